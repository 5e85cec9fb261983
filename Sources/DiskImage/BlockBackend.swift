#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// Linux constants and functions hidden behind _GNU_SOURCE in Glibc's Swift import.
private let linuxFallocKeepSize: Int32 = 1
private let linuxFallocPunchHole: Int32 = 2
let linuxSeekData: Int32 = 3
let linuxSeekHole: Int32 = 4
@_silgen_name("fallocate")
private func c_fallocate(_ fd: Int32, _ mode: Int32, _ offset: off_t, _ len: off_t) -> Int32

/// A virtual block device: a byte-addressable disk of `size` bytes.
///
/// Implementations are thread-safe (internally locked) so the VMM may share one between threads.
public protocol BlockBackend: AnyObject, Sendable {
    /// The virtual disk size in bytes.
    var size: UInt64 { get }
    /// Whether writes are refused.
    var isReadOnly: Bool { get }
    /// Reads `buffer.count` bytes at virtual `offset`. Unallocated areas read as zeroes.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws
    /// Writes `data` at virtual `offset`.
    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws
    /// Makes every completed write durable (data before metadata, fdatasync).
    func flush() throws
    /// Tells the backend that `length` bytes at `offset` are no longer needed (they read as zeroes afterwards).
    func discard(at offset: UInt64, length: UInt64) throws
    /// Makes `length` bytes at `offset` read as zeroes, deallocating where possible.
    func writeZeroes(at offset: UInt64, length: UInt64) throws
    /// Changes the virtual size. Shrinking requires `allowShrink`.
    func resize(to newSize: UInt64, allowShrink: Bool) throws
    /// Flushes and releases the underlying file(s). Further calls throw.
    func close() throws
}

extension BlockBackend {
    /// Reads `count` bytes at `offset` into a new array.
    public func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { try read(into: $0, at: offset) }
        return out
    }
    /// Writes the bytes of `data` at `offset`.
    public func write(_ data: [UInt8], at offset: UInt64) throws {
        try data.withUnsafeBytes { try write($0, at: offset) }
    }
}

/// Checks that `[offset, offset+count)` lies inside a disk of `size` bytes.
func checkRange(_ offset: UInt64, _ count: UInt64, _ what: String, size: UInt64) throws {
        let (end, overflow) = offset.addingReportingOverflow(count)
        if overflow || end > size {
            throw DiskImageError.invalid("\(what) of \(count) bytes at offset \(offset) is past the end of the \(size)-byte disk")
        }
}

/// A file descriptor with full-length pread/pwrite loops and typed errors. Owned by one image.
final class ImageFile: @unchecked Sendable {
    let path: String
    private(set) var fd: Int32
    let readOnly: Bool

    init(path: String, readOnly: Bool, create: Bool = false, truncate: Bool = false) throws {
        self.path = path
        self.readOnly = readOnly
        var flags: Int32 = readOnly ? O_RDONLY : O_RDWR
        flags |= O_CLOEXEC
        if create { flags |= O_CREAT }
        if truncate { flags |= O_TRUNC }
        let fd = open(path, flags, 0o644)
        if fd < 0 {
            let e = errno
            throw DiskImageError(.io, "cannot open \(path)\(readOnly ? " read-only" : ""): \(String(cString: strerror(e)))", errno: e)
        }
        self.fd = fd
    }

    deinit { if fd >= 0 { Glibc.close(fd) } }

    /// Whether [offset, offset + count) fits in an `off_t`.
    static func representable(_ offset: UInt64, _ count: Int) -> Bool {
        offset <= UInt64(Int64.max) && UInt64(Int64.max) - offset >= UInt64(count)
    }

    func close() {
        if fd >= 0 { Glibc.close(fd); fd = -1 }
    }

    private func fail(_ op: String, _ offset: UInt64, _ count: Int) -> DiskImageError {
        let e = errno
        return DiskImageError(.io, "\(path): \(op) of \(count) bytes at offset \(offset) failed: \(String(cString: strerror(e)))", errno: e)
    }

    /// Current file size in bytes.
    func fileSize() throws -> UInt64 {
        var st = stat()
        if fstat(fd, &st) != 0 { throw fail("fstat", 0, 0) }
        return UInt64(st.st_size)
    }

    /// Bytes actually allocated on the host file system.
    func allocatedBytes() throws -> UInt64 {
        var st = stat()
        if fstat(fd, &st) != 0 { throw fail("fstat", 0, 0) }
        return UInt64(st.st_blocks) * 512
    }

