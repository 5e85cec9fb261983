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

    @Test("with --log-level debug, a guest's read of an unhandled port (logged on its vCPU thread) does not trip that thread's seccomp filter")
    func vcpuThreadLogging() throws {
        var rom = [UInt8](repeating: 0xf4, count: 0x10000)
        rom.replaceSubrange(0xfff0..<0xfff5, with: [0xea, 0x10, 0xff, 0x00, 0xf0])          // jmp far F000:FF10
        rom.replaceSubrange(0xff10..<0xff17, with: [0xe4, 0x99, 0xb0, 0x2a, 0xe6, 0xf4, 0xf4]) // in al,0x99; mov al,0x2a; out 0xf4,al; hlt
        let path = try ProcessRunner.temporaryFile(rom, name: "unhandled-port.rom")
        defer { ProcessRunner.removeTemporary(path) }
        let r = try ProcessRunner.runSwiftKVM(["run", "--firmware", path, "--memory", "16M", "--log-level", "debug"], timeout: 60)
        #expect(r.status == 85, "status \(r.status)\n\(r.stderr)")
        #expect(r.stderr.contains("unhandled port read at 0x99"), "\(r.stderr)")
    }

    @Test("bad firmware input exits 2 with a message naming the problem", arguments: [
        ("missing", "cannot read"), ("big", "larger than its window"), ("odd", "4 KiB pages"), ("kernel", "only a bzImage"),
        ("initrd", "need --kernel"),
    ])
    func badInput(kind: String, message: String) throws {
        var args = ["run", "--memory", "16M"]
        var temp: String?
        switch kind {
        case "missing": args += ["--firmware", "/nonexistent/bios.bin"]
        case "big": temp = try ProcessRunner.temporaryFile([UInt8](repeating: 0, count: 17 << 20), name: "big.rom")
        case "odd": temp = try ProcessRunner.temporaryFile([UInt8](repeating: 0, count: 1000), name: "odd.rom")
        case "initrd": args += ["--bios", "--initrd", "/bin/true"]
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

    @Test("OVMF (Debian's OVMF.fd as a 2 MiB ROM) starts at the reset vector; on this PVM host SEC's x87 setup fails to emulate in ring 0, which is reported with the instruction's bytes (exit 4), never a hang",
          .enabled(if: GuestTestEnvironment.isPVMHost, "measures the PVM host's limit; a hardware KVM host runs OVMF's SEC natively"),
          .enabled(if: FileManager.default.fileExists(atPath: "/usr/share/ovmf/OVMF.fd"), "needs Debian's ovmf"))
    func ovmfOnPVM() throws {
        let r = try ProcessRunner.runSwiftKVM(["run", "--firmware", "/usr/share/ovmf/OVMF.fd", "--memory", "256M", "--serial", "none"],
                                              timeout: 120)
        #expect(r.status == 4, "status \(r.status)\n\(r.stderr)")
        #expect(r.stderr.contains("KVM internal error") && r.stderr.contains("instruction bytes"), "\(r.stderr)")
        print("# OVMF on this host: \(r.stderr.split(separator: "\n").last ?? "")")
        // The split image with its variable store (--uefi: OVMF_CODE_4M.fd, a per-VM copy of OVMF_VARS_4M.fd as CFI
        // flash below it) gets as far; a second VM on the same store is refused.
        let vars = FileManager.default.temporaryDirectory.appendingPathComponent("swiftkvm-vars-\(getpid()).fd").path
        defer { try? FileManager.default.removeItem(atPath: vars) }
        let u = try ProcessRunner.runSwiftKVM(["run", "--uefi", "--uefi-vars", vars, "--memory", "256M", "--serial", "none",
                                               "--log-level", "info"], timeout: 120)
        #expect(u.status == 4 && u.stderr.contains("as CFI flash at 0xffc00000"), "\(u.stderr)")
        #expect((try? FileManager.default.attributesOfItem(atPath: vars)[.size] as? Int) == 540672, "created from the template")
    }

    /// A bzImage whose real-mode setup is a test: entered by the option ROM at 0x1020:0 with DS = 0x1000, it checks
    /// the command line at 0x20000 ("fwk"), type_of_loader (0xb0) and ramdisk_size (1234) in its own header, then
    /// writes 0x2a (all good, status 85) or 0x15 (status 43) to the debug-exit port.
    static func setupTestBzImage() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 1024)
        b[0x1f1] = 1                                               // one setup sector
        b[0x1fe] = 0x55; b[0x1ff] = 0xaa
        b[0x200] = 0xeb; b[0x201] = 0x6a                           // jmp 0x26c (end of the header)
        b.replaceSubrange(0x202..<0x206, with: Array("HdrS".utf8))
        b[0x206] = 0x0f; b[0x207] = 0x02                           // protocol 2.15
        b[0x211] = 0x01                                            // LOADED_HIGH
        b[0x216] = 0x10                                            // code32_start 0x100000
        b[0x22c] = 0xff; b[0x22d] = 0xff; b[0x22e] = 0xff; b[0x22f] = 0x37  // initrd_addr_max
        b[0x232] = 0x20                                            // kernel_alignment 2 MiB
        b[0x236] = 0x01                                            // XLF_KERNEL_64
        b[0x261] = 0x10                                            // init_size 0x1000
        b[0x1f4] = 0x20                                            // syssize: 0x200 bytes
        var code: [UInt8] = [0xb8, 0x00, 0x20, 0x8e, 0xc0, 0xb3, 0x15]   // mov ax,0x2000; mov es,ax; mov bl,0x15
        var jumps: [Int] = []
        func check(_ bytes: [UInt8]) { code += bytes + [0x75, 0]; jumps.append(code.count - 1) }
        for (i, c) in Array("fwk".utf8 + [0]).enumerated() { check([0x26, 0x80, 0x3e, UInt8(i), 0x00, c]) }  // cmp byte es:[i], c
        check([0x80, 0x3e, 0x10, 0x02, 0xb0])                      // cmp byte [0x210], 0xb0
        check([0x81, 0x3e, 0x1c, 0x02, 0xd2, 0x04])                // cmp word [0x21c], 1234
        code += [0xb3, 0x2a]                                       // mov bl, 0x2a
        let fail = code.count
        for j in jumps { code[j] = UInt8(fail - (j + 1)) }
        code += [0x88, 0xd8, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd]         // mov al,bl; out 0xf4,al; hlt; jmp hlt
        b.replaceSubrange(0x26c..<0x26c + code.count, with: code)
        return b + [UInt8](repeating: 0xf4, count: 0x200)
    }

    @Test("--bios --kernel: SeaBIOS runs QEMU's linuxboot_dma.bin, which reads the setup, kernel, initrd and command line from fw_cfg by DMA and enters the setup",
          .enabled(if: FileManager.default.fileExists(atPath: "/usr/share/seabios/bios.bin")
                   && FileManager.default.fileExists(atPath: "/usr/share/qemu/linuxboot_dma.bin"), "needs seabios and qemu-system-data"))
    func firmwareKernel() throws {
        let kernel = try ProcessRunner.temporaryFile(Self.setupTestBzImage(), name: "setup-test.bzImage")
        let initrd = try ProcessRunner.temporaryFile((0..<1234).map { UInt8(truncatingIfNeeded: $0) }, name: "initrd.img")
        defer { ProcessRunner.removeTemporary(kernel); ProcessRunner.removeTemporary(initrd) }
        let start = Date()
        let r = try ProcessRunner.runSwiftKVM(["run", "--bios", "--kernel", kernel, "--initrd", initrd, "--cmdline", "fwk",
                                               "--memory", "64M", "--log-level", "info"], timeout: 180)
        #expect(r.status == 85, "status \(r.status) (43: the setup found a wrong header or command line)\n\(r.stdout)\n\(r.stderr)")
        #expect(r.stderr.contains("firmware: Searching bootorder for: /rom@genroms/linuxboot_dma.bin"), "\(r.stderr)")
        print("# SeaBIOS + linuxboot_dma.bin to the kernel's setup code: \(String(format: "%.1f", Date().timeIntervalSince(start))) s")
    }
}

