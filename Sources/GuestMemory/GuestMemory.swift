#if canImport(Glibc)
import Glibc
#endif

/// A guest-physical address.
public struct GuestAddress: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ value: UInt64) { self.rawValue = value }
    public static func < (a: GuestAddress, b: GuestAddress) -> Bool { a.rawValue < b.rawValue }
    public var description: String { "0x" + String(rawValue, radix: 16) }
    /// `self + offset`, or nil on overflow.
    public func adding(_ offset: UInt64) -> GuestAddress? {
        let (r, o) = rawValue.addingReportingOverflow(offset)
        return o ? nil : GuestAddress(r)
    }
}

/// Errors from guest memory: every message names the address and length involved.
public enum GuestMemoryError: Error, Equatable, CustomStringConvertible {
    case outOfBounds(address: UInt64, length: UInt64)
    case overlappingRegions(UInt64, UInt64)
    case invalidSize(UInt64)
    case mmapFailed(size: UInt64, errno: Int32)
    /// The memory backend could not be set up (`what` names it and why).
    case backend(String)

    public var description: String {
        switch self {
        case .outOfBounds(let a, let l):
            return "guest memory access out of bounds: 0x\(String(a, radix: 16)) + \(l) bytes is not in guest RAM"
        case .overlappingRegions(let a, let b):
            return "guest memory regions at 0x\(String(a, radix: 16)) and 0x\(String(b, radix: 16)) overlap"
        case .invalidSize(let s):
            return "invalid guest memory size \(s) bytes"
        case .mmapFailed(let s, let e):
            return "mmap of \(s) bytes of guest memory failed: \(String(cString: strerror(e)))"
        case .backend(let why):
            return why
        }
    }
}

/// One contiguous range of guest RAM backed by host memory that this object owns (or borrows).
public final class GuestRegion: @unchecked Sendable {
    /// First guest-physical address of the region.
    public let start: UInt64
    /// Size in bytes.
    public let size: UInt64
    /// Host address of the first byte. SAFETY: valid for `size` bytes while the region lives.
    public let host: UnsafeMutableRawPointer
    private let ownsMapping: Bool

    /// Maps `size` bytes of anonymous, zeroed, MAP_NORESERVE memory for guest RAM at `start`.
    public convenience init(start: UInt64, size: UInt64) throws {
        try self.init(start: start, size: size, flags: MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, fd: -1, offset: 0)
    }

    /// Maps `size` bytes of `fd` from `offset` shared: guest RAM backed by a memfd or a file.
    convenience init(start: UInt64, size: UInt64, fd: Int32, offset: UInt64) throws {
        try self.init(start: start, size: size, flags: MAP_SHARED, fd: fd, offset: offset)
    }

    /// Maps anonymous memory with `extraFlags` (MAP_HUGETLB), reserved at once (no MAP_NORESERVE:
    /// huge pages that are not there must fail here, not as a SIGBUS when the guest touches them).
    convenience init(start: UInt64, size: UInt64, extraFlags: Int32) throws {
        try self.init(start: start, size: size, flags: MAP_PRIVATE | MAP_ANONYMOUS | extraFlags, fd: -1, offset: 0)
    }

    /// One `mmap` of `size` bytes with `flags` (of `fd` at `offset`, or anonymous with fd -1).
    private init(start: UInt64, size: UInt64, flags: Int32, fd: Int32, offset: UInt64) throws {
        guard size > 0, size % 4096 == 0, size <= (1 << 46) else { throw GuestMemoryError.invalidSize(size) }
        guard start.addingReportingOverflow(size).overflow == false else { throw GuestMemoryError.invalidSize(size) }
        let p = mmap(nil, Int(size), PROT_READ | PROT_WRITE, flags, fd, off_t(offset))
        guard let p, p != MAP_FAILED else { throw GuestMemoryError.mmapFailed(size: size, errno: errno) }
        self.start = start
        self.size = size
        self.host = p
        self.ownsMapping = true
    }

    /// Wraps memory the caller owns and keeps alive (used by tests with plain buffers).
    public init(start: UInt64, borrowing host: UnsafeMutableRawPointer, size: UInt64) {
        self.start = start
        self.size = size
        self.host = host
        self.ownsMapping = false
    }

