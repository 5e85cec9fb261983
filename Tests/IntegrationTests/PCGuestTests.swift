import Foundation
import Testing
import VMM

// The PC pieces standard x86 test kernels expect (issue 14): fw_cfg, the RTC's update cycle and
// interrupts, and the ACPI PM timer, each checked by a freestanding guest program.
@Suite("PC devices under swiftkvm run (fw_cfg, RTC, PM timer)", .serialized,
       .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"))
struct PCGuestTests {
    @Test("fwcfg: signature, ID with DMA, CPU count, RAM size, the file directory and DMA reads reach the guest",
          arguments: [(1, 64), (3, 192)])
    func fwcfg(cpus: Int, ramMB: Int) throws {
        let r = try runGuestProgram(programArguments("fwcfg", cmdline: "cpus=\(cpus) ram_mb=\(ramMB)")
                                    + ["--cpus", "\(cpus)", "--memory", "\(ramMB)M"])
        expectPass(r, checks: ["signature", "id-dma", "dma-signature", "cpu-count", "ram-size", "numa-none", "file-dir",
                               "dma-read", "e820-ram", "dma-skip", "dma-write-refused"])
        #expect(r.lines.contains("FWCFG cpus=\(cpus) ram=\(ramMB << 20) files=6"), "\(r.output)")
    }

    @Test("rtc_irq: UIP rises and falls once per RTC second; the alarm, update-ended and periodic interrupts arrive on IRQ 8")
    func rtcInterrupts() throws {
        let r = try runGuestProgram(programArguments("rtc_irq", cmdline: "timeout=20000"), timeout: 240)
        expectPass(r, checks: ["uip-cycle", "alarm-irq", "update-irq", "periodic-irq"])
    }

    @Test("pmtimer: the FADT's 32-bit PM timer counts at 3.579545 MHz against the TSC (20 % tolerance: the host is noisy)")
    func pmTimer() throws {
        let khz = TimeDilation.hostTSCkHz()
        let r = try runGuestProgram(programArguments("pmtimer", cmdline: "tsc_khz=\(khz) tolerance=20"), timeout: 240)
        expectPass(r, checks: ["fadt", "pmtimer-fadt", "pmtimer-monotonic", "tsc-rate-known", "pmtimer-rate"])
    }
}

/// Firmware boots under `swiftkvm run --firmware/--bios` (issue 14, part 2).
@Suite("firmware boot", .serialized, .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"))
struct FirmwareBootTests {
    /// A 64 KiB firmware: the reset vector far-jumps into the shadow at F000:FF10, which writes 0x2a to
    /// the debug-exit port (status 85).
    static func resetVectorImage() -> [UInt8] {
        var rom = [UInt8](repeating: 0xf4, count: 0x10000)            // hlt everywhere
        rom.replaceSubrange(0xfff0..<0xfff5, with: [0xea, 0x10, 0xff, 0x00, 0xf0])   // jmp far F000:FF10
        rom.replaceSubrange(0xff10..<0xff15, with: [0xb0, 0x2a, 0xe6, 0xf4, 0xf4])   // mov al,0x2a; out 0xf4,al; hlt
        return rom
    }

    @Test("a program at the reset vector runs in real mode from 0xFFFFFFF0 and jumps into its shadow below 1 MiB")
    func resetVector() throws {
        let path = try ProcessRunner.temporaryFile(Self.resetVectorImage(), name: "reset-vector.rom")
        defer { ProcessRunner.removeTemporary(path) }
        let r = try ProcessRunner.runSwiftKVM(["run", "--firmware", path, "--memory", "16M"], timeout: 60)
        #expect(r.status == 85, "status \(r.status)\n\(r.stderr)")
    }

    @Test("bad firmware input exits 2 with a message naming the problem", arguments: [
        ("missing", "cannot read"), ("big", "larger than its window"), ("odd", "64 KiB"), ("kernel", "not supported yet"),
    ])
    func badInput(kind: String, message: String) throws {
        var args = ["run", "--memory", "16M"]
        var temp: String?
        switch kind {
        case "missing": args += ["--firmware", "/nonexistent/bios.bin"]
        case "big": temp = try ProcessRunner.temporaryFile([UInt8](repeating: 0, count: 0x80000), name: "big.rom")
        case "odd": temp = try ProcessRunner.temporaryFile([UInt8](repeating: 0, count: 1000), name: "odd.rom")
        default: args += ["--bios", "--kernel", "/bin/true"]
        }
        if let temp { args += ["--firmware", temp] }
        defer { temp.map(ProcessRunner.removeTemporary) }
        let r = try ProcessRunner.runSwiftKVM(args, timeout: 60)
        #expect(r.status == 2, "status \(r.status)\n\(r.stderr)")
        #expect(r.stderr.contains(message), "\(r.stderr)")
    }

    @Test("SeaBIOS (--bios) starts at the reset vector, reads fw_cfg (DMA, CPU count, e820) and reaches its boot attempt on the serial console (sercon)",
          .enabled(if: FileManager.default.fileExists(atPath: "/usr/share/seabios/bios.bin"), "needs Debian's seabios"))
    func seabios() throws {
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath)
        let child = GuestTestProcess(executable: swiftkvm, arguments: ["run", "--bios", "--memory", "64M", "--cpus", "2",
                                                                       "--log-level", "info", "--serial", "stdio"])
        let start = Date()
        try child.start()
        // SeaBIOS tries its boot devices, finds none and waits 60 s before rebooting: stop it once it said so.
        let reached = child.waitFor("No bootable device", timeout: 120)
        let elapsed = Date().timeIntervalSince(start)
        child.kill()
        let out = child.output
        #expect(reached, "\(out)")
        #expect(out.contains("SeaBIOS (version"), "\(out)")
        #expect(out.contains("firmware: Found QEMU fw_cfg") && out.contains("QEMU fw_cfg DMA interface supported"), "\(out)")
        #expect(out.contains("Found 2 cpu(s)"), "the CPU count from fw_cfg\n\(out)")
        #expect(out.contains("qemu/e820: addr 0x0000000000000000 len 0x0000000004000000 [RAM]"), "\(out)")
        print("# SeaBIOS: reset vector to \"No bootable device\" in \(String(format: "%.2f", elapsed)) s")
    }
}
