import GuestMemory
#if canImport(Glibc)
import Glibc
#endif

/// A kernel, initrd or module given either as a file path or as bytes already in memory.
public enum BootSource: Sendable, Equatable {
    case path(String)
    case bytes([UInt8], name: String)

    /// The path or name, for messages.
    public var name: String {
        switch self {
        case .path(let p): return p
        case .bytes(_, let n): return n
        }
    }

    /// The whole content. Files larger than `limit` are refused with an error naming the path.
    public func readAll(limit: UInt64) throws -> [UInt8] { try readAllWithIdentity(limit: limit).bytes }

    /// The whole content and, for a file that did not change while it was read, its identity (for
    /// `KernelCache`'s memo of the payload's key).
    func readAllWithIdentity(limit: UInt64) throws -> (bytes: [UInt8], identity: KernelCache.SourceIdentity?) {
        switch self {
        case .bytes(let b, let n):
            guard UInt64(b.count) <= limit else { throw BootError.doesNotFit("\(n) is \(sizeText(UInt64(b.count))), larger than \(sizeText(limit))") }
            return (b, nil)
        case .path(let p):
            return try BootFile.open(p) { fd, size in
                guard size <= limit else {
                    throw BootError.doesNotFit("\(p) is \(sizeText(size)), larger than \(sizeText(limit)) of guest RAM")
                }
                var before = stat(), after = stat()
                _ = fstat(fd, &before)
                // Read into uninitialized storage: zero-filling megabytes first would only be overwritten.
                let out = try [UInt8](unsafeUninitializedCapacity: Int(size)) { buf, count in
                    try BootFile.readFully(fd, into: UnsafeMutableRawBufferPointer(buf), path: p)
                    count = Int(size)
                }
                let unchanged = fstat(fd, &after) == 0 && KernelCache.SourceIdentity(before) == KernelCache.SourceIdentity(after)
                return (out, unchanged ? KernelCache.SourceIdentity(after) : nil)
            }
        }
    }

    /// The first `count` bytes (fewer if the source is shorter) and the total size.
    func readPrefix(_ count: Int) throws -> (bytes: [UInt8], size: UInt64) {
        switch self {
        case .bytes(let b, _): return (Array(b.prefix(count)), UInt64(b.count))
        case .path(let p):
            return try BootFile.open(p) { fd, size in
                var out = [UInt8](repeating: 0, count: Int(min(UInt64(count), size)))
                try out.withUnsafeMutableBytes { try BootFile.preadFully(fd, into: $0, at: 0, path: p) }
                return (out, size)
            }
        }
    }

    /// Copies `count` bytes from file offset `offset` straight into guest memory at `address`.
    func copyRange(offset: UInt64, count: UInt64, into memory: GuestMemory, at address: UInt64) throws {
        guard count > 0 else { return }
        let dst = try guarded(name, at: address) { try memory.translate(address, count: count) }
        switch self {
        case .bytes(let b, let n):
            guard offset <= UInt64(b.count), count <= UInt64(b.count) - offset else {
                throw BootError.invalidImage("\(n): range \(hex(offset))+\(hex(count)) is past the end (\(b.count) bytes)")
            }
            b.withUnsafeBytes { dst.copyMemory(from: $0.baseAddress! + Int(offset), byteCount: Int(count)) }
        case .path(let p):
            try BootFile.open(p) { fd, size in
                guard offset <= size, count <= size - offset else {
                    throw BootError.fileUnreadable(path: p, reason: "range \(hex(offset))+\(hex(count)) is past the end of the file (\(size) bytes)")
                }
                try BootFile.preadFully(fd, into: UnsafeMutableRawBufferPointer(start: dst, count: Int(count)), at: offset, path: p)
            }
        }
    }

    /// The size in bytes.
    func size() throws -> UInt64 {
        switch self {
        case .bytes(let b, _): return UInt64(b.count)
        case .path(let p): return try BootFile.open(p) { _, size in size }
        }
    }

    /// Copies the content straight into guest memory at `address` (which must hold `size()` bytes).
    func copy(into memory: GuestMemory, at address: UInt64, expectedSize: UInt64) throws {
        switch self {
        case .bytes(let b, let n):
            try guarded(n, at: address) { try memory.write(b, at: address) }
        case .path(let p):
            try BootFile.open(p) { fd, size in
                guard size == expectedSize else {
                    throw BootError.fileUnreadable(path: p, reason: "size changed while loading (\(expectedSize) → \(size) bytes)")
                }
                let dst = try guarded(p, at: address) { try memory.translate(address, count: size) }
                try BootFile.readFully(fd, into: UnsafeMutableRawBufferPointer(start: dst, count: Int(size)), path: p)
            }
        }
    }
}

/// File helpers with errors that name the path.
enum BootFile {
    /// Opens `path` read-only, checks it is a regular file, and calls `body` with the fd and size.
    static func open<R>(_ path: String, _ body: (Int32, UInt64) throws -> R) throws -> R {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw BootError.fileUnreadable(path: path, reason: String(cString: strerror(errno))) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw BootError.fileUnreadable(path: path, reason: String(cString: strerror(errno))) }
        guard (st.st_mode & S_IFMT) == S_IFREG else { throw BootError.fileUnreadable(path: path, reason: "not a regular file") }
        return try body(fd, UInt64(st.st_size))
    }

    /// Reads exactly `buffer.count` bytes at file offset `offset`.
    static func preadFully(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, path: String) throws {
        var done = 0
        while done < buffer.count {
            let n = pread(fd, buffer.baseAddress! + done, min(buffer.count - done, 1 << 30), off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw BootError.fileUnreadable(path: path, reason: String(cString: strerror(errno)))
            }
            if n == 0 { throw BootError.fileUnreadable(path: path, reason: "file shrank to \(UInt64(done) + offset) bytes while reading") }
            done += n
        }
    }

    /// Reads exactly `buffer.count` bytes.
    static func readFully(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, path: String) throws {
        var done = 0
        while done < buffer.count {
            let n = read(fd, buffer.baseAddress! + done, min(buffer.count - done, 1 << 30))
            if n < 0 {
                if errno == EINTR { continue }
                throw BootError.fileUnreadable(path: path, reason: String(cString: strerror(errno)))
            }
            if n == 0 { throw BootError.fileUnreadable(path: path, reason: "file shrank to \(done) bytes while reading") }
            done += n
        }
    }
}
