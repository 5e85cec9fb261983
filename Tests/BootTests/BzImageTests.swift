import Foundation
import GuestMemory
import Testing
@testable import Boot

@Suite("bzImage setup header validation")
struct SetupHeaderTests {
    @Test("a well-formed header parses with its fields")
    func good() throws {
        let h = try SetupHeader(parsing: makeBzImage(payload: [UInt8](repeating: 1, count: 100)))
        #expect(h.version == 0x020f && h.setupSects == 4 && h.setupSize == 2560)
        #expect(h.cmdlineSize == 2047 && h.initrdAddrMax == 0x7fff_ffff && h.prefAddress == 0x100_0000)
        #expect(h.payloadOffset == 0x200 && h.payloadLength == 100 && h.relocatable && h.headerEnd == 0x26c)
        #expect(h.kernelVersion(in: makeBzImage(payload: [1])) == "6.1.0-test (swiftkvm@test) #1")
    }

    @Test("the bzImage entry's load address follows pref_address and kernel_alignment")
    func loadAddress() throws {
        var o = BzOptions()
        #expect(try SetupHeader(parsing: makeBzImage(payload: [1], o)).loadAddress == 0x100_0000)
        o.prefAddress = 0x123_4000
        #expect(try SetupHeader(parsing: makeBzImage(payload: [1], o)).loadAddress == 0x20_0000)
        o.prefAddress = 0
        #expect(try SetupHeader(parsing: makeBzImage(payload: [1], o)).loadAddress == 0x20_0000)
    }

    @Test("setup_sects 0 means 4")
    func zeroSects() throws {
        var o = BzOptions(); o.setupSects = 0
        #expect(try SetupHeader(parsing: makeBzImage(payload: [1, 2], o)).setupSects == 4)
    }

    @Test("bad magic names the offset and value")
    func badMagic() {
        var b = makeBzImage(payload: [1])
        b.putLE(UInt32(0), at: 0x202)
        #expect(bootError { _ = try SetupHeader(parsing: b) } == "bzImage: setup header magic at 0x202 is 0x00000000, expected \"HdrS\"")
    }

    @Test("protocols older than 2.06 and without the 64-bit entry are refused")
    func versions() {
        var o = BzOptions(); o.version = 0x0205
        #expect(bootError { _ = try SetupHeader(parsing: makeBzImage(payload: [1], o)) }?.contains("2.05 at 0x206 is too old") == true)
        o.version = 0x020a
        #expect(bootError { _ = try SetupHeader(parsing: makeBzImage(payload: [1], o)) }?.contains("predates the 64-bit entry") == true)
        o = BzOptions(); o.xloadflags = 0x2
        #expect(bootError { _ = try SetupHeader(parsing: makeBzImage(payload: [1], o)) }?.contains("XLF_KERNEL_64") == true)
    }

    @Test("a truncated file is refused at every stage")
    func truncated() {
        let full = makeBzImage(payload: [UInt8](repeating: 7, count: 4096))
        #expect(bootError { _ = try SetupHeader(parsing: Array(full.prefix(0x100))) }?.contains("truncated") == true)
        #expect(bootError { _ = try SetupHeader(parsing: Array(full.prefix(0x230))) }?.contains("truncated") == true)
        #expect(bootError { _ = try SetupHeader(parsing: Array(full.prefix(2000))) }?.contains("setup sectors") == true)
        #expect(bootError { _ = try SetupHeader(parsing: Array(full.prefix(3000))) }?.contains("syssize") == true)
    }

    @Test("a payload outside the file is refused")
    func payloadOutside() {
        var o = BzOptions(); o.payloadLengthOverride = 0x10000
        #expect(bootError { _ = try SetupHeader(parsing: makeBzImage(payload: [1, 2, 3], o)) }?.contains("payload_offset/payload_length at 0x248") == true)
        o = BzOptions(); o.payloadOffsetOverride = 0xffff_fff0
        #expect(bootError { _ = try SetupHeader(parsing: makeBzImage(payload: [1, 2, 3], o)) }?.contains("lies outside") == true)
    }

    @Test("a bad kernel_alignment and a zImage are refused")
    func alignmentAndZImage() {
        var o = BzOptions(); o.kernelAlignment = 0x30_0000
        #expect(bootError { _ = try SetupHeader(parsing: makeBzImage(payload: [1], o)) }?.contains("kernel_alignment") == true)
        o = BzOptions(); o.loadflags = 0
        #expect(bootError { _ = try SetupHeader(parsing: makeBzImage(payload: [1], o)) }?.contains("LOADED_HIGH") == true)
    }
}

@Suite("bzImage loading")
struct BzImageLoadTests {
    func gzipKernel() throws -> [UInt8] {
        try makeBzImage(payload: compress(makeVmlinux(), tool: "gzip", args: ["-c"]))
    }

