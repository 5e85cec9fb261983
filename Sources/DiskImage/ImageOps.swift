import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Dispatch

/// Allocation status of a guest range through a whole backing chain (as `qemu-img map` reports it).
public struct MapEntry: Sendable, Equatable {
    public var start: UInt64
    public var length: UInt64
    /// Index in the chain of the image that provides the range (0 = top).
    public var depth: Int
    /// Whether some image in the chain provides the range.
    public var present: Bool
    /// Whether the range reads as zero.
    public var zero: Bool
    /// Whether the range is stored as data.
    public var data: Bool
    /// Host offset in the providing image's file, when known.
    public var offset: UInt64?
}

/// Status of the range at `offset` through the chain of `image`.
public func chainStatus(_ image: BlockBackend, at offset: UInt64, maxLength: UInt64, depth: Int = 0) throws -> MapEntry {
    let maxLen = min(maxLength, image.size - offset)
    if let raw = image as? RawImage {
        // Holes in a raw file read as zero; report data ranges with their offsets.
        let fsize = try raw.file.fileSize()
        if offset >= fsize { return MapEntry(start: offset, length: maxLen, depth: depth, present: true, zero: true, data: false, offset: offset) }
        guard let d = raw.file.nextData(from: offset) else {
            return MapEntry(start: offset, length: maxLen, depth: depth, present: true, zero: true, data: false, offset: offset)
        }
        if d > offset {
            return MapEntry(start: offset, length: min(maxLen, d - offset), depth: depth, present: true, zero: true, data: false, offset: offset)
        }
        let h = raw.file.nextHole(from: offset)
        return MapEntry(start: offset, length: min(maxLen, max(h, offset + 1) - offset), depth: depth, present: true, zero: false, data: true, offset: offset)
    }
    guard let q = image as? Qcow2Image else {
        return MapEntry(start: offset, length: maxLen, depth: depth, present: true, zero: false, data: true)
    }
    let (st, len) = try q.blockStatus(at: offset, maxLength: maxLen)
    switch st {
    case .data(let h):
        return MapEntry(start: offset, length: len, depth: depth, present: true, zero: false, data: true, offset: h)
    case .zero:
        return MapEntry(start: offset, length: len, depth: depth, present: true, zero: true, data: false)
    case .unallocated:
        guard let b = q.backing else {
            return MapEntry(start: offset, length: len, depth: depth, present: false, zero: true, data: false)
        }
        if offset >= b.size {
            return MapEntry(start: offset, length: len, depth: depth, present: false, zero: true, data: false)
        }
        var e = try chainStatus(b, at: offset, maxLength: min(len, b.size - offset), depth: depth + 1)
        if !e.present { e.depth = depth + 1 }
        return e
    }
}

/// The whole map of an image through its backing chain, adjacent equal ranges merged.
public func mapImage(_ image: BlockBackend) throws -> [MapEntry] {
    var out: [MapEntry] = []
    var off: UInt64 = 0
    let size = image.size
    while off < size {
        let e = try chainStatus(image, at: off, maxLength: size - off)
        guard e.length > 0 else { throw DiskImageError.invalid("map made no progress at offset \(off)") }
        if var last = out.last, last.depth == e.depth, last.present == e.present, last.zero == e.zero, last.data == e.data,
           (last.offset == nil && e.offset == nil) || (last.offset.map { $0 + last.length } == e.offset) {
            last.length += e.length
            out[out.count - 1] = last
        } else {
            out.append(e)
        }
        off += e.length
    }
    return out
}

/// Carries a non-Sendable value into a concurrent closure whose accesses are disjoint (see the SAFETY notes).
struct SendableBox<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}

/// Whether every byte of the buffer is zero.
func isZero(_ b: UnsafeRawBufferPointer) -> Bool {
    var i = 0
    let n = b.count
    while i + 8 <= n {
        if b.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
        i += 8
    }
    while i < n { if b[i] != 0 { return false }; i += 1 }
    return true
}