    deinit {
        if ownsMapping { munmap(host, Int(size)) }
    }

    /// One past the last guest-physical address.
    public var end: UInt64 { start + size }

    func contains(_ gpa: UInt64, _ count: UInt64) -> Bool {
        guard gpa >= start else { return false }
        let off = gpa - start
        return off <= size && count <= size - off
    }
}

/// The guest's physical memory: a sorted set of non-overlapping regions.
///
/// Every access is bounds-checked with overflow-safe arithmetic; raw pointers are only handed
/// to closures and never escape.
public final class GuestMemory: @unchecked Sendable {
    /// Start of the 32-bit PCI/MMIO hole. RAM at or above this address moves above 4 GiB.
    public static let pciHoleStart: UInt64 = 0xC000_0000
    /// End of the 32-bit hole (4 GiB).
    public static let pciHoleEnd: UInt64 = 0x1_0000_0000

    /// Regions sorted by start address.
    public let regions: [GuestRegion]
    /// Pages written by the VMM's devices, for diff snapshots (off unless enabled).
    public let dirtyLog: DirtyPageLog

    /// Builds guest memory from regions; they must not overlap.
    public init(regions: [GuestRegion]) throws {
        let sorted = regions.sorted { $0.start < $1.start }
        for (a, b) in zip(sorted, sorted.dropFirst()) where a.end > b.start {
            throw GuestMemoryError.overlappingRegions(a.start, b.start)
        }
        self.regions = sorted
        dirtyLog = DirtyPageLog(regions: sorted.map { ($0.start, $0.size) })
    }

    /// Allocates `size` bytes of RAM laid out as on a PC: below 3 GiB, and the rest above 4 GiB.
    public static func allocate(size: UInt64) throws -> GuestMemory {
        try GuestMemory(regions: layout(ramSize: size).map { try GuestRegion(start: $0.start, size: $0.size) })
    }

    /// Allocates `size` bytes of RAM as `allocate(size:)`, from `backend`.
    public static func allocate(size: UInt64, backend: MemoryBackend) throws -> GuestMemory {
        let ranges = try layout(ramSize: size)
        let huge = backend.hugePages == .hugetlbfs
        let regions: [GuestRegion]
        do {
            switch backend.kind {
            case .anonymous:
                regions = try ranges.map {
                    try huge ? GuestRegion(start: $0.start, size: $0.size, extraFlags: MAP_HUGETLB)
                             : GuestRegion(start: $0.start, size: $0.size)
                }
            case .memfd, .file:
                let fd = try backend.kind == .memfd ? memfd(huge: huge, size: size) : try openFile(backend.path ?? "", size: size)
                defer { close(fd) }
                var offset: UInt64 = 0
                regions = try ranges.map { r in
                    defer { offset += r.size }
                    return try GuestRegion(start: r.start, size: r.size, fd: fd, offset: offset)
                }
            }
        } catch GuestMemoryError.mmapFailed(let n, let e) where huge {
            throw GuestMemoryError.backend("cannot map \(n) bytes of guest RAM in huge pages (\(String(cString: strerror(e)))): reserve them first (vm.nr_hugepages is \(hugePagesReserved()))")
        }
        let memory = try GuestMemory(regions: regions)
        memory.advise(backend)
        return memory
    }

    /// Applies `backend`'s advice to guest RAM: `MADV_MERGEABLE` (KSM) and `MADV_HUGEPAGE`. Again after a
    /// restore mapped the memory file over RAM (a new mapping starts without advice).
    public func advise(_ backend: MemoryBackend) {
        for r in regions {
            if backend.mergeable { _ = madvise(r.host, Int(r.size), MADV_MERGEABLE) }
            if backend.hugePages == .transparent { _ = madvise(r.host, Int(r.size), MADV_HUGEPAGE) }
        }
    }

