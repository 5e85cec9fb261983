import Foundation
import Testing
import VMM

// The lean kernel with its devices on virtio-mmio (`--transport mmio`) and a Firecracker client's `pci=off`: the
// guest finds its disk through the DSDT's LNRO0005 devices (ACPI on) or, with `acpi=off`, through the
// `virtio_mmio.device=` items swiftkvm appends to the command line; it mounts the disk, reads the host's file and
// writes one the host then checks with e2fsck and debugfs, and reads /dev/hwrng; and once through `swiftkvm vmm`'s API
// (virtio-mmio by default) with `pci=off` in boot_args and a root drive, which the guest mounts. About 80 s per boot here.
//
// Gate: SWIFTKVM_SKIP_LINUX=1 skips this suite (local runs only; CI refuses it).

@Suite("Linux: the lean kernel with pci=off uses virtio-mmio devices", .serialized,
       .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"),
       .enabled(if: !LinuxBoot.skipRequested, "SWIFTKVM_SKIP_LINUX=1"))
struct LinuxMMIOTests {
    @Test("the guest mounts an ext4 disk on virtio-mmio found through ACPI (LNRO0005), or through the command line with acpi=off",
          .timeLimit(.minutes(30)), arguments: ["acpi", "cmdline"])
    func mountDisk(route: String) throws {
        let root = GuestTestEnvironment.repoRoot
        let kernel = root.appendingPathComponent("assets/lean/vmlinux").path
        try #require(FileManager.default.fileExists(atPath: kernel),
                     "assets/lean/vmlinux missing: run scripts/guest-kernel (or set SWIFTKVM_SKIP_LINUX=1)")
        try #require(FileManager.default.fileExists(atPath: root.appendingPathComponent("assets/initramfs.cpio").path),
                     "assets/initramfs.cpio missing: run scripts/guest-assets (or set SWIFTKVM_SKIP_LINUX=1)")
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath, "swiftkvm executable not found")
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("swiftkvm-mmio-linux-\(getpid())-\(route)").path
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: work) }
        let data = work + "/data.ext4"
        try LinuxBootTests.makeDisk(["hello.txt": "hello over virtio-mmio 24680\n"], image: data, root: root)

        let cmdline = DefaultGuest.leanCmdline + " pci=off" + (route == "cmdline" ? " acpi=off" : "")
        let child = GuestTestProcess(executable: swiftkvm, arguments: [
            "run", "--guest", "lean", "--transport", "mmio", "--cmdline", cmdline, "--memory", "256M", "--serial", "stdio",
            "--time-dilation", "10", "--disk", "path=\(data),id=data", "--rng", "--log-level", "info",
        ], currentDirectory: root)
        try child.start()
        defer { child.kill() }
        let ready = child.waitFor(LinuxBoot.readyMarker, timeout: LinuxBoot.bootTimeout)
        // The device that bound: an ACPI one (LNRO0005:00) or a command-line one (virtio-mmio.0).
        let bound = route == "acpi" ? "LNRO0005:00" : "virtio-mmio.0"
        let steps: [(command: String, expect: String)] = [
            ("echo bound-$(ls -d /sys/bus/platform/drivers/virtio-mmio/\(bound) | wc -l)-$((1+1))", "bound-1-2"),
            ("echo serial=$(cat /sys/block/vda/serial)", "serial=data"),
            ("mkdir -p /mnt/data && mount -t ext4 /dev/vda /mnt/data && cat /mnt/data/hello.txt", "hello over virtio-mmio 24680"),
            ("echo \"written over mmio $((4*5))\" > /mnt/data/from-guest.txt && sync && umount /mnt/data && echo umounted-$((2+2))",
             "umounted-4"),
            ("echo irq=$(grep -c 'IO-APIC *5-edge *virtio0' /proc/interrupts)", "irq=1"),
            ("echo rngbytes=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | wc -c)", "rngbytes=32"),
        ]
        var answers: [String: Bool] = [:]
        var status: Int32?
        if ready {
            Thread.sleep(forTimeInterval: 2)
            for step in steps {
                child.send(step.command + "\n")
                answers[step.expect] = child.waitFor(step.expect, timeout: 180)
            }
            child.send("poweroff -f\n")
            status = child.waitForExit(timeout: 180)
        } else {
            status = child.waitForExit(timeout: 1)
        }
        let log = child.output
        let context = "\(child.commandLine): exit status \(status.map(String.init) ?? "none")\n"
            + log.split(separator: "\n").suffix(60).joined(separator: "\n")
        #expect(ready, "no \(LinuxBoot.readyMarker)\n\(context)")
        #expect(log.contains("virtio_mmio.device=4K@0xf0000000:5 virtio_mmio.device=4K@0xf0001000:6"), "command line items\n\(context)")
        #expect(log.contains("virtio-blk \(data) (16777216 bytes) at MMIO 0xf0000000 IRQ 5"), "\(context)")
        #expect(!log.contains("Kernel panic"), "\(context)")
        #expect(!log.contains("pci 0000:00:01.0"), "pci=off: no PCI enumeration\n\(context)")
        for step in steps {
            #expect(answers[step.expect] == true, "`\(step.command)` did not print \(step.expect)\n\(context)")
        }
        if status != nil {
            let fsck = try ProcessRunner.run("/usr/sbin/e2fsck", ["-fn", data])
            #expect(fsck.status == 0, "e2fsck -fn: status \(fsck.status)\n\(fsck.stdout)\(fsck.stderr)")
            let cat = try ProcessRunner.run("/usr/sbin/debugfs", ["-R", "cat /from-guest.txt", data])
            #expect(cat.stdout == "written over mmio 20\n", "debugfs cat /from-guest.txt: \(cat.stdout.debugDescription)")
        }
        Attachment.record(log, named: "linux-mmio-\(route).log")
    }

    @Test("through swiftkvm vmm's API (virtio-mmio by default, as Firecracker) with pci=off in boot_args and a root drive, the guest mounts the drive",
          .timeLimit(.minutes(20)))
    func apiBoot() throws {
        let root = GuestTestEnvironment.repoRoot
        let kernel = root.appendingPathComponent("assets/lean/vmlinux").path
        let initrd = root.appendingPathComponent("assets/" + DefaultGuest.initrdName).path
        try #require(FileManager.default.fileExists(atPath: kernel), "assets/lean/vmlinux missing: run scripts/guest-kernel")
        try #require(FileManager.default.fileExists(atPath: initrd), "assets/initramfs.cpio missing: run scripts/guest-assets")
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath, "swiftkvm executable not found")
        let dir = MCTempDir(prefix: "lmmio")
        defer { dir.remove() }
        let disk = dir.path + "/rootfs.ext4"
        try LinuxBootTests.makeDisk(["hello.txt": "root drive over the API 13579\n"], image: disk, root: root)
        let args = DefaultGuest.leanCmdline + " " + TimeDilation.cmdlineParameters(factor: 10, hostTSCkHz: MCSupport.tscKHz) + " pci=off"
        let sock = dir.path + "/api.sock"
        let vmm = try MCChild(swiftkvm, ["vmm", "--api-sock", sock, "--level", "Info"], stdinPipe: true)
        defer { vmm.stop() }
        #expect(MCSupport.wait(seconds: 10) { FileManager.default.fileExists(atPath: sock) })
        #expect(MCSupport.apiCall(sock, "PUT", "/boot-source",
                                  #"{"kernel_image_path": "\#(kernel)", "initrd_path": "\#(initrd)", "boot_args": "\#(args)"}"#) == "204")
        #expect(MCSupport.apiCall(sock, "PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 256}"#) == "204")
        #expect(MCSupport.apiCall(sock, "PUT", "/drives/rootfs",
                                  #"{"drive_id": "rootfs", "path_on_host": "\#(disk)", "is_root_device": true, "is_read_only": false}"#) == "204")
        #expect(MCSupport.apiCall(sock, "PUT", "/actions", #"{"action_type": "InstanceStart"}"#) == "204")
        let ready = vmm.stdout.waitFor(LinuxBoot.readyMarker, timeout: LinuxBoot.bootTimeout)
        try #require(ready, "no \(LinuxBoot.readyMarker): \(vmm.stdout.text.suffix(3000)) / \(vmm.stderr.text.suffix(1000))")
        Thread.sleep(forTimeInterval: 2)
        vmm.writeInput("mkdir -p /mnt/r && mount -t ext4 /dev/vda /mnt/r && cat /mnt/r/hello.txt && echo acpi-$(ls /sys/bus/platform/drivers/virtio-mmio | grep -c LNRO0005)-dev\n")
        #expect(vmm.stdout.waitFor("root drive over the API 13579", timeout: 180), "\(vmm.stdout.text.suffix(2000))")
        #expect(vmm.stdout.waitFor("acpi-1-dev", timeout: 60), "the disk is the DSDT's LNRO0005 device: \(vmm.stdout.text.suffix(2000))")
        let text = vmm.stdout.text
        #expect(text.contains("root=/dev/vda rw"), "the root drive's root= on the command line")
        #expect(text.contains("virtio_mmio.device=4K@0xf0000000:5"), "the drive announced on the command line")
        #expect(!text.contains("Kernel panic"))
        vmm.writeInput("umount /mnt/r; poweroff -f\n")
    }
}
