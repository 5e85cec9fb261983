import Foundation
import Testing
import VMM

/// Bootable ISOs made in the test with GRUB's `grub-mkrescue` (Debian grub-pc-bin, grub-common, xorriso, mtools).
enum GrubISO {
    static let mkrescue = "/usr/bin/grub-mkrescue"
    static var available: Bool {
        FileManager.default.fileExists(atPath: mkrescue) && FileManager.default.fileExists(atPath: "/usr/lib/grub/i386-pc")
            && FileManager.default.fileExists(atPath: "/usr/bin/xorriso")
    }

    /// Makes an ISO in `dir` whose only menu entry (on GRUB's serial terminal, no timeout) runs `commands`;
    /// `files` are copied into /boot. Returns its path.
    static func make(in dir: URL, name: String, commands: [String], files: [String: String] = [:]) throws -> String {
        let root = dir.appendingPathComponent("\(name)-root")
        try FileManager.default.createDirectory(at: root.appendingPathComponent("boot/grub"), withIntermediateDirectories: true)
        for (target, source) in files {
            try FileManager.default.copyItem(atPath: source, toPath: root.appendingPathComponent("boot/\(target)").path)
        }
        let cfg = ["serial --unit=0 --speed=115200", "terminal_input serial", "terminal_output serial", "set timeout=0",
                   "set gfxpayload=text", "menuentry \"\(name)\" {"] + commands.map { "  " + $0 } + ["}", ""]
        try cfg.joined(separator: "\n").write(to: root.appendingPathComponent("boot/grub/grub.cfg"), atomically: true, encoding: .utf8)
        let iso = dir.appendingPathComponent("\(name).iso").path
        let r = try ProcessRunner.run(mkrescue, ["-o", iso, root.path], timeout: 120)
        guard r.status == 0 else {
            throw ProcessRunner.LaunchError(description: "grub-mkrescue failed (\(r.status)): \(r.stderr)")
        }
        return iso
    }

    /// An ISO that multiboot-loads guest program `program` with `cmdline`.
    static func program(in dir: URL, name: String, program: String, cmdline: String) throws -> String {
        try make(in: dir, name: name, commands: ["multiboot /boot/prog.elf \(cmdline)", "boot"],
                 files: ["prog.elf": GuestTestEnvironment.guestImage(program)])
    }
}

/// Firmware boots of ISOs (issue 14): SeaBIOS reads GRUB from a virtio-scsi CD-ROM (El Torito) or from the same
/// ISO as a virtio-blk disk (isohybrid), in the order `--boot` gives; GRUB multiboot-loads a guest program, which
/// reports through debug-exit, or powers the machine off through ACPI.
@Suite("firmware ISO boot", .serialized,
       .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"),
       .enabled(if: FileManager.default.fileExists(atPath: "/usr/share/seabios/bios.bin"), "needs Debian's seabios"),
       .enabled(if: GrubISO.available, "needs grub-pc-bin, grub-common and xorriso (scripts/install-deps)"))
