import DiskImage
import Foundation
import Testing
@testable import Virtio

@Suite("raw file backend (O_DIRECT and buffered, vectored)")
struct RawFileBackendTests {
    @Test("aligned and unaligned reads and writes, write-zeroes and read-only refusal")
    func readWrite() throws {
        let disk = try TempDisk(size: 64 << 10)
        let original = try disk.contents()
        let b = try RawFileBackend(path: disk.path, readOnly: false, direct: true)
        #expect(b.size == 64 << 10)
        // Aligned: a page-aligned buffer, 4 KiB at 8 KiB.
        let page = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { page.deallocate() }
        try b.read(into: page, at: 8192)
        #expect(Array(page) == Array(original[8192..<12288]))
        // Unaligned read across a 4 KiB boundary.
        #expect(try b.read(at: 4000, count: 300) == Array(original[4000..<4300]))
        // Unaligned write (read-modify-write) and an aligned one.
        try b.write([UInt8](repeating: 0xaa, count: 100), at: 4090)
        for i in 0..<4096 { page[i] = UInt8(i & 0xff) }
        try b.write(UnsafeRawBufferPointer(page), at: 16384)
        try b.writeZeroes(at: 20480, length: 8192)
        try b.flush()
        var expected = original
        expected.replaceSubrange(4090..<4190, with: [UInt8](repeating: 0xaa, count: 100))
        expected.replaceSubrange(16384..<20480, with: (0..<4096).map { UInt8($0 & 0xff) })
        expected.replaceSubrange(20480..<28672, with: [UInt8](repeating: 0, count: 8192))
        #expect(try disk.contents() == expected)
        #expect(throws: (any Error).self) { try b.read(at: 65530, count: 10) }
        let ro = try RawFileBackend(path: disk.path, readOnly: true, direct: true)
        #expect(throws: (any Error).self) { try ro.write([1], at: 0) }
    }

    @Test("virtio-blk with I/O threads: many requests in flight complete (in any order) with the right data")
    func parallelRequests() throws {
        let disk = try TempDisk(size: 256 << 10)
        let original = try disk.contents()
        let dev = VirtioBlock(backend: try RawFileBackend(path: disk.path, readOnly: false, direct: true), serial: "p", ioThreads: 3)
        defer { dev.shutdown() }
        let h = try Harness(device: dev, queueCount: 1)
        let d = h.drivers[0]
        var reads: [(UInt64, Int, UInt64)] = [] // (buffer, sector, status)
        for i in 0..<5 {
            var hdr = [UInt8](repeating: 0, count: 16); hdr.putLE(UInt64(i * 8), at: 8)
            let buf = try d.alloc(4096), st = try d.alloc(1, fill: [0xee])
            try d.addChain([(try d.alloc(16, fill: hdr), 16, false), (buf, 4096, true), (st, 1, true)])
            reads.append((buf, i * 8, st))
        }
        var used: [(id: UInt32, len: UInt32)] = []
        for _ in 0..<500 where used.count < 5 {
            try dev.processQueue(0)
            used += try d.takeUsed()
            if used.count < 5 { usleep(5_000) }
        }
        #expect(used.count == 5)
        #expect(used.allSatisfy { $0.len == 4097 })
        for r in reads {
            #expect(try h.memory.read(at: r.2, count: 1) == [0])
            #expect(try h.memory.read(at: r.0, count: 4096) == Array(original[(r.1 * 512)..<(r.1 * 512 + 4096)]))
        }
        #expect(!h.interrupt.queueSignals.isEmpty)
    }

    @Test("vectored reads and writes, aligned (one preadv/pwritev) and not, buffered and direct", arguments: [false, true])
    func vectored(direct: Bool) throws {
        let disk = try TempDisk(size: 64 << 10)
        let original = try disk.contents()
        let b = try RawFileBackend(path: disk.path, readOnly: false, direct: direct)
        let pages = UnsafeMutableRawBufferPointer.allocate(byteCount: 3 * 4096, alignment: 4096)
        defer { pages.deallocate() }
        let parts = (0..<3).map { UnsafeMutableRawBufferPointer(rebasing: pages[($0 * 4096)..<(($0 + 1) * 4096)]) }
        try b.read(into: [parts[2], parts[0], parts[1]], at: 4096)
        #expect(Array(parts[2]) == Array(original[4096..<8192]))
        #expect(Array(parts[0]) == Array(original[8192..<12288]))
        // Unaligned pieces (bounce per piece under O_DIRECT).
        let odd = [UnsafeMutableRawBufferPointer(rebasing: pages[1..<101]), UnsafeMutableRawBufferPointer(rebasing: pages[200..<300])]
        try b.read(into: odd, at: 10)
        #expect(Array(odd[0]) + Array(odd[1]) == Array(original[10..<210]))
        for i in 0..<(3 * 4096) { pages[i] = UInt8(truncatingIfNeeded: i * 3) }
        try b.write(parts.map { UnsafeRawBufferPointer($0) }, at: 16384)
        try b.write([UnsafeRawBufferPointer(rebasing: pages[5..<9]), UnsafeRawBufferPointer(rebasing: pages[0..<2])], at: 3)
        try b.flush()
        var expected = original
        expected.replaceSubrange(16384..<(16384 + 3 * 4096), with: (0..<(3 * 4096)).map { UInt8(truncatingIfNeeded: $0 * 3) })
        expected.replaceSubrange(3..<9, with: [15, 18, 21, 24, 0, 3])
        #expect(try disk.contents() == expected)
        #expect(throws: (any Error).self) { try b.read(into: [parts[0], parts[1]], at: 60 << 10) }
    }
}
