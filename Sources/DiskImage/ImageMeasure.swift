/// `qemu-img measure`: how large a new image would get, as qemu-img 7.2 computes it.
///
/// For qcow2 the fully allocated size is the data rounded up to whole clusters plus every piece of
/// metadata a fully allocated image has: the header cluster, L2 tables for every cluster (rounded up
/// to whole tables), the L1 table (rounded up to a whole cluster of entries), and the refcount table
/// and blocks that count all of these, themselves included (found as a fixed point). The required
/// size keeps that metadata but counts only the data clusters the source really holds (data that is
/// neither unallocated nor zero), or every cluster when the new image will have a backing file or
/// `preallocation=falloc|full`. For raw both sizes are the virtual size.
public struct ImageMeasurement: Sendable, Equatable {
    /// Bytes the new image needs for the source's data.
    public var required: UInt64
    /// Bytes it would take fully allocated.
    public var fullyAllocated: UInt64
    /// Bytes for the source's persistent bitmaps (qcow2 v3 output of a qcow2 source), else nil.
    public var bitmaps: UInt64?

    public init(required: UInt64, fullyAllocated: UInt64, bitmaps: UInt64? = nil) {
        self.required = required
        self.fullyAllocated = fullyAllocated
        self.bitmaps = bitmaps
    }
}

/// The computations behind `ImageMeasurement`.
public enum ImageMeasure {
    /// The qcow2 geometry a measurement is made for.
    public struct Qcow2Layout: Sendable, Equatable {
        public var clusterSize: UInt64 = 65536
        public var refcountBits: UInt64 = 16
        /// Extended L2 entries (16 bytes instead of 8).
        public var extendedL2 = false
        public init(clusterSize: UInt64 = 65536, refcountBits: UInt64 = 16, extendedL2: Bool = false) {
            self.clusterSize = clusterSize
            self.refcountBits = refcountBits
            self.extendedL2 = extendedL2
        }
    }

    /// `v` rounded up to a multiple of `to`.
    public static func roundUp(_ v: UInt64, _ to: UInt64) -> UInt64 { (v + to - 1) / to * to }
    static func divUp(_ v: UInt64, _ by: UInt64) -> UInt64 { (v + by - 1) / by }

    /// Refcount table and block bytes for an image of `clusters` clusters: the counts must also
    /// cover the refcount clusters themselves, so the numbers grow until they stop changing.
    static func refcountMetadataSize(clusters: UInt64, layout: Qcow2Layout) -> UInt64 {
        let c = layout.clusterSize
        let perBlock = c * 8 / layout.refcountBits
        let perTableCluster = c / 8
        var table: UInt64 = 0, blocks: UInt64 = 0, total: UInt64 = 0
        while true {
            blocks = divUp(clusters + table + blocks, perBlock)
            table = divUp(blocks, perTableCluster)
            let next = clusters + blocks + table
            if next == total { break }
            total = next
        }
        return (blocks + table) * c
    }

    /// Metadata plus data of a fully allocated qcow2 image of `virtualSize` bytes.
    public static func qcow2FullyAllocated(virtualSize: UInt64, layout: Qcow2Layout) -> UInt64 {
        let c = layout.clusterSize
        let data = roundUp(virtualSize, c)
        let l2Entry: UInt64 = layout.extendedL2 ? 16 : 8
        var meta = c // the header
        let l2Entries = roundUp(data / c, c / l2Entry)
        meta += l2Entries * l2Entry
        let l1Entries = roundUp(l2Entries * l2Entry / c, c / 8)
        meta += l1Entries * 8
        meta += refcountMetadataSize(clusters: (meta + data) / c, layout: layout)
        return meta + data
    }

    /// Bytes of whole clusters holding data in `image` (any depth of its backing chain): data that is
    /// present and not zero, each run rounded out to the clusters it touches, each cluster once.
    public static func dataClusterBytes(of image: BlockBackend, clusterSize c: UInt64) throws -> UInt64 {
        var total: UInt64 = 0, coveredEnd: UInt64 = 0
        for e in try mapImage(image) where e.data && !e.zero {
            let start = max(e.start / c * c, coveredEnd)
            let end = roundUp(e.start + e.length, c)
            if end > start {
                total += end - start
                coveredEnd = end
            }
        }
        return total
    }

    /// Bytes a qcow2 image with clusters of `clusterSize` needs for `image`'s persistent bitmaps, each
    /// assumed fully set: its data clusters, its bitmap table clusters, and the directory.
    public static func bitmapsSize(of image: Qcow2Image, clusterSize c: UInt64) throws -> UInt64 {
        var total: UInt64 = 0, directory: UInt64 = 0
        for b in try image.bitmaps() {
            let clusters = divUp(UInt64(b.dataBytes(size: image.size)), c)
            total += clusters * c
            total += roundUp(clusters * 8, c)
            directory += roundUp(24 + UInt64(b.name.utf8.count), 8)
        }
        return total + roundUp(directory, c)
    }

    /// The measurement of a new qcow2 image: of `virtualSize` bytes, holding `dataBytes` of whole data
    /// clusters (nil: every cluster, as with a backing file or full preallocation).
    public static func qcow2(virtualSize: UInt64, dataBytes: UInt64?, layout: Qcow2Layout) -> ImageMeasurement {
        let virtual = roundUp(virtualSize, layout.clusterSize)
        let full = qcow2FullyAllocated(virtualSize: virtual, layout: layout)
        return ImageMeasurement(required: full - virtual + (dataBytes ?? virtual), fullyAllocated: full)
    }
}
