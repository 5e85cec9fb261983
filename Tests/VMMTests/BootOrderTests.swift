import Boot
import GuestMemory
import Testing
@testable import VMM

/// `--boot`, `bootindex=` and the fw_cfg `bootorder` file they make (no /dev/kvm).
@Suite("boot order")
struct BootOrderTests {
    let disk = BootDevice.virtioBlock(slot: 1, bootIndex: nil, label: "disk.img")
    let cd = BootDevice.scsi(slot: 2, target: 0, cdrom: true, bootIndex: nil, label: "a.iso")
    let scsiDisk = BootDevice.scsi(slot: 2, target: 1, cdrom: false, bootIndex: nil, label: "b.img")

    @Test("QEMU's device paths: virtio-blk and virtio-scsi units (hex slots)")
    func paths() {
        #expect(disk.path == "/pci@i0cf8/scsi@1/disk@0,0")
        #expect(cd.path == "/pci@i0cf8/scsi@2/channel@0/disk@0,0")
        #expect(BootDevice.virtioBlock(slot: 12, bootIndex: nil, label: "").path == "/pci@i0cf8/scsi@c/disk@0,0")
    }

    @Test("--boot letters order the kinds; bootindex comes first; strict adds HALT; the default is disks then CD-ROMs")
    func order() throws {
        #expect(try BootOrder.lines(devices: [disk, cd, scsiDisk], spec: nil) == [disk.path, scsiDisk.path, cd.path])
        #expect(try BootOrder.lines(devices: [disk, cd, scsiDisk], spec: BootOrderSpec(parsing: "d"))
                == [cd.path])
        #expect(try BootOrder.lines(devices: [disk, cd], spec: BootOrderSpec(parsing: "order=dc,strict=on"))
                == [cd.path, disk.path, "HALT"])
        var indexed = scsiDisk
        indexed.bootIndex = 1
        var first = cd
        first.bootIndex = 0
        #expect(try BootOrder.lines(devices: [disk, first, indexed], spec: BootOrderSpec(parsing: "c")) == [cd.path, scsiDisk.path, disk.path])
        #expect(try BootOrderSpec(parsing: "order=c,menu=on").menu)
        #expect(try BootOrderSpec(parsing: "dc,menu=on") == BootOrderSpec(order: [.cdrom, .disk], menu: true), "QEMU's implied order=")
        #expect(try BootOrder.lines(devices: [disk, cd], spec: BootOrderSpec(parsing: "strict=on")) == [disk.path, cd.path, "HALT"],
                "no order: the default one, then HALT")
        #expect(try BootOrder.lines(devices: [], spec: BootOrderSpec(parsing: "strict=on")) == [], "no lone HALT")
    }

    @Test("bad --boot values and orders name the problem", arguments: [
        ("x", "unknown boot device 'x'"), ("a", "floppy"), ("cc", "given twice"), ("order=", "no boot devices"),
        ("order=c,splash=x", "unknown key 'splash'"), ("strict=maybe", "expected on or off"), ("c,d", "unknown boot device ','"), ("order=c,d", "not KEY=VALUE"),
    ])
    func badSpec(text: String, message: String) {
        #expect { try BootOrderSpec(parsing: text) } throws: { "\($0)".contains(message) }
    }

    @Test("an order naming a kind without devices (network boot without a NIC with a boot ROM) and a shared bootindex are refused")
    func badOrder() throws {
        #expect { try BootOrder.lines(devices: [disk], spec: BootOrderSpec(parsing: "d")) } throws: { "\($0)".contains("names no device") }
        #expect { try BootOrder.lines(devices: [disk], spec: BootOrderSpec(parsing: "n")) } throws: {
            "\($0)".contains("names no device") && "\($0)".contains("PXE boot ROM") && "\($0)".contains("ipxe-qemu")
        }
        var a = disk, b = cd
        a.bootIndex = 2; b.bootIndex = 2
        #expect { try BootOrder.lines(devices: [a, b], spec: nil) } throws: { "\($0)".contains("given to both disk.img and a.iso") }
    }

    @Test("a NIC with a boot ROM is /pci@i0cf8/ethernet@SLOT (SeaBIOS matches its ROM by slot); --boot n puts it first, bootindex before everything")
    func network() throws {
        let nic = BootDevice.network(slot: 3, bootIndex: nil, label: "NIC net0")
        #expect(nic.path == "/pci@i0cf8/ethernet@3")
        #expect(BootDevice.network(slot: 10, bootIndex: nil, label: "").path == "/pci@i0cf8/ethernet@a")
        #expect(try BootOrder.lines(devices: [disk, cd, nic], spec: BootOrderSpec(parsing: "nc")) == [nic.path, disk.path])
        #expect(try BootOrder.lines(devices: [disk, nic], spec: nil) == [disk.path], "not in the default order")
        var first = nic
        first.bootIndex = 0
        #expect(try BootOrder.lines(devices: [disk, first], spec: nil) == [nic.path, disk.path])
    }

    @Test("--net romfile= and bootindex=; the kvm front end's -device virtio-net-pci,bootindex=,romfile= map onto them")
    func netKeys() throws {
        let n = try NetSpec(parsing: "tap=tap0,romfile=/x/pxe.rom,bootindex=2")
        #expect(n.romFile == "/x/pxe.rom" && n.bootIndex == 2)
        #expect(try NetSpec(parsing: "tap=tap0,romfile=").romFile == "")
        #expect(try NetSpec(parsing: "tap=tap0").romFile == nil)
        #expect { try NetSpec(parsing: "tap=tap0,bootindex=x") } throws: { "\($0)".contains("bootindex=x: expected 0 to 9999") }
    }

    @Test("--disk if=, media=, bootindex= and --boot validation")
    func diskKeys() throws {
        let cdrom = try DiskSpec(parsing: "path=x.iso,media=cdrom,bootindex=3")
        #expect(cdrom.isSCSI && cdrom.isCDROM && cdrom.readOnly && cdrom.bootIndex == 3)
        #expect(try DiskSpec(parsing: "path=x.img,if=scsi").isSCSI)
        #expect { try DiskSpec(parsing: "path=x.iso,media=cdrom,if=virtio") } throws: { "\($0)".contains("needs if=scsi") }
        #expect { try DiskSpec(parsing: "path=x.iso,media=cdrom,readonly=off") } throws: { "\($0)".contains("read-only") }
        #expect { try DiskSpec(parsing: "path=x.img,if=ide") } throws: { "\($0)".contains("expected virtio or scsi") }
        var config = VMConfiguration(payload: .kernel(path: "k", initrd: nil, cmdline: "", modules: []))
        config.boot = try BootOrderSpec(parsing: "c")
        #expect { try config.validate(hostMemory: nil) } throws: { "\($0)".contains("firmware boots") }
    }

    @Test("the machine's fw_cfg bootorder file lists the devices in order; --boot menu=on sets the boot menu item")
    func firmwareItems() throws {
        var config = VMConfiguration(payload: .firmware(FirmwareSpec(path: "/usr/share/seabios/bios.bin")))
        config.boot = try BootOrderSpec(parsing: "order=dc,menu=on")
        let memory = try GuestMemory.allocate(size: 32 << 20)
        let items = try Machine.firmwareConfigItems(config: config, memory: memory, acpi: ACPIConfiguration(cpus: 1),
                                                    bootDevices: [disk, cd])
        #expect(items.file("bootorder") == Array("\(cd.path)\n\(disk.path)\n".utf8))
    }
}
