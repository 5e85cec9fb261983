import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// How an image (and its backing chain) is opened.
public struct ImageOpenOptions: Sendable {
    /// Open without write access.
    public var readOnly: Bool
    /// Whether backing files named inside the image may be opened. The VMM passes false unless the user allows it.
    public var allowBackingFiles: Bool
    /// Format of the image, or nil to probe ("qcow2" or "raw").
    public var format: String?
    /// Open the image alone, ignoring its backing file (unallocated ranges read as zero). For metadata-only work
    /// such as `check` and `rebase -u`.
    public var ignoreBackingFile: Bool
    /// Skip fdatasync entirely (qemu-img's cache=unsafe, the default for convert output). Writes keep their order
    /// but nothing is durable before the kernel writes it back.
    public var unsafeNoSync = false
    /// Open for `check` (qemu's BDRV_O_CHECK): an image marked corrupt may be opened writable for repair, a dirty
    /// image is left for the check to repair, and the autoclear bits qemu knows (bitmaps) are kept.
    public var forCheck = false
    /// Creates options.
    public init(readOnly: Bool = false, allowBackingFiles: Bool = true, format: String? = nil, ignoreBackingFile: Bool = false) {
        self.readOnly = readOnly
        self.allowBackingFiles = allowBackingFiles
        self.format = format
        self.ignoreBackingFile = ignoreBackingFile
    }
}

/// A cached metadata table (L2 table or refcount block), mutated in place.
final class CachedTable<T> {
    var data: T
    var dirty: Bool
    var lastUse: UInt64 = 0
    init(_ data: T, dirty: Bool) { self.data = data; self.dirty = dirty }
}

/// A small LRU cache of metadata tables keyed by host offset, with dirty tracking for write-back.
struct TableCache<T> {
    var entries: [UInt64: CachedTable<T>] = [:]
    var clock: UInt64 = 0
    let capacity: Int

    init(capacity: Int) { self.capacity = max(4, capacity) }

    mutating func get(_ off: UInt64) -> CachedTable<T>? {
        guard let e = entries[off] else { return nil }
        clock += 1
        e.lastUse = clock
        return e
    }
    /// The least recently used entry to evict when the cache is full.
    func victim() -> (UInt64, CachedTable<T>)? {
        guard entries.count >= capacity else { return nil }
        return entries.min { $0.value.lastUse < $1.value.lastUse }.map { ($0.key, $0.value) }
    }
}

/// Where one guest cluster (or subcluster) lives.
enum ClusterMapping: Equatable {
    case unallocated
    case zero
    case data(UInt64)
    case compressed(offset: UInt64, bytes: Int)
}

/// A qcow2 image (version 2 or 3) with an optional backing chain.
///
/// Metadata is cached (L2 tables and refcount blocks, LRU, write-back) and written back on `flush()` in crash-safe
/// order: data and refcount blocks, fdatasync, L2 tables, fdatasync, L1 table and header, fdatasync. Clusters are only
/// freed after the references to them are durably gone, so a crash at any point leaves at worst leaked clusters.
public final class Qcow2Image: BlockBackend, @unchecked Sendable {
    static let copiedFlag: UInt64 = 1 << 63
    static let compressedFlag: UInt64 = 1 << 62
    static let zeroFlag: UInt64 = 1

    let file: ImageFile
    let lock = Mutex(())
    /// The parsed header (kept up to date with what is on disk after a flush).
    public internal(set) var header: Qcow2Header
    /// The backing image, if any.
    public let backing: BlockBackend?
    /// The backing image's path as resolved, if any.
    public let backingPath: String?

    let cs: UInt64
    let clusterBits: UInt64
    let extendedL2: Bool
    let l2Entries: UInt64
    let l2Bits: UInt64
    let refBlockEntries: UInt64
    let refcountBits: UInt64
    let maxRefcount: UInt64

    var l1: [UInt64]
    var l1Dirty = Set<Int>()
    var refTable: [UInt64]
    var refTableDirty = Set<Int>()
    var refTableRelocated = false
    var l2Cache: TableCache<[UInt64]>
    var refCache: TableCache<[UInt8]>
    var nextFree: UInt64
    var fileEnd: UInt64
    var compressedCursor: UInt64 = 0
    var pendingFrees: [UInt64] = []
    var dirtyBitWritten = false
    /// `nextFree` as the open (or the last metadata reload) set it: nothing allocated yet.
    var allocationStartAtOpen: UInt64 = 0
    /// Persistent bitmaps of an image open for writing (nil when it has none).
    var bitmapState: BitmapState?
    var closed = false
    var virtualSize: UInt64
    private var lastDecompressed: (UInt64, [UInt8])?

    /// The path the image was opened from.
    public var path: String { file.path }
    public var size: UInt64 { lock.withLock { _ in virtualSize } }
    public var isReadOnly: Bool { file.readOnly }
    /// Cluster size in bytes.
    public var clusterSize: UInt64 { cs }

    /// Opens a qcow2 image. Backing files are opened read-only, relative names resolved against the image's folder.
    public convenience init(path: String, options: ImageOpenOptions = .init()) throws {
        try self.init(path: path, options: options, chain: [])
    }