/// Copies the guest-visible contents of `source` into `destination` (a freshly created image of at least the
/// same size), skipping ranges that read as zero so the output stays sparse. When `destination` has a backing image,
/// only ranges that differ from it are written. `compress` writes qcow2 compressed clusters.
public func convertImage(from source: BlockBackend, to destination: BlockBackend, compress: Bool = false,
                         progress: ((UInt64, UInt64) -> Void)? = nil) throws {
    let size = source.size
    let dq = destination as? Qcow2Image
    if compress && dq == nil { throw DiskImageError.invalid("compression (-c) requires a qcow2 destination") }
    let unit = Int(dq?.clusterSize ?? 65536)
    let chunk = max(unit, 2 << 20) / unit * unit
    let dstBacking = dq?.backing
    var buf = [UInt8](repeating: 0, count: chunk)
    var base = [UInt8](repeating: 0, count: chunk)
    var off: UInt64 = 0
    while off < size {
        let want = UInt64(min(UInt64(chunk), size - off))
        let st = try chainStatus(source, at: off, maxLength: want)
        let n = Int(st.length)
        if st.zero && dstBacking == nil {
            off += UInt64(n)
            progress?(off, size)
            continue
        }
        try buf.withUnsafeMutableBytes { b in
            let dst = UnsafeMutableRawBufferPointer(rebasing: b[0..<n])
            if st.zero { dst.initializeMemory(as: UInt8.self, repeating: 0) } else { try source.read(into: dst, at: off) }
        }
        if let bk = dstBacking {
            let avail = off < bk.size ? Int(min(UInt64(n), bk.size - off)) : 0
            try base.withUnsafeMutableBytes { b in
                if avail > 0 { try bk.read(into: UnsafeMutableRawBufferPointer(rebasing: b[0..<avail]), at: off) }
                UnsafeMutableRawBufferPointer(rebasing: b[avail..<n]).initializeMemory(as: UInt8.self, repeating: 0)
            }
        }
        // Compress the chunk's whole clusters in parallel (the expensive part of convert -c), then write in order.
        var packedUnits: [Int: [UInt8]] = [:]
        var triedUnits = Set<Int>()
        if compress, let dq, dstBacking == nil {
            let units = n / unit
            let results = UnsafeMutableBufferPointer<[UInt8]?>.allocate(capacity: max(units, 1))
            results.initialize(repeating: nil)
            defer { results.deallocate() }
            let start = off
            buf.withUnsafeBytes { b in
                // SAFETY: each iteration reads its own slice of `b` and writes only its own slot of `results`;
                // both outlive concurrentPerform, which returns after every iteration finished.
                let shared = SendableBox((b, results))
                DispatchQueue.concurrentPerform(iterations: units) { u in
                    let (b, results) = shared.value
                    guard (start + UInt64(u * unit)) % UInt64(unit) == 0 else { return }
                    let piece = UnsafeRawBufferPointer(rebasing: b[(u * unit)..<((u + 1) * unit)])
                    if !isZero(piece) { results[u] = dq.compressCluster(piece) }
                }
            }
            for u in 0..<units {
                triedUnits.insert(u * unit)
                if let r = results[u] { packedUnits[u * unit] = r }
            }
        }
        // Decide unit by unit; consecutive plain writes are merged into one call.
        var pendingStart = -1
        func flushPending(_ end: Int) throws {
            if pendingStart >= 0 {
                try buf.withUnsafeBytes { b in
                    try destination.write(UnsafeRawBufferPointer(rebasing: b[pendingStart..<end]), at: off + UInt64(pendingStart))
                }
                pendingStart = -1
            }
        }
        var p = 0
        while p < n {
            let v = off + UInt64(p)
            let q = min(n - p, unit - Int(v % UInt64(unit)))
            enum Action { case skip, zero, write, compressed }
            let action: Action = buf.withUnsafeBytes { b in
                let piece = UnsafeRawBufferPointer(rebasing: b[p..<(p + q)])
                let pieceZero = isZero(piece)
                if dstBacking != nil {
                    let same = base.withUnsafeBytes { memcmp($0.baseAddress! + p, piece.baseAddress!, q) == 0 }
                    if same { return .skip }
                    if pieceZero { return .zero }
                } else if pieceZero {
                    return .skip
                }
                if compress, v % UInt64(unit) == 0, q == unit || v + UInt64(q) == size { return .compressed }
                return .write
            }
            switch action {
            case .write:
                if pendingStart < 0 { pendingStart = p }
            case .skip:
                try flushPending(p)
            case .zero:
                try flushPending(p)
                try destination.writeZeroes(at: v, length: UInt64(q))
            case .compressed:
                try flushPending(p)
                try buf.withUnsafeBytes { b in
                    try dq!.writeCompressedCluster(UnsafeRawBufferPointer(rebasing: b[p..<(p + q)]), at: v, packed: packedUnits[p], alreadyTried: triedUnits.contains(p))
                }
            }
            p += q
        }
        try flushPending(n)
        off += UInt64(n)
        progress?(off, size)
    }
    try destination.flush()
}