/// Multiboot kernels that load low (issue 14 part 6): the boot area goes above the highest segment, as QEMU puts it.
@Suite("multiboot low load", .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"))
struct MultibootLowLoadTests {
    /// An a.out-kludge multiboot kernel loaded at 0x8000 (entry 0x8020) that checks EAX, that EBX and ESP are above
    /// its image, that the stack works and that the command line starts with 'l', then writes 0x2a (status 85) or
    /// 0x15 (status 43) to the debug-exit port.
    static func lowKernel() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 0x20)
        let magic: UInt32 = 0x1bad_b002, flags: UInt32 = 0x1_0000
        for (i, v) in [magic, flags, 0 &- (magic &+ flags), 0x8000, 0x8000, 0, 0, 0x8020].enumerated() {
            for k in 0..<4 { b[i * 4 + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(k))) }
        }
        var code: [UInt8] = [], jumps: [Int] = []
        func check(_ bytes: [UInt8], jump: UInt8) { code += bytes + [jump, 0]; jumps.append(code.count - 1) }
        check([0x3d, 0x02, 0xb0, 0xad, 0x2b], jump: 0x75)               // cmp eax, 0x2badb002; jne fail
        check([0x81, 0xfb, 0x00, 0x90, 0x00, 0x00], jump: 0x72)         // cmp ebx, 0x9000; jb fail
        check([0x81, 0xfc, 0x00, 0x90, 0x00, 0x00], jump: 0x72)         // cmp esp, 0x9000; jb fail
        code += [0x50, 0x59, 0x8b, 0x73, 0x10]                          // push eax; pop ecx; mov esi, [ebx+16]
        check([0x80, 0x3e, 0x6c], jump: 0x75)                           // cmp byte [esi], 'l'; jne fail
        code += [0xb0, 0x2a, 0xe6, 0xf4, 0xf4]                          // mov al, 0x2a; out 0xf4, al; hlt
        let fail = code.count
        for j in jumps { code[j] = UInt8(fail - (j + 1)) }
        code += [0xb0, 0x15, 0xe6, 0xf4, 0xf4]                          // fail: mov al, 0x15; out 0xf4, al; hlt
        return b + code
    }

    @Test("a multiboot kernel with its segment at 0x8000 runs: the info, command line and stack are above it")
    func segmentAt0x8000() throws {
        let path = try ProcessRunner.temporaryFile(Self.lowKernel(), name: "low.mb")
        defer { ProcessRunner.removeTemporary(path) }
        let r = try ProcessRunner.runSwiftKVM(["run", "--kernel", path, "--cmdline", "low kernel", "--memory", "16M"], timeout: 60)
        #expect(r.status == 85, "status \(r.status) (43: a check failed)\n\(r.stderr)")
    }
}

