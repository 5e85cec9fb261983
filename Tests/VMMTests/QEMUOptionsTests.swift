import Testing
@testable import VMM

/// QEMU's command line mapped onto `swiftkvm run` (the `kvm` front end), without /dev/kvm.
@Suite("QEMU command line")
struct QEMUOptionsTests {
    func translate(_ build: (inout QEMUOptions) -> Void) throws -> QEMUOptions.Translation {
        var o = QEMUOptions()
        build(&o)
        return try o.runArguments()
    }

    @Test("the seeds' command: -m 384 -cdrom -hda -boot d -no-acpi")
    func seeds() throws {
        let t = try translate { $0.memory = "384"; $0.cdrom = "guestos.iso"; $0.hd[0] = "vm-disk.img"; $0.boot = "d"; $0.noACPI = true }
        #expect(t.arguments == ["--memory", "384M", "--disk", "path=vm-disk.img", "--disk", "path=guestos.iso,media=cdrom",
                                "--debug-exit-port", "none", "--bios", "--boot", "d", "--no-acpi", "--serial", "stdio",
                                "--on-reboot", "restart"])
        #expect(t.notes.first?.contains("no IDE controller") == true)
    }

    @Test("-drive keys, -device attachments, -kernel, NICs, debug-exit, -smp, -name, -serial")
    func mapping() throws {
        let t = try translate {
            $0.drives = ["file=a.qcow2,if=virtio,format=qcow2,cache=none,id=root", "file=b.iso,if=none,id=cd",
                         "file=c.img,if=scsi,readonly=on,index=0"]
            $0.devices = ["scsi-cd,drive=cd,bootindex=1", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
                          "isa-debug-exit,iobase=0xf4,iosize=0x04", "virtio-rng-pci"]
            $0.netdevs = ["tap,id=n0,ifname=tap0,script=no,downscript=no"]
            $0.kernel = "bzImage"; $0.append = "console=ttyS0"
            $0.smp = "cpus=2,maxcpus=2"; $0.name = "guest=vm1"; $0.serial = ["file:/tmp/s.log"]; $0.noReboot = true
        }
        #expect(t.arguments == ["--memory", "128M", "--cpus", "2", "--rng",
                                "--disk", "path=c.img,if=scsi,readonly=on",
                                "--disk", "path=a.qcow2,format=qcow2,cache=none,id=root",
                                "--disk", "path=b.iso,media=cdrom,id=cd,bootindex=1",
                                "--net", "tap=tap0,id=n0,mac=52:54:00:12:34:56", "--debug-exit-port", "0xf4",
                                "--kernel", "bzImage", "--cmdline", "console=ttyS0", "--serial", "file:/tmp/s.log",
                                "--name", "vm1", "--on-reboot", "exit"])
        let user = try translate { $0.netdevs = ["user,id=u,hostfwd=tcp::2222-:22"]; $0.devices = ["virtio-net-pci,netdev=u"] }
        #expect(user.arguments.contains("user,hostfwd=tcp::2222-:22,id=u"))
        let pxe = try translate {
            $0.netdevs = ["tap,id=n0,ifname=tap0,script=no,downscript=no"]; $0.devices = ["virtio-net-pci,netdev=n0,bootindex=0,romfile=/r/pxe.rom"]
            $0.boot = "n"
        }
        #expect(pxe.arguments.contains("tap=tap0,id=n0,bootindex=0,romfile=/r/pxe.rom") && pxe.arguments.contains(["--boot", "n"]), "\(pxe.arguments)")
    }

    @Test("QEMU's UEFI invocation: two if=pflash drives are the firmware code and its variable store")
    func pflash() throws {
        let t = try translate {
            $0.drives = ["if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd", "if=pflash,format=raw,file=vm_VARS.fd"]
            $0.cdrom = "x.iso"
        }
        #expect(t.arguments.contains(["--firmware", "/usr/share/OVMF/OVMF_CODE_4M.fd", "--uefi-vars", "vm_VARS.fd"]))
        #expect(!t.arguments.contains("--bios"))
        let reordered = try translate {
            $0.drives = ["if=pflash,unit=1,file=vars.fd", "if=pflash,unit=0,readonly=on,file=code.fd"]
        }
        #expect(reordered.arguments.contains(["--firmware", "code.fd", "--uefi-vars", "vars.fd"]), "unit= orders them")
    }

    @Test("options it cannot honour are errors naming them", arguments: [
        ("drive", "unknown key 'aio'"), ("driveif", "if=floppy"), ("cdvirtio", "media=cdrom with if=virtio"),
        ("device", "unknown or unsupported device 'e1000'"), ("netdev", "no -device virtio-net-pci,netdev=x"),
        ("none", "if=none, and no -device attaches it"), ("append", "needs -kernel"), ("cpu", "only host"),
        ("smp", "sockets=2"), ("serial", "one serial port"), ("vga", "no graphics card"), ("accel", "KVM only"),
        ("hdc", "IDE index 2 is taken"), ("comma", "comma is not supported"), ("netboot", "bootindex=x: expected a number"), ("script", "add script=no,downscript=no"), ("machine", "'foo=1'"),
    ])
    func refused(kind: String, message: String) {
        #expect {
            try translate { o in
                switch kind {
                case "drive": o.drives = ["file=a.img,aio=native"]
                case "driveif": o.drives = ["file=a.img,if=floppy"]
                case "cdvirtio": o.drives = ["file=a.iso,if=virtio,media=cdrom"]
                case "device": o.devices = ["e1000,netdev=x"]
                case "netdev": o.netdevs = ["user,id=x"]
                case "none": o.drives = ["file=a.img,if=none,id=d"]
                case "append": o.append = "quiet"
                case "cpu": o.cpu = "Skylake-Server"
                case "smp": o.smp = "4,sockets=2"
                case "serial": o.serial = ["stdio", "file:x"]
                case "vga": o.vga = "std"
                case "accel": o.accel = ["tcg"]
                case "hdc": o.hd[2] = "c.img"; o.cdrom = "x.iso"
                case "comma": o.hd[0] = "x,format=qcow2.img"
                case "netboot": o.netdevs = ["user,id=u"]; o.devices = ["virtio-net-pci,netdev=u,bootindex=x"]
                case "script": o.netdevs = ["tap,id=t,ifname=tap0"]; o.devices = ["virtio-net-pci,netdev=t"]
                default: o.machine = "pc,foo=1"
                }
            }
        } throws: { "\($0)".contains(message) }
    }

    @Test("QEMU's key=value lists: ',,' escapes a comma")
    func keyValues() {
        let kv = QEMUOptions.keyValues("file=a,,b.img,if=virtio,readonly")
        #expect(kv.map(\.key) == ["file", "if", "readonly"])
        #expect(kv.map(\.value) == ["a,b.img", "virtio", nil])
    }
}