    /// /proc/sys/vm/nr_hugepages, for messages.
    static func hugePagesReserved() -> String {
        let fd = open("/proc/sys/vm/nr_hugepages", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return "unknown" }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 32)
        let n = Glibc.read(fd, &buf, buf.count)
        guard n > 0 else { return "unknown" }
        return String(decoding: buf[0..<n], as: UTF8.self).split(separator: "\n").first.map(String.init) ?? "unknown"
    }

    private typealias MemfdCreate = @convention(c) (UnsafePointer<CChar>, UInt32) -> Int32
    /// glibc's memfd_create (declared only with _GNU_SOURCE, so not imported).
    private static let memfdCreate: MemfdCreate? = {
        guard let sym = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "memfd_create") else { return nil }
        return unsafeBitCast(sym, to: MemfdCreate.self)
    }()

    /// A close-on-exec memfd of `size` bytes (guest RAM received by a migration).
    public static func makeMemfd(size: UInt64) throws -> Int32 { try memfd(huge: false, size: size) }

    private static func memfd(huge: Bool, size: UInt64) throws -> Int32 {
        let cloexec: UInt32 = 0x1, hugetlb: UInt32 = 0x4 // MFD_CLOEXEC, MFD_HUGETLB
        guard let create = memfdCreate else { throw GuestMemoryError.backend("memfd_create is not available in this C library") }
        let fd = create("swiftkvm-guest-ram", cloexec | (huge ? hugetlb : 0))
        guard fd >= 0 else { throw GuestMemoryError.backend("memfd_create for guest RAM failed: \(String(cString: strerror(errno)))") }
        guard ftruncate(fd, off_t(size)) == 0 else {
            let e = errno
            close(fd)
            throw GuestMemoryError.backend("cannot size the guest RAM memfd to \(size) bytes: \(String(cString: strerror(e)))"
                                           + (huge ? " (huge pages reserved: \(hugePagesReserved()))" : ""))
        }
        return fd
    }

    /// Opens (or creates) the backing file. An existing file must be a regular file and empty or
    /// already `size` bytes: a larger or different file is refused rather than overwritten.
    private static func openFile(_ path: String, size: UInt64) throws -> Int32 {
        guard !path.isEmpty else { throw GuestMemoryError.backend("the memory backend file path is empty") }
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw GuestMemoryError.backend("cannot open the memory backend file \(path): \(String(cString: strerror(errno)))") }
        var st = stat()
        guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else {
            close(fd)
            throw GuestMemoryError.backend("the memory backend file \(path) is not a regular file")
        }
        guard st.st_size == 0 || UInt64(st.st_size) == size else {
            close(fd)
            throw GuestMemoryError.backend("the memory backend file \(path) holds \(st.st_size) bytes, not the guest's \(size): refusing to reuse it")
        }
        guard ftruncate(fd, off_t(size)) == 0 else {
            let e = errno
            close(fd)
            throw GuestMemoryError.backend("cannot size the memory backend file \(path) to \(size) bytes: \(String(cString: strerror(e)))")
        }
        return fd
    }

    /// The guest-physical ranges used for `ramSize` bytes of RAM (the PCI hole split).
    public static func layout(ramSize: UInt64) throws -> [(start: UInt64, size: UInt64)] {
        guard ramSize >= 1 << 20, ramSize % 4096 == 0, ramSize <= 1 << 46 else {
            throw GuestMemoryError.invalidSize(ramSize)
        }
        if ramSize <= pciHoleStart { return [(0, ramSize)] }
        return [(0, pciHoleStart), (pciHoleEnd, ramSize - pciHoleStart)]
    }

    /// Total RAM in bytes.
    public var totalSize: UInt64 { regions.reduce(0) { $0 + $1.size } }

    /// Whether `[gpa, gpa+count)` lies entirely inside one region.
    public func contains(_ gpa: UInt64, count: UInt64) -> Bool {
        regions.contains { $0.contains(gpa, count) }
    }

    /// Host pointer for `[gpa, gpa+count)`, which must lie in one region.
    /// SAFETY: the pointer is valid only while `self` lives; prefer `withBytes`.
    public func translate(_ gpa: UInt64, count: UInt64) throws -> UnsafeMutableRawPointer {
        // Few regions (1 or 2): a linear scan is fastest.
        for r in regions where r.contains(gpa, count) {
            return r.host + Int(gpa - r.start)
        }
        throw GuestMemoryError.outOfBounds(address: gpa, length: count)
    }

    /// Runs `body` with a mutable view of `[gpa, gpa+count)`.
    public func withBytes<R>(at gpa: UInt64, count: Int, _ body: (UnsafeMutableRawBufferPointer) throws -> R) throws -> R {
        guard count >= 0 else { throw GuestMemoryError.outOfBounds(address: gpa, length: 0) }
        let p = try translate(gpa, count: UInt64(count))
        return try body(UnsafeMutableRawBufferPointer(start: p, count: count))
    }

    /// Copies bytes into guest memory.
    public func write<C: Collection>(_ bytes: C, at gpa: UInt64) throws where C.Element == UInt8 {
        try withBytes(at: gpa, count: bytes.count) { dst in _ = dst.initializeMemory(as: UInt8.self, from: bytes) }
    }

    /// Copies bytes out of guest memory.
    public func read(at gpa: UInt64, count: Int) throws -> [UInt8] {
        try withBytes(at: gpa, count: count) { Array($0) }
    }

    /// Fills a range with zeros.
    public func zero(at gpa: UInt64, count: Int) throws {
        _ = try withBytes(at: gpa, count: count) { $0.initializeMemory(as: UInt8.self, repeating: 0) }
    }

    /// Reads a little-endian integer.
    public func readLE<T: FixedWidthInteger>(_: T.Type = T.self, at gpa: UInt64) throws -> T {
        try withBytes(at: gpa, count: MemoryLayout<T>.size) { T(littleEndian: $0.loadUnaligned(as: T.self)) }
    }

    /// Writes a little-endian integer.
    public func writeLE<T: FixedWidthInteger>(_ value: T, at gpa: UInt64) throws {
        try withBytes(at: gpa, count: MemoryLayout<T>.size) { $0.storeBytes(of: value.littleEndian, as: T.self) }
    }
}