/// kvm-unit-tests (a built tree named by `KVM_UNIT_TESTS`, e.g. `./configure && make x86/smptest.flat`): a standard
/// x86 test kernel reads the CPU count from fw_cfg with no extra input (without fw_cfg it sees 65535 CPUs and waits).
@Suite("kvm-unit-tests", .enabled(if: GuestTestEnvironment.kvmAvailable
                                  && ProcessInfo.processInfo.environment["KVM_UNIT_TESTS"] != nil, "kvm-unit-tests is not packaged in Debian and this host has no other network: set KVM_UNIT_TESTS to a built tree"))
struct KVMUnitTestsTests {
    @Test("x86/smptest with 2 vCPUs finds 2 CPUs through fw_cfg, brings the AP up and passes (status 1)")
    func smptest() throws {
        let dir = ProcessInfo.processInfo.environment["KVM_UNIT_TESTS"] ?? ""
        let r = try ProcessRunner.runSwiftKVM(["run", "--kernel", dir + "/x86/smptest.flat", "--cpus", "2", "--memory", "256M"],
                                              timeout: 120)
        #expect(r.stdout.contains("found 2 cpus") && r.stdout.contains("PASS: IPI to each CPU"), "\(r.stdout)\n\(r.stderr)")
        #expect(r.status == 1, "kvm-unit-tests exit 0 through isa-debug-exit: status 1\n\(r.stdout)")
    }
}
