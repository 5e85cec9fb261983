import CKVM
import GuestMemory
import Testing
@testable import Boot

@Suite("Zero page layout against <asm/bootparam.h>")
struct ZeroPageLayoutTests {
    func hdr<T>(_ key: KeyPath<setup_header, T>) -> Int? {
        guard let base = MemoryLayout<boot_params>.offset(of: \boot_params.hdr),
              let off = MemoryLayout<setup_header>.offset(of: key) else { return nil }
        return base + off
    }

    @Test("boot_params has the size and top-level field offsets the loader writes")
    func topLevel() throws {
        #expect(MemoryLayout<boot_params>.size == ZeroPage.size)
        #expect(MemoryLayout<boot_params>.offset(of: \.acpi_rsdp_addr) == ZeroPage.Offset.acpiRsdpAddr)
        #expect(MemoryLayout<boot_params>.offset(of: \.ext_ramdisk_image) == ZeroPage.Offset.extRamdiskImage)
        #expect(MemoryLayout<boot_params>.offset(of: \.ext_ramdisk_size) == ZeroPage.Offset.extRamdiskSize)
        #expect(MemoryLayout<boot_params>.offset(of: \.ext_cmd_line_ptr) == ZeroPage.Offset.extCmdLinePtr)
        #expect(MemoryLayout<boot_params>.offset(of: \.alt_mem_k) == ZeroPage.Offset.altMemK)
        #expect(MemoryLayout<boot_params>.offset(of: \.e820_entries) == ZeroPage.Offset.e820Entries)
        #expect(MemoryLayout<boot_params>.offset(of: \.sentinel) == ZeroPage.Offset.sentinel)
        #expect(MemoryLayout<boot_params>.offset(of: \.hdr) == ZeroPage.Offset.hdr)
        #expect(MemoryLayout<boot_params>.offset(of: \.e820_table) == ZeroPage.Offset.e820Table)
        #expect(MemoryLayout<boot_e820_entry>.size == ZeroPage.e820EntrySize)
        #expect(MemoryLayout<boot_e820_entry>.offset(of: \.type) == 16)
        #expect(Int(E820_MAX_ENTRIES_ZEROPAGE) == ZeroPage.e820MaxEntries)
    }

    @Test("setup header fields sit at the offsets the loader reads and writes")
    func setupHeader() throws {
        #expect(hdr(\.setup_sects) == ZeroPage.Offset.setupSects)
        #expect(hdr(\.root_flags) == ZeroPage.Offset.rootFlags)
        #expect(hdr(\.syssize) == ZeroPage.Offset.syssize)
        #expect(hdr(\.vid_mode) == ZeroPage.Offset.vidMode)
        #expect(hdr(\.boot_flag) == ZeroPage.Offset.bootFlag)
        #expect(hdr(\.jump) == ZeroPage.Offset.jump)
        #expect(hdr(\.header) == ZeroPage.Offset.header)
        #expect(hdr(\.version) == ZeroPage.Offset.version)
        #expect(hdr(\.kernel_version) == ZeroPage.Offset.kernelVersion)
        #expect(hdr(\.type_of_loader) == ZeroPage.Offset.typeOfLoader)
        #expect(hdr(\.loadflags) == ZeroPage.Offset.loadflags)
        #expect(hdr(\.code32_start) == ZeroPage.Offset.code32Start)
        #expect(hdr(\.ramdisk_image) == ZeroPage.Offset.ramdiskImage)
        #expect(hdr(\.ramdisk_size) == ZeroPage.Offset.ramdiskSize)
        #expect(hdr(\.heap_end_ptr) == ZeroPage.Offset.heapEndPtr)
        #expect(hdr(\.cmd_line_ptr) == ZeroPage.Offset.cmdLinePtr)
        #expect(hdr(\.initrd_addr_max) == ZeroPage.Offset.initrdAddrMax)
        #expect(hdr(\.kernel_alignment) == ZeroPage.Offset.kernelAlignment)
        #expect(hdr(\.relocatable_kernel) == ZeroPage.Offset.relocatableKernel)
        #expect(hdr(\.xloadflags) == ZeroPage.Offset.xloadflags)
        #expect(hdr(\.cmdline_size) == ZeroPage.Offset.cmdlineSize)
        #expect(hdr(\.payload_offset) == ZeroPage.Offset.payloadOffset)
        #expect(hdr(\.payload_length) == ZeroPage.Offset.payloadLength)
        #expect(hdr(\.setup_data) == ZeroPage.Offset.setupData)
        #expect(hdr(\.pref_address) == ZeroPage.Offset.prefAddress)
        #expect(hdr(\.init_size) == ZeroPage.Offset.initSize)
    }

