import Testing
@testable import Boot

/// A multiboot header with the given flags (and a.out fields when bit 16 is set).
func multibootHeader(flags: UInt32, aout: (header: UInt32, load: UInt32, loadEnd: UInt32, bssEnd: UInt32, entry: UInt32)? = nil,
                     checksumDelta: UInt32 = 0) -> [UInt8] {
    var h: [UInt8] = []
    h.putLE(UInt32(0x1bad_b002), at: 0)
    h.putLE(flags, at: 4)
    h.putLE((0 &- (0x1bad_b002 &+ flags)) &+ checksumDelta, at: 8)
    if let a = aout {
        h.putLE(a.header, at: 12); h.putLE(a.load, at: 16); h.putLE(a.loadEnd, at: 20)
        h.putLE(a.bssEnd, at: 24); h.putLE(a.entry, at: 28)
    }
    return h
}

/// An a.out-kludge image: 0x40 bytes of code with the header at offset 0x10, loaded at 1 MiB.
func aoutKernel(bssEnd: UInt32 = 0x10_2000, flags: UInt32 = 0x1_0003) -> [UInt8] {
    var img = [UInt8](repeating: 0x90, count: 0x10)
    img += multibootHeader(flags: flags, aout: (0x10_0010, 0x10_0000, 0, bssEnd, 0x10_0030))
    img += [UInt8](repeating: 0x90, count: 0x40 - img.count)
    img[0x30] = 0xf4
    return img
}

@Suite("Multiboot v1")
struct MultibootTests {
    @Test("the header is found only 4-byte aligned, within 8 KiB, with a valid checksum")
    func search() {
        var b = [UInt8](repeating: 0, count: 100)
        b += multibootHeader(flags: 0)
        #expect(MultibootHeader.find(in: b)?.offset == 100)
        var unaligned = [UInt8](repeating: 0, count: 102) + multibootHeader(flags: 0)
        #expect(MultibootHeader.find(in: unaligned) == nil)
        unaligned = [UInt8](repeating: 0, count: 8192) + multibootHeader(flags: 0)
        #expect(MultibootHeader.find(in: unaligned) == nil)
        let lastSlot = [UInt8](repeating: 0, count: 8180) + multibootHeader(flags: 0)
        #expect(MultibootHeader.find(in: lastSlot)?.offset == 8180)
        #expect(MultibootHeader.find(in: multibootHeader(flags: 0, checksumDelta: 1)) == nil)
        #expect(KernelFormat.detect(b) == .multiboot)
    }

    @Test("an a.out kludge kernel loads at load_addr, clears BSS and enters 32-bit protected mode with EAX and EBX")
    func aout() throws {
        let mem = try makeMemory(32 << 20)
        try mem.write([UInt8](repeating: 0xcc, count: 0x2000), at: 0x10_0000)
        let img = aoutKernel()
        let k = try KernelLoader.load(kernel: .bytes(img, name: "mb"), cmdline: "hello", memory: mem)
        #expect(k.format == .multiboot)
        // The boot area (GDT, info, strings, stack) starts at the first page above the image and its BSS.
        let base: UInt64 = 0x10_2000
        #expect(k.entry.rip == 0x10_0030 && k.entry.rax == 0x2bad_b002 && k.entry.rbx == base + MultibootInfo.infoOffset)
        #expect(k.entry.cr0 == 0x11 && k.entry.cs.db && !k.entry.cs.l && k.entry.efer == 0)
        #expect(k.entry.gdt.base == base && k.entry.rsp > base && k.entry.rsp < base + MultibootInfo.areaSize(stringsBytes: 6))
        #expect(try mem.read(at: 0x10_0000, count: 0x40) == img)
        #expect(try mem.read(at: 0x10_0040, count: 0x2000 - 0x40).allSatisfy { $0 == 0 })
        #expect(try mem.readLE(UInt64.self, at: base + 0x10) == 0x00cf_9b00_0000_ffff)
    }

