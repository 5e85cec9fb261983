import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// Disk image formats this module reads and writes.
public enum ImageFormat: String, Sendable, CaseIterable {
    case qcow2
    case raw
}

/// Probes the format of the file at `path` from its first bytes (qcow2 magic, else raw).
public func probeImageFormat(path: String) throws -> ImageFormat {
    let f = try ImageFile(path: path, readOnly: true)
    defer { f.close() }
    let b = try f.pread(at: 0, count: 4)
    return b.be32(0) == Qcow2Limits.QCOW_MAGIC ? .qcow2 : .raw
}

/// Opens a disk image of the given (or probed) format with its backing chain.
public func openDiskImage(path: String, options: ImageOpenOptions = .init()) throws -> BlockBackend {
    try openImage(path: path, options: options, chain: [])
}

func openImage(path: String, options: ImageOpenOptions, chain: [String]) throws -> BlockBackend {
    let format: ImageFormat
    if let f = options.format {
        guard let known = ImageFormat(rawValue: f) else {
            throw DiskImageError(.unsupported, "\(path): unknown image format '\(f)' (supported: qcow2, raw)")
        }
        format = known
    } else {
        format = try probeImageFormat(path: path)
    }
    switch format {
    case .raw: return try RawImage(path: path, readOnly: options.readOnly, unsafeNoSync: options.unsafeNoSync)
    case .qcow2: return try Qcow2Image(path: path, options: options, chain: chain)
    }
}

/// Rounds a disk size up to a whole number of 512-byte sectors, as qemu-img does when it creates an image (qemu sees
/// every image as whole sectors; a size it would read rounded down would hide the tail).
public func roundUpToSector(_ size: UInt64) -> UInt64 {
    size > UInt64.max - 511 ? size & ~511 : (size + 511) & ~511
}

/// How much of a new image is allocated up front (qemu-img's `preallocation=`).
public enum Preallocation: String, Sendable, CaseIterable {
    /// Nothing beyond what the format needs.
    case off
    /// qcow2 only: every L2 table and data cluster is allocated in the image (the file stays sparse).
    case metadata
    /// As metadata for qcow2, then the whole file's host space is reserved with fallocate.
    case falloc
    /// As metadata for qcow2, then every hole of the file is written with zeroes.
    case full
}

/// Options for creating a qcow2 image (the `-o` options of `qemu-img create`).
public struct Qcow2CreateOptions: Sendable {
    /// Virtual size in bytes.
    public var size: UInt64
    /// Cluster size: a power of two from 512 B to 2 MiB.
    public var clusterSize: UInt64 = 65536
    /// qcow2 version: 2 ("compat=0.10") or 3 ("compat=1.1").
    public var version: UInt32 = 3
    /// Sets the lazy-refcounts compatible feature (version 3 only).
    public var lazyRefcounts = false
    /// Refcount width: a power of two from 1 to 64 (16 for version 2).
    public var refcountBits: UInt32 = 16
    /// Preallocation: metadata allocates L2 tables and data clusters; falloc and full also reserve the host space.
    public var preallocation: Preallocation = .off
    /// Preallocate L2 tables and data clusters (`preallocation` other than off).
    public var preallocateMetadata: Bool {
        get { preallocation != .off }
        set { preallocation = newValue ? (preallocation == .off ? .metadata : preallocation) : .off }
    }
    /// Backing file name as stored in the image.
    public var backingFile: String?
    /// Backing file format stored in the backing-format extension.
    public var backingFormat: String?
    /// Compression type for compressed clusters.
    public var compressionType: Qcow2CompressionType = .zlib
    /// fdatasync the new file before returning (off for convert output, which is written with cache=unsafe).
    public var syncOnCreate = true

    /// Creates options for a disk of `size` bytes.
    public init(size: UInt64) { self.size = size }
}