    init(path: String, options: ImageOpenOptions, chain: [String]) throws {
        let file = try ImageFile(path: path, readOnly: options.readOnly)
        file.syncDisabled = options.unsafeNoSync
        self.file = file
        let fsize = try file.fileSize()
        let headBytes = try file.pread(at: 0, count: Int(min(fsize, UInt64(Qcow2Limits.maxHeaderExtensionBytes))))
        var h = try Qcow2Header(bytes: headBytes, path: path, fileSize: fsize)
        if h.incompatible.contains(.corrupt) && !options.readOnly && !options.forCheck {
            throw DiskImageError.corrupt(path, "image is marked corrupt (incompatible bit 1 at offset 72); open it read-only or repair it with 'img check -r all'")
        }
        cs = h.clusterSize
        clusterBits = UInt64(h.clusterBits)
        extendedL2 = h.incompatible.contains(.extendedL2)
        l2Entries = cs / (extendedL2 ? 16 : 8)
        l2Bits = UInt64(l2Entries.trailingZeroBitCount)
        refcountBits = UInt64(h.refcountBits)
        refBlockEntries = cs * 8 / refcountBits
        maxRefcount = refcountBits == 64 ? UInt64.max : (1 << refcountBits) - 1
        virtualSize = h.virtualSize
        fileEnd = fsize
        nextFree = (fsize + cs - 1) / cs * cs
        let capBytes: UInt64 = 32 << 20
        l2Cache = TableCache(capacity: Int(capBytes / cs))
        refCache = TableCache(capacity: Int((8 << 20) / cs))

        // L1 and refcount tables: sizes were bounded by the header parser against the named limits. As qemu, bytes
        // past the end of the file read as zero, and entries are validated where a read or write uses them, so a
        // damaged entry that nothing uses does not keep the image from opening (check reports it).
        let l1Bytes = try file.pread(at: h.l1TableOffset, count: Int(h.l1Size) * 8)
        l1 = (0..<Int(h.l1Size)).map { l1Bytes.be64($0 * 8) }
        let rtBytes = try file.pread(at: h.refcountTableOffset, count: Int(UInt64(h.refcountTableClusters) * cs))
        refTable = (0..<(rtBytes.count / 8)).map { rtBytes.be64($0 * 8) }

        // Backing chain.
        var resolved: String?
        var backingImage: BlockBackend?
        if let name = h.backingFile, !options.ignoreBackingFile {
            guard options.allowBackingFiles else {
                throw DiskImageError(.backingChain, "\(path): has backing file '\(name)' but opening backing files is not allowed")
            }
            let full = ImagePath.backing(name, of: path)
            let canonical = ImagePath.resolved(full)
            let me = ImagePath.resolved(path)
            let visited = chain + [me]
            if visited.contains(canonical) {
                throw DiskImageError(.backingChain, "\(path): backing chain cycle: '\(name)' is already in the chain \(visited)")
            }
            if visited.count >= Qcow2Limits.maxBackingDepth {
                throw DiskImageError(.backingChain, "\(path): backing chain deeper than \(Qcow2Limits.maxBackingDepth) images")
            }
            let fmt = h.backingFormat
            resolved = full
            backingImage = try DiskImage.openImage(path: full, options: ImageOpenOptions(readOnly: true, allowBackingFiles: true, format: fmt), chain: visited)
        }
        backing = backingImage
        backingPath = resolved
        // Unknown autoclear bits must be cleared when the image is opened writable.
        // check -r writes no guest data, so it also keeps raw external data (bit 1) valid.
        // Bit 0 (bitmaps) stays: writes keep the bitmaps up to date (Qcow2Bitmaps.swift).
        let keptAutoclear: UInt64 = options.forCheck ? 0b11 : 0b1
        if !options.readOnly && h.version == 3 && h.autoclear & ~keptAutoclear != 0 {
            h.autoclear &= keptAutoclear
            var b = [UInt8](repeating: 0, count: 8)
            b.putBE64(h.autoclear, at: 0)
            try file.pwrite(b, at: 88)
        }
        header = h
        if !options.readOnly {
            // Never allocate over a table or a cluster the refcounts say is in use, even past the end of the file.
            nextFree = max(nextFree, try safeAllocationStart())
            allocationStartAtOpen = nextFree
        }
        if !options.readOnly && !options.forCheck && h.incompatible.contains(.dirty) {
            // Lazy refcounts left dirty by a crash: rebuild the refcounts before writing anything.
            _ = try checkLocked(repair: .all)
            try clearDirtyBit()
        }
        if !options.readOnly && !options.forCheck { try openBitmapsForWriting() }
    }

    deinit { if !closed { try? close() } }

    /// The first offset the allocator may use: past the end of the file, the L1 and refcount tables, and the
    /// highest cluster the last refcount block counts as in use (a truncated file may still reference clusters
    /// past its end). Unreadable refcount blocks are ignored here; check reports them.
    func safeAllocationStart() throws -> UInt64 {
        func up(_ v: UInt64) -> UInt64 { (v + cs - 1) / cs * cs }
        var s = up(fileEnd)
        // Tables far past the end (damaged offsets) are not worth a file grown to reach them.
        let reach = up(fileEnd) + RefcountCheck.rebuildGuard
        for end in [header.l1TableOffset + UInt64(header.l1Size) * 8,
                    header.refcountTableOffset + UInt64(header.refcountTableClusters) * cs] where end <= reach {
            s = max(s, up(end))
        }
        if let ti = refTable.lastIndex(where: { $0 & ~UInt64(0x1ff) != 0 }) {
            let boff = refTable[ti] & ~UInt64(0x1ff)
            if boff % cs == 0 && boff >= cs && boff < up(fileEnd) {
                s = max(s, boff + cs)
                let b = try file.pread(at: boff, count: Int(cs))
                var k = Int(refBlockEntries) - 1
                while k >= 0 && Self.getRefcount(b, k, bits: refcountBits) == 0 { k -= 1 }
                // A damaged refcount table entry can claim clusters terabytes away: not trusted past `reach`.
                if k >= 0 { s = max(s, min(reach, (UInt64(ti) * refBlockEntries + UInt64(k) + 1) * cs)) }
            }
        }
        return s
    }

    // MARK: - L2 access

    func l1Index(_ v: UInt64) -> Int { Int(v >> (clusterBits + l2Bits)) }
    func l2Index(_ v: UInt64) -> Int { Int((v >> clusterBits) & (l2Entries - 1)) }

