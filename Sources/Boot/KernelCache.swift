import CZlib
#if canImport(Glibc)
import Glibc
#endif

/// A cache of decompressed bzImage payloads, so that a kernel is decompressed on the host once rather
/// than at every start.
///
/// An entry is keyed by the compressed payload's length, CRC-32 and compression format, and holds a
/// header (`KernelCache.Header`) followed by the decompressed vmlinux. An entry is used only when its
/// header matches the key and the decompressed bytes' length and CRC-32 check out; anything else is
/// ignored and replaced. Entries are written to a temporary file in the cache directory, fsynced and
/// renamed into place, so a concurrent reader sees either no entry or a whole one.
///
/// The cache never makes a load fail: any error reading or writing it (read-only file system, full disk,
/// permissions) falls back to decompressing, and is reported in the returned outcome (which
/// `BzImageLoader` adds to `LoadedKernel.notes`, logged at debug level by the VMM).
public struct KernelCache: Sendable, Equatable {
    /// The directory holding the entries.
    public var directory: String
    /// Entries kept after a new one is written (the least recently used beyond this are removed).
    public var maxEntries: Int

    /// Payloads shorter than this are decompressed without the cache (they take milliseconds, and
    /// test kernels would otherwise crowd real ones out of it).
    public var minimumPayload: Int

    /// A cache in `directory` (created with mode 0700 when missing).
    public init(directory: String, maxEntries: Int = 8, minimumPayload: Int = 1 << 20) {
        self.directory = directory
        self.maxEntries = max(1, maxEntries)
        self.minimumPayload = max(0, minimumPayload)
    }

    /// Environment variable naming the cache directory.
    public static let directoryVariable = "SWIFTKVM_CACHE_DIR"
    /// Environment variable that disables the cache when set to `off` (or `0`, `no`, `false`).
    public static let switchVariable = "SWIFTKVM_KERNEL_CACHE"

    /// The cache the environment asks for, or nil when it is disabled or no location can be found:
    /// `$SWIFTKVM_CACHE_DIR` if set, else `/var/cache/swiftkvm/kernels` for root, else
    /// `$XDG_CACHE_HOME/swiftkvm/kernels` or `$HOME/.cache/swiftkvm/kernels`.
    /// `SWIFTKVM_KERNEL_CACHE=off` disables it.
    public static func fromEnvironment(_ environment: (String) -> String? = { getenv($0).map { String(cString: $0) } },
                                       isRoot: Bool = geteuid() == 0) -> KernelCache? {
        if let s = environment(switchVariable), ["off", "0", "no", "false", "disabled"].contains(s.lowercased()) {
            return nil
        }
        if let d = environment(directoryVariable), !d.isEmpty { return KernelCache(directory: d) }
        if isRoot { return KernelCache(directory: "/var/cache/swiftkvm/kernels") }
        if let x = environment("XDG_CACHE_HOME"), x.hasPrefix("/") { return KernelCache(directory: x + "/swiftkvm/kernels") }
        if let h = environment("HOME"), h.hasPrefix("/") { return KernelCache(directory: h + "/.cache/swiftkvm/kernels") }
        return nil
    }

    /// What happened to the cache during one load.
    public enum Outcome: Sendable, Equatable {
        /// The entry at this path was valid and was used. `checksummed`: its data CRC was computed during this
        /// load (the first use of this file); false when the same file (device, inode, size, modification time)
        /// had been verified before.
        case hit(String, checksummed: Bool)
        /// There was no usable entry (the reason says why); the payload was decompressed and a new
        /// entry written at this path.
        case stored(String, reason: String)
        /// The cache could not be used (the reason names the path and the error); the payload was
        /// decompressed without it.
        case bypassed(String)

        /// One line for `LoadedKernel.notes`.
        public var note: String {
            switch self {
            case .hit(let p, let c): return "kernel cache hit: \(p) (\(c ? "checksum verified" : "verified before, same file"))"
            case .stored(let p, let r): return "kernel cache miss (\(r)): wrote \(p)"
            case .bypassed(let r): return "kernel cache not used: \(r); decompressed without it"
            }
        }
    }

    /// One version of the file a payload came from: device, inode, size, modification and change times
    /// (a change time cannot be set back, so a rewritten file never matches an older identity).
    public struct SourceIdentity: Sendable, Equatable {
        /// `dev ino size mtime ctime`.
        public var text: String
        /// Device and inode, which name the source's memo.
        var device: UInt64, inode: UInt64
        /// Whether the file was last changed long enough ago that a change within the same timestamp tick
        /// can no longer follow unseen (as git treats "racily clean" files); only such versions are memoized.
        public var settled: Bool

