/// What `img amend -o …` changes in a qcow2 image (nil: unchanged).
public struct Qcow2Amendment: Sendable, Equatable {
    /// 3 (`compat=1.1`) or 2 (`compat=0.10`).
    public var version: UInt32?
    public var lazyRefcounts: Bool?
    /// The new virtual size.
    public var size: UInt64?

    public init() {}
}

extension Qcow2Image {
    /// Applies `a` as `qemu-img amend` does, or throws before changing anything when it cannot:
    /// - `compat=1.1` upgrades a version-2 header (16-bit refcounts, the feature-name table);
    /// - `compat=0.10` downgrades, when nothing needs version 3: 16-bit refcounts, no bitmaps, no extended
    ///   L2 entries, no zstd compression, no lazy refcounts left on; zero clusters (version 2 has no zero flag)
    ///   become unallocated when nothing lies beneath (no backing file, no snapshots), else it refuses and
    ///   names how many there are (qemu-img would write them out);
    /// - `lazy_refcounts` needs version 3; turning it off leaves the image clean (a dirty image was repaired
    ///   when it was opened for writing);
        /// - `size` resizes (shrinking as `resize --shrink`), after the version change;
    /// - upgrading an image with internal snapshots is refused (not supported yet).
    public func amend(_ a: Qcow2Amendment) throws {
        let current = lock.withLock { _ in header }
        let version = a.version ?? current.version
        let lazy = a.lazyRefcounts ?? (version == 3 && current.compatible.contains(.lazyRefcounts))
        func refuse(_ why: String) -> DiskImageError { DiskImageError(.unsupported, "\(path): \(why)") }
        if lazy && version < 3 {
            throw refuse("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")
        }
        if version == 3 && current.version == 2, try !snapshots().isEmpty {
            throw refuse("upgrading an image with internal snapshots to compat=1.1 is not supported yet (their table entries would need version 3's extra data)")
        }
        if version == 2 && current.version == 3 {
            if current.refcountBits != 16 {
                throw refuse("compat=0.10 requires refcount_bits=16, the image has \(current.refcountBits)")
            }
            if try !bitmaps().isEmpty { throw refuse("Cannot downgrade an image with bitmaps") }
            if current.incompatible.contains(.extendedL2) { throw refuse("Cannot downgrade an image with extended L2 entries") }
            if current.compressionType != .zlib { throw refuse("Cannot downgrade an image with a compression type other than zlib") }
            if current.incompatible.contains(.externalData) { throw refuse("Cannot downgrade an image with an external data file") }
            let hasSnapshots = try !snapshots().isEmpty
            if current.backingFile != nil || hasSnapshots {
                let zeros = try countZeroClusters()
                if zeros > 0 {
                    throw refuse("compat=0.10 has no zero clusters and this image has \(zeros) \(current.backingFile != nil ? "over a backing file" : "with internal snapshots"): not downgraded (qemu-img amend would write them out)")
                }
            }
        }
        if version == 2 && current.version == 3 {
            // Without a backing file or snapshots a zero cluster reads as an unallocated one does.
            try unallocateZeroClusters()
        }
        try lock.withLock { _ in
            try checkOpen()
            try checkWritable()
            try flushLocked()
            var h = header
            if version != h.version {
                h.version = version
                if version == 2 {
                    h.incompatible = []
                    h.compatible = []
                    h.autoclear = 0
                } else {
                    h.refcountOrder = 4
                }
            }
            if version == 3 {
                if lazy { h.compatible.insert(.lazyRefcounts) } else { h.compatible.remove(.lazyRefcounts) }
                // A clean image (written back above), whether lazy refcounts stay on or not.
                h.incompatible.remove(.dirty)
            }
            _ = try h.encode() // throws (nothing written) if it does not fit in the first cluster
            header = h
            dirtyBitWritten = false
            try rewriteHeader()
        }
        // After the version change: growing over a longer backing file writes zeroes, as zero clusters in
        // version 3 but as data in version 2, which has no zero flag.
        if let size = a.size, size != self.size {
            try resize(to: size, allowShrink: true)
        }
    }

    /// Makes every zero cluster of the active L1 table unallocated (freeing a host cluster it kept), for an image
    /// with nothing underneath: the data reads the same, and version 2 can express it.
    func unallocateZeroClusters() throws {
        try lock.withLock { _ in
            try checkOpen()
            try checkWritable()
            let span = UInt64(1) << (clusterBits + l2Bits)
            var v: UInt64 = 0
            while v < virtualSize {
                guard let l2 = try l2Offset(for: v) else {
                    v = (v / span + 1) * span
                    continue
                }
                let idx = l2Index(v)
                let e = try loadL2(l2).data[idx]
                if e & (1 << 62) == 0 && e & 1 != 0 {
                    let target = try writableL2(for: v)
                    if e & Qcow2Limits.offsetMask != 0 { try freeEntryLater(e) }
                    try setL2Entry(target, idx, 0)
                }
                v += cs
            }
            try flushLocked()
        }
    }

    /// Zero clusters (L2 entries with the zero flag) in the active L1 table and in every snapshot's.
    func countZeroClusters() throws -> Int {
        let tables = try [lock.withLock { _ in l1 }] + snapshots().map { try readL1(at: $0.l1TableOffset, count: Int($0.l1Size)) }
        var seen: Set<UInt64> = []
        var zeros = 0
        for table in tables {
            for e in table {
                let l2 = e & Qcow2Limits.offsetMask
                guard l2 != 0, seen.insert(l2).inserted else { continue }
                let entries = try lock.withLock { _ in try loadL2(l2).data }
                // Standard L2 entries: bit 0 is the zero flag (compressed entries use bit 62 and no zero flag).
                zeros += entries.filter { $0 & (1 << 62) == 0 && $0 & 1 != 0 }.count
            }
        }
        return zeros
    }
}
