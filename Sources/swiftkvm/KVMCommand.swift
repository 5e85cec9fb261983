import ArgumentParser
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// `swiftkvm kvm`, or the binary run as `kvm` / `qemu-system-x86_64`: QEMU's command line, mapped onto
/// `swiftkvm run` (`QEMUOptions`). Options it does not know, or sub-options it cannot honour, are errors that
/// name them (exit 2).
struct KVMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kvm",
        abstract: "Run a VM from QEMU's command line (kvm -m 384 -cdrom x.iso -hda disk.img -boot d).",
        discussion: """
        Without -kernel the machine boots SeaBIOS; -kernel boots the kernel directly. -hda…-hdd and if=ide drives \
        are virtio-blk disks and -cdrom a virtio-scsi CD-ROM (there is no IDE controller). The guest reboots on reset \
        unless -no-reboot is given. Exit codes as `swiftkvm run`.
        """)

    @Option(name: .customShort("m"), help: "Guest RAM (MiB, or with a K/M/G suffix).")
    var memory: String?
    @Option(name: .customLong("smp", withSingleDash: true), help: "CPU count: N or cpus=N.")
    var smp: String?
    @Option(name: .customLong("cdrom", withSingleDash: true), help: "CD-ROM image (virtio-scsi).")
    var cdrom: String?
    @Option(name: .customLong("hda", withSingleDash: true), help: "Disk image, IDE index 0 (virtio-blk).")
    var hda: String?
    @Option(name: .customLong("hdb", withSingleDash: true), help: "Disk image, IDE index 1.")
    var hdb: String?
    @Option(name: .customLong("hdc", withSingleDash: true), help: "Disk image, IDE index 2.")
    var hdc: String?
    @Option(name: .customLong("hdd", withSingleDash: true), help: "Disk image, IDE index 3.")
    var hdd: String?
    @Option(name: .customLong("drive", withSingleDash: true),
            help: "file=F[,if=ide|virtio|scsi|pflash|none][,format=raw|qcow2][,media=disk|cdrom][,readonly=on][,cache=writeback|none][,index=N][,id=ID] (repeatable).")
    var drives: [String] = []
    @Option(name: .customLong("boot", withSingleDash: true), help: "Boot order: c, d, or order=…[,menu=on][,strict=on].")
    var boot: String?
    @Flag(name: .customLong("no-acpi", withSingleDash: true), help: "No ACPI tables (an MP table describes the machine).")
    var noACPI = false
    @Option(name: .customLong("kernel", withSingleDash: true), help: "Kernel to boot directly (bzImage, ELF, multiboot).")
    var kernel: String?
    @Option(name: .customLong("initrd", withSingleDash: true), help: "Initial ramdisk.")
    var initrd: String?
    @Option(name: .customLong("append", withSingleDash: true), help: "Kernel command line.")
    var append: String?
    @Option(name: .customLong("bios", withSingleDash: true), help: "Firmware image (default: SeaBIOS).")
    var bios: String?
    @Flag(name: .customLong("nographic", withSingleDash: true), help: "Accepted: the console is the serial port on stdio.")
    var nographic = false
    @Option(name: .customLong("serial", withSingleDash: true), help: "stdio, mon:stdio, file:PATH or none.")
    var serial: [String] = []
    @Flag(name: .customLong("enable-kvm", withSingleDash: true), help: "Accepted: SwiftKVM always uses KVM.")
    var enableKVM = false
    @Option(name: .customLong("accel", withSingleDash: true), help: "kvm only.")
    var accel: [String] = []
    @Option(name: .customLong("cpu", withSingleDash: true), help: "host (or max).")
    var cpu: String?
    @Option(name: .customLong("name", withSingleDash: true), help: "VM name (NAME or guest=NAME).")
    var name: String?
    @Option(name: .customLong("netdev", withSingleDash: true), help: "tap,id=ID,ifname=TAP[,script=no,downscript=no] | bridge,id=ID,br=BR | user,id=ID[,hostfwd=tcp::H-:G].")
    var netdevs: [String] = []
    @Option(name: .customLong("device", withSingleDash: true), help: "virtio-net-pci,netdev=ID[,mac=MAC], virtio-blk-pci|scsi-hd|scsi-cd,drive=ID[,bootindex=N], virtio-scsi-pci, virtio-rng-pci, virtio-balloon-pci, isa-debug-exit[,iobase=P].")
    var devices: [String] = []
    @Option(name: [.customShort("M"), .customLong("machine", withSingleDash: true)], help: "pc or q35 (SwiftKVM's PC either way)[,accel=kvm].")
    var machine: String?
    @Option(name: .customLong("display", withSingleDash: true), help: "none only.")
    var display: String?
    @Option(name: .customLong("vga", withSingleDash: true), help: "none only.")
    var vga: String?
    @Option(name: .customLong("monitor", withSingleDash: true), help: "none only.")
    var monitor: String?
    @Flag(name: .customLong("no-reboot", withSingleDash: true), help: "Exit on guest reset instead of rebooting.")
    var noReboot = false
    @Argument(help: "Disk image (as -hda).")
    var image: String?

    var options: QEMUOptions {
        var o = QEMUOptions()
        o.memory = memory; o.smp = smp; o.cdrom = cdrom
        for (i, f) in [hda, hdb, hdc, hdd].enumerated() { if let f { o.hd[i] = f } }
        o.drives = drives; o.boot = boot; o.noACPI = noACPI
        o.kernel = kernel; o.initrd = initrd; o.append = append; o.bios = bios
        o.serial = serial; o.cpu = cpu; o.name = name; o.netdevs = netdevs; o.devices = devices
        o.machine = machine; o.accel = accel; o.display = display; o.vga = vga; o.monitor = monitor
        o.noReboot = noReboot; o.image = image
        return o
    }

    func run() throws {
        let translation: QEMUOptions.Translation
        do {
            translation = try options.runArguments()
        } catch {
            RunMain.fail("\(error)")
            throw ExitCode(MachineExit.usageExitCode)
        }
        for n in translation.notes {
            let line = "kvm: note: \(n)\n"
            _ = line.withCString { write(STDERR_FILENO, $0, strlen($0)) }
        }
        let run: RunCommand
        do {
            run = try RunCommand.parse(translation.arguments)
        } catch {
            RunMain.fail(RunCommand.message(for: error))
            throw ExitCode(MachineExit.usageExitCode)
        }
        throw ExitCode(RunMain.execute(run))
    }
}
