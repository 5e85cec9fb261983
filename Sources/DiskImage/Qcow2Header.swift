/// Named limits of the qcow2 format, checked before any allocation so a forged header can never make us allocate
/// memory proportional to its claims.
public enum Qcow2Limits {
    /// "QFI\xfb".
    public static let QCOW_MAGIC: UInt32 = 0x5146_49fb
    /// Smallest cluster: 512 bytes.
    public static let minClusterBits: UInt32 = 9
    /// Largest cluster: 2 MiB.
    public static let maxClusterBits: UInt32 = 21
    /// Largest L1 table in bytes (32 MiB, as QEMU).
    public static let maxL1Bytes: UInt64 = 32 << 20
    /// Largest refcount table in bytes (8 MiB, as QEMU).
    public static let maxRefcountTableBytes: UInt64 = 8 << 20
    /// Largest virtual disk (32 TiB … QEMU allows 2^61 in theory; we cap sensibly).
    public static let maxImageSize: UInt64 = 1 << 55
    /// Largest snapshot count (as QEMU).
    public static let maxSnapshots: UInt32 = 65536
    /// Largest backing-file name.
    public static let maxBackingNameBytes: UInt32 = 1023
    /// Deepest backing chain we follow.
    public static let maxBackingDepth = 256
    /// Header extension area / total header cap (one cluster at most, never more than 2 MiB).
    public static let maxHeaderExtensionBytes = 2 << 20
    /// Mask of host offsets in L1/L2/refcount-table entries (bits 9–55).
    public static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
}

/// Incompatible feature bits.
public struct Qcow2Incompatible: OptionSet, Sendable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let dirty = Self(rawValue: 1 << 0)
    public static let corrupt = Self(rawValue: 1 << 1)
    public static let externalData = Self(rawValue: 1 << 2)
    public static let compressionType = Self(rawValue: 1 << 3)
    public static let extendedL2 = Self(rawValue: 1 << 4)
    /// Bits this implementation understands.
    public static let known: Self = [.dirty, .corrupt, .externalData, .compressionType, .extendedL2]
}

/// Compatible feature bits.
public struct Qcow2Compatible: OptionSet, Sendable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let lazyRefcounts = Self(rawValue: 1 << 0)
}

/// Compression algorithm of compressed clusters.
public enum Qcow2CompressionType: UInt8, Sendable {
    case zlib = 0
    case zstd = 1
}

/// Header extension type codes.
enum Qcow2Extension {
    static let end: UInt32 = 0
    static let backingFormat: UInt32 = 0xe279_2aca
    static let featureNameTable: UInt32 = 0x6803_f857
    static let bitmaps: UInt32 = 0x2385_2875
    static let fullDiskEncryption: UInt32 = 0x0537_be77
    static let externalDataFile: UInt32 = 0x4441_5441
}

/// Big-endian helpers over byte arrays.
extension Array where Element == UInt8 {
    func be32(_ at: Int) -> UInt32 {
        var v: UInt32 = 0
        for i in 0..<4 { v = v << 8 | UInt32(self[at + i]) }
        return v
    }
    func be64(_ at: Int) -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<8 { v = v << 8 | UInt64(self[at + i]) }
        return v
    }
    func be16(_ at: Int) -> UInt16 { UInt16(self[at]) << 8 | UInt16(self[at + 1]) }
    mutating func putBE32(_ v: UInt32, at: Int) {
        for i in 0..<4 { self[at + i] = UInt8(truncatingIfNeeded: v >> (24 - 8 * UInt32(i))) }
    }
    mutating func putBE64(_ v: UInt64, at: Int) {
        for i in 0..<8 { self[at + i] = UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64(i))) }
    }
    mutating func putBE16(_ v: UInt16, at: Int) {
        self[at] = UInt8(v >> 8); self[at + 1] = UInt8(truncatingIfNeeded: v)
    }
}

/// One header extension as stored (type and raw payload).
public struct Qcow2HeaderExtension: Sendable, Equatable {
    public var type: UInt32
    public var data: [UInt8]
}

