import Testing
@testable import Boot
import GuestMemory

/// fw_cfg content for firmware: the table-loader applied as SeaBIOS applies it must give the same
/// tables `ACPITables.build` writes for direct boots; `etc/e820`; the `-kernel` items.
@Suite("firmware configuration files")
struct FirmwareConfigTests {
    /// Runs `loader` over `files` the way firmware does; returns each file's bytes and address.
    func apply(_ loader: [UInt8], files: [String: [UInt8]], high: UInt64, fseg: UInt64) throws -> [String: (UInt64, [UInt8])] {
        var placed: [String: (UInt64, [UInt8])] = [:]
        var next = (high: high, fseg: fseg)
        func name(_ e: ArraySlice<UInt8>) -> String { String(decoding: e.prefix { $0 != 0 }, as: UTF8.self) }
        #expect(loader.count % TableLoader.entrySize == 0)
        for start in stride(from: 0, to: loader.count, by: TableLoader.entrySize) {
            let e = Array(loader[start..<start + TableLoader.entrySize])
            switch e.getLE(UInt32.self, at: 0) {
            case 1:
                let file = name(e[4..<60]), align = UInt64(e.getLE(UInt32.self, at: 60)!), zone = e[64]
                let bytes = try #require(files[file], "ALLOCATE of unknown \(file)")
                var at = zone == 2 ? next.fseg : next.high
                at = (at + align - 1) & ~(align - 1)
                if zone == 2 { next.fseg = at + UInt64(bytes.count) } else { next.high = at + UInt64(bytes.count) }
                placed[file] = (at, bytes)
            case 2:
                let dest = name(e[4..<60]), src = name(e[60..<116])
                let offset = Int(e.getLE(UInt32.self, at: 116)!), size = Int(e[120])
                #expect(size == 4 || size == 8)
                var d = try #require(placed[dest]), s = try #require(placed[src])
                _ = s
                var v: UInt64 = 0
                for i in 0..<size { v |= UInt64(d.1[offset + i]) << (8 * i) }
                v &+= placed[src]!.0
                for i in 0..<size { d.1[offset + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
                placed[dest] = d
                s = placed[src]!
            case 3:
                let file = name(e[4..<60])
                let offset = Int(e.getLE(UInt32.self, at: 60)!), first = Int(e.getLE(UInt32.self, at: 64)!)
                let length = Int(e.getLE(UInt32.self, at: 68)!)
                var f = try #require(placed[file])
                #expect(f.1[offset] == 0, "checksum field of \(file) at \(offset) is 0 before ADD_CHECKSUM")
                f.1[offset] = 0 &- f.1[first..<first + length].reduce(0, &+)
                placed[file] = f
            default:
                Issue.record("unknown command \(e.getLE(UInt32.self, at: 0) ?? 0)")
            }
        }
        return placed
    }

    @Test("etc/table-loader applied to etc/acpi/tables and etc/acpi/rsdp gives the tables ACPITables builds at that address",
          arguments: [1, 4])
    func tableLoader(cpus: Int) throws {
        var config = ACPIConfiguration(cpus: cpus)
        config.ecamBase = 0xe000_0000
        let fw = try FirmwareACPI(config)
        let placed = try apply(fw.loader.bytes, files: [FirmwareACPI.tablesFile: fw.tables, FirmwareACPI.rsdpFile: fw.rsdp],
                               high: 0x7fe_0000, fseg: 0xf5a20)
        let (tablesAt, tables) = try #require(placed[FirmwareACPI.tablesFile])
        let (rsdpAt, rsdp) = try #require(placed[FirmwareACPI.rsdpFile])
        #expect(tablesAt % 64 == 0 && rsdpAt % 16 == 0 && rsdpAt >= 0xf0000 && rsdpAt < 0x100000)
        let reference = try ACPITables.build(config, at: tablesAt)
        #expect(Array(tables[ACPITables.rsdpSize...]) == Array(reference.bytes[ACPITables.rsdpSize...]))
        #expect(rsdp == Array(reference.bytes[0..<ACPITables.rsdpSize]), "the RSDP points at the XSDT in the tables")
        #expect(ACPITables.checksum(rsdp[0..<20]) == 0 && ACPITables.checksum(rsdp[...]) == 0)
    }

    @Test("the table-loader's file names fit and it only names the two files")
    func loaderNames() throws {
        let fw = try FirmwareACPI(ACPIConfiguration(cpus: 2))
        let b = fw.loader.bytes
        #expect(b.count >= 2 * TableLoader.entrySize)
        #expect(b.getLE(UInt32.self, at: 0) == 1 && b[64] == 2, "the RSDP is allocated first, in the F segment")
    }

    @Test("etc/e820 lists each RAM region whole, then the reserved ranges, 20 bytes each")
    func e820() throws {
        let mem = try GuestMemory.allocate(size: 3584 << 20)  // 3.5 GiB: split at the PCI hole
        let t = E820Map.firmwareTable(for: mem, reserved: [(0xfffb_c000, 0x4000)])
        #expect(t.count == 3 * 20)
        #expect(t.getLE(UInt64.self, at: 0) == 0 && t.getLE(UInt64.self, at: 8) == GuestMemory.pciHoleStart && t.getLE(UInt32.self, at: 16) == 1)
        #expect(t.getLE(UInt64.self, at: 20) == GuestMemory.pciHoleEnd && t.getLE(UInt64.self, at: 28) == 512 << 20)
        #expect(t.getLE(UInt64.self, at: 40) == 0xfffb_c000 && t.getLE(UInt32.self, at: 56) == 2)
    }

    @Test("a bzImage splits into setup (header patched) and kernel; the initrd goes page-aligned below the top of low RAM")
    func kernelItems() throws {
        let image = makeBzImage(payload: testData(5000))
        let header = try SetupHeader(parsing: image)
        let k = try FirmwareKernel(image: image, initrd: testData(10000), cmdline: "console=ttyS0", lowRAM: 64 << 20)
        #expect(k.setup.count == header.setupSize && k.kernel == Array(image[header.setupSize...]))
        #expect(k.cmdline == Array("console=ttyS0".utf8) + [0])
        #expect(k.setup[0x210] == 0xb0 && k.setup[0x211] & 0x80 != 0)
        #expect(k.setup.getLE(UInt32.self, at: 0x228) == FirmwareKernel.cmdlineAddress)
        let top: UInt64 = (64 << 20) - FirmwareKernel.firmwareReserve
        #expect(k.initrdAddress % 4096 == 0 && UInt64(k.initrdAddress) + 10000 <= top && UInt64(k.initrdAddress) + 10000 > top - 4096,
                "below the firmware's reserve at the top of RAM: \(k.initrdAddress)")
        #expect(k.setup.getLE(UInt32.self, at: 0x218) == k.initrdAddress && k.setup.getLE(UInt32.self, at: 0x21c) == 10000)
        #expect(throws: BootError.self) { try FirmwareKernel(image: Array(image.prefix(600)), initrd: [], cmdline: "", lowRAM: 64 << 20) }
        #expect(throws: BootError.self) { try FirmwareKernel(image: image, initrd: testData(70 << 20), cmdline: "", lowRAM: 64 << 20) }
    }
}

@Suite("firmware loader")
struct FirmwareLoaderTests {
    @Test("a 256 KiB image: its last 128 KiB shadowed at 0xE0000, the image kept for the ROM mapping, the reset state at F000:FFF0")
    func load() throws {
        let mem = try makeMemory(16 << 20)
        let image = (0..<0x40000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 12) }
        let loaded = try FirmwareLoader.load(image: image, path: "bios.bin", memory: mem)
        #expect(loaded.format == .firmware)
        #expect(try mem.read(at: 0xe0000, count: 0x20000) == Array(image[0x20000...]))
        #expect(loaded.firmwareImage == image)
        #expect(FirmwareLoader.romAddress(size: 0x40000) == 0xfffc_0000)
        let e = loaded.entry
        #expect(e.cs.selector == 0xf000 && e.cs.base == 0xffff_0000 && e.rip == 0xfff0 && e.cr0 & 1 == 0)
        #expect(e.cs.base + e.rip == 0xffff_fff0, "the first instruction is the image's last 16 bytes")
    }

    @Test("a 64 KiB image is shadowed whole at 0xF0000")
    func small() throws {
        let mem = try makeMemory(4 << 20)
        let image = [UInt8](repeating: 0x90, count: 0x10000)
        _ = try FirmwareLoader.load(image: image, path: "x", memory: mem)
        #expect(try mem.read(at: 0xf0000, count: 0x10000) == image)
        #expect(try mem.read(at: 0xeffff, count: 1) == [0])
    }

    @Test("images of a bad size are refused, naming the window", arguments: [0, 1000, 0x1001, 17 << 20])
    func badSize(size: Int) throws {
        let mem = try makeMemory(4 << 20)
        let message = bootError { _ = try FirmwareLoader.load(image: [UInt8](repeating: 0, count: size), path: "f.bin", memory: mem) }
        #expect(message != nil)
        if UInt64(size) > FirmwareLoader.maximumSize { #expect(message?.contains("larger than its window") == true, "\(message ?? "")") }
    }
}
