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
    public init(start: UInt64, size: UInt64) throws {
        guard size > 0, size % 4096 == 0, size <= (1 << 46) else { throw GuestMemoryError.invalidSize(size) }
        guard start.addingReportingOverflow(size).overflow == false else { throw GuestMemoryError.invalidSize(size) }
        let p = mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
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

    /// Builds guest memory from regions; they must not overlap.
    public init(regions: [GuestRegion]) throws {
        let sorted = regions.sorted { $0.start < $1.start }
        for (a, b) in zip(sorted, sorted.dropFirst()) where a.end > b.start {
            throw GuestMemoryError.overlappingRegions(a.start, b.start)
        }
        self.regions = sorted
    }

    /// Allocates `size` bytes of RAM laid out as on a PC: below 3 GiB, and the rest above 4 GiB.
    public static func allocate(size: UInt64) throws -> GuestMemory {
        try GuestMemory(regions: layout(ramSize: size).map { try GuestRegion(start: $0.start, size: $0.size) })
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
