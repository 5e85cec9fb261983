#if canImport(Glibc)
import Glibc
#endif

/// Copies an image file byte for byte to a new file, as `cp --reflink=auto --sparse=always` does:
/// a reflink (`FICLONE`, shared extents on btrfs or XFS) when the file system offers it, else the
/// data extents only (`SEEK_DATA`/`SEEK_HOLE`), with all-zero blocks left as holes. The copy has the
/// same size as the source. Used by `swiftkvm vm clone` for a clone's own writable disks.
public enum FileCopy {
    /// What a copy did.
    public struct Result: Sendable, Equatable {
        /// The file's size.
        public var size: UInt64
        /// Bytes written (0 for a reflink).
        public var bytesWritten: UInt64
        /// Whether the copy shares the source's extents (a reflink).
        public var reflinked: Bool
    }

    /// `FICLONE` = `_IOW(0x94, 9, int)`.
    static let ficlone: UInt = 0x4004_9409
    static let chunk = 1 << 20

    /// Copies `source` to `destination`, which must not exist (it is created with the source's
    /// permission bits, less the umask). On any failure the partial destination is removed and the
    /// error names the file and the step.
    public static func copy(from source: String, to destination: String) throws(DiskImageError) -> Result {
        let src = open(source, O_RDONLY | O_CLOEXEC)
        guard src >= 0 else { throw ioError("cannot open \(source)", errno) }
        defer { Glibc.close(src) }
        var st = stat()
        guard fstat(src, &st) == 0 else { throw ioError("cannot stat \(source)", errno) }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            throw DiskImageError(.invalidArgument, "\(source) is not a regular file (only image files can be copied)")
        }
        let dst = open(destination, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, st.st_mode & 0o777)
        guard dst >= 0 else { throw ioError("cannot create \(destination)", errno) }
        var done = false
        defer {
            Glibc.close(dst)
            if !done { unlink(destination) }
        }
        let size = UInt64(st.st_size)
        if ioctl(dst, ficlone, src) == 0 {
            done = true
            return Result(size: size, bytesWritten: 0, reflinked: true)
        }
        var written: UInt64 = 0
        var buffer = [UInt8](repeating: 0, count: chunk)
        var offset: UInt64 = 0
        while offset < size {
            // The next data extent [start, end); without SEEK_DATA support the whole rest is data.
            let d = lseek(src, off_t(offset), linuxSeekData)
            if d < 0 {
                if errno == ENXIO { break } // only a hole is left
                if errno != EINVAL && errno != EOPNOTSUPP { throw ioError("cannot seek in \(source)", errno) }
            }
            let start = d < 0 ? offset : UInt64(d)
            let h = lseek(src, off_t(start), linuxSeekHole)
            let end = h < 0 ? size : min(size, UInt64(h))
            var at = start
            while at < end {
                let want = Int(min(UInt64(chunk), end - at))
                let n = buffer.withUnsafeMutableBytes { pread(src, $0.baseAddress, want, off_t(at)) }
                if n < 0 && errno == EINTR { continue }
                guard n >= 0 else { throw ioError("cannot read \(source) at offset \(at)", errno) }
                guard n > 0 else { throw DiskImageError(.io, "\(source) shrank while it was copied (end of file at offset \(at), expected \(size) bytes)") }
                if !buffer[..<n].allSatisfy({ $0 == 0 }) {
                    var w = 0
                    while w < n {
                        let m = buffer.withUnsafeBytes { pwrite(dst, $0.baseAddress! + w, n - w, off_t(at) + off_t(w)) }
                        if m < 0 && errno == EINTR { continue }
                        guard m > 0 else { throw ioError("cannot write \(destination) at offset \(at + UInt64(w))", m < 0 ? errno : ENOSPC) }
                        w += m
                    }
                    written += UInt64(n)
                }
                at += UInt64(n)
            }
            offset = end
        }
        guard ftruncate(dst, off_t(size)) == 0 else { throw ioError("cannot set the size of \(destination) to \(size)", errno) }
        guard fsync(dst) == 0 else { throw ioError("cannot sync \(destination)", errno) }
        done = true
        return Result(size: size, bytesWritten: written, reflinked: false)
    }

    static func ioError(_ what: String, _ e: Int32) -> DiskImageError {
        DiskImageError(.io, "\(what): \(String(cString: strerror(e)))", errno: e)
    }
}