    @Test("the information structure has memory sizes, cmdline, e820 mmap, modules and the loader name")
    func info() throws {
        let mem = try makeMemory(32 << 20)
        let mods = [MultibootModule(source: .bytes([1, 2, 3], name: "m0"), cmdline: "first arg"),
                    MultibootModule(source: .bytes([UInt8](repeating: 9, count: 5000), name: "m1"), cmdline: "")]
        let k = try KernelLoader.load(kernel: .bytes(aoutKernel(), name: "mb"), cmdline: "kernel args", memory: mem,
                                      options: BootOptions(modules: mods))
        func u32(_ o: Int) throws -> UInt32 { try mem.readLE(UInt32.self, at: k.entry.rbx + UInt64(o)) }
        // Modules follow the boot area (page aligned above the kernel's end, 0x102000).
        let modulesStart = UInt32(0x10_2000 + MultibootInfo.areaSize(stringsBytes: 12 + 10 + 1))
        func string(_ a: UInt32) throws -> String {
            let b = try mem.read(at: UInt64(a), count: 64)
            return String(decoding: b.prefix { $0 != 0 }, as: UTF8.self)
        }
        #expect(try u32(0) == (1 | 4 | 8 | 64 | 512))
        #expect(try u32(4) == 639)
        #expect(try u32(8) == (32 << 10) - 1024)
        #expect(try string(try u32(16)) == "kernel args")
        #expect(try string(try u32(64)) == "swiftkvm")
        #expect(try u32(20) == 2)
        let mods0 = UInt64(try u32(24))
        let m0start = try mem.readLE(UInt32.self, at: mods0), m0end = try mem.readLE(UInt32.self, at: mods0 + 4)
        #expect(m0start == modulesStart && m0end == modulesStart + 3)
        #expect(try mem.read(at: UInt64(m0start), count: 3) == [1, 2, 3])
        #expect(try string(try mem.readLE(UInt32.self, at: mods0 + 8)) == "first arg")
        let m1start = try mem.readLE(UInt32.self, at: mods0 + 16)
        #expect(m1start == modulesStart + 0x1000 && m1start % 4096 == 0)
        #expect(try mem.readLE(UInt32.self, at: mods0 + 20) == modulesStart + 0x1000 + 5000)
        // Memory map: 4 entries of 24 bytes, each with size 20.
        #expect(try u32(44) == 4 * 24)
        let mmap = UInt64(try u32(48))
        #expect(try mem.readLE(UInt32.self, at: mmap) == 20)
        #expect(try mem.readLE(UInt64.self, at: mmap + 24 * 3 + 4) == 0x10_0000)
        #expect(try mem.readLE(UInt64.self, at: mmap + 24 * 3 + 12) == (32 << 20) - 0x10_0000)
        #expect(try mem.readLE(UInt32.self, at: mmap + 24 + 20) == 2)
    }

    @Test("an ELF32 multiboot kernel loads its program headers")
    func elf32() throws {
        var code = [UInt8](repeating: 0x90, count: 0x100)
        let hdr = multibootHeader(flags: 0x3)
        code.replaceSubrange(0..<hdr.count, with: hdr)
        let elf = makeELF(bits: 32, machine: 3, entry: 0x10_0020, segments: [
            TestSegment(paddr: 0x10_0000, vaddr: 0x10_0000, data: code, memsz: 0x1000)])
        let mem = try makeMemory(16 << 20)
        let k = try KernelLoader.load(kernel: .bytes(elf, name: "mb.elf"), memory: mem)
        #expect(k.format == .multiboot && k.entry.rip == 0x10_0020 && k.entry.rax == 0x2bad_b002)
        #expect(try mem.read(at: 0x10_0000, count: 0x100) == code)
    }