    /// Reads exactly `buffer.count` bytes at `offset`; bytes past end of file read as zero.
    func pread(_ buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        if !Self.representable(offset, buffer.count) {
            // No file reaches this far: it reads as zero, as any offset past the end does.
            buffer.initializeMemory(as: UInt8.self, repeating: 0)
            return
        }
        var done = 0
        while done < buffer.count {
            let n = Glibc.pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw fail("read", offset, buffer.count)
            }
            if n == 0 {
                // Past end of file: zero-fill (sparse tail).
                (buffer.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - done)
                return
            }
            done += n
        }
    }

    /// Reads exactly `count` bytes, throwing a corruption error if the file is shorter.
    func preadExact(at offset: UInt64, count: Int, what: String) throws -> [UInt8] {
        if !Self.representable(offset, count) {
            throw DiskImageError.corrupt(path, "\(what) at offset \(offset) (\(count) bytes) is past the end of the file")
        }
        var out = [UInt8](repeating: 0, count: count)
        let got: Int = try out.withUnsafeMutableBytes { buf in
            var done = 0
            while done < count {
                let n = Glibc.pread(fd, buf.baseAddress! + done, count - done, off_t(offset) + off_t(done))
                if n < 0 {
                    if errno == EINTR { continue }
                    throw fail("read of \(what)", offset, count)
                }
                if n == 0 { break }
                done += n
            }
            return done
        }
        if got < count {
            throw DiskImageError.corrupt(path, "\(what) at offset \(offset) (\(count) bytes) is past the end of the file (truncated image?)")
        }
        return out
    }

    func pread(at offset: UInt64, count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { try pread($0, at: offset) }
        return out
    }

    /// Writes all of `data` at `offset`.
    func pwrite(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        if readOnly { throw DiskImageError.invalid("\(path) is open read-only") }
        if !Self.representable(offset, data.count) {
            throw DiskImageError.corrupt(path, "write of \(data.count) bytes at offset \(offset) is beyond any file's size")
        }
        var done = 0
        while done < data.count {
            let n = Glibc.pwrite(fd, data.baseAddress! + done, data.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw fail("write", offset, data.count)
            }
            done += n
        }
    }

    func pwrite(_ data: [UInt8], at offset: UInt64) throws {
        try data.withUnsafeBytes { try pwrite($0, at: offset) }
    }

    /// When set, `datasync` does nothing (cache=unsafe).
    var syncDisabled = false

    func datasync() throws {
        if readOnly || syncDisabled { return }
        while fdatasync(fd) != 0 {
            if errno == EINTR { continue }
            throw fail("fdatasync", 0, 0)
        }
    }

    func truncate(to size: UInt64) throws {
        guard Self.representable(size, 0) else { throw DiskImageError.invalid("\(path): size \(size) is beyond any file's size") }
        while ftruncate(fd, off_t(size)) != 0 {
            if errno == EINTR { continue }
            throw fail("ftruncate", size, 0)
        }
    }

    /// Allocates host space for `[offset, offset + length)` so later writes cannot fail for lack of it:
    /// `zeroFill` false uses fallocate (qemu's preallocation=falloc), true writes zeroes over every hole in the
    /// range (preallocation=full). Data already in the file is kept either way.
    func preallocate(at offset: UInt64, length: UInt64, zeroFill: Bool) throws {
        guard length > 0 else { return }
        if !zeroFill {
            if c_fallocate(fd, 0, off_t(offset), off_t(length)) != 0 {
                throw fail("fallocate", offset, Int(clamping: length))
            }
            return
        }
        let end = offset + length
        let zeros = [UInt8](repeating: 0, count: 1 << 20)
        var pos = offset
        while pos < end {
            let hole = nextHole(from: pos)
            guard hole < end else { break }
            let dataAfter = nextData(from: hole).map { min($0, end) } ?? end
            var p = hole
            while p < dataAfter {
                let n = Int(min(UInt64(zeros.count), dataAfter - p))
                try zeros.withUnsafeBytes { try pwrite(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: p) }
                p += UInt64(n)
            }
            pos = dataAfter
        }
    }

    /// Deallocates a range (reads back as zeroes). Returns false if the file system does not support it.
    @discardableResult
    func punchHole(at offset: UInt64, length: UInt64) throws -> Bool {
        if length == 0 { return true }
        let r = c_fallocate(fd, linuxFallocPunchHole | linuxFallocKeepSize, off_t(offset), off_t(length))
        if r == 0 { return true }
        if errno == EOPNOTSUPP || errno == ENOSYS { return false }
        throw fail("fallocate(PUNCH_HOLE)", offset, Int(clamping: length))
    }

    /// Next data region at or after `offset` (linuxSeekData), or nil when only a hole remains.
    func nextData(from offset: UInt64) -> UInt64? {
        guard Self.representable(offset, 0) else { return nil }
        let r = lseek(fd, off_t(offset), linuxSeekData)
        if r < 0 { return nil }
        return UInt64(r)
    }

    /// Next hole at or after `offset` (linuxSeekHole).
    func nextHole(from offset: UInt64) -> UInt64 {
        guard Self.representable(offset, 0) else { return offset }
        let r = lseek(fd, off_t(offset), linuxSeekHole)
        if r < 0 { return (try? fileSize()) ?? offset }
        return UInt64(r)
    }
}