extension Qcow2Image {
    /// Creates a new qcow2 image at `path` (overwriting any file there). Layout: header, refcount table, refcount
    /// blocks, L1 table.
    public static func create(path: String, options o: Qcow2CreateOptions) throws {
        let cs = o.clusterSize
        guard cs.nonzeroBitCount == 1, cs >= 512, cs <= 2 << 20 else {
            throw DiskImageError.invalid("cluster size \(cs) must be a power of two between 512 and 2097152")
        }
        guard o.version == 2 || o.version == 3 else { throw DiskImageError.invalid("qcow2 version \(o.version) is not 2 or 3") }
        guard o.refcountBits.nonzeroBitCount == 1, o.refcountBits <= 64 else {
            throw DiskImageError.invalid("refcount_bits \(o.refcountBits) must be a power of two between 1 and 64")
        }
        if o.version == 2 && o.refcountBits != 16 { throw DiskImageError.invalid("compat=0.10 requires refcount_bits=16") }
        if o.version == 2 && o.lazyRefcounts { throw DiskImageError.invalid("lazy_refcounts requires compat=1.1") }
        if o.version == 2 && o.compressionType != .zlib { throw DiskImageError.invalid("compression_type=zstd requires compat=1.1") }
        guard o.size <= Qcow2Limits.maxImageSize else { throw DiskImageError.invalid("size \(o.size) exceeds the limit of \(Qcow2Limits.maxImageSize) bytes") }
        // qemu reads the size in 512-byte sectors: round up, as qemu-img create does, so no byte is cut off.
        var o = o
        o.size = roundUpToSector(o.size)
        let clusterBits = UInt32(cs.trailingZeroBitCount)
        let l2Entries = cs / 8
        let l1Entries = (o.size + l2Entries * cs - 1) / (l2Entries * cs)
        guard l1Entries * 8 <= Qcow2Limits.maxL1Bytes else {
            throw DiskImageError.invalid("size \(o.size) needs an L1 table larger than \(Qcow2Limits.maxL1Bytes) bytes with \(cs)-byte clusters")
        }
        let l1Clusters = max(1, (l1Entries * 8 + cs - 1) / cs)
        let refBlockEntries = cs * 8 / UInt64(o.refcountBits)
        var tableClusters: UInt64 = 1
        var blocks: UInt64 = 1
        while true {
            let total = 1 + tableClusters + blocks + l1Clusters
            let nb = (total + refBlockEntries - 1) / refBlockEntries
            let nt = max(1, (nb * 8 + cs - 1) / cs)
            if nb == blocks && nt == tableClusters { break }
            blocks = nb; tableClusters = nt
        }
        var h = Qcow2Header()
        h.version = o.version
        h.clusterBits = clusterBits
        h.virtualSize = o.size
        h.l1Size = UInt32(l1Entries)
        h.refcountTableOffset = cs
        h.refcountTableClusters = UInt32(tableClusters)
        h.l1TableOffset = cs * (1 + tableClusters + blocks)
        h.refcountOrder = UInt32(o.refcountBits.trailingZeroBitCount)
        if o.lazyRefcounts { h.compatible.insert(.lazyRefcounts) }
        h.compressionType = o.compressionType
        if o.compressionType != .zlib { h.incompatible.insert(.compressionType) }
        h.backingFile = o.backingFile
        if let bf = o.backingFormat, o.backingFile != nil { h.backingFormat = bf }
        let total = 1 + tableClusters + blocks + l1Clusters

        let f = try ImageFile(path: path, readOnly: false, create: true, truncate: true)
        defer { f.close() }
        try f.pwrite(try h.encode(), at: 0)
        var table = [UInt8](repeating: 0, count: Int(tableClusters * cs))
        for i in 0..<blocks { table.putBE64(cs * (1 + tableClusters + i), at: Int(i) * 8) }
        try f.pwrite(table, at: cs)
        var blockBytes = [UInt8](repeating: 0, count: Int(blocks * cs))
        for c in 0..<total {
            let b = Int(c / refBlockEntries), i = Int(c % refBlockEntries)
            var one = Array(blockBytes[(b * Int(cs))..<((b + 1) * Int(cs))])
            setRefcount(&one, i, bits: UInt64(o.refcountBits), 1)
            blockBytes.replaceSubrange((b * Int(cs))..<((b + 1) * Int(cs)), with: one)
        }
        try f.pwrite(blockBytes, at: cs * (1 + tableClusters))
        try f.truncate(to: total * cs)
        if o.syncOnCreate { try f.datasync() }
        f.close()
        if o.preallocateMetadata {
            let img = try Qcow2Image(path: path, options: .init(readOnly: false, allowBackingFiles: o.backingFile != nil))
            try img.preallocateMetadata()
            try img.close()
        }
        if o.preallocation == .falloc || o.preallocation == .full {
            let f = try ImageFile(path: path, readOnly: false)
            defer { f.close() }
            try f.preallocate(at: 0, length: try f.fileSize(), zeroFill: o.preallocation == .full)
            if o.syncOnCreate { try f.datasync() }
        }
    }

    /// Preallocates the range from `offset` (rounded up to a cluster) to the end of the disk, as `qemu-img resize
    /// --preallocation` does for the part a resize adds: metadata allocates its L2 tables and data clusters, and
    /// falloc/full also reserve the host space they take in the file.
    public func preallocate(from offset: UInt64, mode: Preallocation) throws {
        guard mode != .off else { return }
        let fileBefore = try file.fileSize()
        try preallocateMetadata(from: offset)
        if mode == .falloc || mode == .full {
            let fileAfter = try file.fileSize()
            if fileAfter > fileBefore {
                try file.preallocate(at: fileBefore, length: fileAfter - fileBefore, zeroFill: mode == .full)
                try file.datasync()
            }
        }
    }

    /// Allocates every L2 table and data cluster from `start` (rounded up to a cluster) on, for clusters that have
    /// no entry yet (data reads as zero: the file is extended sparsely).
    func preallocateMetadata(from start: UInt64 = 0) throws {
        try lock.withLock { _ in
            var v = (start + cs - 1) / cs * cs
            while v < virtualSize {
                let l2off = try writableL2(for: v)
                let first = l2Index(v)
                let count = Int(min(l2Entries - UInt64(first), (virtualSize - v + cs - 1) / cs))
                let missing = (0..<count).filter { (try? loadL2(l2off).data[first + $0]) == 0 }
                if !missing.isEmpty {
                    let host = try allocateClusters(UInt64(missing.count))
                    for (n, k) in missing.enumerated() {
                        try setL2Entry(l2off, first + k, (host + UInt64(n) * cs) | Self.copiedFlag)
                    }
                }
                v += UInt64(count) * cs
            }
            try flushLocked()
        }
    }
}