/// The qcow2 header (versions 2 and 3), decoded field by field from big-endian bytes.
public struct Qcow2Header: Sendable, Equatable {
    /// Size of the fixed version-2 header.
    public static let v2Size = 72
    /// Size of the version-3 header we write (with the compression-type field and padding).
    public static let size = 112

    public var version: UInt32 = 3
    public var backingFileOffset: UInt64 = 0
    public var backingFileSize: UInt32 = 0
    public var clusterBits: UInt32 = 16
    public var virtualSize: UInt64 = 0
    public var cryptMethod: UInt32 = 0
    public var l1Size: UInt32 = 0
    public var l1TableOffset: UInt64 = 0
    public var refcountTableOffset: UInt64 = 0
    public var refcountTableClusters: UInt32 = 0
    public var nbSnapshots: UInt32 = 0
    public var snapshotsOffset: UInt64 = 0
    public var incompatible: Qcow2Incompatible = []
    public var compatible: Qcow2Compatible = []
    public var autoclear: UInt64 = 0
    public var refcountOrder: UInt32 = 4
    public var headerLength: UInt32 = UInt32(Qcow2Header.size)
    public var compressionType: Qcow2CompressionType = .zlib

    /// Header extensions in file order (end marker excluded).
    public var extensions: [Qcow2HeaderExtension] = []
    /// The backing file name, if any.
    public var backingFile: String?

    public init() {}

    public var clusterSize: UInt64 { 1 << UInt64(clusterBits) }
    public var refcountBits: UInt32 { 1 << refcountOrder }

    /// The backing format named by the backing-format extension.
    public var backingFormat: String? {
        get {
            extensions.first { $0.type == Qcow2Extension.backingFormat }.map { String(decoding: $0.data, as: UTF8.self) }
        }
        set {
            extensions.removeAll { $0.type == Qcow2Extension.backingFormat }
            if let v = newValue { extensions.insert(.init(type: Qcow2Extension.backingFormat, data: Array(v.utf8)), at: 0) }
        }
    }