    @Test("a zero page built from a header keeps the header bytes and sets the loader fields")
    func build() throws {
        let image = makeBzImage(payload: [1, 2, 3, 4])
        var z = ZeroPage(setupHeader: image[0x1f1..<0x26c])
        z.setLoaderFields()
        z.setCmdline(at: 0x1_2345_6000)
        z.setInitrd(at: 0x7000_0000, size: 0x1234)
        try z.setE820([E820Entry(address: 0, size: 0x9fc00, kind: .ram), E820Entry(address: 0x100000, size: 0x100000, kind: .ram)])
        #expect(z.bytes.count == 4096)
        #expect(z.bytes.getLE(UInt32.self, at: 0x202) == 0x5372_6448)
        #expect(z.bytes.getLE(UInt32.self, at: 0x260) == 0x80_0000)
        #expect(z.bytes[0x210] == 0xff)
        #expect(z.bytes[0x211] == 0x81)
        #expect(z.bytes.getLE(UInt32.self, at: 0x228) == 0x2345_6000)
        #expect(z.bytes.getLE(UInt32.self, at: 0xc8) == 0x1)
        #expect(z.bytes.getLE(UInt32.self, at: 0x218) == 0x7000_0000)
        #expect(z.bytes.getLE(UInt32.self, at: 0x21c) == 0x1234)
        #expect(z.bytes[0x1e8] == 2)
        #expect(z.bytes.getLE(UInt64.self, at: 0x2d0 + 20) == 0x100000)
        #expect(z.bytes.getLE(UInt32.self, at: 0x2d0 + 20 + 16) == 1)
        // Nothing past the header (0x26c) was copied from the file.
        #expect(z.bytes[0x26c..<0x2d0].allSatisfy { $0 == 0 })
    }

    @Test("more than 128 e820 entries are refused")
    func e820Overflow() {
        var z = ZeroPage.synthesized()
        let map = (0..<129).map { E820Entry(address: UInt64($0) << 20, size: 4096, kind: .ram) }
        #expect(bootError { try z.setE820(map) }?.contains("129 entries") == true)
    }
}

@Suite("GDT, page tables and entry states")
struct EntryStateTests {
    @Test("the identity page tables map the first 4 GiB one to one with 2 MiB pages")
    func pageWalk() throws {
        let mem = try makeMemory(16 << 20)
        let cr3 = try IdentityPageTables.write(into: mem)
        #expect(cr3 == 0x9000)
        func walk(_ va: UInt64) throws -> UInt64? {
            let pml4e = try mem.readLE(UInt64.self, at: cr3 + ((va >> 39) & 0x1ff) * 8)
            guard pml4e & 1 == 1 else { return nil }
            let pdpte = try mem.readLE(UInt64.self, at: (pml4e & 0x000f_ffff_ffff_f000) + ((va >> 30) & 0x1ff) * 8)
            guard pdpte & 1 == 1 else { return nil }
            #expect(pdpte & 0x80 == 0)
            let pde = try mem.readLE(UInt64.self, at: (pdpte & 0x000f_ffff_ffff_f000) + ((va >> 21) & 0x1ff) * 8)
            guard pde & 1 == 1 else { return nil }
            #expect(pde & 0x83 == 0x83)
            return (pde & 0x000f_ffff_ffe0_0000) | (va & 0x1f_ffff)
        }
        for va: UInt64 in [0, 0x7000, 0x1000000, 0x1234_5678, 0xbfff_ffff, 0xfec0_0000, 0xffff_ffff] {
            #expect(try walk(va) == va)
        }
        #expect(try walk(0x1_0000_0000) == nil)
        #expect(try walk(0x8000_0000_0000) == nil)
    }

    @Test("the GDT holds the 64-bit code and flat data descriptors at 0x10 and 0x18")
    func gdt() throws {
        let mem = try makeMemory(1 << 20)
        try BootGDT.write(long: true, into: mem)
        #expect(try mem.readLE(UInt64.self, at: 0x500) == 0)
        #expect(try mem.readLE(UInt64.self, at: 0x510) == 0x00af_9b00_0000_ffff)
        #expect(try mem.readLE(UInt64.self, at: 0x518) == 0x00cf_9300_0000_ffff)
        try BootGDT.write(long: false, into: mem)
        #expect(try mem.readLE(UInt64.self, at: 0x510) == 0x00cf_9b00_0000_ffff)
        #expect(try mem.readLE(UInt64.self, at: 0x520) == 0)
    }