    /// Loads the L2 table at host offset `off` (already validated against the file) through the cache.
    func loadL2(_ off: UInt64) throws -> CachedTable<[UInt64]> {
        if let t = l2Cache.get(off) { return t }
        let words = Int(cs / 8)
        let bytes = try file.pread(at: off, count: Int(cs))  // past the end of the file: zeros, as qemu reads it
        var t = [UInt64](repeating: 0, count: words)
        bytes.withUnsafeBytes { raw in
            for i in 0..<words { t[i] = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)) }
        }
        return try insertL2(off, t, dirty: false)
    }

    @discardableResult
    func insertL2(_ off: UInt64, _ t: [UInt64], dirty: Bool) throws -> CachedTable<[UInt64]> {
        if l2Cache.entries[off] == nil, let (voff, v) = l2Cache.victim() {
            if v.dirty {
                // Dependencies first: refcounts of everything this table points to, durably.
                try writeRefcountBlocks()
                try file.datasync()
                try writeL2(voff, v.data)
                v.dirty = false
            }
            l2Cache.entries[voff] = nil
        }
        l2Cache.clock += 1
        let box = CachedTable(t, dirty: dirty)
        box.lastUse = l2Cache.clock
        l2Cache.entries[off] = box
        return box
    }

    func writeL2(_ off: UInt64, _ t: [UInt64]) throws {
        var bytes = [UInt8](repeating: 0, count: Int(cs))
        bytes.withUnsafeMutableBytes { raw in
            for (i, w) in t.enumerated() { raw.storeBytes(of: w.bigEndian, toByteOffset: i * 8, as: UInt64.self) }
        }
        try file.pwrite(bytes, at: off)
    }

    /// Validates a host cluster offset taken from an L2 entry. A read of a cluster past the end of the file reads
    /// zeros, as in qemu; a write there is refused (the allocator could hand the cluster out again).
    func checkDataOffset(_ off: UInt64, l2Offset: UInt64, index: Int, forWrite: Bool = false) throws {
        let where_ = "L2 entry \(index) of the table at offset \(l2Offset)"
        if off % cs != 0 { throw DiskImageError.corrupt(path, "\(where_): data offset \(off) is not cluster aligned") }
        if off < cs { throw DiskImageError.corrupt(path, "\(where_): data cluster at offset \(off) points into the header") }
        if forWrite && off >= max(fileEnd, nextFree) {
            throw DiskImageError.corrupt(path, "\(where_): data cluster at offset \(off) is past the end of the file (\(fileEnd) bytes)")
        }
    }

    /// The L2 table offset for guest offset `v`, or nil when unallocated.
    func l2Offset(for v: UInt64) throws -> UInt64? {
        let i = l1Index(v)
        guard i < l1.count else { throw DiskImageError.corrupt(path, "guest offset \(v) needs L1 index \(i) beyond l1_size \(l1.count)") }
        let off = l1[i] & Qcow2Limits.offsetMask
        if off == 0 { return nil }
        if off % cs != 0 {
            throw DiskImageError.corrupt(path, "L1 entry \(i) (0x\(String(l1[i], radix: 16))) at offset \(header.l1TableOffset + UInt64(i) * 8) is not a cluster-aligned L2 offset")
        }
        return off
    }

    /// Mapping of the cluster (or, for extended L2, subcluster) containing guest offset `v`, and how many bytes from
    /// `v` share it.
    func mapping(at v: UInt64) throws -> (ClusterMapping, UInt64) {
        let inCluster = v & (cs - 1)
        var run = cs - inCluster
        guard let l2off = try l2Offset(for: v) else { return (.unallocated, run) }
        let t = try loadL2(l2off).data
        let idx = l2Index(v)
        let e = extendedL2 ? t[idx * 2] : t[idx]
        if e & Self.compressedFlag != 0 {
            let x = 62 - (clusterBits - 8)
            let hostOff = e & ((1 << x) - 1)
            let nsect = (e >> x) & ((1 << (clusterBits - 8)) - 1)
            let bytes = Int((nsect + 1) * 512 - (hostOff & 511))
            if hostOff < cs || hostOff >= fileEnd {
                throw DiskImageError.corrupt(path, "L2 entry \(idx) of the table at offset \(l2off): compressed data at offset \(hostOff) points into the header or past the end of the file")
            }
            return (.compressed(offset: hostOff, bytes: bytes), run)
        }
        let host = e & Qcow2Limits.offsetMask
        if extendedL2 {
            let bitmap = t[idx * 2 + 1]
            let sub = cs / 32
            let si = inCluster / sub
            run = sub - (inCluster % sub)
            if (bitmap >> (32 + si)) & 1 != 0 { return (.zero, run) }
            if (bitmap >> si) & 1 != 0 {
                try checkDataOffset(host, l2Offset: l2off, index: idx)
                return (.data(host + si * sub), run)
            }
            return (.unallocated, run)
        }
        if e & Self.zeroFlag != 0 && header.version >= 3 { return (.zero, run) }
        if host == 0 { return (.unallocated, run) }
        try checkDataOffset(host, l2Offset: l2off, index: idx)
        return (.data(host), run)
    }

    /// Decompressed contents of a compressed cluster (cached: the last one).
    func decompressed(offset: UInt64, bytes: Int) throws -> [UInt8] {
        if let (o, d) = lastDecompressed, o == offset { return d }
        let input = try file.pread(at: offset, count: bytes)
        var out = [UInt8](repeating: 0, count: Int(cs))
        try out.withUnsafeMutableBytes {
            try Qcow2Codec.decompress(header.compressionType, input, into: $0, path: path, offset: offset)
        }
        lastDecompressed = (offset, out)
        return out
    }

    // MARK: - Reading

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try lock.withLock { _ in
            try checkOpen()
            try checkRange(offset, UInt64(buffer.count), "read", size: virtualSize)
            try readLocked(into: buffer, at: offset)
        }
    }

    func readLocked(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while done < buffer.count {
            let v = offset + UInt64(done)
            let (m, run) = try mapping(at: v)
            let n = Int(min(run, UInt64(buffer.count - done)))
            let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)])
            switch m {
            case .zero:
                dst.initializeMemory(as: UInt8.self, repeating: 0)
            case .unallocated:
                try readBacking(into: dst, at: v)
            case .data(let host):
                let start = host + (v & (cs - 1)) - (extendedL2 ? (v & (cs - 1)) / (cs / 32) * (cs / 32) : 0)
                // Extend over following clusters stored contiguously on the host: one pread.
                var len = n
                while !extendedL2 && done + len < buffer.count {
                    let (m2, run2) = try mapping(at: v + UInt64(len))
                    guard case .data(let h2) = m2, h2 == start + UInt64(len) else { break }
                    len += Int(min(run2, UInt64(buffer.count - done - len)))
                }
                try file.pread(UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + len)]), at: start)
                done += len
                continue
            case .compressed(let o, let b):
                let d = try decompressed(offset: o, bytes: b)
                let start = Int(v & (cs - 1))
                d.withUnsafeBytes { dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[start..<(start + n)])) }
            }
            done += n
        }
    }

    func readBacking(into dst: UnsafeMutableRawBufferPointer, at v: UInt64) throws {
        guard let b = backing else { dst.initializeMemory(as: UInt8.self, repeating: 0); return }
        let bsize = b.size
        if v >= bsize { dst.initializeMemory(as: UInt8.self, repeating: 0); return }
        let avail = Int(min(UInt64(dst.count), bsize - v))
        try b.read(into: UnsafeMutableRawBufferPointer(rebasing: dst[0..<avail]), at: v)
        if avail < dst.count {
            UnsafeMutableRawBufferPointer(rebasing: dst[avail...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    // MARK: - Refcounts

    func checkOpen() throws {
        if closed { throw DiskImageError.invalid("\(path): image is closed") }
    }

    func loadRefBlock(_ off: UInt64) throws -> CachedTable<[UInt8]> {
        if let b = refCache.get(off) { return b }
        let limit = max(fileEnd, nextFree)
        if off % cs != 0 || off < cs || off >= limit || limit - off < cs {
            throw DiskImageError.corrupt(path, "refcount block at offset \(off) (refcount table at \(header.refcountTableOffset)) is misaligned, in the header or past the end of the file (\(fileEnd) bytes); repair with 'img check -r all'")
        }
        let b = try file.preadExact(at: off, count: Int(cs), what: "refcount block")
        return try insertRefBlock(off, b, dirty: false)
    }

    @discardableResult
    func insertRefBlock(_ off: UInt64, _ b: [UInt8], dirty: Bool) throws -> CachedTable<[UInt8]> {
        if refCache.entries[off] == nil, let (voff, v) = refCache.victim() {
            // Writing a refcount block early is always safe: increments precede references, decrements follow them.
            if v.dirty { try file.pwrite(v.data, at: voff); v.dirty = false }
            refCache.entries[voff] = nil
        }
        refCache.clock += 1
        let box = CachedTable(b, dirty: dirty)
        box.lastUse = refCache.clock
        refCache.entries[off] = box
        return box
    }

    static func getRefcount(_ b: [UInt8], _ i: Int, bits: UInt64) -> UInt64 {
        switch bits {
        case 64: return b.be64(i * 8)
        case 32: return UInt64(b.be32(i * 4))
        case 16: return UInt64(b.be16(i * 2))
        case 8: return UInt64(b[i])
        default:
            let bitPos = i * Int(bits)
            return UInt64(b[bitPos / 8] >> UInt8(bitPos % 8)) & ((1 << bits) - 1)
        }
    }

    static func setRefcount(_ b: inout [UInt8], _ i: Int, bits: UInt64, _ v: UInt64) {
        switch bits {
        case 64: b.putBE64(v, at: i * 8)
        case 32: b.putBE32(UInt32(v), at: i * 4)
        case 16: b.putBE16(UInt16(v), at: i * 2)
        case 8: b[i] = UInt8(v)
        default:
            let bitPos = i * Int(bits)
            let mask = UInt8(((1 << bits) - 1) << UInt64(bitPos % 8))
            b[bitPos / 8] = (b[bitPos / 8] & ~mask) | (UInt8(v << UInt64(bitPos % 8)) & mask)
        }
    }

    /// The on-disk (cached) refcount of the host cluster at `off`.
    func refcount(of off: UInt64) throws -> UInt64 {
        let c = off >> clusterBits
        let ti = Int(c / refBlockEntries)
        guard ti < refTable.count, refTable[ti] & ~UInt64(0x1ff) != 0 else { return 0 }
        let b = try loadRefBlock(refTable[ti] & ~UInt64(0x1ff))
        return Self.getRefcount(b.data, Int(c % refBlockEntries), bits: refcountBits)
    }

    /// Adds `delta` to the refcount of the host cluster at `off`, allocating refcount blocks (and growing the
    /// refcount table) as needed.
    func addRefcount(_ off: UInt64, _ delta: Int64) throws {
        let c = off >> clusterBits
        let ti = Int(c / refBlockEntries)
        let blockOff = try refBlock(forTableIndex: ti)
        let b = try loadRefBlock(blockOff)
        let i = Int(c % refBlockEntries)
        let old = Self.getRefcount(b.data, i, bits: refcountBits)
        let new: UInt64
        if delta >= 0 {
            let (s, o) = old.addingReportingOverflow(UInt64(delta))
            guard !o && s <= maxRefcount else {
                throw DiskImageError.corrupt(path, "refcount of cluster at offset \(off) would exceed the \(refcountBits)-bit maximum")
            }
            new = s
        } else {
            guard old >= UInt64(-delta) else {
                throw DiskImageError.corrupt(path, "refcount of cluster at offset \(off) would drop below zero (is \(old))")
            }
            new = old - UInt64(-delta)
        }
        Self.setRefcount(&b.data, i, bits: refcountBits, new)
        b.dirty = true
        if refCache.entries[blockOff] !== b { refCache.entries[blockOff] = b }
    }

    func refBlock(forTableIndex ti: Int) throws -> UInt64 {
        if ti >= refTable.count { try growRefcountTable(minEntries: ti + 1) }
        let e = refTable[ti] & ~UInt64(0x1ff)
        if e != 0 { return e }
        let off = nextFree
        nextFree += cs
        try insertRefBlock(off, [UInt8](repeating: 0, count: Int(cs)), dirty: true)
        refTable[ti] = off
        refTableDirty.insert(ti)
        try addRefcount(off, 1)
        return off
    }

    /// Moves the refcount table to a larger one at the end of the file. The header switches to it on the next flush;
    /// the old table is freed after that.
    func growRefcountTable(minEntries: Int) throws {
        let perCluster = Int(cs / 8)
        var entries = max(minEntries, refTable.count + refTable.count / 2 + 1)
        // Cover the new table itself and the blocks it may need.
        let coverPerEntry = refBlockEntries * cs
        let needCover = Int((nextFree + UInt64(entries) * 8 + 4 * cs) / coverPerEntry) + 2
        entries = max(entries, needCover)
        let clusters = (entries + perCluster - 1) / perCluster
        guard UInt64(clusters) * cs <= Qcow2Limits.maxRefcountTableBytes else {
            throw DiskImageError.invalid("\(path): refcount table would exceed \(Qcow2Limits.maxRefcountTableBytes) bytes")
        }
        let old = (header.refcountTableOffset, UInt64(header.refcountTableClusters))
        let off = nextFree
        nextFree += UInt64(clusters) * cs
        refTable += [UInt64](repeating: 0, count: clusters * perCluster - refTable.count)
        header.refcountTableOffset = off
        header.refcountTableClusters = UInt32(clusters)
        refTableRelocated = true
        for k in 0..<UInt64(clusters) { try addRefcount(off + k * cs, 1) }
        for k in 0..<old.1 { pendingFrees.append(old.0 + k * cs) }
    }

    /// Allocates `n` contiguous fresh clusters at the end of the file with refcount 1.
    func allocateClusters(_ n: UInt64) throws -> UInt64 {
        let off = nextFree
        nextFree += n * cs
        for k in 0..<n { try addRefcount(off + k * cs, 1) }
        return off
    }

    // MARK: - Writing

    func setDirtyBitIfNeeded() throws {
        guard !dirtyBitWritten, header.version == 3, header.compatible.contains(.lazyRefcounts) else { return }
        header.incompatible.insert(.dirty)
        var b = [UInt8](repeating: 0, count: 8)
        b.putBE64(header.incompatible.rawValue, at: 0)
        try file.pwrite(b, at: 72)
        try file.datasync()
        dirtyBitWritten = true
    }

    func clearDirtyBit() throws {
        guard header.incompatible.contains(.dirty) else { return }
        header.incompatible.remove(.dirty)
        var b = [UInt8](repeating: 0, count: 8)
        b.putBE64(header.incompatible.rawValue, at: 0)
        try file.pwrite(b, at: 72)
        try file.datasync()
        dirtyBitWritten = false
    }

    /// A writable (refcount 1) L2 table for guest offset `v`: allocates or copies it as needed.
    func writableL2(for v: UInt64) throws -> UInt64 {
        let i = l1Index(v)
        guard i < l1.count else { throw DiskImageError.corrupt(path, "guest offset \(v) needs L1 index \(i) beyond l1_size \(l1.count)") }
        let e = l1[i]
        let old = e & Qcow2Limits.offsetMask
        if old != 0 && (old % cs != 0 || old + cs > max(fileEnd, nextFree)) {
            throw DiskImageError.corrupt(path, "L1 entry \(i) at offset \(header.l1TableOffset + UInt64(i) * 8): L2 table at offset \(old) is misaligned or past the end of the file (\(fileEnd) bytes); repair with 'img check -r all'")
        }
        if old != 0 && e & Self.copiedFlag != 0 { return old }
        var table = [UInt64](repeating: 0, count: Int(cs / 8))
        if old != 0 {
            table = try loadL2(old).data
            // The copy shares data clusters with the old table: they are no longer exclusively ours.
            let stride = extendedL2 ? 2 : 1
            for k in Swift.stride(from: 0, to: table.count, by: stride) { table[k] &= ~Self.copiedFlag }
        }
        let newOff = try allocateClusters(1)
        try insertL2(newOff, table, dirty: true)
        l1[i] = newOff | Self.copiedFlag
        l1Dirty.insert(i)
        if old != 0 { pendingFrees.append(old) }
        return newOff
    }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try lock.withLock { _ in
            try checkOpen()
            try checkWritable()
            try checkRange(offset, UInt64(data.count), "write", size: virtualSize)
            try writeLocked(data, at: offset)
        }
    }

    func checkWritable() throws {
        if file.readOnly { throw DiskImageError.invalid("\(path): write to a read-only image") }
        if extendedL2 { throw DiskImageError.unsupported(path, "writing to images with extended L2 entries is not supported (read-only support)") }
    }

    func writeLocked(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try setDirtyBitIfNeeded()
        markBitmapsDirty(offset, UInt64(data.count))
        var done = 0
        while done < data.count {
            let v = offset + UInt64(done)
            let inCluster = Int(v & (cs - 1))
            // Fast path: a run of whole, not yet allocated clusters in one L2 table gets one contiguous allocation and
            // one pwrite.
            let whole = (data.count - done) / Int(cs)
            if inCluster == 0 && whole >= 2 {
                let l2off = try writableL2(for: v)
                let t = try loadL2(l2off)
                let idx = l2Index(v)
                var k = 0
                while k < whole && idx + k < Int(l2Entries) {
                    let e = t.data[idx + k]
                    if e & Qcow2Limits.offsetMask != 0 || e & Self.compressedFlag != 0 { break }
                    k += 1
                }
                if k >= 2 {
                    let host = try allocateClusters(UInt64(k))
                    let bytes = k * Int(cs)
                    try file.pwrite(UnsafeRawBufferPointer(rebasing: data[done..<(done + bytes)]), at: host)
                    fileEnd = max(fileEnd, host + UInt64(bytes))
                    for j in 0..<k { try setL2Entry(l2off, idx + j, (host + UInt64(j) * cs) | Self.copiedFlag) }
                    done += bytes
                    continue
                }
            }
            let n = min(Int(cs) - inCluster, data.count - done)
            try writeCluster(UnsafeRawBufferPointer(rebasing: data[done..<(done + n)]), at: v)
            done += n
        }
    }

    /// Writes within one cluster; copies on write when the cluster is not exclusively ours.
    func writeCluster(_ data: UnsafeRawBufferPointer, at v: UInt64, compress: Bool = false, packed prepacked: [UInt8]? = nil, alreadyTried: Bool = false) throws {
        let l2off = try writableL2(for: v)
        let idx = l2Index(v)
        let e = try loadL2(l2off).data[idx]
        let inCluster = v & (cs - 1)
        if !compress && e & Self.copiedFlag != 0 && e & Self.compressedFlag == 0 && e & Qcow2Limits.offsetMask != 0 {
            let host = e & Qcow2Limits.offsetMask
            try checkDataOffset(host, l2Offset: l2off, index: idx, forWrite: true)
            try file.pwrite(data, at: host + inCluster)
            fileEnd = max(fileEnd, host + inCluster + UInt64(data.count))
            if e & Self.zeroFlag != 0 {
                // Preallocated zero cluster: the rest of the cluster must read as zero.
                if data.count < Int(cs) {
                    var full = [UInt8](repeating: 0, count: Int(cs))
                    full.withUnsafeMutableBytes { _ = memcpy($0.baseAddress! + Int(inCluster), data.baseAddress!, data.count) }
                    try file.pwrite(full, at: host)
                }
                try setL2Entry(l2off, idx, host | Self.copiedFlag)
            }
            return
        }
        // Build the new cluster contents.
        let (m, _) = try mapping(at: v & ~(cs - 1))
        var buf: [UInt8]
        var onlyData = false
        if data.count == Int(cs) {
            buf = compress ? Array(data) : []
        } else {
            let oldIsZero: Bool
            switch m {
            case .zero: oldIsZero = true
            case .unallocated: oldIsZero = backing == nil || (v & ~(cs - 1)) >= backing!.size
            default: oldIsZero = false
            }
            if oldIsZero && !compress {
                buf = []
                onlyData = true
            } else {
                buf = [UInt8](repeating: 0, count: Int(cs))
                try buf.withUnsafeMutableBytes { try readLocked(into: $0, at: v & ~(cs - 1)) }
                buf.withUnsafeMutableBytes { _ = memcpy($0.baseAddress! + Int(inCluster), data.baseAddress!, data.count) }
            }
        }
        var newEntry: UInt64
        if compress, let packed = prepacked ?? (alreadyTried ? nil : buf.withUnsafeBytes({ Qcow2Codec.compress(header.compressionType, $0) })) {
            newEntry = try writeCompressed(packed)
        } else {
            let host = try allocateClusters(1)
            if onlyData || data.count == Int(cs) {
                try file.pwrite(data, at: host + inCluster)
            } else {
                try file.pwrite(buf, at: host)
            }
            fileEnd = max(fileEnd, host + inCluster + UInt64(data.count))
            newEntry = host | Self.copiedFlag
        }
        try setL2Entry(l2off, idx, newEntry)
        try freeEntryLater(e)
    }

    /// Appends compressed data, packing it after the previous compressed cluster when that is at the file's end.
    func writeCompressed(_ packed: [UInt8]) throws -> UInt64 {
        var off: UInt64
        if compressedCursor != 0 && compressedCursor % cs != 0 && (compressedCursor + cs - 1) / cs * cs == nextFree,
           try refcount(of: compressedCursor & ~(cs - 1)) < maxRefcount {
            off = compressedCursor
            try addRefcount(off & ~(cs - 1), 1)
            let endAligned = (off + UInt64(packed.count) + cs - 1) / cs * cs
            if endAligned > nextFree { _ = try allocateClusters((endAligned - nextFree) / cs) }
        } else {
            off = try allocateClusters((UInt64(packed.count) + cs - 1) / cs)
        }
        try file.pwrite(packed, at: off)
        fileEnd = max(fileEnd, off + UInt64(packed.count))
        compressedCursor = off + UInt64(packed.count)
        let x = 62 - (clusterBits - 8)
        let nsect = ((off + UInt64(packed.count) - 1) >> 9) - (off >> 9)
        return Self.compressedFlag | (nsect << x) | off
    }

    /// Sets one L2 entry in the cached table at `off` and marks it dirty.
    func setL2Entry(_ off: UInt64, _ idx: Int, _ value: UInt64) throws {
        let t = try loadL2(off)
        t.data[idx] = value
        t.dirty = true
        if l2Cache.entries[off] !== t { l2Cache.entries[off] = t }
    }

    /// Schedules the host clusters an old L2 entry referenced to be released after the next durable flush.
    func freeEntryLater(_ e: UInt64) throws {
        if e & Self.compressedFlag != 0 {
            let x = 62 - (clusterBits - 8)
            let hostOff = e & ((1 << x) - 1)
            let nsect = (e >> x) & ((1 << (clusterBits - 8)) - 1)
            let end = (hostOff & ~UInt64(511)) + (nsect + 1) * 512
            var c = hostOff & ~(cs - 1)
            while c < end { pendingFrees.append(c); c += cs }
        } else if e & Qcow2Limits.offsetMask != 0 {
            pendingFrees.append(e & Qcow2Limits.offsetMask)
        }
    }

    /// Compresses one cluster with this image's compression type (thread-safe, no I/O), for callers that compress
    /// clusters in parallel and then write them with `writeCompressedCluster(_:at:packed:)`.
    public func compressCluster(_ data: UnsafeRawBufferPointer) -> [UInt8]? {
        guard data.count == Int(cs) else { return nil }
        return Qcow2Codec.compress(header.compressionType, data)
    }

    /// Writes `data` (one full cluster at a cluster-aligned offset) compressed, as `convert -c` does. `packed` is
    /// the already compressed form from `compressCluster`, or nil to compress here; `alreadyTried` says that
    /// `compressCluster` returned nil (incompressible: stored uncompressed without trying again).
    public func writeCompressedCluster(_ data: UnsafeRawBufferPointer, at offset: UInt64, packed: [UInt8]? = nil,
                                       alreadyTried: Bool = false) throws {
        try lock.withLock { _ in
            try checkOpen()
            try checkWritable()
            guard offset % cs == 0, data.count == Int(cs) || offset + UInt64(data.count) == virtualSize else {
                throw DiskImageError.invalid("\(path): compressed write at \(offset) of \(data.count) bytes must cover one whole cluster")
            }
            try checkRange(offset, UInt64(data.count), "compressed write", size: virtualSize)
            try setDirtyBitIfNeeded()
            markBitmapsDirty(offset, UInt64(data.count))
            var full = [UInt8](repeating: 0, count: Int(cs))
            full.withUnsafeMutableBytes { _ = memcpy($0.baseAddress!, data.baseAddress!, data.count) }
            try full.withUnsafeBytes { try writeCluster($0, at: offset, compress: true, packed: packed, alreadyTried: alreadyTried) }
        }
    }

    public func writeZeroes(at offset: UInt64, length: UInt64) throws {
        try zeroOrDiscard(at: offset, length: length, discard: false)
    }

    public func discard(at offset: UInt64, length: UInt64) throws {
        try zeroOrDiscard(at: offset, length: length, discard: true)
    }

    func zeroOrDiscard(at offset: UInt64, length: UInt64, discard: Bool) throws {
        try lock.withLock { _ in
            try checkOpen()
            try checkWritable()
            try checkRange(offset, length, discard ? "discard" : "write-zeroes", size: virtualSize)
            try setDirtyBitIfNeeded()
            markBitmapsDirty(offset, length)
            var v = offset
            let end = offset + length
            while v < end {
                let inCluster = v & (cs - 1)
                let n = min(cs - inCluster, end - v)
                let wholeCluster = inCluster == 0 && (n == cs || v + n == virtualSize)
                if wholeCluster && (header.version >= 3 || backing == nil) {
                    let l2off = try writableL2(for: v)
                    let idx = l2Index(v)
                    let old = try loadL2(l2off).data[idx]
                    // With a backing file, "unallocated" would expose backing data: use the zero flag.
                    try setL2Entry(l2off, idx, (header.version >= 3 && (backing != nil || !discard)) ? Self.zeroFlag : 0)
                    try freeEntryLater(old)
                } else {
                    let zeros = [UInt8](repeating: 0, count: Int(n))
                    try zeros.withUnsafeBytes { try writeLocked($0, at: v) }
                }
                v += n
            }
        }
    }

    // MARK: - Flush

    func writeRefcountBlocks() throws {
        for (off, e) in refCache.entries where e.dirty {
            try file.pwrite(e.data, at: off)
            e.dirty = false
        }
        if refTableRelocated {
            var b = [UInt8](repeating: 0, count: refTable.count * 8)
            for (i, e) in refTable.enumerated() { b.putBE64(e, at: i * 8) }
            try file.pwrite(b, at: header.refcountTableOffset)
        } else {
            for i in refTableDirty.sorted() {
                var b = [UInt8](repeating: 0, count: 8)
                b.putBE64(refTable[i], at: 0)
                try file.pwrite(b, at: header.refcountTableOffset + UInt64(i) * 8)
            }
        }
        refTableDirty.removeAll()
    }

    func flushLocked() throws {
        if file.readOnly || closed { return }
        // The file must cover every allocated cluster.
        // (Only once something was allocated: opening never grows the file, not even up to a safe start.)
        if nextFree > fileEnd && nextFree > allocationStartAtOpen {
            try file.truncate(to: nextFree)
            fileEnd = nextFree
        }
        // 1. data and refcounts (blocks, then the table that points to them)
        try writeRefcountBlocks()
        try file.datasync()
        if refTableRelocated {
            var b = [UInt8](repeating: 0, count: 12)
            b.putBE64(header.refcountTableOffset, at: 0)
            b.putBE32(header.refcountTableClusters, at: 8)
            try file.pwrite(b, at: 48)
            try file.datasync()
            refTableRelocated = false
        }
        // 2. L2 tables
        var wroteL2 = false
        for (off, e) in l2Cache.entries where e.dirty {
            try writeL2(off, e.data)
            e.dirty = false
            wroteL2 = true
        }
        if wroteL2 { try file.datasync() }
        // 3. L1
        if !l1Dirty.isEmpty {
            for i in l1Dirty.sorted() {
                var b = [UInt8](repeating: 0, count: 8)
                b.putBE64(l1[i], at: 0)
                try file.pwrite(b, at: header.l1TableOffset + UInt64(i) * 8)
            }
            l1Dirty.removeAll()
            try file.datasync()
        }
        // 4. Release clusters whose references are now durably gone (written on the next flush).
        if !pendingFrees.isEmpty {
            let frees = pendingFrees
            pendingFrees.removeAll()
            for off in frees { try addRefcount(off, -1) }
            try writeRefcountBlocks()
            try file.datasync()
        }
    }

    public func flush() throws {
        try lock.withLock { _ in try flushLocked() }
    }

    public func close() throws {
        try lock.withLock { _ in
            if closed { return }
            if !file.readOnly {
                try flushLocked()
                try storeBitmaps()
                try clearDirtyBit()
            }
            closed = true
            file.close()
        }
        try backing?.close()
    }

    // MARK: - Resize

    /// Changes the virtual size. `newSize` must be a multiple of 512 (qemu refuses others too). When the image grows
    /// over a backing file that is longer than the old size, the new range is written as zeroes, as qemu does, so the
    /// backing file's data beyond the old end never becomes visible.
    public func resize(to newSize: UInt64, allowShrink: Bool) throws {
        let oldSize = try lock.withLock { _ in try resizeLocked(to: newSize, allowShrink: allowShrink) }
        if newSize > oldSize, let b = backing, b.size > oldSize {
            try writeZeroes(at: oldSize, length: min(newSize, b.size) - oldSize)
            try flush()
        }
    }

    /// Resizes the tables and the header; returns the old size.
    private func resizeLocked(to newSize: UInt64, allowShrink: Bool) throws -> UInt64 {
        try checkOpen()
        try checkWritable()
        guard newSize % 512 == 0 else { throw DiskImageError.invalid("\(path): the new size \(newSize) must be a multiple of 512") }
        guard newSize <= Qcow2Limits.maxImageSize else { throw DiskImageError.invalid("\(path): size \(newSize) exceeds the limit of \(Qcow2Limits.maxImageSize) bytes") }
        try loadBitmapsForResize()
        let oldSize = virtualSize
        if newSize < virtualSize {
            guard allowShrink else { throw DiskImageError.invalid("\(path): shrinking from \(virtualSize) to \(newSize) bytes requires --shrink") }
            // Drop every cluster wholly beyond the new end.
            let firstDrop = (newSize + cs - 1) / cs * cs
            var v = firstDrop
            while v < virtualSize {
                if try l2Offset(for: v) != nil {
                    let l2off = try writableL2(for: v)
                    let idx = l2Index(v)
                    try freeEntryLater(try loadL2(l2off).data[idx])
                    try setL2Entry(l2off, idx, 0)
                    v += cs
                } else {
                    v = (v >> (clusterBits + l2Bits) + 1) << (clusterBits + l2Bits)
                }
            }
        }
        let bytesPerL1 = l2Entries * cs
        let needed = Int((newSize + bytesPerL1 - 1) / bytesPerL1)
        if needed > l1.count {
            guard UInt64(needed) * 8 <= Qcow2Limits.maxL1Bytes else { throw DiskImageError.invalid("\(path): L1 table for \(newSize) bytes exceeds the limit") }
            try flushLocked()
            let clusters = (UInt64(needed) * 8 + cs - 1) / cs
            let newOff = try allocateClusters(clusters)
            var b = [UInt8](repeating: 0, count: Int(clusters * cs))
            let newL1 = l1 + [UInt64](repeating: 0, count: needed - l1.count)
            for (i, e) in newL1.enumerated() { b.putBE64(e, at: i * 8) }
            try file.pwrite(b, at: newOff)
            fileEnd = max(fileEnd, newOff + UInt64(b.count))
            try flushLocked()  // refcounts of the new table
            var h = [UInt8](repeating: 0, count: 12)
            h.putBE32(UInt32(needed), at: 0)
            h.putBE64(newOff, at: 4)
            try file.pwrite(h, at: 36)
            try file.datasync()
            let oldClusters = (UInt64(l1.count) * 8 + cs - 1) / cs
            if l1.count > 0 { for k in 0..<oldClusters { pendingFrees.append(header.l1TableOffset + k * cs) } }
            header.l1TableOffset = newOff
            header.l1Size = UInt32(needed)
            l1 = newL1
        }
        try flushLocked()
        try writeVirtualSize(newSize)
        return oldSize
    }

    /// Writes the header's virtual size (offset 24), durably, and takes it over.
    func writeVirtualSize(_ newSize: UInt64) throws {
        var s = [UInt8](repeating: 0, count: 8)
        s.putBE64(newSize, at: 0)
        try file.pwrite(s, at: 24)
        try file.datasync()
        header.virtualSize = newSize
        virtualSize = newSize
    }

    /// Bytes allocated on the host file system for this image's file.
    public func allocatedBytes() throws -> UInt64 { try file.allocatedBytes() }

    // MARK: - Allocation status

    /// Status of a guest range as seen through this image only (not its backing file).
    public enum BlockStatus: Sendable, Equatable {
        /// Data stored in this image, at host offset (nil for compressed data).
        case data(hostOffset: UInt64?)
        /// Reads as zero, stored as a zero cluster.
        case zero
        /// Not allocated here: reads from the backing image (or zeroes).
        case unallocated
    }

    /// Status of the range starting at `offset`, and how many bytes (≤ `maxLength`) share it.
    public func blockStatus(at offset: UInt64, maxLength: UInt64) throws -> (BlockStatus, UInt64) {
        try lock.withLock { _ in
            try checkOpen()
            var len: UInt64 = 0
            var first: BlockStatus?
            var expectHost: UInt64?
            scan: while len < maxLength && offset + len < virtualSize {
                let v = offset + len
                let st: BlockStatus
                let run: UInt64
                var host: UInt64?
                if try l2Offset(for: v) == nil {
                    // A whole unallocated L2 range.
                    st = .unallocated
                    run = (((v >> (clusterBits + l2Bits)) + 1) << (clusterBits + l2Bits)) - v
                } else {
                    let (m, r) = try mapping(at: v)
                    run = r
                    switch m {
                    case .unallocated: st = .unallocated
                    case .zero: st = .zero
                    case .compressed: st = .data(hostOffset: nil)
                    case .data(let h):
                        let inC = v & (cs - 1)
                        host = h + inC - (extendedL2 ? inC / (cs / 32) * (cs / 32) : 0)
                        st = .data(hostOffset: host)
                    }
                }
                if let f = first {
                    switch (f, st) {
                    case (.zero, .zero), (.unallocated, .unallocated): break
                    case (.data(_?), .data(let b?)) where b == expectHost: break
                    default: break scan
                    }
                } else {
                    first = st
                }
                let step = min(run, maxLength - len)
                len += step
                if let h = host { expectHost = h + step }
                if case .data(nil) = st { break }
            }
            return (first ?? .unallocated, min(len, virtualSize - offset))
        }
    }
}