    @Test("required features other than page alignment and memory info are refused; video is ignored")
    func flags() throws {
        let mem = try makeMemory(16 << 20)
        let message = bootError { _ = try KernelLoader.load(kernel: .bytes(aoutKernel(flags: 0x1_0803), name: "mb"), memory: mem) }
        #expect(message?.contains("unsupported features 0x800") == true, "\(message ?? "")")
        let k = try KernelLoader.load(kernel: .bytes(aoutKernel(flags: 0x1_0007), name: "mb"), memory: mem)
        #expect(k.notes.contains { $0.contains("video") })
    }

    @Test("inconsistent a.out fields and images outside RAM are refused")
    func badAout() throws {
        let mem = try makeMemory(16 << 20)
        var img = [UInt8](repeating: 0, count: 0x10) + multibootHeader(flags: 0x1_0000, aout: (0x10_0010, 0x10_0000, 0x20_0000, 0, 0x10_0000))
        #expect(bootError { _ = try KernelLoader.load(kernel: .bytes(img, name: "mb"), memory: mem) }?.contains("the file has only") == true)
        img = [UInt8](repeating: 0, count: 0x10) + multibootHeader(flags: 0x1_0000, aout: (0x10_0100, 0x10_0000, 0, 0, 0x10_0000))
        #expect(bootError { _ = try KernelLoader.load(kernel: .bytes(img, name: "mb"), memory: mem) }?.contains("before the start of the file") == true)
        img = [UInt8](repeating: 0, count: 0x10) + multibootHeader(flags: 0x1_0000, aout: (0x1000_0010, 0x1000_0000, 0, 0, 0x1000_0000))
        #expect(bootError { _ = try KernelLoader.load(kernel: .bytes(img, name: "mb"), memory: mem) }?.contains("outside guest RAM") == true)
        img = [UInt8](repeating: 0, count: 0x10) + multibootHeader(flags: 0x1_0000, aout: (0x10_0010, 0x10_0000, 0, 0, 0x50_0000))
        #expect(bootError { _ = try KernelLoader.load(kernel: .bytes(img, name: "mb"), memory: mem) }?.contains("entry_addr") == true)
        img = [UInt8](repeating: 0, count: 0x10) + multibootHeader(flags: 0x1_0000, aout: (0x9_fc00, 0x9_fbf0, 0, 0, 0x9_fbf0))
        #expect(bootError { _ = try KernelLoader.load(kernel: .bytes(img, name: "mb"), memory: mem) }?.contains("overlaps the MP table") == true)
    }

    @Test("a kernel loaded at 0x8000 (below QEMU's and our old boot data) gets its boot area above it, below the MP table")
    func lowKernel() throws {
        let mem = try makeMemory(16 << 20)
        let img = [UInt8](repeating: 0, count: 0x10) + multibootHeader(flags: 0x1_0000, aout: (0x8010, 0x8000, 0, 0, 0x8000))
        let k = try KernelLoader.load(kernel: .bytes(img, name: "low"), cmdline: "low", memory: mem)
        #expect(k.entry.rip == 0x8000 && k.entry.rbx == 0x9000 + MultibootInfo.infoOffset && k.entry.gdt.base == 0x9000)
        #expect(try mem.read(at: 0x8000, count: img.count) == img)
        let cmdline = try mem.readLE(UInt32.self, at: k.entry.rbx + 16)
        #expect(try mem.read(at: UInt64(cmdline), count: 4) == Array("low".utf8) + [0])
        #expect(k.entry.rsp < BootLayout.mpTableAddress && k.entry.rsp > 0x9000)
    }

    @Test("a module that does not fit in RAM is refused naming it")
    func moduleTooBig() throws {
        let mem = try makeMemory(4 << 20)
        let mods = [MultibootModule(source: .bytes([UInt8](repeating: 1, count: 4 << 20), name: "big.bin"))]
        let message = bootError { _ = try KernelLoader.load(kernel: .bytes(aoutKernel(), name: "mb"), memory: mem, options: BootOptions(modules: mods)) }
        #expect(message?.hasPrefix("multiboot module 0 big.bin of 4 MiB does not fit") == true, "\(message ?? "")")
    }
}

