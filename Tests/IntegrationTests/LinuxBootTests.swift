import Foundation
import Testing

// One boot of the default guest with the lean kernel (assets/lean/vmlinux from scripts/guest-kernel, and
// assets/initramfs.cpio from scripts/guest-assets) per test run: it proves the core VMM and the machine at once.
// The lean kernel has every virtio driver built in, so it reaches its shell in a fraction of the stock kernel's
// time on PVM hosts (guest kernel code is emulated; HOST-KVM.md). The stock kernel keeps one boot in the suite:
// APITests/LinuxAPIBootTests.
//
// `swiftkvm run --guest lean` (the default initramfs and the lean kernel's default cmdline), 2 vCPUs, two ext4
// disks built on the host (one read-only), virtio-rng and virtio-console, console on stdio, guest time dilated
// 10x, plus a virtio-scsi disk and CD-ROM. The kernel log is checked (e820, 8250, RTC, ACPI, SMP, PCI, virtio, SCSI),
// then the shell is driven: CPUs, disk reads and writes, a read-only disk refusing writes, hvc0, /dev/hwrng, the SCSI
// disk (sd) and the CD-ROM (sr: the ISO's checksum, writes refused), power-off through ACPI. Afterwards the host
// checks the disks with e2fsck and debugfs.
//
// Gate: SWIFTKVM_SKIP_LINUX=1 skips this suite (local runs only; CI refuses it). Without the gate the test FAILS
// when the assets are missing or the boot does not reach the shell: it never skips because of a VMM gap.

enum LinuxBoot {
    static let skipRequested = ProcessInfo.processInfo.environment["SWIFTKVM_SKIP_LINUX"] == "1"
    static let readyMarker = "SWIFTKVM-READY"
    static let bootTimeout: TimeInterval = 25 * 60
}

@Suite("Linux: the default guest boots to its shell under swiftkvm and uses the machine's devices", .serialized,
       .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"),
       .enabled(if: !LinuxBoot.skipRequested, "SWIFTKVM_SKIP_LINUX=1"))
struct LinuxBootTests {
    /// Builds an ext4 image from `files` with scripts/make-ext4.
    static func makeDisk(_ files: [String: String], image: String, root: URL) throws {
        let dir = image + ".d"
        try? FileManager.default.removeItem(atPath: dir)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for (name, text) in files {
            try text.write(toFile: dir + "/" + name, atomically: true, encoding: .utf8)
        }
        let r = try ProcessRunner.run(root.appendingPathComponent("scripts/make-ext4").path, [dir, image, "16M"])
        try #require(r.status == 0, "scripts/make-ext4 failed: \(r.stderr)")
    }