        /// The identity of the file with status `st`, `now` being the current time.
        public init(_ st: stat, now: time_t = time(nil)) {
            text = "\(st.st_dev) \(st.st_ino) \(st.st_size) \(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec) \(st.st_ctim.tv_sec).\(st.st_ctim.tv_nsec)"
            device = UInt64(st.st_dev)
            inode = UInt64(st.st_ino)
            settled = now - max(st.st_mtim.tv_sec, st.st_ctim.tv_sec) >= 2
        }
    }

    /// The key of an entry: the compressed payload's length, CRC-32 and format.
    public struct Key: Sendable, Equatable {
        public var compressedLength: UInt64
        public var compressedCRC: UInt32
        public var format: CompressionFormat

        /// The key of `payload` in `format`.
        public init(payload: UnsafeRawBufferPointer, format: CompressionFormat) {
            compressedLength = UInt64(payload.count)
            compressedCRC = KernelCache.crc32(payload)
            self.format = format
        }

        init(compressedLength: UInt64, compressedCRC: UInt32, format: CompressionFormat) {
            self.compressedLength = compressedLength
            self.compressedCRC = compressedCRC
            self.format = format
        }

        /// The entry's file name: format, length and CRC, so different kernels coexist.
        var fileName: String {
            let c = String(compressedCRC, radix: 16)
            return "\(format.rawValue)-\(compressedLength)-" + String(repeating: "0", count: 8 - c.count) + c + ".vmlinux"
        }
    }

    /// The fixed 4096-byte header of an entry (little-endian):
    /// magic "SKVMKERN" (8), version (4), header size (4), compressed length (8), compressed CRC-32 (4),
    /// format code (4), decompressed length (8), decompressed CRC-32 (4), CRC-32 of bytes 0..<44 (4),
    /// zero padding to 4096. The padding puts the decompressed data on a page boundary, so a loader can
    /// map the kernel's segments from the file instead of copying them (version 1 had a 64-byte header).
    struct Header: Equatable {
        static let size = 4096
        static let magic: [UInt8] = Array("SKVMKERN".utf8)
        static let version: UInt32 = 2
        var key: Key
        var decompressedLength: UInt64
        var decompressedCRC: UInt32

        /// Stable on-disk codes of the formats (independent of the enum's order).
        static func code(_ f: CompressionFormat) -> UInt32 {
            switch f {
            case .gzip: return 1
            case .xz: return 2
            case .lzma: return 3
            case .lz4Legacy: return 4
            case .lz4Frame: return 5
            case .zstd: return 6
            case .bzip2: return 7
            case .lzo: return 8
            case .uncompressed: return 9
            }
        }

        func encode() -> [UInt8] {
            var b = Header.magic + [UInt8](repeating: 0, count: Header.size - Header.magic.count)
            b.putLE(Header.version, at: 8)
            b.putLE(UInt32(Header.size), at: 12)
            b.putLE(key.compressedLength, at: 16)
            b.putLE(key.compressedCRC, at: 24)
            b.putLE(Header.code(key.format), at: 28)
            b.putLE(decompressedLength, at: 32)
            b.putLE(decompressedCRC, at: 40)
            b.putLE(b.withUnsafeBytes { KernelCache.crc32(UnsafeRawBufferPointer(rebasing: $0[0..<44])) }, at: 44)
            return b
        }