/// Compares the guest-visible contents of two images. Returns nil when identical (over the common size, with the
/// larger image's tail required to be zero), else the first differing offset.
/// What `qemu-img compare -s` (strict) finds before looking at the data.
public enum StrictMismatch: Sendable, Equatable {
    /// The virtual sizes differ.
    case size
    /// From this offset the two chains disagree on whether a range is allocated, reads as zero, or is stored data.
    case status(UInt64)
}

/// The first strict-mode difference between `a` and `b`, or nil when their sizes and allocation agree.
public func strictMismatch(_ a: BlockBackend, _ b: BlockBackend) throws -> StrictMismatch? {
    guard a.size == b.size else { return .size }
    var off: UInt64 = 0
    while off < a.size {
        let sa = try chainStatus(a, at: off, maxLength: a.size - off)
        let sb = try chainStatus(b, at: off, maxLength: b.size - off)
        if sa.present != sb.present || sa.zero != sb.zero || sa.data != sb.data { return .status(off) }
        let step = min(sa.length, sb.length)
        guard step > 0 else { throw DiskImageError.invalid("compare made no progress at offset \(off)") }
        off += step
    }
    return nil
}

public func compareImages(_ a: BlockBackend, _ b: BlockBackend) throws -> UInt64? {
    let common = min(a.size, b.size)
    let chunk = 1 << 20
    var ba = [UInt8](repeating: 0, count: chunk)
    var bb = [UInt8](repeating: 0, count: chunk)
    var off: UInt64 = 0
    while off < common {
        let n = Int(min(UInt64(chunk), common - off))
        let sa = try chainStatus(a, at: off, maxLength: UInt64(n))
        let sb = try chainStatus(b, at: off, maxLength: UInt64(n))
        if sa.zero && sb.zero {
            off += min(sa.length, sb.length)
            continue
        }
        try ba.withUnsafeMutableBytes { try a.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: off) }
        try bb.withUnsafeMutableBytes { try b.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: off) }
        if memcmp(ba, bb, n) != 0 {
            for i in 0..<n where ba[i] != bb[i] { return off + UInt64(i) }
        }
        off += UInt64(n)
    }
    let longer = a.size > b.size ? a : b
    while off < longer.size {
        let st = try chainStatus(longer, at: off, maxLength: UInt64(chunk))
        if !st.zero {
            let n = Int(st.length)
            try ba.withUnsafeMutableBytes { try longer.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: off) }
            for i in 0..<n where ba[i] != 0 { return off + UInt64(i) }
        }
        off += st.length
    }
    return nil
}

