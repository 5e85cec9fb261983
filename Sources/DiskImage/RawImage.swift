import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// A raw disk image: the file's bytes are the disk's bytes.
public final class RawImage: BlockBackend, @unchecked Sendable {
    let file: ImageFile
    private let lock = Mutex(())
    private var currentSize: UInt64
    private var unsynced = false

    /// The path the image was opened from.
    public var path: String { file.path }
    public var size: UInt64 { lock.withLock { _ in currentSize } }
    public var isReadOnly: Bool { file.readOnly }

    /// Opens an existing raw image. `unsafeNoSync` makes flush a no-op (qemu-img's cache=unsafe).
    public init(path: String, readOnly: Bool = false, unsafeNoSync: Bool = false) throws {
        file = try ImageFile(path: path, readOnly: readOnly)
        file.syncDisabled = unsafeNoSync
        currentSize = try file.fileSize()
    }

    /// Creates (or truncates) a sparse raw image of `size` bytes, rounded up to whole 512-byte sectors as qemu-img
    /// does.
    /// `preallocation` falloc reserves the host space, full writes zeroes (metadata is refused: raw has none).
    @discardableResult
    public static func create(path: String, size: UInt64, preallocation: Preallocation = .off) throws -> RawImage {
        guard preallocation != .metadata else {
            throw DiskImageError.invalid("\(path): preallocation=metadata is for qcow2; raw takes off, falloc or full")
        }
        let f = try ImageFile(path: path, readOnly: false, create: true, truncate: true)
        try f.truncate(to: roundUpToSector(size))
        if preallocation != .off {
            try f.preallocate(at: 0, length: roundUpToSector(size), zeroFill: preallocation == .full)
            try f.datasync()
        }
        f.close()
        return try RawImage(path: path)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try lock.withLock { _ in
            try checkRange(offset, UInt64(buffer.count), "read", size: currentSize)
            try file.pread(buffer, at: offset)
        }
    }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try lock.withLock { _ in
            if file.readOnly { throw DiskImageError.invalid("\(path): write to a read-only image") }
            try checkRange(offset, UInt64(data.count), "write", size: currentSize)
            try file.pwrite(data, at: offset)
            unsynced = true
        }
    }

    public func flush() throws {
        try lock.withLock { _ in
            if unsynced { try file.datasync(); unsynced = false }
        }
    }

    public func discard(at offset: UInt64, length: UInt64) throws {
        try writeZeroes(at: offset, length: length)
    }

    public func writeZeroes(at offset: UInt64, length: UInt64) throws {
        try lock.withLock { _ in
            if file.readOnly { throw DiskImageError.invalid("\(path): write to a read-only image") }
            try checkRange(offset, length, "write-zeroes", size: currentSize)
            unsynced = true
            if try !file.punchHole(at: offset, length: length) {
                let chunk = [UInt8](repeating: 0, count: 1 << 20)
                var pos = offset
                while pos < offset + length {
                    let n = Int(min(UInt64(chunk.count), offset + length - pos))
                    try chunk.withUnsafeBytes { try file.pwrite(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: pos) }
                    pos += UInt64(n)
                }
            }
        }
    }

    public func resize(to newSize: UInt64, allowShrink: Bool) throws {
        try lock.withLock { _ in
            if file.readOnly { throw DiskImageError.invalid("\(path): resize of a read-only image") }
            if newSize < currentSize && !allowShrink {
                throw DiskImageError.invalid("\(path): shrinking from \(currentSize) to \(newSize) bytes requires --shrink")
            }
            try file.truncate(to: newSize)
            currentSize = newSize
            unsynced = true
        }
    }

    /// Reserves host space from `offset` to the end (falloc) or writes zeroes over its holes (full), as `qemu-img
    /// resize --preallocation` does for the part a resize adds; metadata is refused (raw has none).
    public func preallocate(from offset: UInt64, mode: Preallocation) throws {
        guard mode != .off else { return }
        guard mode != .metadata else {
            throw DiskImageError.invalid("\(path): preallocation=metadata is for qcow2; raw takes off, falloc or full")
        }
        try lock.withLock { _ in
            guard offset < currentSize else { return }
            try file.preallocate(at: offset, length: currentSize - offset, zeroFill: mode == .full)
            unsynced = true
        }
    }

    public func close() throws {
        try lock.withLock { _ in
            if unsynced { try file.datasync() }
            file.close()
        }
    }

    /// Whether `[offset, offset+length)` contains any allocated data on the host (SEEK_DATA), for sparse copies.
    public func hasData(at offset: UInt64, length: UInt64) -> Bool {
        lock.withLock { _ in
            guard let d = file.nextData(from: offset) else { return false }
            return d < offset + length
        }
    }

    /// Bytes allocated on the host file system.
    public func allocatedBytes() throws -> UInt64 { try file.allocatedBytes() }
}