        /// Checks `bytes` (at least `size` long) against `key`; returns the decompressed length and CRC,
        /// or the reason the header does not match.
        static func check(_ bytes: UnsafeRawBufferPointer, key: Key) -> Result<(UInt64, UInt32), Mismatch> {
            guard bytes.count >= size else { return .failure(Mismatch("shorter than the \(size)-byte header")) }
            func u32(_ o: Int) -> UInt32 { UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: o, as: UInt32.self)) }
            func u64(_ o: Int) -> UInt64 { UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: o, as: UInt64.self)) }
            guard Array(bytes[0..<8]) == magic else { return .failure(Mismatch("bad magic")) }
            guard u32(8) == version, u32(12) == UInt32(size) else { return .failure(Mismatch("version \(u32(8)), not \(version)")) }
            guard KernelCache.crc32(UnsafeRawBufferPointer(rebasing: bytes[0..<44])) == u32(44) else {
                return .failure(Mismatch("header checksum mismatch"))
            }
            guard u64(16) == key.compressedLength, u32(24) == key.compressedCRC, u32(28) == code(key.format) else {
                return .failure(Mismatch("header is for another payload"))
            }
            return .success((u64(32), u32(40)))
        }
    }

    /// Why an entry was not used.
    struct Mismatch: Error { var reason: String; init(_ r: String) { reason = r } }

    /// CRC-32 (zlib) of `bytes`, in slices that fit zlib's 32-bit length.
    static func crc32(_ bytes: UnsafeRawBufferPointer, seed: UInt32 = 0) -> UInt32 {
        var c = UInt(seed)
        var o = 0
        while o < bytes.count, let base = bytes.baseAddress {
            let n = min(bytes.count - o, 1 << 30)
            c = CZlib.crc32(c, (base + o).assumingMemoryBound(to: Bytef.self), uInt(n))
            o += n
        }
        return UInt32(truncatingIfNeeded: c)
    }

    /// The path of the entry for `key`.
    public func path(for key: Key) -> String { directory + "/" + key.fileName }

    /// Produces the decompressed `payload`: from a valid cache entry (through `mapper`) when there is one, else
    /// by decompressing it (`Decompressor`) into `consumer`, in order, while writing a new entry. Returns the number
    /// of bytes produced and what happened to the cache. Output never exceeds `limit` bytes either way.
    ///
    /// Errors thrown are those of decompression, `consumer` or `mapper`, never of the cache.
    ///
    /// A hit hands the whole entry to `mapper` instead of `consumer`: the entry's file descriptor, the file offset
    /// of the decompressed data (page-aligned), and the mapped data, so the loader can map the kernel's segments
    /// from the file copy-on-write (the descriptor is closed after `mapper` returns).
    ///
    /// `source`, the identity of the file the payload was read from, lets a later load of the same file version
    /// take the key from a memo instead of checksumming the payload again.
    public func decompress(_ payload: UnsafeRawBufferPointer, format: CompressionFormat, limit: Int,
                           source: SourceIdentity? = nil,
                           mapper: (_ fd: Int32, _ dataOffset: Int, _ data: UnsafeRawBufferPointer) throws -> Void,
                           consumer: @escaping (UnsafeRawBufferPointer) throws -> Void) throws -> (total: Int, outcome: Outcome) {
        guard payload.count >= minimumPayload else {
            let total = try Decompressor.decompress(payload, format: format, limit: limit, consumer: consumer)
            return (total, .bypassed("payload of \(payload.count) bytes is below the \(minimumPayload)-byte minimum"))
        }
        let key: Key
        if let source, let memo = memoizedKey(source, length: payload.count, format: format) {
            key = memo
        } else {
            key = Key(payload: payload, format: format)
            if let source, source.settled { memoize(key, for: source) }
        }
        let entryPath = path(for: key)
        var reason = "no entry"
        switch lookup(key, at: entryPath, limit: limit) {
        case .success(let entry):
            defer { entry.unmap() }
            // Mark it recently used for `prune` (best effort) through its access time alone: the modification time
            // is part of the verified marker's identity.
            // UTIME_NOW and UTIME_OMIT (<sys/stat.h> macros that do not import).
            var times = [timespec(tv_sec: 0, tv_nsec: (1 << 30) - 1), timespec(tv_sec: 0, tv_nsec: (1 << 30) - 2)]
            _ = utimensat(AT_FDCWD, entryPath, &times, 0)
            try mapper(entry.fd, Header.size, entry.data)
            return (entry.data.count, .hit(entryPath, checksummed: entry.checksummed))
        case .failure(let m):
            reason = m.reason
        }

        let writer: EntryWriter
        do {
            writer = try EntryWriter(directory: directory, key: key)
        } catch let e as Mismatch {
            let total = try Decompressor.decompress(payload, format: format, limit: limit, consumer: consumer)
            return (total, .bypassed(e.reason))
        }
        var writeError: String?
        let total: Int
        do {
            total = try Decompressor.decompress(payload, format: format, limit: limit) { chunk in
                if writeError == nil {
                    do { try writer.append(chunk) } catch let e as Mismatch { writeError = e.reason; writer.abandon() }
                }
                try consumer(chunk)
            }
        } catch {
            writer.abandon()
            throw error
        }
        if let writeError { return (total, .bypassed(writeError)) }
        do {
            try writer.commit(as: entryPath)
        } catch let e as Mismatch {
            return (total, .bypassed(e.reason))
        } catch {
            return (total, .bypassed("\(error)"))
        }
        // The writer checksummed what it wrote: the stored file counts as verified.
        var st = stat()
        if stat(entryPath, &st) == 0 { markVerified(entryPath, st) }
        prune(keeping: entryPath)
        return (total, .stored(entryPath, reason: reason))
    }

    /// A mapped, validated entry and its open file.
    struct MappedEntry {
        let base: UnsafeMutableRawPointer
        let length: Int
        let fd: Int32
        /// Whether the data checksum was computed for this use (else this file version was verified before).
        let checksummed: Bool
        /// The decompressed bytes (after the header).
        var data: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: base + Header.size, count: length - Header.size) }
        func unmap() { munmap(base, length); close(fd) }
    }

    /// What identifies one version of an entry file: a file rewritten in place gets a new modification time, a
    /// replaced one a new inode. (Not the change time: marking an entry used sets its access time, which changes
    /// it. Only this user can set a modification time back, and the directory is this user's alone.)
    static func identity(_ st: stat) -> String {
        "\(st.st_dev) \(st.st_ino) \(st.st_size) \(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec)"
    }

    /// The marker recording that the entry at `path` was verified: `.<entry name>.verified` beside it.
    func verifiedMarker(for path: String) -> String {
        let name = path[(path.lastIndex(of: "/").map { path.index(after: $0) } ?? path.startIndex)...]
        return directory + "/." + name + ".verified"
    }

    /// Whether the marker says this very file (by `identity`) was verified before.
    func wasVerified(_ path: String, _ st: stat) -> Bool {
        readSmallFile(verifiedMarker(for: path)) == KernelCache.identity(st) + "\n"
    }

    /// Records that the file at `path` with status `st` was verified (best effort: a failure only costs a
    /// checksum at the next use).
    func markVerified(_ path: String, _ st: stat) {
        writeSmallFile(verifiedMarker(for: path), KernelCache.identity(st) + "\n")
    }

    /// Whether the directory could have been written by someone else (then nothing in it is trusted).
    var directoryIsShared: Bool {
        var dst = stat()
        return stat(directory, &dst) == 0 && (dst.st_uid != geteuid() || dst.st_mode & 0o022 != 0)
    }

    /// The memo of the key of a source file's payload: `.source-<dev>-<inode>`.
    func sourceMemo(_ source: SourceIdentity) -> String { directory + "/.source-\(source.device)-\(source.inode)" }

    /// The key recorded for this very version of the source file, if its length and format still agree.
    func memoizedKey(_ source: SourceIdentity, length: Int, format: CompressionFormat) -> Key? {
        guard !directoryIsShared, let text = readSmallFile(sourceMemo(source)) else { return nil }
        let prefix = source.text + " "
        guard text.hasPrefix(prefix), text.hasSuffix("\n") else { return nil }
        let fields = text.dropFirst(prefix.count).dropLast().split(separator: " ")
        guard fields.count == 3, fields[0] == format.rawValue, UInt64(fields[1]) == UInt64(length),
              let crc = UInt32(fields[2], radix: 16) else { return nil }
        return Key(compressedLength: UInt64(length), compressedCRC: crc, format: format)
    }

    /// Whether the source memo at `path` names an entry that exists (else `prune` removes it).
    func sourceMemoHasEntry(_ path: String) -> Bool {
        guard let text = readSmallFile(path) else { return false }
        let f = text.dropLast().split(separator: " ").suffix(3)
        guard f.count == 3, let format = CompressionFormat(rawValue: String(f[f.startIndex])),
              let length = UInt64(f[f.startIndex + 1]), let crc = UInt32(f[f.startIndex + 2], radix: 16) else { return false }
        return access(self.path(for: Key(compressedLength: length, compressedCRC: crc, format: format)), F_OK) == 0
    }

    /// Records `key` for this version of the source file (best effort: a failure costs a checksum next time).
    func memoize(_ key: Key, for source: SourceIdentity) {
        guard !directoryIsShared, (try? EntryWriter.makeDirectory(directory)) != nil else { return }
        writeSmallFile(sourceMemo(source), "\(source.text) \(key.format.rawValue) \(key.compressedLength) \(String(key.compressedCRC, radix: 16))\n")
    }

    /// The content of a small regular file of this user's (not a symlink), or nil.
    func readSmallFile(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG, st.st_uid == geteuid(), st.st_size < 512 else { return nil }
        var buf = [UInt8](repeating: 0, count: 512)
        let n = read(fd, &buf, buf.count)
        guard n > 0 else { return nil }
        return String(decoding: buf[0..<n], as: UTF8.self)
    }

    /// Replaces `path` with `text` through a temporary file and a rename (best effort).
    func writeSmallFile(_ path: String, _ text: String) {
        let temp = path + ".tmp-\(getpid())"
        let fd = open(temp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { return }
        let bytes = Array(text.utf8)
        let ok = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress!, $0.count) } == bytes.count
        close(fd)
        if !ok || rename(temp, path) != 0 { unlink(temp) }
    }

    /// Maps the entry at `path` read-only and validates it against `key` and `limit`.
    func lookup(_ key: Key, at path: String, limit: Int) -> Result<MappedEntry, Mismatch> {
        // Only entries that nobody else could have written are trusted.
        if directoryIsShared {
            return .failure(Mismatch("\(directory) is not owned by this user or is writable by others"))
        }
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW)
        guard fd >= 0 else {
            return .failure(Mismatch(errno == ENOENT ? "no entry" : "cannot open \(path): \(errnoText())"))
        }
        let failOpen = { (r: String) -> Result<MappedEntry, Mismatch> in close(fd); return .failure(Mismatch(r)) }
        var st = stat()
        guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { return failOpen("\(path) is not a regular file") }
        guard st.st_uid == geteuid() else { return failOpen("\(path) is not owned by this user") }
        let size = Int(st.st_size)
        guard size >= Header.size else { return failOpen("entry is truncated (\(size) bytes)") }
        guard let p = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0), p != UnsafeMutableRawPointer(bitPattern: -1) else {
            return failOpen("cannot map \(path): \(errnoText())")
        }
        let whole = UnsafeRawBufferPointer(start: p, count: size)
        let fail = { (r: String) -> Result<MappedEntry, Mismatch> in munmap(p, size); close(fd); return .failure(Mismatch(r)) }
        switch Header.check(UnsafeRawBufferPointer(rebasing: whole[0..<Header.size]), key: key) {
        case .failure(let m): return fail("entry \(m.reason)")
        case .success(let (length, crc)):
            guard length == UInt64(size - Header.size) else {
                return fail("entry has \(size - Header.size) bytes of data, its header says \(length)")
            }
            guard length <= UInt64(limit) else { return fail("entry of \(length) bytes exceeds the limit of \(limit)") }
            // The data checksum once per file version: a later use of the same file (same inode, size and times)
            // trusts the marker, so a warm start does not read the whole entry.
            if wasVerified(path, st) {
                return .success(MappedEntry(base: p, length: size, fd: fd, checksummed: false))
            }
            _ = madvise(p, size, MADV_SEQUENTIAL)
            guard KernelCache.crc32(UnsafeRawBufferPointer(rebasing: whole[Header.size...])) == crc else {
                return fail("entry data checksum mismatch")
            }
            markVerified(path, st)
            return .success(MappedEntry(base: p, length: size, fd: fd, checksummed: true))
        }
    }

    /// Removes the least recently used entries beyond `maxEntries` (by the later of their access and modification
    /// times) with their verified markers, markers whose entry is gone, and temporary files of interrupted
    /// writers older than an hour. Errors are ignored.
    func prune(keeping: String) {
        guard let d = opendir(directory) else { return }
        var entries: [(path: String, mtime: Int)] = []
        let now = time(nil)
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            let p = directory + "/" + name
            var st = stat()
            guard lstat(p, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { continue }
            if name.hasSuffix(".vmlinux") && !name.hasPrefix(".") {
                entries.append((p, max(st.st_mtim.tv_sec, st.st_atim.tv_sec)))
            } else if name.hasPrefix(".tmp-") || name.contains(".verified.tmp-") || name.contains(".tmp-"), now - st.st_mtim.tv_sec > 3600 {
                unlink(p)
            } else if name.hasPrefix("."), name.hasSuffix(".verified"),
                      access(directory + "/" + name.dropFirst().dropLast(".verified".count), F_OK) != 0 {
                unlink(p)
            } else if name.hasPrefix(".source-"), !name.contains(".tmp-"), !sourceMemoHasEntry(p) {
                unlink(p)
            }
        }
        closedir(d)
        guard entries.count > maxEntries else { return }
        for e in entries.sorted(by: { $0.mtime > $1.mtime }).dropFirst(maxEntries) where e.path != keeping {
            unlink(e.path)
            unlink(verifiedMarker(for: e.path))
        }
    }
}