extension Qcow2Image {
    /// Rewrites the header (fields, extensions, backing file name) in cluster 0.
    func rewriteHeader() throws {
        try file.pwrite(try header.encode(), at: 0)
        try file.datasync()
    }

    /// Changes the backing file recorded in the header without touching data (`rebase -u`).
    public func setBackingFile(_ name: String?, format: String?) throws {
        try lock.withLock { _ in
            try checkOpen()
            if file.readOnly { throw DiskImageError.invalid("\(path): image is open read-only") }
            try flushLocked()
            header.backingFile = name
            header.backingFormat = name == nil ? nil : format
            try rewriteHeader()
        }
    }

    /// Drops every cluster of this image (so everything reads from the backing image), as after `commit`.
    public func makeEmpty() throws {
        try lock.withLock { _ in
            try checkOpen()
            try checkWritable()
            var v: UInt64 = 0
            while v < virtualSize {
                if try l2Offset(for: v) == nil {
                    v = ((v >> (clusterBits + l2Bits)) + 1) << (clusterBits + l2Bits)
                    continue
                }
                let l2off = try writableL2(for: v)
                let idx = l2Index(v)
                let e = try loadL2(l2off).data[idx]
                if e != 0 {
                    try freeEntryLater(e)
                    try setL2Entry(l2off, idx, 0)
                }
                v += cs
            }
            try flushLocked()
        }
    }
}

/// Writes every range allocated in `top` (its own data, not its backing's) into `top`'s backing image, which must
/// have been opened writable as `base`; then empties `top` unless `emptyTop` is false. A base smaller than `top` is
/// grown to `top`'s size first (as qemu-img commit does), so no byte of `top` is dropped.
public func commitImage(top: Qcow2Image, base: BlockBackend, emptyTop: Bool = true, progress: ((UInt64, UInt64) -> Void)? = nil) throws {
    if base.size < top.size {
        try base.resize(to: top.size, allowShrink: false)
    }
    let size = top.size
    var off: UInt64 = 0
    var buf = [UInt8](repeating: 0, count: 2 << 20)
    while off < size {
        let (st, len) = try top.blockStatus(at: off, maxLength: min(UInt64(buf.count), size - off))
        let n = Int(len)
        switch st {
        case .unallocated: break
        case .zero: try base.writeZeroes(at: off, length: len)
        case .data:
            try buf.withUnsafeMutableBytes { try top.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: off) }
            try buf.withUnsafeBytes { try base.write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: off) }
        }
        off += len
        progress?(off, size)
    }
    try base.flush()
    if emptyTop { try top.makeEmpty() }
}

/// Safe rebase: copies into `image` every range it does not allocate where the old and new backing differ, then
/// records the new backing file.
public func rebaseImage(_ image: Qcow2Image, newBacking: BlockBackend?, name: String?, format: String?) throws {
    let size = image.size
    var off: UInt64 = 0
    let chunk = Int(image.clusterSize)
    var a = [UInt8](repeating: 0, count: chunk)
    var b = [UInt8](repeating: 0, count: chunk)
    while off < size {
        let (st, len) = try image.blockStatus(at: off, maxLength: min(UInt64(chunk) - off % UInt64(chunk), size - off))
        if st == .unallocated {
            let n = Int(len)
            try a.withUnsafeMutableBytes { try image.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: off) }
            try b.withUnsafeMutableBytes { p in
                let dst = UnsafeMutableRawBufferPointer(rebasing: p[0..<n])
                dst.initializeMemory(as: UInt8.self, repeating: 0)
                if let nb = newBacking, off < nb.size {
                    let avail = Int(min(UInt64(n), nb.size - off))
                    try nb.read(into: UnsafeMutableRawBufferPointer(rebasing: p[0..<avail]), at: off)
                }
            }
            if memcmp(a, b, n) != 0 {
                try a.withUnsafeBytes { try image.write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: off) }
            }
        }
        off += len
    }
    try image.flush()
    try image.setBackingFile(name, format: format)
}