    @Test("the lean kernel boots with 2 CPUs, ACPI, PCI and virtio; its shell reads and writes an ext4 disk, sees a read-only disk, hvc0 and hwrng, a virtio-scsi disk (sd) and CD-ROM (sr), and powers off",
          .timeLimit(.minutes(30)))
    func bootToShell() throws {
        let root = GuestTestEnvironment.repoRoot
        let kernel = root.appendingPathComponent("assets/lean/vmlinux").path
        let initrd = root.appendingPathComponent("assets/initramfs.cpio").path
        try #require(FileManager.default.fileExists(atPath: kernel),
                     "assets/lean/vmlinux missing: run scripts/guest-kernel (or set SWIFTKVM_SKIP_LINUX=1)")
        try #require(FileManager.default.fileExists(atPath: initrd),
                     "assets/initramfs.cpio missing: run scripts/guest-assets (or set SWIFTKVM_SKIP_LINUX=1)")
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath,
                                    "swiftkvm executable not found (build it, or set SWIFTKVM_BIN)")

        let work = FileManager.default.temporaryDirectory.appendingPathComponent("swiftkvm-linux-\(getpid())").path
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: work) }
        let data = work + "/data.ext4", readOnly = work + "/ro.ext4"
        try Self.makeDisk(["hello.txt": "hello from the host 12345\n"], image: data, root: root)
        try Self.makeDisk(["readme.txt": "read-only disk 67890\n"], image: readOnly, root: root)
        let readOnlyBefore = try Data(contentsOf: URL(fileURLWithPath: readOnly))
        // A virtio-scsi disk and CD-ROM (an ISO made with xorriso), read through Linux's sd and sr drivers.
        let scsiDisk = work + "/scsi.ext4", isoDir = work + "/iso.d", iso = work + "/cd.iso"
        try Self.makeDisk(["scsi.txt": "scsi disk 24680\n"], image: scsiDisk, root: root)
        try FileManager.default.createDirectory(atPath: isoDir, withIntermediateDirectories: true)
        try String(repeating: "a CD-ROM file\n", count: 5000).write(toFile: isoDir + "/cd.txt", atomically: true, encoding: .utf8)
        let mkiso = try ProcessRunner.run("/usr/bin/xorriso", ["-as", "mkisofs", "-quiet", "-o", iso, isoDir])
        try #require(mkiso.status == 0, "xorriso failed: \(mkiso.stderr)")
        let isoMD5 = try ProcessRunner.run("/usr/bin/md5sum", [iso]).stdout.prefix(32)
        let isoSize = try Data(contentsOf: URL(fileURLWithPath: iso)).count

        let child = GuestTestProcess(executable: swiftkvm, arguments: [
            "run", "--guest", "lean", "--memory", "256M", "--cpus", "2", "--serial", "stdio", "--time-dilation", "10",
            "--disk", "path=\(data),id=data", "--disk", "path=\(readOnly),readonly=on,id=ro",
            "--disk", "path=\(scsiDisk),if=scsi,id=scsi0", "--cdrom", iso,
            "--rng", "--virtio-console",
        ], currentDirectory: root)
        let started = Date()
        try child.start()
        defer { child.kill() }

        let ready = child.waitFor(LinuxBoot.readyMarker, timeout: LinuxBoot.bootTimeout)
        let bootSeconds = Int(Date().timeIntervalSince(started))
        var status: Int32?
        // Each command prints a marker computed by the shell, so the echoed command line never matches.
        var answers: [String: Bool] = [:]
        let steps: [(command: String, expect: String)] = [
            ("echo hello-$((6*7))", "hello-42"),
            ("echo nproc=$(nproc)", "nproc=2"),
            ("echo id-vda=$(cat /sys/block/vda/serial) id-vdb=$(cat /sys/block/vdb/serial)", "id-vda=data id-vdb=ro"),
            ("mkdir -p /mnt/data /mnt/ro && mount -t ext4 /dev/vda /mnt/data && echo mounted-$((1+1))", "mounted-2"),
            ("cat /mnt/data/hello.txt", "hello from the host 12345"),
            ("echo \"guest wrote this $((3*5))\" > /mnt/data/from-guest.txt && sync && umount /mnt/data && echo umounted-$((2+2))",
             "umounted-4"),
            ("echo ro-flag=$(cat /sys/block/vdb/ro)", "ro-flag=1"),
            ("mount -t ext4 -o ro /dev/vdb /mnt/ro && cat /mnt/ro/readme.txt", "read-only disk 67890"),
            ("dd if=/dev/zero of=/dev/vdb bs=512 count=1 2>/dev/null; echo ro-dd-status=$(( $? != 0 ))", "ro-dd-status=1"),
            ("umount /mnt/ro; echo hvc-$((20+22)) > /dev/hvc0", "hvc-42"),
            ("echo rng=$(cat /sys/class/misc/hw_random/rng_current)", "rng=virtio_rng"),
            ("echo rngbytes=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | wc -c)", "rngbytes=32"),
            ("echo sd-vendor=$(cat /sys/block/sda/device/vendor) sr0-removable=$(cat /sys/block/sr0/removable)",
             "sd-vendor=SWIFTKVM sr0-removable=1"),
            ("mkdir -p /mnt/s && mount -t ext4 /dev/sda /mnt/s && cat /mnt/s/scsi.txt", "scsi disk 24680"),
            ("echo \"scsi write $((4*6))\" > /mnt/s/w.txt && sync && umount /mnt/s && echo scsi-umounted-$((3+3))", "scsi-umounted-6"),
            ("echo cdsum=$(md5sum /dev/sr0 | cut -c1-32) cdsize=$(blockdev --getsize64 /dev/sr0)",
             "cdsum=\(isoMD5) cdsize=\(isoSize)"),
            ("dd if=/dev/zero of=/dev/sr0 bs=2048 count=1 2>/dev/null; echo sr-dd-status=$(( $? != 0 ))", "sr-dd-status=1"),
        ]
        if ready {
            // Let the shell start on the console, then drive it.
            Thread.sleep(forTimeInterval: 2)
            for step in steps {
                child.send(step.command + "\n")
                answers[step.expect] = child.waitFor(step.expect, timeout: 180)
            }
            child.send("poweroff -f\n")
            status = child.waitForExit(timeout: 180)
        } else {
            // Exited early (its status says how), or still running after the timeout (killed).
            status = child.waitForExit(timeout: 1)
        }
        let log = child.output
        let tail = log.split(separator: "\n").suffix(80).joined(separator: "\n")
        let context = "\(child.commandLine): after \(bootSeconds) s, exit status \(status.map(String.init) ?? "none (killed)")"
        func has(_ pattern: String) -> Bool { log.range(of: pattern, options: .regularExpression) != nil }

        #expect(ready, "no \(LinuxBoot.readyMarker) within \(Int(LinuxBoot.bootTimeout)) s\n\(context)")
        // The kernel log: memory map, serial driver, RTC, clocksource, init (issue 2).
        #expect(has(#"BIOS-e820: \[mem 0x0+-0x[0-9a-f]+\] usable"#), "no e820 line for usable memory at 0\n\(context)")
        #expect(has(#"BIOS-e820: \[mem 0x0*100000-0x[0-9a-f]+\] usable"#), "no usable e820 range at 1 MiB\n\(context)")
        #expect(has(#"Serial: 8250/16550 driver"#), "no 8250 driver line\n\(context)")
        #expect(has(#"ttyS0 at I/O 0x3f8 \(irq = 4, base_baud = 115200\) is a 16550A"#),
                "ttyS0 not detected as a 16550A at 0x3f8 on IRQ 4\n\(context)")
        #expect(has(#"rtc_cmos [\w:]+: registered as rtc0"#), "no rtc_cmos registration line\n\(context)")
        #expect(has(#"clocksource: Switched to clocksource \w+"#), "no clocksource switch\n\(context)")
        #expect(has(#"Run /init as init process"#), "init not started\n\(context)")
        #expect(!has(#"Kernel panic"#), "kernel panic\n\(context)")
        #expect(!has(#"(?i)internal error"#), "an emulation failure was reported\n\(context)")
        // ACPI, SMP, PCI and virtio (issue 4).
        #expect(has(#"ACPI: RSDP 0x0*[0-9A-F]+ \d+ \(v02"#), "the kernel did not find our RSDP\n\(context)")
        #expect(!has(#"ACPI (BIOS )?Error|\[Firmware Bug\]|FW BUG|ACPI Warning"#), "ACPI firmware-bug lines\n\(context)")
        #expect(has(#"smp: Brought up 1 node, 2 CPUs"#), "both CPUs not brought up\n\(context)")
        #expect(has(#"pci 0000:00:00\.0: \[8086:0d57\]"#), "host bridge not enumerated\n\(context)")
        #expect(has(#"pci 0000:00:01\.0: \[1af4:1042\]"#), "virtio-blk (1af4:1042) not enumerated at 00:01.0\n\(context)")
        #expect(has(#"pci 0000:00:0[0-9a-f]\.0: \[1af4:1043\]"#), "virtio-console (1af4:1043) not enumerated\n\(context)")
        #expect(has(#"pci 0000:00:0[0-9a-f]\.0: \[1af4:1044\]"#), "virtio-rng (1af4:1044) not enumerated\n\(context)")
        #expect(has(#"virtio_blk virtio\d: \[vda\] 32768 512-byte logical blocks"#), "vda (16 MiB) not attached\n\(context)")
        #expect(has(#"scsi 0:0:0:0: Direct-Access +SWIFTKVM +VIRTUAL DISK"#), "virtio-scsi disk not found\n\(context)")
        #expect(has(#"scsi 0:0:1:0: CD-ROM +SWIFTKVM +VIRTUAL CD-ROM"#), "virtio-scsi CD-ROM not found\n\(context)")
        #expect(has(#"sr 0:0:1:0: \[sr0\] scsi3-mmc drive"#), "the sr driver did not take the CD-ROM\n\(context)")
        // The console.
        for step in steps {
            #expect(answers[step.expect] == true, "`\(step.command)` did not print \(step.expect)\n\(context)")
        }
        #expect(status == 0, "exit status after `poweroff -f` (ACPI S5)\n\(context)")

        // The host's view of the disks after the guest powered off.
        if status != nil {
            let fsck = try ProcessRunner.run("/usr/sbin/e2fsck", ["-fn", data])
            #expect(fsck.status == 0, "e2fsck -fn on the guest-written disk: status \(fsck.status)\n\(fsck.stdout)\(fsck.stderr)")
            let cat = try ProcessRunner.run("/usr/sbin/debugfs", ["-R", "cat /from-guest.txt", data])
            #expect(cat.stdout == "guest wrote this 15\n", "debugfs cat /from-guest.txt: \(cat.stdout.debugDescription)")
            let readOnlyAfter = try Data(contentsOf: URL(fileURLWithPath: readOnly))
            #expect(readOnlyAfter == readOnlyBefore, "the read-only disk's file changed")
            let scsiFsck = try ProcessRunner.run("/usr/sbin/e2fsck", ["-fn", scsiDisk])
            #expect(scsiFsck.status == 0, "e2fsck -fn on the SCSI disk: status \(scsiFsck.status)\n\(scsiFsck.stdout)")
            let scsiCat = try ProcessRunner.run("/usr/sbin/debugfs", ["-R", "cat /w.txt", scsiDisk])
            #expect(scsiCat.stdout == "scsi write 24\n", "debugfs cat /w.txt on the SCSI disk: \(scsiCat.stdout.debugDescription)")
        }
        if !(ready && status == 0 && answers.values.allSatisfy { $0 }) {
            Issue.record("last 80 lines of the guest's console (the whole log is attached as linux-console.log):\n\(tail)")
        }
        // Saved when the tests run with --attachments-path.
        Attachment.record(log, named: "linux-console.log")
    }
}