/// Writes one entry: a temporary file in the cache directory, renamed into place by `commit`.
final class EntryWriter {
    private var fd: Int32
    private let tempPath: String
    private let key: KernelCache.Key
    private var length: UInt64 = 0
    private var crc: UInt32 = 0

    /// Creates the directory (0700) if needed and a temporary file in it. Throws `Mismatch` naming the
    /// path and error.
    init(directory: String, key: KernelCache.Key) throws {
        try EntryWriter.makeDirectory(directory)
        var template = Array((directory + "/.tmp-XXXXXX").utf8CString)
        let f = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard f >= 0 else { throw KernelCache.Mismatch("cannot create a file in \(directory): \(errnoText())") }
        _ = fcntl(f, F_SETFD, FD_CLOEXEC)
        fd = f
        tempPath = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        self.key = key
        // Room for the header, written last.
        do { try writeAll([UInt8](repeating: 0, count: KernelCache.Header.size)) } catch { abandon(); throw error }
    }

    deinit { if fd >= 0 { abandon() } }

    /// Creates `path` and missing parents with mode 0700; refuses a directory that is not ours or is
    /// writable by others.
    static func makeDirectory(_ path: String) throws {
        var st = stat()
        if stat(path, &st) != 0 {
            guard errno == ENOENT else { throw KernelCache.Mismatch("cannot use \(path): \(errnoText())") }
            var prefix = path.hasPrefix("/") ? "" : "."
            for part in path.split(separator: "/") {
                prefix += "/" + part
                if mkdir(prefix, 0o700) != 0 && errno != EEXIST {
                    throw KernelCache.Mismatch("cannot create \(prefix): \(errnoText())")
                }
            }
            guard stat(path, &st) == 0 else { throw KernelCache.Mismatch("cannot use \(path): \(errnoText())") }
        }
        guard (st.st_mode & S_IFMT) == S_IFDIR else { throw KernelCache.Mismatch("\(path) is not a directory") }
        guard st.st_uid == geteuid(), st.st_mode & 0o022 == 0 else {
            throw KernelCache.Mismatch("\(path) is not owned by this user or is writable by others")
        }
    }

