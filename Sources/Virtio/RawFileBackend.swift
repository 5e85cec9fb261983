import DiskImage
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

// Linux values hidden behind _GNU_SOURCE in Glibc's Swift import.
private let linuxODirect: Int32 = 0o40000
private let linuxFallocKeepSize: Int32 = 1
private let linuxFallocPunchHole: Int32 = 2
@_silgen_name("fallocate")
private func c_fallocate(_ fd: Int32, _ mode: Int32, _ offset: off_t, _ len: off_t) -> Int32
@_silgen_name("posix_memalign")
private func c_posix_memalign(_ p: UnsafeMutablePointer<UnsafeMutableRawPointer?>, _ alignment: Int, _ size: Int) -> Int32

/// A block backend that can move one request's scattered buffers with a single system call.
public protocol VectoredBlockBackend: BlockBackend {
    /// Reads consecutive bytes at `offset` into `buffers` in order (preadv).
    func read(into buffers: [UnsafeMutableRawBufferPointer], at offset: UInt64) throws
    /// Writes `buffers` in order as consecutive bytes at `offset` (pwritev).
    func write(_ buffers: [UnsafeRawBufferPointer], at offset: UInt64) throws
}

/// A raw image file for virtio-blk, without a backend-wide lock so that requests run in parallel, and
/// with vectored I/O (one preadv/pwritev per request).
///
/// With `direct` (the `--disk …,cache=none` mode) the file is opened with `O_DIRECT`: I/O bypasses
/// the host page cache, as QEMU's `cache=none`; requests whose buffer addresses, offset or length are
/// not multiples of `alignment` go through an aligned bounce buffer (writes then read-modify-write
/// under a lock). `flush()` is an fdatasync in both modes, so completed writes are durable.
public final class RawFileBackend: VectoredBlockBackend, @unchecked Sendable {
    /// Alignment used for direct I/O (safe for 512-byte and 4 KiB logical sectors).
    public static let alignment = 4096

    public let path: String
    public let size: UInt64
    public let isReadOnly: Bool
    /// Whether the file is open with O_DIRECT.
    public let direct: Bool
    private let fd: Int32
    private let rmw = Mutex(())

    /// Opens `path` (read-only when `readOnly`; with O_DIRECT when `direct`, which fails when the
    /// file system does not support direct I/O).
    public init(path: String, readOnly: Bool, direct: Bool) throws {
        let fd = open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC | (direct ? linuxODirect : 0))
        guard fd >= 0 else { throw Self.error("cannot open \(path)\(direct ? " with O_DIRECT" : "")", errno) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { let e = errno; Glibc.close(fd); throw Self.error("fstat \(path)", e) }
        self.fd = fd
        self.path = path
        self.size = UInt64(st.st_size)
        self.isReadOnly = readOnly
        self.direct = direct
    }

    deinit { Glibc.close(fd) }

    private static func error(_ what: String, _ e: Int32) -> DiskImageError {
        DiskImageError(.io, "\(what): \(String(cString: strerror(e)))", errno: e)
    }

    private func check(_ offset: UInt64, _ count: UInt64, _ what: String) throws {
        let (end, o) = offset.addingReportingOverflow(count)
        if o || end > size {
            throw DiskImageError.invalid("\(path): \(what) of \(count) bytes at offset \(offset) is past the end of the \(size)-byte disk")
        }
    }

    private func aligned(_ p: UnsafeRawPointer?, _ offset: UInt64, _ count: Int) -> Bool {
        guard direct else { return true }
        let a = Self.alignment
        return Int(bitPattern: p) % a == 0 && offset % UInt64(a) == 0 && count % a == 0
    }

    private func preadFull(_ p: UnsafeMutableRawPointer, _ count: Int, _ offset: UInt64) throws {
        var done = 0
        while done < count {
            let n = Glibc.pread(fd, p + done, count - done, off_t(offset) + off_t(done))
            if n < 0 { if errno == EINTR { continue }; throw Self.error("\(path): read of \(count) bytes at \(offset)", errno) }
            if n == 0 { (p + done).initializeMemory(as: UInt8.self, repeating: 0, count: count - done); return }
            done += n
        }
    }

    private func pwriteFull(_ p: UnsafeRawPointer, _ count: Int, _ offset: UInt64) throws {
        var done = 0
        while done < count {
            let n = Glibc.pwrite(fd, p + done, count - done, off_t(offset) + off_t(done))
            if n < 0 { if errno == EINTR { continue }; throw Self.error("\(path): write of \(count) bytes at \(offset)", errno) }
            done += n
        }
    }