@Suite("Linux: the lean kernel's bzImage entered at its own 64-bit entry (in-guest decompression)",
       .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"),
       .enabled(if: !LinuxBoot.skipRequested, "SWIFTKVM_SKIP_LINUX=1"))
struct LinuxBzImageEntryTests {
    @Test("--kernel-entry bzimage: the LZ4 bzImage decompresses itself in the guest and reaches the shell", .timeLimit(.minutes(15)))
    func bzImageEntry() throws {
        let root = GuestTestEnvironment.repoRoot
        let kernel = root.appendingPathComponent("assets/lean/bzImage").path
        try #require(FileManager.default.fileExists(atPath: kernel), "assets/lean/bzImage missing: run scripts/guest-kernel")
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath, "swiftkvm executable not found")
        let child = GuestTestProcess(executable: swiftkvm, arguments: [
            "run", "--kernel", kernel, "--kernel-entry", "bzimage", "--initrd", root.appendingPathComponent("assets/initramfs.cpio").path,
            "--cmdline", "console=ttyS0 reboot=k panic=-1 tsc=reliable noxsave mitigations=off rodata=off nosoftlockup clearcpuid=popcnt,fsgsbase,smap,erms,fsrm,aes,pclmulqdq,ssse3,sse4_1,sse4_2,sha_ni,gfni,vaes,vpclmulqdq",
            "--memory", "256M", "--time-dilation", "10", "--serial", "stdio",
        ], currentDirectory: root)
        try child.start()
        defer { child.kill() }
        let ready = child.waitFor(LinuxBoot.readyMarker, timeout: LinuxBoot.bootTimeout)
        var status: Int32?
        if ready {
            child.send("poweroff -f\n")
            status = child.waitForExit(timeout: 180)
        }
        let tail = child.output.split(separator: "\n").suffix(40).joined(separator: "\n")
        #expect(ready, "no \(LinuxBoot.readyMarker)\n\(tail)")
        #expect(child.output.contains("Run /init as init process"), "\(tail)")
        #expect(!child.output.contains("Kernel panic"), "\(tail)")
        #expect(status == 0, "exit status after poweroff -f\n\(tail)")
    }
}