    /// Parses a header from the first bytes of a file (at least one cluster, or the whole file if smaller).
    /// `path` is used in error messages only. Validates every field against `Qcow2Limits` and `fileSize`.
    public init(bytes b: [UInt8], path: String, fileSize: UInt64) throws {
        func bad(_ what: String) -> DiskImageError { .corrupt(path, what) }
        guard b.count >= Self.v2Size else {
            throw bad("file is \(b.count) bytes, too short for a qcow2 header (72 bytes at offset 0)")
        }
        let magic = b.be32(0)
        guard magic == Qcow2Limits.QCOW_MAGIC else {
            throw bad("bad magic 0x\(ImagePath.hex8(magic)) at offset 0 (expected 0x514649fb, \"QFI\\xfb\")")
        }
        version = b.be32(4)
        guard version == 2 || version == 3 else {
            throw DiskImageError.unsupported(path, "qcow2 version \(version) at offset 4 is not supported (only 2 and 3)")
        }
        backingFileOffset = b.be64(8)
        backingFileSize = b.be32(16)
        clusterBits = b.be32(20)
        guard clusterBits >= Qcow2Limits.minClusterBits && clusterBits <= Qcow2Limits.maxClusterBits else {
            throw bad("cluster_bits \(clusterBits) at offset 20 is outside \(Qcow2Limits.minClusterBits)...\(Qcow2Limits.maxClusterBits)")
        }
        virtualSize = b.be64(24)
        guard virtualSize <= Qcow2Limits.maxImageSize else {
            throw bad("virtual size \(virtualSize) at offset 24 exceeds the limit of \(Qcow2Limits.maxImageSize) bytes")
        }
        cryptMethod = b.be32(32)
        l1Size = b.be32(36)
        l1TableOffset = b.be64(40)
        refcountTableOffset = b.be64(48)
        refcountTableClusters = b.be32(56)
        nbSnapshots = b.be32(60)
        snapshotsOffset = b.be64(64)
        if version == 3 {
            guard b.count >= 104 else { throw bad("file is \(b.count) bytes, too short for a version 3 header (104 bytes)") }
            incompatible = Qcow2Incompatible(rawValue: b.be64(72))
            compatible = Qcow2Compatible(rawValue: b.be64(80))
            autoclear = b.be64(88)
            refcountOrder = b.be32(96)
            headerLength = b.be32(100)
            // qemu accepts any length from 104 to the cluster size (extensions then start unaligned).
            guard headerLength >= 104 && UInt64(headerLength) <= clusterSize else {
                throw bad("header_length \(headerLength) at offset 100 must be between 104 and the cluster size \(clusterSize)")
            }
            guard b.count >= Int(headerLength) else { throw bad("header of \(headerLength) bytes is past the end of the file") }
            if headerLength >= 105 {
                guard let ct = Qcow2CompressionType(rawValue: b[104]) else {
                    throw DiskImageError.unsupported(path, "unknown compression type \(b[104]) at offset 104")
                }
                compressionType = ct
            }
        } else {
            refcountOrder = 4
            headerLength = UInt32(Self.v2Size)
        }
        guard refcountOrder <= 6 else {
            throw bad("refcount_order \(refcountOrder) at offset 96 is larger than 6 (64-bit refcounts)")
        }
        if compressionType != .zlib && !incompatible.contains(.compressionType) {
            throw bad("compression type \(compressionType) at offset 104 without the compression-type incompatible bit")
        }
        let cs = clusterSize
        // Offsets must be cluster aligned and inside a sane range; table sizes below the named limits.
        guard cryptMethod == 0 else {
            throw DiskImageError.unsupported(path, "encrypted images (crypt_method \(cryptMethod) at offset 32) are not supported")
        }
        guard UInt64(l1Size) * 8 <= Qcow2Limits.maxL1Bytes else {
            throw bad("l1_size \(l1Size) at offset 36 exceeds the limit of \(Qcow2Limits.maxL1Bytes / 8) entries")
        }
        let entrySize: UInt64 = incompatible.contains(.extendedL2) ? 16 : 8
        let l2Entries = cs / entrySize
        let bytesPerL1 = l2Entries * cs
        let neededL1 = (virtualSize + bytesPerL1 - 1) / bytesPerL1
        guard UInt64(l1Size) >= neededL1 else {
            throw bad("l1_size \(l1Size) at offset 36 is too small for the virtual size \(virtualSize) (needs \(neededL1))")
        }
        // The L1 and refcount tables may reach past the end of a truncated file: qemu reads zeros there and
        // reports the damage in check, so only their offsets and sizes are checked here.
        func checkTable(_ off: UInt64, _ bytes: UInt64, _ name: String, _ fieldOffset: Int, pastEnd: Bool = false) throws {
            guard off % cs == 0 else { throw bad("\(name) offset \(off) (header offset \(fieldOffset)) is not cluster aligned") }
            if bytes > 0 {
                guard off != 0 else { throw bad("\(name) at offset 0 overlaps the header (header offset \(fieldOffset))") }
                let (end, o) = off.addingReportingOverflow(bytes)
                guard !o && end <= UInt64(Int64.max) && (pastEnd || end <= fileSize) else {
                    throw bad("\(name) at offset \(off) (\(bytes) bytes) is past the end of the \(fileSize)-byte file")
                }
            }
        }
        try checkTable(l1TableOffset, UInt64(l1Size) * 8, "L1 table", 40, pastEnd: true)
        guard refcountTableClusters > 0 else { throw bad("refcount_table_clusters at offset 56 is 0") }
        guard UInt64(refcountTableClusters) * cs <= Qcow2Limits.maxRefcountTableBytes else {
            throw bad("refcount_table_clusters \(refcountTableClusters) at offset 56 exceeds the limit of \(Qcow2Limits.maxRefcountTableBytes) bytes")
        }
        try checkTable(refcountTableOffset, UInt64(refcountTableClusters) * cs, "refcount table", 48, pastEnd: true)
        guard nbSnapshots <= Qcow2Limits.maxSnapshots else {
            throw bad("nb_snapshots \(nbSnapshots) at offset 60 exceeds the limit of \(Qcow2Limits.maxSnapshots)")
        }
        // As qemu: the offset must be aligned even when there are no snapshots.
        try checkTable(snapshotsOffset, UInt64(nbSnapshots) * 40, "snapshot table", 64, pastEnd: true)
        // Tables must not overlap each other.
        if l1Size > 0 {
            let l1End = l1TableOffset + UInt64(l1Size) * 8
            let rtEnd = refcountTableOffset + UInt64(refcountTableClusters) * cs
            if l1TableOffset < rtEnd && refcountTableOffset < l1End {
                throw bad("L1 table at offset \(l1TableOffset) overlaps the refcount table at offset \(refcountTableOffset)")
            }
        }
        // Header extensions.
        var pos = Int(headerLength)
        let limit = min(b.count, Int(min(cs, UInt64(Qcow2Limits.maxHeaderExtensionBytes))))
        let extLimit = backingFileOffset > 0 ? min(limit, Int(clamping: backingFileOffset)) : limit
        while pos + 8 <= extLimit {
            let type = b.be32(pos)
            let len = Int(b.be32(pos + 4))
            if type == Qcow2Extension.end { break }
            guard len <= extLimit - pos - 8 else {
                throw bad("header extension 0x\(String(type, radix: 16)) at offset \(pos) has length \(len) past the end of the header cluster")
            }
            let data = Array(b[(pos + 8)..<(pos + 8 + len)])
            if type == Qcow2Extension.fullDiskEncryption {
                throw DiskImageError.unsupported(path, "full disk encryption header extension at offset \(pos) is not supported")
            }
            extensions.append(.init(type: type, data: data))
            pos += 8 + ((len + 7) & ~7)
        }
        // Backing file name.
        if backingFileOffset != 0 {
            guard backingFileSize <= Qcow2Limits.maxBackingNameBytes else {
                throw bad("backing file name length \(backingFileSize) at offset 16 exceeds \(Qcow2Limits.maxBackingNameBytes)")
            }
            let (end, o) = backingFileOffset.addingReportingOverflow(UInt64(backingFileSize))
            guard !o && end <= UInt64(limit) && end <= cs else {
                throw bad("backing file name at offset \(backingFileOffset) (\(backingFileSize) bytes) is outside the header cluster")
            }
            backingFile = String(decoding: b[Int(backingFileOffset)..<Int(end)], as: UTF8.self)
        }
        // Feature checks last so that the error names the feature.
        let unknown = incompatible.subtracting(.known)
        if !unknown.isEmpty {
            throw DiskImageError.unsupported(path, "unknown incompatible feature bits 0x\(String(unknown.rawValue, radix: 16)) at offset 72\(featureNames(unknown.rawValue, type: 0))")
        }
        if incompatible.contains(.externalData) {
            throw DiskImageError.unsupported(path, "external data files (incompatible bit 2 at offset 72) are not supported")
        }
    }

