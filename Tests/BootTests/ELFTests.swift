import Foundation
import Testing
@testable import Boot

@Suite("ELF vmlinux loading")
struct ELFTests {
    @Test("an ELF64 vmlinux loads at p_paddr, zeroes BSS and enters long mode with a synthesized zero page")
    func load() throws {
        let mem = try makeMemory(64 << 20)
        let k = try KernelLoader.load(kernel: .bytes(makeVmlinux(), name: "vmlinux"), cmdline: "root=/dev/vda", memory: mem)
        #expect(k.format == .elf64)
        #expect(k.entry.rip == 0x100_0040 && k.entry.rsi == 0x7000 && k.entry.cr0 == 0x8005_0033)
        #expect(try mem.readLE(UInt8.self, at: 0x100_0040) == 0xf4)
        let zp = try mem.read(at: 0x7000, count: 4096)
        #expect(zp.getLE(UInt16.self, at: 0x1fe) == 0xaa55)
        #expect(zp.getLE(UInt32.self, at: 0x202) == 0x5372_6448)
        #expect(zp.getLE(UInt16.self, at: 0x206) == 0x020f)
        #expect(zp[0x210] == 0xff)
        #expect(zp.getLE(UInt32.self, at: 0x228) == 0x20000)
        #expect(zp[0x1e8] == 4)
    }

    @Test("the MP table is written when asked for and lies in the e820-reserved area")
    func mpTable() throws {
        let mem = try makeMemory(64 << 20)
        let k = try KernelLoader.load(kernel: .bytes(makeVmlinux(), name: "vmlinux"), memory: mem, options: BootOptions(mpTableCPUs: 2))
        let mp = try #require(k.ranges.first { $0.what == "MP table" })
        #expect(try mem.read(at: 0x9fc00, count: 4) == Array("_MP_".utf8))
        #expect(k.e820.contains { $0.kind == .reserved && $0.address <= mp.start && $0.end >= mp.end })
    }