@Suite("The lean guest kernel's config fragment")
struct LeanKernelConfigTests {
    @Test("guest/kernel/lean.config applies to the packaged linux-source (scripts/guest-kernel --check)",
          .timeLimit(.minutes(5)))
    func fragmentApplies() throws {
        let root = GuestTestEnvironment.repoRoot
        let r = try ProcessRunner.run(root.appendingPathComponent("scripts/guest-kernel").path, ["--check"], timeout: 280)
        #expect(r.status == 0, "scripts/guest-kernel --check: status \(r.status)\n\(r.stdout)\(r.stderr)")
        #expect(r.stderr.contains("guest/kernel/lean.config applies to linux-source-6.1"), "\(r.stderr)")
    }

    @Test("the built lean kernel was made from the current fragment: assets/lean/config holds every fragment line")
    func builtFromFragment() throws {
        let root = GuestTestEnvironment.repoRoot
        let built = root.appendingPathComponent("assets/lean/config").path
        try #require(FileManager.default.fileExists(atPath: built), "assets/lean/config missing: run scripts/guest-kernel")
        let config = Set(try String(contentsOfFile: built, encoding: .utf8).split(separator: "\n").map(String.init))
        let fragment = try String(contentsOfFile: root.appendingPathComponent("guest/kernel/lean.config").path, encoding: .utf8)
        for line in fragment.split(separator: "\n").map(String.init) where line.hasPrefix("CONFIG_") {
            #expect(config.contains(line), "the built kernel lacks \(line)")
        }
    }
}