    /// Runs `body` with an aligned bounce buffer covering `[offset, offset+count)` rounded out to
    /// the alignment: (buffer, aligned start, bytes).
    private func withBounce<R>(_ offset: UInt64, _ count: Int, _ body: (UnsafeMutableRawPointer, UInt64, Int) throws -> R) throws -> R {
        let a = UInt64(Self.alignment)
        let start = offset / a * a
        let end = (offset + UInt64(count) + a - 1) / a * a
        let n = Int(end - start)
        var p: UnsafeMutableRawPointer?
        guard c_posix_memalign(&p, Self.alignment, n) == 0, let p else { throw Self.error("posix_memalign(\(n))", ENOMEM) }
        defer { free(p) }
        return try body(p, start, n)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try check(offset, UInt64(buffer.count), "read")
        guard buffer.count > 0, let base = buffer.baseAddress else { return }
        if aligned(base, offset, buffer.count) { return try preadFull(base, buffer.count, offset) }
        try withBounce(offset, buffer.count) { p, start, n in
            try preadFull(p, n, start)
            base.copyMemory(from: p + Int(offset - start), byteCount: buffer.count)
        }
    }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard !isReadOnly else { throw DiskImageError.invalid("\(path) is open read-only") }
        try check(offset, UInt64(data.count), "write")
        guard data.count > 0, let base = data.baseAddress else { return }
        if aligned(base, offset, data.count) { return try pwriteFull(base, data.count, offset) }
        try rmw.withLock { _ in
            try withBounce(offset, data.count) { p, start, n in
                try preadFull(p, n, start)
                (p + Int(offset - start)).copyMemory(from: base, byteCount: data.count)
                try pwriteFull(p, n, start)
            }
        }
    }

    public func read(into buffers: [UnsafeMutableRawBufferPointer], at offset: UInt64) throws {
        let total = buffers.reduce(0) { $0 + $1.count }
        try check(offset, UInt64(total), "read")
        var pos = offset
        if vectorOK(buffers.map { UnsafeRawBufferPointer($0) }, offset) {
            let done = try transfer(buffers.map { UnsafeRawBufferPointer($0) }, offset, write: false)
            if done == total { return }
            // Short read (end of file): finish buffer by buffer (zero-filling).
            var skip = done
            for b in buffers {
                if skip >= b.count { skip -= b.count; pos += UInt64(b.count); continue }
                try read(into: UnsafeMutableRawBufferPointer(rebasing: b[skip...]), at: pos + UInt64(skip))
                pos += UInt64(b.count)
                skip = 0
            }
            return
        }
        for b in buffers { try read(into: b, at: pos); pos += UInt64(b.count) }
    }

    public func write(_ buffers: [UnsafeRawBufferPointer], at offset: UInt64) throws {
        guard !isReadOnly else { throw DiskImageError.invalid("\(path) is open read-only") }
        let total = buffers.reduce(0) { $0 + $1.count }
        try check(offset, UInt64(total), "write")
        var pos = offset
        if vectorOK(buffers, offset) {
            var done = try transfer(buffers, offset, write: true)
            if done == total { return }
            for b in buffers {
                if done >= b.count { done -= b.count; pos += UInt64(b.count); continue }
                try write(UnsafeRawBufferPointer(rebasing: b[done...]), at: pos + UInt64(done))
                pos += UInt64(b.count)
                done = 0
            }
            return
        }
        for b in buffers { try write(b, at: pos); pos += UInt64(b.count) }
    }

    /// Whether one preadv/pwritev can move `buffers` (every piece aligned for O_DIRECT).
    private func vectorOK(_ buffers: [UnsafeRawBufferPointer], _ offset: UInt64) -> Bool {
        guard buffers.count > 1, buffers.count <= 1024 else { return false }
        return buffers.allSatisfy { aligned($0.baseAddress, offset, $0.count) }
    }

    /// One preadv/pwritev (retried on EINTR); returns the bytes moved (short at end of file).
    private func transfer(_ buffers: [UnsafeRawBufferPointer], _ offset: UInt64, write: Bool) throws -> Int {
        var iov = buffers.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
        while true {
            let n = iov.withUnsafeMutableBufferPointer { v in
                write ? pwritev(fd, v.baseAddress, Int32(v.count), off_t(offset)) : preadv(fd, v.baseAddress, Int32(v.count), off_t(offset))
            }
            if n >= 0 { return n }
            if errno == EINTR { continue }
            throw Self.error("\(path): \(write ? "pwritev" : "preadv") of \(buffers.count) buffers at \(offset)", errno)
        }
    }

    public func flush() throws {
        if isReadOnly { return }
        while fdatasync(fd) != 0 {
            if errno == EINTR { continue }
            throw Self.error("\(path): fdatasync", errno)
        }
    }

    public func discard(at offset: UInt64, length: UInt64) throws {
        try writeZeroes(at: offset, length: length)
    }

    public func writeZeroes(at offset: UInt64, length: UInt64) throws {
        guard !isReadOnly else { throw DiskImageError.invalid("\(path) is open read-only") }
        try check(offset, length, "write-zeroes")
        if length == 0 { return }
        if c_fallocate(fd, linuxFallocPunchHole | linuxFallocKeepSize, off_t(offset), off_t(length)) == 0 { return }
        // No hole punching here: write zeroes in aligned chunks.
        let chunk = 1 << 20
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(chunk), length - done))
            try withBounce(offset + done, n) { p, start, total in
                try rmw.withLock { _ in
                    try preadFull(p, total, start)
                    (p + Int(offset + done - start)).initializeMemory(as: UInt8.self, repeating: 0, count: n)
                    try pwriteFull(p, total, start)
                }
            }
            done += UInt64(n)
        }
    }

    public func resize(to newSize: UInt64, allowShrink: Bool) throws {
        throw DiskImageError(.unsupported, "\(path): resizing a disk in use by virtio-blk is not supported")
    }

    public func close() throws { try flush() }
}