    @Test("the default path decompresses the payload, loads the ELF and enters startup_64 with the real header")
    func decompressed() throws {
        try #require(haveTool("gzip"))
        let mem = try makeMemory(64 << 20)
        let image = try gzipKernel()
        let initrd = [UInt8](repeating: 0xab, count: 10000)
        let k = try KernelLoader.load(kernel: .bytes(image, name: "test"), initrd: .bytes(initrd, name: "initrd"),
                                      cmdline: "console=ttyS0 quiet", memory: mem)
        #expect(k.format == .bzImage && k.compression == .gzip && k.protocolVersion == 0x020f)
        #expect(k.kernelVersion == "6.1.0-test (swiftkvm@test) #1")
        #expect(k.entry.rip == 0x100_0040 && k.entry.rsi == 0x7000 && k.entry.cs.l && k.entry.cr3 == 0x9000)
        #expect(try mem.read(at: 0x100_0000, count: 0x41) == [UInt8](repeating: 0x90, count: 0x40) + [0xf4])
        #expect(try mem.read(at: 0x100_3000, count: 0x2000).allSatisfy { $0 == 0 })
        // Zero page: the file's header bytes, plus loader fields.
        let zp = try mem.read(at: 0x7000, count: 4096)
        #expect(Array(zp[0x1f1..<0x210]) == Array(image[0x1f1..<0x210]))
        #expect(zp[0x210] == 0xff && zp[0x211] & 0x81 == 0x81)
        #expect(zp.getLE(UInt32.self, at: 0x228) == 0x20000)
        #expect(try mem.read(at: 0x20000, count: 20) == Array("console=ttyS0 quiet".utf8) + [0])
        // Initrd: page aligned at the top of RAM.
        let rd = UInt64(zp.getLE(UInt32.self, at: 0x218)!)
        #expect(zp.getLE(UInt32.self, at: 0x21c) == 10000)
        #expect(rd % 4096 == 0 && rd + 10000 <= 64 << 20 && rd + 10000 + 4096 > 64 << 20)
        #expect(try mem.read(at: rd, count: 10000) == initrd)
        #expect(zp[0x1e8] == 4)
        #expect(zp.getLE(UInt64.self, at: 0x2d0 + 3 * 20 + 8) == (64 << 20) - 0x100000)
    }

    @Test("the bzImage entry loads the protected-mode kernel at pref_address and enters at +0x200")
    func bzImageEntry() throws {
        let mem = try makeMemory(64 << 20)
        let image = makeBzImage(payload: [UInt8](repeating: 0x55, count: 1000))
        let k = try KernelLoader.load(kernel: .bytes(image, name: "t"), cmdline: "", memory: mem,
                                      options: BootOptions(linuxEntry: .bzImage))
        #expect(k.entry.rip == 0x100_0200 && k.entry.rsi == 0x7000 && k.compression == nil)
        #expect(try mem.read(at: 0x100_0000, count: 0x200) == [UInt8](repeating: 0xf4, count: 0x200))
        #expect(try mem.readLE(UInt32.self, at: 0x7000 + 0x214) == 0x100_0000)
    }

    @Test("a command line longer than cmdline_size is refused")
    func cmdlineTooLong() throws {
        var o = BzOptions(); o.cmdlineSize = 16
        let mem = try makeMemory(64 << 20)
        let image = makeBzImage(payload: [UInt8](repeating: 0x55, count: 100), o)
        let message = bootError {
            _ = try KernelLoader.load(kernel: .bytes(image, name: "t"), cmdline: String(repeating: "x", count: 17),
                                      memory: mem, options: BootOptions(linuxEntry: .bzImage))
        }
        #expect(message == "kernel command line is 17 bytes, longer than the kernel's limit of 16 bytes (cmdline_size)")
        #expect(bootError {
            _ = try KernelLoader.load(kernel: .bytes(image, name: "t"), cmdline: String(repeating: "x", count: 16),
                                      memory: mem, options: BootOptions(linuxEntry: .bzImage))
        } == nil)
    }

    @Test("an initrd that does not fit below initrd_addr_max is refused with sizes in the message")
    func initrdTooBig() throws {
        try #require(haveTool("gzip"))
        let mem = try makeMemory(32 << 20)
        let message = bootError {
            _ = try KernelLoader.load(kernel: .bytes(try gzipKernel(), name: "t"),
                                      initrd: .bytes([UInt8](repeating: 1, count: 20 << 20), name: "rd"), memory: mem)
        }
        #expect(message?.hasPrefix("initrd of 20 MiB does not fit below 0x7fffffff in 32 MiB of guest RAM") == true, "\(message ?? "")")
    }

    @Test("initrd placement respects initrd_addr_max and the PCI hole")
    func placement() throws {
        let mem = try makeMemory(4 << 30)
        #expect(try InitrdPlacer.place(size: 0x1800, maxAddress: 0x37ff_ffff, kernelEnd: 0x200_0000, memory: mem) == 0x37ff_e000)
        #expect(try InitrdPlacer.place(size: 0x1800, maxAddress: 0xffff_ffff, kernelEnd: 0x200_0000, memory: mem) == 0xbfff_e000)
    }

    @Test("a kernel that needs more than guest RAM is refused")
    func tooSmall() throws {
        let mem = try makeMemory(8 << 20)
        let image = makeBzImage(payload: [UInt8](repeating: 0x55, count: 100))
        let message = bootError { _ = try KernelLoader.load(kernel: .bytes(image, name: "t"), memory: mem, options: BootOptions(linuxEntry: .bzImage)) }
        #expect(message?.contains("outside guest RAM") == true)
    }

    @Test("missing and non-kernel files give errors naming the path")
    func files() throws {
        let mem = try makeMemory(16 << 20)
        #expect(bootError { _ = try KernelLoader.load(kernel: .path("/nonexistent/vmlinuz"), memory: mem) } ==
                "cannot read /nonexistent/vmlinuz: No such file or directory")
        #expect(bootError { _ = try KernelLoader.load(kernel: .path("/tmp"), memory: mem) } == "cannot read /tmp: not a regular file")
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("notakernel-\(UUID().uuidString)").path
        try Data("hello".utf8).write(to: URL(fileURLWithPath: path))
        defer { try? FileManager.default.removeItem(atPath: path) }
        #expect(bootError { _ = try KernelLoader.load(kernel: .path(path), memory: mem) }?.hasPrefix("\(path) is not a kernel") == true)
    }

    @Test("kernel and initrd load from files")
    func fromFiles() throws {
        try #require(haveTool("gzip"))
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("bz-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        try Data(try gzipKernel()).write(to: dir.appendingPathComponent("vmlinuz"))
        try Data(testData(50000)).write(to: dir.appendingPathComponent("initrd"))
        let mem = try makeMemory(64 << 20)
        let k = try KernelLoader.load(kernel: .path(dir.appendingPathComponent("vmlinuz").path),
                                      initrd: .path(dir.appendingPathComponent("initrd").path), cmdline: "x", memory: mem)
        let rd = try #require(k.ranges.first { $0.what == "initrd" })
        #expect(try mem.read(at: rd.start, count: 50000) == testData(50000))
    }
}

