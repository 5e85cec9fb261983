import Boot
import Devices
import Foundation
import GuestMemory
import Testing
@testable import VMM

/// The fw_cfg items a machine gets (no /dev/kvm: the items are built from the configuration and memory alone).
@Suite("machine fw_cfg items")
struct FirmwareConfigMachineTests {
    func read(_ dev: FWCfg, key: UInt16, count: Int) -> [UInt8] {
        var sel = [UInt8(key & 0xff), UInt8(key >> 8)]
        sel.withUnsafeBytes { dev.write(offset: 0, data: $0) }
        var out = [UInt8](repeating: 0, count: count)
        out.withUnsafeMutableBytes { buf in
            for i in 0..<count { dev.read(offset: 1, data: UnsafeMutableRawBufferPointer(rebasing: buf[i..<i + 1])) }
        }
        return out
    }

    @Test("every machine's items: RAM, CPUs, NUMA, and the files bootorder, etc/e820, sercon port and the ACPI trio")
    func items() throws {
        var config = VMConfiguration(payload: .flat(FlatImage(path: "/dev/null", loadAddress: 0x100000, entry: 0x100000, mode: .long)))
        config.cpus = 3
        let memory = try GuestMemory.allocate(size: 96 << 20)
        let items = try Machine.firmwareConfigItems(config: config, memory: memory, acpi: ACPIConfiguration(cpus: 3))
        #expect(items.fileNames == ["bootorder", "etc/acpi/rsdp", "etc/acpi/tables", "etc/e820", "etc/sercon-port", "etc/table-loader"])
        #expect(items.file("bootorder") == [])
        #expect(items.file("etc/sercon-port") == [0xf8, 0x03])
        let e820 = try #require(items.file("etc/e820"))
        #expect(e820.count == 40 && e820.getLE(UInt64.self, at: 8) == 96 << 20 && e820.getLE(UInt64.self, at: 20) == Machine.identityMapAddress)
        let dev = FWCfg(items: items, memory: memory)
        #expect(read(dev, key: FWCfgItems.Key.nbCPUs, count: 2) == [3, 0])
        #expect(read(dev, key: FWCfgItems.Key.maxCPUs, count: 2) == [3, 0])
        #expect(read(dev, key: FWCfgItems.Key.ramSize, count: 8) == [0, 0, 0, 6, 0, 0, 0, 0])
        #expect(read(dev, key: FWCfgItems.Key.nbCPUs | FWCfgItems.Key.archLocal, count: 2) == [0, 0], "0x8005 is not NB_CPUS")
        #expect(read(dev, key: FWCfgItems.Key.numa, count: 32) == [UInt8](repeating: 0, count: 32), "no nodes, then CPU 0-2 on node 0")
    }

    @Test("a firmware boot with a kernel adds the -kernel items, linuxboot_dma.bin under genroms/ and a bootorder naming it",
          .enabled(if: FileManager.default.fileExists(atPath: Machine.linuxBootROM), "needs qemu-system-data"))
    func kernelItems() throws {
        // A minimal bzImage: one setup sector, protocol 2.15, LOADED_HIGH, XLF_KERNEL_64, 0x200 bytes of kernel.
        var b = [UInt8](repeating: 0, count: 1024)
        b[0x1f1] = 1; b[0x1fe] = 0x55; b[0x1ff] = 0xaa; b[0x201] = 0x6a
        b.replaceSubrange(0x202..<0x206, with: Array("HdrS".utf8))
        b[0x206] = 0x0f; b[0x207] = 0x02; b[0x211] = 1; b[0x236] = 1; b[0x261] = 0x10; b[0x1f4] = 0x20
        b.putLE(UInt32(0x37ff_ffff), at: 0x22c)
        let kernel = b + [UInt8](repeating: 0x90, count: 0x200)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("swk-fwk-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        try Data(kernel).write(to: dir.appendingPathComponent("bzImage"))
        try Data([1, 2, 3]).write(to: dir.appendingPathComponent("initrd"))
        let spec = FirmwareSpec(path: "/usr/share/seabios/bios.bin", kernel: dir.appendingPathComponent("bzImage").path,
                                initrd: dir.appendingPathComponent("initrd").path, cmdline: "console=ttyS0")
        let memory = try GuestMemory.allocate(size: 64 << 20)
        let items = try Machine.firmwareConfigItems(config: VMConfiguration(payload: .firmware(spec)), memory: memory,
                                                    acpi: ACPIConfiguration(cpus: 1))
        #expect(items.file("bootorder") == Array("/rom@genroms/linuxboot_dma.bin\n".utf8))
        #expect(items.file("genroms/linuxboot_dma.bin")?.prefix(2) == [0x55, 0xaa], "an option ROM")
        let dev = FWCfg(items: items, memory: memory)
        typealias Key = FWCfgItems.Key
        #expect(read(dev, key: Key.setupAddr, count: 4) == [0, 0, 1, 0])
        #expect(read(dev, key: Key.setupSize, count: 4) == [0, 4, 0, 0])
        #expect(read(dev, key: Key.kernelAddr, count: 4) == [0, 0, 0x10, 0])
        #expect(read(dev, key: Key.kernelSize, count: 4) == [0, 2, 0, 0])
        #expect(read(dev, key: Key.kernelData, count: 4) == [0x90, 0x90, 0x90, 0x90])
        #expect(read(dev, key: Key.initrdSize, count: 4) == [3, 0, 0, 0])
        #expect(read(dev, key: Key.initrdData, count: 3) == [1, 2, 3])
        #expect(read(dev, key: Key.cmdlineAddr, count: 4) == [0, 0, 2, 0])
        #expect(read(dev, key: Key.cmdlineData, count: 14) == Array("console=ttyS0".utf8) + [0])
        let setup = read(dev, key: Key.setupData, count: 1024)
        #expect(setup[0x210] == 0xb0 && setup.getLE(UInt32.self, at: 0x228) == 0x20000 && setup.getLE(UInt32.self, at: 0x21c) == 3)
        // A kernel that is not a bzImage is refused.
        try Data([0x7f, 0x45, 0x4c, 0x46]).write(to: dir.appendingPathComponent("bzImage"))
        #expect(throws: BootError.self) {
            _ = try Machine.firmwareConfigItems(config: VMConfiguration(payload: .firmware(spec)), memory: memory, acpi: ACPIConfiguration(cpus: 1))
        }
    }
}