    private func writeAll(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try write($0, at: nil) }
    }

    private func write(_ buf: UnsafeRawBufferPointer, at offset: off_t?) throws {
        var done = 0
        while done < buf.count {
            let n = offset.map { pwrite(fd, buf.baseAddress! + done, buf.count - done, $0 + off_t(done)) }
                ?? Glibc.write(fd, buf.baseAddress! + done, buf.count - done)
            if n < 0 {
                if errno == EINTR { continue }
                throw KernelCache.Mismatch("cannot write \(tempPath): \(errnoText())")
            }
            done += n
        }
    }

    /// Appends decompressed bytes.
    func append(_ chunk: UnsafeRawBufferPointer) throws {
        guard fd >= 0 else { throw KernelCache.Mismatch("\(tempPath) was abandoned") }
        try write(chunk, at: nil)
        crc = KernelCache.crc32(chunk, seed: crc)
        length += UInt64(chunk.count)
    }

    /// Writes the header, fsyncs, and renames the file to `path` (replacing any entry there).
    func commit(as path: String) throws {
        guard fd >= 0 else { throw KernelCache.Mismatch("\(tempPath) was abandoned") }
        defer { if fd >= 0 { abandon() } }
        let header = KernelCache.Header(key: key, decompressedLength: length, decompressedCRC: crc).encode()
        try header.withUnsafeBytes { try write($0, at: 0) }
        _ = fchmod(fd, 0o600)
        guard fsync(fd) == 0 else { throw KernelCache.Mismatch("cannot sync \(tempPath): \(errnoText())") }
        guard rename(tempPath, path) == 0 else { throw KernelCache.Mismatch("cannot rename \(tempPath) to \(path): \(errnoText())") }
        close(fd)
        fd = -1
        // Make the rename durable; failure only loses the entry after a crash.
        let dir = String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)])
        let dfd = open(dir.isEmpty ? "/" : dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dfd >= 0 { _ = fsync(dfd); close(dfd) }
    }

    /// Closes and removes the temporary file.
    func abandon() {
        guard fd >= 0 else { return }
        close(fd)
        fd = -1
        unlink(tempPath)
    }
}

/// The text of the current errno.
func errnoText() -> String { String(cString: strerror(errno)) }