    @Test("long mode sets CR0, CR4, EFER, CR3, a 64-bit CS and RSI")
    func longMode() {
        let s = EntryState.longMode(entry: 0x100_0000, zeroPage: 0x7000)
        #expect(s.cr0 == 0x8005_0033 && s.cr4 == 0x20 && s.efer == 0x500 && s.cr3 == 0x9000)
        #expect(s.cs.selector == 0x10 && s.cs.l && !s.cs.db && s.cs.type == 0xb)
        #expect(s.ds.selector == 0x18 && s.ss.selector == 0x18 && s.ds.db && s.ds.type == 0x3)
        #expect(s.rip == 0x100_0000 && s.rsi == 0x7000)
        #expect(s.gdt == .init(base: 0x500, limit: 31))
    }

    @Test("protected mode uses flat 32-bit segments with paging off")
    func protectedMode() {
        let s = EntryState.protectedMode(entry: 0x10_0000)
        #expect(s.cr0 == 0x11 && s.cr4 == 0 && s.efer == 0)
        #expect(s.cs.selector == 0x10 && s.cs.db && !s.cs.l && s.cs.g && s.cs.limit == 0xffff_ffff && s.cs.base == 0)
        #expect(s.ss.selector == 0x18 && s.ss.db)
    }

    @Test("real mode segments have base selector × 16 and limit 0xffff")
    func realMode() {
        let s = EntryState.realMode(cs: 0xf000, ip: 0xfff0, sp: 0x7c00)
        #expect(s.cs.base == 0xf0000 && s.cs.limit == 0xffff && s.cs.selector == 0xf000 && !s.cs.db)
        #expect(s.ds.base == 0xf0000 && s.rip == 0xfff0 && s.rsp == 0x7c00 && s.cr0 & 1 == 0)
    }
}

@Suite("e820 map")
struct E820Tests {
    @Test("256 MiB: low memory, the reserved EBDA and BIOS areas, and extended memory")
    func small() throws {
        let map = E820Map.build(for: try makeMemory(256 << 20))
        #expect(map == [
            E820Entry(address: 0, size: 0x9fc00, kind: .ram),
            E820Entry(address: 0x9fc00, size: 0x400, kind: .reserved),
            E820Entry(address: 0xe0000, size: 0x20000, kind: .reserved),
            E820Entry(address: 0x100000, size: (256 << 20) - 0x100000, kind: .ram),
        ])
    }

    @Test("4 GiB: RAM stops at the PCI hole at 3 GiB and resumes at 4 GiB")
    func pciHole() throws {
        let mem = try makeMemory(4 << 30)
        let map = E820Map.build(for: mem)
        #expect(map.count == 5)
        #expect(map[3] == E820Entry(address: 0x100000, size: 0xc000_0000 - 0x100000, kind: .ram))
        #expect(map[4] == E820Entry(address: 0x1_0000_0000, size: 1 << 30, kind: .ram))
        #expect(E820Map.lowRAMEnd(of: mem) == 0xc000_0000)
        // Nothing usable overlaps the hole.
        #expect(!map.contains { $0.kind == .ram && $0.address < 0x1_0000_0000 && $0.end > 0xc000_0000 })
    }
}

@Suite("MP table")
struct MPTableTests {
    func sum(_ b: ArraySlice<UInt8>) -> UInt8 { b.reduce(0, &+) }

    @Test("floating pointer and configuration table checksums are zero and entries are counted")
    func checksums() throws {
        for cpus in [1, 2, 8, MPTable.maxCPUs] {
            let t = try MPTable.build(cpus: cpus)
            #expect(Array(t[0..<4]) == Array("_MP_".utf8))
            #expect(sum(t[0..<16]) == 0)
            #expect(t.getLE(UInt32.self, at: 4) == 0x9fc10)
            #expect(Array(t[16..<20]) == Array("PCMP".utf8))
            let length = Int(t.getLE(UInt16.self, at: 20)!)
            #expect(16 + length == t.count)
            #expect(sum(t[16..<16 + length]) == 0)
            #expect(t.getLE(UInt16.self, at: 16 + 34) == UInt16(cpus + 1 + 1 + 16 + 2))
            #expect(t.count <= 0x400)
            // First processor is the BSP, I/O APIC ID is the CPU count.
            #expect(t[60] == 0 && t[61] == 0 && t[63] == 3)
            let ioapic = 60 + 20 * cpus + 8
            #expect(t[ioapic] == 2 && Int(t[ioapic + 1]) == cpus && t.getLE(UInt32.self, at: ioapic + 4) == 0xfec0_0000)
        }
    }

    @Test("zero or too many CPUs are refused")
    func limits() {
        #expect(bootError { _ = try MPTable.build(cpus: 0) } != nil)
        #expect(bootError { _ = try MPTable.build(cpus: MPTable.maxCPUs + 1) }?.contains("CPUs") == true)
    }
}