/// Little-endian encoding helpers for building guest-visible structures in byte arrays.
extension Array where Element == UInt8 {
    /// Stores `value` little-endian at `offset`, growing the array if needed. (Inlinable, like
    /// `getLE`: unspecialized generic code across modules cost a loader scan milliseconds.)
    @inlinable
    public mutating func putLE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        let n = MemoryLayout<T>.size
        if count < offset + n { append(contentsOf: repeatElement(0, count: offset + n - count)) }
        let v = value.littleEndian
        for i in 0..<n { self[offset + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
    }

    /// Loads a little-endian integer at `offset`, or nil if the array is too short.
    @inlinable
    public func getLE<T: FixedWidthInteger>(_: T.Type = T.self, at offset: Int) -> T? {
        let n = MemoryLayout<T>.size
        guard offset >= 0, offset <= count - n else { return nil }
        return withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }
}

/// How guest RAM is backed (`swiftkvm run --memory-backend`, `--memory …,ksm=on,hugepages=…`).
public struct MemoryBackend: Codable, Sendable, Equatable {
    public enum Kind: String, Codable, Sendable, CaseIterable {
        /// Private anonymous memory (the default).
        case anonymous
        /// A memfd, mapped shared (another process can be handed the fd).
        case memfd
        /// A file, mapped shared (`path`): guest RAM lives in it, e.g. on /dev/shm or hugetlbfs.
        case file
    }
    public enum HugePages: String, Codable, Sendable, CaseIterable {
        case none
        /// Transparent huge pages (`MADV_HUGEPAGE`).
        case transparent
        /// hugetlbfs pages (`MAP_HUGETLB` / `MFD_HUGETLB`): they must be reserved (vm.nr_hugepages).
        case hugetlbfs
    }
    public var kind: Kind
    public var path: String?
    /// `MADV_MERGEABLE`: the kernel's KSM may share identical pages between guests.
    public var mergeable: Bool
    public var hugePages: HugePages

    public init(kind: Kind = .anonymous, path: String? = nil, mergeable: Bool = false, hugePages: HugePages = .none) {
        self.kind = kind; self.path = path; self.mergeable = mergeable; self.hugePages = hugePages
    }
}