    /// Names of feature bits from the feature-name table, for error messages.
    func featureNames(_ bits: UInt64, type: UInt8) -> String {
        guard let table = extensions.first(where: { $0.type == Qcow2Extension.featureNameTable }) else { return "" }
        var names: [String] = []
        var i = 0
        while i + 48 <= table.data.count {
            if table.data[i] == type && table.data[i + 1] < 64 && bits & (1 << UInt64(table.data[i + 1])) != 0 {
                let raw = table.data[(i + 2)..<(i + 48)].prefix { $0 != 0 }
                names.append(String(decoding: raw, as: UTF8.self))
            }
            i += 48
        }
        return names.isEmpty ? "" : " (" + names.joined(separator: ", ") + ")"
    }

    /// Encodes the header, its extensions (plus the feature-name table for v3) and the backing file name into one
    /// block that fits in the first cluster. Throws if it does not fit.
    public func encode() throws -> [UInt8] {
        if let full = try? encode(featureTable: true) { return full }
        // The feature-name table is optional: drop it when the header would not fit in a small cluster.
        return try encode(featureTable: false)
    }

    func encode(featureTable: Bool) throws -> [UInt8] {
        let hl = version == 3 ? Self.size : Self.v2Size
        var b = [UInt8](repeating: 0, count: hl)
        b.putBE32(Qcow2Limits.QCOW_MAGIC, at: 0)
        b.putBE32(version, at: 4)
        b.putBE32(clusterBits, at: 20)
        b.putBE64(virtualSize, at: 24)
        b.putBE32(cryptMethod, at: 32)
        b.putBE32(l1Size, at: 36)
        b.putBE64(l1TableOffset, at: 40)
        b.putBE64(refcountTableOffset, at: 48)
        b.putBE32(refcountTableClusters, at: 56)
        b.putBE32(nbSnapshots, at: 60)
        b.putBE64(snapshotsOffset, at: 64)
        if version == 3 {
            b.putBE64(incompatible.rawValue, at: 72)
            b.putBE64(compatible.rawValue, at: 80)
            b.putBE64(autoclear, at: 88)
            b.putBE32(refcountOrder, at: 96)
            b.putBE32(UInt32(hl), at: 100)
            b[104] = compressionType.rawValue
        }
        // qemu's order: the others, the feature-name table, then the bitmaps extension.
        var exts = extensions.filter { $0.type != Qcow2Extension.featureNameTable && $0.type != Qcow2Extension.bitmaps }
        if version == 3 && featureTable { exts.append(.init(type: Qcow2Extension.featureNameTable, data: Self.featureNameTable)) }
        exts += extensions.filter { $0.type == Qcow2Extension.bitmaps }
        for e in exts {
            var h = [UInt8](repeating: 0, count: 8)
            h.putBE32(e.type, at: 0)
            h.putBE32(UInt32(e.data.count), at: 4)
            b += h + e.data + [UInt8](repeating: 0, count: (8 - e.data.count % 8) % 8)
        }
        b += [UInt8](repeating: 0, count: 8)  // end of extensions
        if let bf = backingFile {
            let name = Array(bf.utf8)
            guard name.count <= Qcow2Limits.maxBackingNameBytes else {
                throw DiskImageError.invalid("backing file name of \(name.count) bytes is too long (max \(Qcow2Limits.maxBackingNameBytes))")
            }
            b.putBE64(UInt64(b.count), at: 8)
            b.putBE32(UInt32(name.count), at: 16)
            b += name
        }
        guard UInt64(b.count) <= clusterSize else {
            throw DiskImageError.invalid("header with extensions (\(b.count) bytes) does not fit in one \(clusterSize)-byte cluster")
        }
        return b
    }

    /// The feature-name table QEMU writes (type, bit, 46-byte name).
    static let featureNameTable: [UInt8] = {
        let entries: [(UInt8, UInt8, String)] = [
            (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
            (0, 3, "compression type"), (0, 4, "extended L2 entries"),
            (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data"),
        ]
        var t: [UInt8] = []
        for (ty, bit, name) in entries {
            var e = [UInt8](repeating: 0, count: 48)
            e[0] = ty; e[1] = bit
            for (i, c) in name.utf8.prefix(46).enumerated() { e[2 + i] = c }
            t += e
        }
        return t
    }()
}

extension Qcow2Header {
    /// Reads the header of the qcow2 image at `path` and returns its backing file name and format, or nil when it
    /// has none.
    static func backingFile(of path: String) throws -> (name: String, format: String?)? {
        let f = try ImageFile(path: path, readOnly: true)
        defer { f.close() }
        let size = try f.fileSize()
        let h = try Qcow2Header(bytes: try f.pread(at: 0, count: Int(min(size, UInt64(Qcow2Limits.maxHeaderExtensionBytes)))),
                                path: path, fileSize: size)
        return h.backingFile.map { ($0, h.backingFormat) }
    }
}