struct FirmwareISOTests {
    /// A directory for one test's ISOs and disks (each test removes it).
    let dir: URL = {
        let d = FileManager.default.temporaryDirectory.appendingPathComponent("swiftkvm-iso-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try? FileManager.default.createDirectory(at: d, withIntermediateDirectories: true)
        return d
    }()
    func cleanUp() { try? FileManager.default.removeItem(at: dir) }

    /// Runs `swiftkvm run --bios` with `args`; returns the report of the guest program (or of the power-off).
    func boot(_ args: [String], timeout: TimeInterval = 300) throws -> GuestReport {
        if let error = GuestTestEnvironment.guestBuildError { Issue.record("\(error)") }
        let start = Date()
        let r = try runGuestProgram(["--bios", "--memory", "128M", "--serial", "stdio", "--log-level", "info"] + args, timeout: timeout)
        print("# firmware ISO boot \(args.joined(separator: " ")): \(String(format: "%.1f", Date().timeIntervalSince(start))) s, status \(String(describing: r.status))")
        return r
    }

    @Test("--boot d: SeaBIOS boots GRUB from the virtio-scsi CD-ROM (El Torito), not the empty disk before it; GRUB loads the program")
    func cdromFirst() throws {
        defer { cleanUp() }
        let iso = try GrubISO.program(in: dir, name: "cd", program: "boot", cmdline: "booted-from=cd")
        let empty = dir.appendingPathComponent("empty.raw").path
        _ = FileManager.default.createFile(atPath: empty, contents: Data(count: 16 << 20))
        let r = try boot(["--disk", "path=\(empty),format=raw", "--cdrom", iso, "--boot", "d"])
        expectPass(r, checks: ["multiboot-magic", "cmdline"])
        #expect(r.output.contains("\"booted-from=cd\""), "\(r.output)")
        #expect(r.output.contains("Booting from DVD/CD"), "\(r.output)")
        #expect(r.output.contains("firmware boot order: /pci@i0cf8/scsi@2/channel@0/disk@0,0"), "\(r.output)")
    }

    @Test("--boot c: the disk (an isohybrid ISO on virtio-blk) boots before the CD-ROM")
    func diskFirst() throws {
        defer { cleanUp() }
        let cd = try GrubISO.program(in: dir, name: "cd2", program: "boot", cmdline: "booted-from=cd")
        let disk = try GrubISO.program(in: dir, name: "disk", program: "boot", cmdline: "booted-from=disk")
        let r = try boot(["--disk", "path=\(disk),readonly=on", "--cdrom", cd, "--boot", "c"])
        expectPass(r, checks: ["multiboot-magic", "cmdline"])
        #expect(r.output.contains("\"booted-from=disk\""), "\(r.output)")
        #expect(r.output.contains("Booting from Hard Disk"), "\(r.output)")
    }

    @Test("S3 through SeaBIOS: GRUB loads the s3 program; on the wake SeaBIOS reads CMOS shutdown status 0xFE and jumps to the FACS waking vector")
    func suspendThroughFirmware() throws {
        defer { cleanUp() }
        let iso = try GrubISO.program(in: dir, name: "s3", program: "s3", cmdline: "s3")
        let r = try boot(["--cdrom", iso])
        expectPass(r, checks: ["resumed", "ram-kept", "wake-status"])
        #expect(r.output.contains("firmware: In resume (status=254)") && r.output.contains("Jump to resume vector"), "\(r.output)")
    }

    @Test("GRUB's halt powers the machine off through ACPI (_S5 found through the RSDT): exit status 0")
    func grubHalt() throws {
        defer { cleanUp() }
        let iso = try GrubISO.make(in: dir, name: "halt", commands: ["echo grub-is-halting", "halt"])
        let r = try boot(["--cdrom", iso])
        #expect(r.status == 0, "\(r.output)")
        #expect(r.output.contains("grub-is-halting"), "\(r.output)")
    }

    @Test("the seeds' flow verbatim: swiftkvm img create -f qcow2 vm-disk.img 4G, then kvm -m 384 -cdrom that.iso -hda vm-disk.img -boot d (and with -no-acpi) reaches the program",
          arguments: [false, true])
    func seedsFlow(noACPI: Bool) throws {
        defer { cleanUp() }
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath)
        let iso = try GrubISO.program(in: dir, name: "seed", program: "boot", cmdline: "seed-flow")
        let create = try ProcessRunner.runSwiftKVM(["img", "create", "-f", "qcow2", dir.appendingPathComponent("vm-disk.img").path, "4G"])
        try #require(create.status == 0, "\(create.stderr)")
        // The binary under the name `kvm`, as a user would link it.
        let kvm = dir.appendingPathComponent("kvm").path
        try FileManager.default.createSymbolicLink(atPath: kvm, withDestinationPath: swiftkvm)
        let args = (noACPI ? ["-no-acpi"] : []) + ["-m", "384", "-cdrom", iso, "-hda", dir.appendingPathComponent("vm-disk.img").path, "-boot", "d"]
        let child = GuestTestProcess(executable: kvm, arguments: args, currentDirectory: dir)
        let start = Date()
        try child.start()
        // Without -device isa-debug-exit the program's report is its output; it then halts (power-off, status 0).
        let reached = child.waitFor("RESULT pass", timeout: 300)
        let status = child.waitForExit(timeout: 30)
        child.kill()
        let out = child.output
        print("# kvm \(args.joined(separator: " ")): program reached in \(String(format: "%.1f", Date().timeIntervalSince(start))) s")
        #expect(reached && out.contains("RESULT pass 7 fail 0") && out.contains("\"seed-flow\""), "\(out)")
        #expect(out.contains("kvm: note: no IDE controller"), "\(out)")
        #expect(status == 0, "\(out)")
    }

