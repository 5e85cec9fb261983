import DiskImage
import Foundation
import Testing
@testable import Virtio

@Suite("cache=none raw backend (O_DIRECT)")
struct DirectRawBackendTests {
    @Test("aligned and unaligned reads and writes, write-zeroes and read-only refusal")
    func readWrite() throws {
        let disk = try TempDisk(size: 64 << 10)
        let original = try disk.contents()
        let b = try DirectRawBackend(path: disk.path, readOnly: false)
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
        let ro = try DirectRawBackend(path: disk.path, readOnly: true)
        #expect(throws: (any Error).self) { try ro.write([1], at: 0) }
    }
}