@Suite("Flat binaries")
struct FlatTests {
    @Test("real mode derives CS:IP from the entry")
    func real() throws {
        let mem = try makeMemory(1 << 20)
        var k = try FlatLoader.load(image: [0xf4], at: 0x7c00, entry: 0x7c00, mode: .real, memory: mem)
        #expect(k.entry.cs.selector == 0 && k.entry.rip == 0x7c00 && k.entry.cr0 & 1 == 0)
        k = try FlatLoader.load(image: [0xf4], at: 0x12345, entry: 0x12345, mode: .real, memory: mem)
        #expect(k.entry.cs.selector == 0x1000 && k.entry.rip == 0x2345 && k.entry.cs.base == 0x10000)
        #expect(try mem.read(at: 0x12345, count: 1) == [0xf4])
        k = try FlatLoader.load(image: [0xf4], at: 0xf_0000, entry: 0xf_fff0, mode: .real, memory: mem)
        #expect(k.entry.cs.selector == 0xf000 && k.entry.rip == 0xfff0)
        // The high memory area is reached with CS = 0xffff.
        let hma = try makeMemory(2 << 20)
        k = try FlatLoader.load(image: [0xf4], at: 0x10_0010, entry: 0x10_0010, mode: .real, memory: hma)
        #expect(k.entry.cs.selector == 0xffff && k.entry.rip == 0x20)
        #expect(bootError { _ = try FlatLoader.load(image: [0xf4], at: 0x1000, entry: 0x10_fff0, mode: .real, memory: hma) }?.contains("real mode") == true)
    }

    @Test("a flat image is read from a file; missing and oversized files are refused naming the path")
    func fromFile() throws {
        let mem = try makeMemory(1 << 20)
        let k = try FlatLoader.load(source: .bytes([0xf4, 0xf4], name: "t.bin"), at: 0x1000, entry: 0x1000, mode: .real, memory: mem)
        #expect(k.format == .flat && k.entry.rip == 0x1000)
        #expect(bootError { _ = try FlatLoader.load(source: .path("/nonexistent.bin"), at: 0x1000, entry: 0x1000, mode: .real, memory: mem) }
                == "cannot read /nonexistent.bin: No such file or directory")
        #expect(bootError { _ = try FlatLoader.load(source: .bytes([UInt8](repeating: 0, count: 2 << 20), name: "big.bin"), at: 0, entry: 0, mode: .real, memory: mem) }?.hasPrefix("big.bin is 2 MiB") == true)
    }

    @Test("protected and long mode write the GDT (and page tables) and refuse images over them")
    func protectedAndLong() throws {
        let mem = try makeMemory(4 << 20)
        var k = try FlatLoader.load(image: [0xf4], at: 0x10_0000, entry: 0x10_0000, mode: .protected, memory: mem)
        #expect(k.entry.cr0 == 0x11 && k.entry.cs.db && k.entry.rip == 0x10_0000)
        k = try FlatLoader.load(image: [0xf4], at: 0x10_0000, entry: 0x10_0000, mode: .long, memory: mem)
        #expect(k.entry.efer == 0x500 && k.entry.cs.l)
        #expect(try mem.readLE(UInt64.self, at: 0x9000) == 0xa003)
        #expect(bootError { _ = try FlatLoader.load(image: [1, 2], at: 0x9ff0, entry: 0x9ff0, mode: .long, memory: mem) }?.contains("page tables") == true)
        #expect(bootError { _ = try FlatLoader.load(image: [1, 2], at: 0x3f_ffff, entry: 0x3f_ffff, mode: .long, memory: mem) }?.contains("outside guest RAM") == true)
    }
}