    @Test("bad input exits 2 naming it: an image that is not an ISO, a missing one, a boot order naming no device",
          arguments: [("notiso", "not an ISO 9660 or UDF image"), ("missing", "nonexistent.iso"), ("order", "'d' names no device")])
    func badInput(kind: String, message: String) throws {
        defer { cleanUp() }
        let junk = dir.appendingPathComponent("junk.img").path
        _ = FileManager.default.createFile(atPath: junk, contents: Data(count: 64 << 10))
        let args: [String] = switch kind {
        case "notiso": ["--cdrom", junk]
        case "missing": ["--cdrom", "/nonexistent.iso"]
        default: ["--disk", "path=\(junk),format=raw", "--boot", "d"]
        }
        let r = try ProcessRunner.runSwiftKVM(["run", "--bios", "--memory", "32M"] + args, timeout: 60)
        #expect(r.status == 2, "status \(r.status)\n\(r.stderr)")
        #expect(r.stderr.contains(message), "\(r.stderr)")
    }

    /// Linux through firmware on a disk: SeaBIOS boots GRUB from an isohybrid image on virtio-blk, GRUB loads the stock
    /// kernel and the default initramfs, which prints its ready marker. On this PVM host the kernel's own decompressor
    /// and early boot are emulated ring-0 code (hours; HOST-KVM.md), so the test runs only where asked.
    static let firmwareLinux = ProcessInfo.processInfo.environment["SWIFTKVM_FIRMWARE_LINUX"] == "1"

    @Test("Linux through firmware: GRUB on a disk image loads the stock kernel and initramfs, which reaches its ready marker",
          .enabled(if: Self.firmwareLinux, "Linux through firmware decompresses in the guest, hours on PVM hosts: set SWIFTKVM_FIRMWARE_LINUX=1 on a hardware KVM host"))
    func linuxThroughFirmware() throws {
        defer { cleanUp() }
        let assets = GuestTestEnvironment.repoRoot.appendingPathComponent("assets").path
        let kernel = assets + "/" + DefaultGuest.kernelName, initrd = assets + "/" + DefaultGuest.initrdName
        try #require(FileManager.default.fileExists(atPath: kernel) && FileManager.default.fileExists(atPath: initrd),
                     "assets missing: run scripts/guest-assets")
        let image = try GrubISO.make(in: dir, name: "linux",
                                     commands: ["linux /boot/vmlinuz \(DefaultGuest.cmdline)", "initrd /boot/initramfs.cpio", "boot"],
                                     files: ["vmlinuz": kernel, "initramfs.cpio": initrd])
        let limit = Double(ProcessInfo.processInfo.environment["SWIFTKVM_FIRMWARE_LINUX_SECONDS"] ?? "") ?? 600
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath)
        let child = GuestTestProcess(executable: swiftkvm, arguments: ["run", "--bios", "--memory", "512M", "--serial", "stdio",
                                                                       "--disk", "path=\(image),readonly=on"])
        let start = Date()
        try child.start()
        let ready = child.waitFor(LinuxBoot.readyMarker, timeout: limit)
        let seconds = Date().timeIntervalSince(start)
        child.kill()
        let out = child.output
        for marker in ["Welcome to GRUB", "Linux version", "Run /init", LinuxBoot.readyMarker] {
            print("# firmware Linux: \(marker): \(out.contains(marker) ? "reached" : "not reached") (run \(Int(seconds)) s)")
        }
        #expect(ready, "no \(LinuxBoot.readyMarker) within \(Int(limit)) s\n\(out.suffix(4000))")
    }
}