@Suite("Streaming ELF loading from the decompressor")
struct StreamingTests {
    func bigELF(truncateTo: Int? = nil) -> [UInt8] {
        var elf = makeELF(entry: 0x100_0000, segments: [
            TestSegment(paddr: 0x100_0000, vaddr: 0xffff_ffff_8100_0000, data: testData(0x10_0123), memsz: 0x20_0000),
            TestSegment(paddr: 0x140_0000, vaddr: 0xffff_ffff_8140_0000, data: Array(testData(0x12_0000).reversed()), memsz: 0x26_0000)])
        if let t = truncateTo { elf = Array(elf.prefix(t)) }
        return elf
    }

    @Test("chunks crossing segment boundaries land exactly where a whole-file load puts them")
    func matchesWholeLoad() throws {
        try #require(haveTool("xz"))
        let elf = bigELF()
        let streamed = try makeMemory(64 << 20), whole = try makeMemory(64 << 20)
        try streamed.write([UInt8](repeating: 0xee, count: 0x60_0000), at: 0x100_0000)
        let k = try KernelLoader.load(kernel: .bytes(makeBzImage(payload: compress(elf, tool: "xz", args: ["--check=crc32", "-1", "-c"])), name: "t"),
                                      memory: streamed)
        #expect(k.compression == .xz && k.entry.rip == 0x100_0000)
        let img = try ELFImage(parsing: elf, bits: 64, machine: 62, what: "k")
        try img.load(from: elf, into: whole, avoiding: [], what: "k")
        #expect(try streamed.read(at: 0x100_0000, count: 0x20_0000) == whole.read(at: 0x100_0000, count: 0x20_0000))
        #expect(try streamed.read(at: 0x140_0000, count: 0x26_0000) == whole.read(at: 0x140_0000, count: 0x26_0000))
        // The gap between the segments is untouched.
        #expect(try streamed.read(at: 0x120_0000, count: 0x20_0000) == [UInt8](repeating: 0xee, count: 0x20_0000))
    }

    @Test("a decompressed kernel that ends inside a segment is refused")
    func truncatedSegment() throws {
        try #require(haveTool("gzip"))
        let elf = bigELF(truncateTo: 0x10_0000)
        let mem = try makeMemory(64 << 20)
        let message = bootError {
            _ = try KernelLoader.load(kernel: .bytes(makeBzImage(payload: compress(elf, tool: "gzip", args: ["-c"])), name: "t"), memory: mem)
        }
        #expect(message?.contains("extends past the end of the decompressed data") == true, "\(message ?? "")")
    }

    @Test("a payload that is not an ELF after decompression is refused")
    func notELF() throws {
        try #require(haveTool("gzip"))
        let mem = try makeMemory(64 << 20)
        let message = bootError {
            _ = try KernelLoader.load(kernel: .bytes(makeBzImage(payload: compress(testData(5000), tool: "gzip", args: ["-c"])), name: "t"), memory: mem)
        }
        #expect(message?.contains("not an ELF64 file") == true, "\(message ?? "")")
    }
}