    @Test("an ELF file larger than guest RAM (debug info after the segments) loads segment by segment")
    func bigFile() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("vmlinux-\(UUID().uuidString)").path
        let elf = makeVmlinux()
        try Data(elf).write(to: URL(fileURLWithPath: path))
        defer { try? FileManager.default.removeItem(atPath: path) }
        #expect(truncate(path, 64 << 20) == 0)  // sparse tail standing in for debug sections
        let mem = try makeMemory(32 << 20)
        let k = try KernelLoader.load(kernel: .path(path), memory: mem)
        #expect(k.format == .elf64 && k.entry.rip == 0x100_0040)
        #expect(try mem.read(at: 0x100_0000, count: 0x41) == Array(elf[elf.count - 0x3000..<elf.count - 0x3000 + 0x41]))
        #expect(try mem.read(at: 0x100_3000, count: 0x2000) == [UInt8](repeating: 0, count: 0x2000))
    }

    @Test("an ELF file whose segment data is cut off is refused naming the offset")
    func cutFile() throws {
        let elf = makeVmlinux()
        let mem = try makeMemory(32 << 20)
        let message = bootError { _ = try KernelLoader.load(kernel: .bytes(Array(elf.prefix(elf.count - 10)), name: "vmlinux"), memory: mem) }
        #expect(message?.contains("extends past the end of the file") == true, "\(message ?? "")")
    }

    @Test("e_entry given as a physical address (as Linux links it) is used as is")
    func physicalEntry() throws {
        let elf = makeELF(entry: 0x100_0010, segments: [
            TestSegment(paddr: 0x100_0000, vaddr: 0xffff_ffff_8100_0000, data: [1, 2, 3], memsz: 0x100)])
        let img = try ELFImage(parsing: elf, bits: 64, machine: 62, what: "k")
        #expect(try img.physicalEntry(what: "k") == 0x100_0010)
    }

    @Test("truncated files, wrong class, wrong machine and non-executables are refused with the offset")
    func validation() {
        let good = makeVmlinux()
        #expect(bootError { _ = try ELFImage(parsing: Array(good.prefix(40)), bits: 64, machine: 62, what: "k") }?.contains("truncated ELF header") == true)
        #expect(bootError { _ = try ELFImage(parsing: Array(good.prefix(100)), bits: 64, machine: 62, what: "k") }?.contains("program headers") == true)
        #expect(bootError { _ = try ELFImage(parsing: Array(good.prefix(200)), bits: 64, machine: 62, what: "k") }?.contains("extends past the end of the file") == true)
        let elf32 = makeELF(bits: 32, machine: 3, entry: 0x100000, segments: [TestSegment(paddr: 0x100000, vaddr: 0x100000, data: [1], memsz: 1)])
        #expect(bootError { _ = try ELFImage(parsing: elf32, bits: 64, machine: 62, what: "k") } == "k: ELF class is 32-bit at offset 4, expected 64-bit")
        let arm = makeELF(machine: 183, entry: 0, segments: [TestSegment(paddr: 0x100000, vaddr: 0x100000, data: [1], memsz: 1)])
        #expect(bootError { _ = try ELFImage(parsing: arm, bits: 64, machine: 62, what: "k") } == "k: ELF machine 183 at offset 18, expected 62")
        let dyn = makeELF(type: 3, entry: 0, segments: [TestSegment(paddr: 0x100000, vaddr: 0x100000, data: [1], memsz: 1)])
        #expect(bootError { _ = try ELFImage(parsing: dyn, bits: 64, machine: 62, what: "k") }?.contains("not an executable") == true)
        let bss = makeELF(entry: 0x100000, segments: [TestSegment(paddr: 0x100000, vaddr: 0x100000, data: [1, 2], memsz: 1)])
        #expect(bootError { _ = try ELFImage(parsing: bss, bits: 64, machine: 62, what: "k") }?.contains("larger than p_memsz") == true)
    }

    @Test("a segment outside guest RAM is refused naming the segment, address and size")
    func outsideRAM() throws {
        let mem = try makeMemory(32 << 20)
        let elf = makeELF(entry: 0x100_0000, segments: [
            TestSegment(paddr: 0x20_0000, vaddr: 0x20_0000, data: [1], memsz: 0x1000),
            TestSegment(paddr: 0x100_0000, vaddr: 0x100_0000, data: [1], memsz: 0x220_0000)])
        let message = bootError { _ = try KernelLoader.load(kernel: .bytes(elf, name: "k"), memory: mem) }
        #expect(message == "kernel ELF segment 1 at 0x1000000+0x2200000 is outside guest RAM (32 MiB)")
    }

    @Test("a segment over the zero page or page tables is refused")
    func overlapsZeroPage() throws {
        let mem = try makeMemory(32 << 20)
        let elf = makeELF(entry: 0x7000, segments: [TestSegment(paddr: 0x7000, vaddr: 0x7000, data: [1], memsz: 0x100)])
        let message = bootError { _ = try KernelLoader.load(kernel: .bytes(elf, name: "k"), memory: mem) }
        #expect(message?.contains("overlaps the boot data (GDT, zero page, page tables)") == true, "\(message ?? "")")
    }

    @Test("an entry point outside every segment is refused")
    func badEntry() throws {
        let mem = try makeMemory(32 << 20)
        let elf = makeELF(entry: 0x500_0000, segments: [TestSegment(paddr: 0x100_0000, vaddr: 0x100_0000, data: [1], memsz: 0x10)])
        #expect(bootError { _ = try KernelLoader.load(kernel: .bytes(elf, name: "k"), memory: mem) }?.contains("entry point 0x5000000") == true)
    }

    @Test("a PVH entry note is recorded")
    func pvhNote() throws {
        var note: [UInt8] = []
        note.putLE(UInt32(4), at: 0); note.putLE(UInt32(4), at: 4); note.putLE(UInt32(18), at: 8)
        note += Array("Xen".utf8) + [0]
        note.putLE(UInt32(0x100_0123), at: note.count)
        let elf = makeELF(entry: 0x100_0000, segments: [
            TestSegment(paddr: 0x100_0000, vaddr: 0x100_0000, data: [0xf4], memsz: 0x1000),
            TestSegment(paddr: 0, vaddr: 0, data: note, memsz: UInt64(note.count), type: 4)])
        let img = try ELFImage(parsing: elf, bits: 64, machine: 62, what: "k")
        #expect(img.pvhEntry == 0x100_0123)
        let mem = try makeMemory(32 << 20)
        let k = try KernelLoader.load(kernel: .bytes(elf, name: "k"), memory: mem)
        #expect(k.pvhEntry == 0x100_0123 && k.entry.rip == 0x100_0000)
    }
}
