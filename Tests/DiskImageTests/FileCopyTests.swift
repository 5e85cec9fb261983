import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import DiskImage

@Suite("FileCopy: sparse or reflinked copies of image files")
struct FileCopyTests {
    /// Writes `bytes` at `offset` of `path`.
    func put(_ path: String, _ bytes: [UInt8], at offset: Int) throws {
        let fd = open(path, O_WRONLY)
        #expect(fd >= 0)
        defer { close(fd) }
        #expect(bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, bytes.count, off_t(offset)) } == bytes.count)
    }

    func allocated(_ path: String) -> Int {
        var st = stat()
        return stat(path, &st) == 0 ? Int(st.st_blocks) * 512 : -1
    }

    @Test("the copy has the same size and bytes; holes and zero blocks stay holes (or the copy is a reflink)")
    func sparse() throws {
        let dir = try TempDir()
        let src = dir.file("a.img"), dst = dir.file("b.img")
        let size = 64 << 20
        #expect(FileManager.default.createFile(atPath: src, contents: nil))
        #expect(truncate(src, off_t(size)) == 0)
        let marker = Array("the guest's data".utf8)
        try put(src, marker, at: 1 << 20)
        try put(src, [UInt8](repeating: 0, count: 4 << 20), at: 8 << 20) // allocated zeros
        try put(src, marker, at: size - marker.count) // the last bytes
        let r = try FileCopy.copy(from: src, to: dst)
        #expect(r.size == UInt64(size))
        let a = try Data(contentsOf: URL(fileURLWithPath: src)), b = try Data(contentsOf: URL(fileURLWithPath: dst))
        #expect(a == b)
        if r.reflinked {
            #expect(r.bytesWritten == 0)
        } else {
            #expect(r.bytesWritten <= 2 << 20, "only the two data blocks are written, not the zeros: \(r.bytesWritten)")
            #expect(allocated(dst) <= 4 << 20, "the copy stays sparse: \(allocated(dst)) bytes allocated")
        }
    }

    @Test("an empty file and a file of only a hole copy to the same size")
    func empty() throws {
        let dir = try TempDir()
        #expect(FileManager.default.createFile(atPath: dir.file("e"), contents: nil))
        #expect(try FileCopy.copy(from: dir.file("e"), to: dir.file("e2")).size == 0)
        #expect(FileManager.default.createFile(atPath: dir.file("h"), contents: nil))
        #expect(truncate(dir.file("h"), 3 << 20) == 0)
        #expect(try FileCopy.copy(from: dir.file("h"), to: dir.file("h2")).size == 3 << 20)
        var st = stat()
        #expect(stat(dir.file("h2"), &st) == 0 && st.st_size == 3 << 20)
    }

    @Test("refused without touching anything: an existing destination, a missing source, a directory")
    func refused() throws {
        let dir = try TempDir()
        let src = dir.file("a.img"), dst = dir.file("b.img")
        #expect(FileManager.default.createFile(atPath: src, contents: Data("source".utf8)))
        #expect(FileManager.default.createFile(atPath: dst, contents: Data("keep me".utf8)))
        do {
            _ = try FileCopy.copy(from: src, to: dst)
            Issue.record("copied over an existing file")
        } catch {
            #expect(error.kind == .io && error.errno == EEXIST && error.message.contains(dst), "\(error)")
        }
        #expect(try String(contentsOfFile: dst, encoding: .utf8) == "keep me")
        do {
            _ = try FileCopy.copy(from: dir.file("missing"), to: dir.file("c"))
            Issue.record("copied a missing file")
        } catch {
            #expect(error.message.contains(dir.file("missing")), "\(error)")
        }
        do {
            _ = try FileCopy.copy(from: dir.path, to: dir.file("d"))
            Issue.record("copied a directory")
        } catch {
            #expect(error.kind == .invalidArgument, "\(error)")
        }
        #expect(!FileManager.default.fileExists(atPath: dir.file("c")) && !FileManager.default.fileExists(atPath: dir.file("d")))
    }
}
