import FoundationEssentials

/// One persistent dirty bitmap of a qcow2 image (the `bitmaps` header extension of docs/interop/qcow2.txt): one bit
/// per `granularity` bytes of the virtual disk, set when that range was written while the bitmap was enabled.
public struct Qcow2Bitmap: Sendable, Equatable {
    /// Flag bit 0: the bitmap was in use by a writer that did not store it (inconsistent).
    public static let inUseFlag: UInt32 = 1
    /// Flag bit 1 ("auto"): the bitmap is enabled and tracks writes.
    public static let autoFlag: UInt32 = 2
    /// Flag bit 2: the extra data may be ignored.
    public static let extraDataCompatibleFlag: UInt32 = 4

    /// The bitmap's name (unique in the image).
    public var name: String
    /// log2 of the bytes covered by one bit.
    public var granularityBits: UInt8
    /// The flag word as stored.
    public var flags: UInt32
    /// Bytes of the virtual disk covered by one bit.
    public var granularity: UInt64 { 1 << UInt64(granularityBits) }
    /// Whether the bitmap tracks writes ("auto").
    public var enabled: Bool { flags & Self.autoFlag != 0 }
    /// Whether the bitmap was left in use (its contents are not to be trusted).
    public var inUse: Bool { flags & Self.inUseFlag != 0 }
    var tableOffset: UInt64
    var tableSize: UInt32
    var type: UInt8 = 1
    var extraData: [UInt8] = []

    /// qemu-img info's flag names.
    public var flagNames: [String] { (inUse ? ["in-use"] : []) + (enabled ? ["auto"] : []) }

    /// Bytes of bitmap data for a disk of `size` bytes.
    func dataBytes(size: UInt64) -> Int { Int(((size + granularity - 1) >> UInt64(granularityBits) + 7) / 8) }
}

/// The bitmaps of an image opened for writing: the directory, the data loaded for bitmaps that track writes or were
/// changed, and whether they must be stored when the image is closed.
final class BitmapState {
    var list: [Qcow2Bitmap]
    /// Loaded data by bitmap name.
    var data: [String: [UInt8]] = [:]
    /// Names whose data must be written at close (tracking or changed).
    var changed: Set<String> = []
    /// Where the directory is now (freed when a new one is written).
    var directoryOffset: UInt64
    var directorySize: UInt64
    init(list: [Qcow2Bitmap], directoryOffset: UInt64, directorySize: UInt64) {
        self.list = list
        self.directoryOffset = directoryOffset
        self.directorySize = directorySize
    }
}

/// Limits of the bitmaps extension (as qemu).
enum Qcow2BitmapLimits {
    static let maxBitmaps = 65535
    static let maxNameBytes = 1023
    static let maxDirectoryBytes: UInt64 = 64 << 20
    static let maxTableBytes: UInt64 = 64 << 20
    static let minGranularityBits: UInt8 = 9
    static let maxGranularityBits: UInt8 = 31
}

extension Qcow2Image {
    /// The persistent dirty bitmaps, or an empty list when there are none or the extension is not valid (autoclear
    /// bit 0 clear: a program without bitmap support wrote the image).
    public func bitmaps() throws -> [Qcow2Bitmap] {
        try lock.withLock { _ in
            try checkOpen()
            if let s = bitmapState { return s.list }
            return try readBitmapDirectory()?.0 ?? []
        }
    }

    /// The bits of bitmap `name`, one per granule (bit k of byte k/8 is granule k, as qemu serializes them).
    public func bitmapData(_ name: String) throws -> [UInt8] {
        try lock.withLock { _ in
            try checkOpen()
            let list = try bitmapState?.list ?? readBitmapDirectory()?.0 ?? []
            guard let b = list.first(where: { $0.name == name }) else { throw DiskImageError.invalid("\(path): no bitmap named '\(name)'") }
            if let d = bitmapState?.data[name] { return d }
            return try loadBitmapData(b)
        }
    }

    /// The bitmaps extension's directory (entries, offset, size), validated, or nil when the image has none.
    func readBitmapDirectory() throws -> ([Qcow2Bitmap], UInt64, UInt64)? {
        guard header.version == 3, header.autoclear & 1 != 0,
              let ext = header.extensions.first(where: { $0.type == Qcow2Extension.bitmaps }) else { return nil }
        guard ext.data.count >= 24 else { throw DiskImageError.corrupt(path, "bitmaps header extension is \(ext.data.count) bytes, 24 needed") }
        let nb = Int(ext.data.be32(0))
        let size = ext.data.be64(8), off = ext.data.be64(16)
        if nb == 0 { return ([], 0, 0) }
        guard nb <= Qcow2BitmapLimits.maxBitmaps, size <= Qcow2BitmapLimits.maxDirectoryBytes, off % cs == 0, off >= cs else {
            throw DiskImageError.corrupt(path, "bitmap directory at offset \(off) (\(size) bytes, \(nb) bitmaps) is misaligned, in the header or too large")
        }
        let dir = try file.preadExact(at: off, count: Int(size), what: "bitmap directory")
        var out: [Qcow2Bitmap] = []
        var pos = 0
        for n in 0..<nb {
            guard pos + 24 <= dir.count else { throw DiskImageError.corrupt(path, "bitmap directory entry \(n) at offset \(off + UInt64(pos)) is past the directory's end") }
            let nameSize = Int(dir.be16(pos + 18)), extra = Int(dir.be32(pos + 20))
            let end = pos + 24 + extra + nameSize
            guard nameSize <= Qcow2BitmapLimits.maxNameBytes, end <= dir.count else {
                throw DiskImageError.corrupt(path, "bitmap directory entry \(n) at offset \(off + UInt64(pos)) overruns the directory")
            }
            let b = Qcow2Bitmap(name: String(decoding: dir[(pos + 24 + extra)..<end], as: UTF8.self),
                                granularityBits: dir[pos + 17], flags: dir.be32(pos + 12),
                                tableOffset: dir.be64(pos), tableSize: dir.be32(pos + 8), type: dir[pos + 16],
                                extraData: Array(dir[(pos + 24)..<(pos + 24 + extra)]))
            guard b.granularityBits >= Qcow2BitmapLimits.minGranularityBits, b.granularityBits <= Qcow2BitmapLimits.maxGranularityBits,
                  b.tableOffset % cs == 0, UInt64(b.tableSize) * 8 <= Qcow2BitmapLimits.maxTableBytes else {
                throw DiskImageError.corrupt(path, "bitmap '\(b.name)' (directory entry \(n)): granularity bits \(b.granularityBits) or table at offset \(b.tableOffset) (\(b.tableSize) entries) is invalid")
            }
            out.append(b)
            pos = (end + 7) & ~7
        }
        return (out, off, size)
    }

    /// Reads a bitmap's bits through its table (entries: 0 all zero, 1 all ones, else a data cluster).
    func loadBitmapData(_ b: Qcow2Bitmap) throws -> [UInt8] {
        let bytes = b.dataBytes(size: virtualSize)
        var out = [UInt8](repeating: 0, count: bytes)
        if b.tableSize == 0 { return out }
        let t = try file.preadExact(at: b.tableOffset, count: Int(b.tableSize) * 8, what: "bitmap '\(b.name)' table")
        for k in 0..<Int(b.tableSize) {
            let start = k * Int(cs)
            if start >= bytes { break }
            let n = min(Int(cs), bytes - start)
            let e = t.be64(k * 8)
            let off = e & Qcow2Limits.offsetMask
            if off == 0 {
                if e & 1 != 0 { for i in start..<(start + n) { out[i] = 0xff } }
                continue
            }
            guard off % cs == 0 else {
                throw DiskImageError.corrupt(path, "bitmap '\(b.name)' table entry \(k) at offset \(b.tableOffset + UInt64(k) * 8): data offset \(off) is not cluster aligned")
            }
            let d = try file.preadExact(at: off, count: n, what: "bitmap '\(b.name)' data")
            out.replaceSubrange(start..<(start + n), with: d)
        }
        return out
    }

    /// On a writable open: loads the enabled bitmaps and marks them in use on disk, as qemu does, so a crash leaves
    /// them marked inconsistent rather than silently stale. They are stored again at close.
    func openBitmapsForWriting() throws {
        guard let (list, off, size) = try readBitmapDirectory() else { return }
        let s = BitmapState(list: list, directoryOffset: off, directorySize: size)
        for (i, b) in list.enumerated() where b.enabled && !b.inUse {
            s.data[b.name] = try loadBitmapData(b)
            s.changed.insert(b.name)
            s.list[i].flags |= Qcow2Bitmap.inUseFlag
        }
        bitmapState = s
        if !s.changed.isEmpty {
            // Mark them in use where they are (the flag word of each entry).
            var pos = 0
            for b in list {
                if s.changed.contains(b.name) {
                    var w = [UInt8](repeating: 0, count: 4)
                    w.putBE32(b.flags | Qcow2Bitmap.inUseFlag, at: 0)
                    try file.pwrite(w, at: off + UInt64(pos) + 12)
                }
                pos = (pos + 24 + b.extraData.count + Array(b.name.utf8).count + 7) & ~7
            }
            try file.datasync()
        }
    }

    /// Before a resize: loads every bitmap, so each is stored again with the new size.
    func loadBitmapsForResize() throws {
        guard let s = bitmapState else { return }
        for b in s.list where s.data[b.name] == nil && !b.inUse {
            s.data[b.name] = try loadBitmapData(b)
            s.changed.insert(b.name)
        }
    }

    /// Sets the bits of every tracking bitmap that cover [offset, offset + length).
    func markBitmapsDirty(_ offset: UInt64, _ length: UInt64) {
        guard let s = bitmapState, length > 0 else { return }
        for b in s.list where b.enabled && s.data[b.name] != nil {
            let g = UInt64(b.granularityBits)
            var k = offset >> g
            let last = (offset + length - 1) >> g
            // In place: no copy of the bitmap per write.
            s.data[b.name]!.withUnsafeMutableBufferPointer { d in
                while k <= last && Int(k / 8) < d.count {
                    if k % 8 == 0 && last - k >= 7 {
                        d[Int(k / 8)] = 0xff
                        k += 8
                    } else {
                        d[Int(k / 8)] |= 1 << UInt8(k % 8)
                        k += 1
                    }
                }
            }
        }
    }

    /// Writes the changed bitmaps (data clusters, tables), a new directory and the header extension, then frees the
    /// structures they replace. Called from close (and after `img bitmap` changes).
    func storeBitmaps() throws {
        guard let s = bitmapState, !s.changed.isEmpty else { return }
        try storeBitmapsNow(s)
    }

    func storeBitmapsNow(_ s: BitmapState) throws {
        var frees: [UInt64] = []
        func clusters(_ off: UInt64, _ bytes: UInt64) {
            if off == 0 || bytes == 0 { return }
            var c = off
            while c < off + bytes { frees.append(c); c += cs }
        }
        for i in s.list.indices {
            var b = s.list[i]
            guard s.changed.contains(b.name) else { continue }
            var d = try s.data[b.name] ?? loadBitmapData(b)
            let bytes = b.dataBytes(size: virtualSize)
            if d.count != bytes { d = Array(d.prefix(bytes)) + [UInt8](repeating: 0, count: max(0, bytes - d.count)) }
            // Free the old table and its data clusters.
            if b.tableSize > 0, let t = try? file.preadExact(at: b.tableOffset, count: Int(b.tableSize) * 8, what: "bitmap table") {
                for k in 0..<Int(b.tableSize) {
                    let off = t.be64(k * 8) & Qcow2Limits.offsetMask
                    if off != 0 { frees.append(off) }
                }
                clusters(b.tableOffset, UInt64(b.tableSize) * 8)
            }
            let entries = (bytes + Int(cs) - 1) / Int(cs)
            var table = [UInt8](repeating: 0, count: entries * 8)
            for k in 0..<entries {
                let chunk = d[(k * Int(cs))..<min(bytes, (k + 1) * Int(cs))]
                if chunk.allSatisfy({ $0 == 0 }) { continue }
                let off = try allocateClusters(1)
                var full = Array(chunk)
                full += [UInt8](repeating: 0, count: Int(cs) - full.count)
                try file.pwrite(full, at: off)
                table.putBE64(off, at: k * 8)
            }
            let tOff = entries == 0 ? 0 : try allocateClusters((UInt64(table.count) + cs - 1) / cs)
            if entries > 0 { try file.pwrite(table + [UInt8](repeating: 0, count: Int((UInt64(table.count) + cs - 1) / cs * cs) - table.count), at: tOff) }
            b.tableOffset = tOff
            b.tableSize = UInt32(entries)
            b.flags &= ~Qcow2Bitmap.inUseFlag
            s.list[i] = b
        }
        // The directory.
        var dir: [UInt8] = []
        for b in s.list {
            var e = [UInt8](repeating: 0, count: 24)
            let name = Array(b.name.utf8)
            e.putBE64(b.tableOffset, at: 0)
            e.putBE32(b.tableSize, at: 8)
            e.putBE32(b.flags, at: 12)
            e[16] = b.type
            e[17] = b.granularityBits
            e.putBE16(UInt16(name.count), at: 18)
            e.putBE32(UInt32(b.extraData.count), at: 20)
            e += b.extraData + name
            e += [UInt8](repeating: 0, count: (8 - e.count % 8) % 8)
            dir += e
        }
        clusters(s.directoryOffset, s.directorySize)
        var dOff: UInt64 = 0
        if !dir.isEmpty {
            dOff = try allocateClusters((UInt64(dir.count) + cs - 1) / cs)
            try file.pwrite(dir + [UInt8](repeating: 0, count: Int((UInt64(dir.count) + cs - 1) / cs * cs) - dir.count), at: dOff)
        }
        fileEnd = max(fileEnd, nextFree)
        try flushLocked()  // data, tables, directory and their refcounts durable before the header names them
        header.extensions.removeAll { $0.type == Qcow2Extension.bitmaps }
        if s.list.isEmpty {
            header.autoclear &= ~1
        } else {
            var ext = [UInt8](repeating: 0, count: 24)
            ext.putBE32(UInt32(s.list.count), at: 0)
            ext.putBE64(UInt64(dir.count), at: 8)
            ext.putBE64(dOff, at: 16)
            header.extensions.append(.init(type: Qcow2Extension.bitmaps, data: ext))
            header.autoclear |= 1
        }
        try rewriteHeader()
        s.directoryOffset = dOff
        s.directorySize = UInt64(dir.count)
        s.changed.removeAll()
        s.data.removeAll()
        pendingFrees += frees
        try flushLocked()
    }

    // MARK: - img bitmap operations

    func mutateBitmaps(_ body: (BitmapState) throws -> Void) throws {
        try lock.withLock { _ in
            try checkOpen()
            if file.readOnly { throw DiskImageError.invalid("\(path): image is open read-only") }
            guard header.version >= 3 else { throw DiskImageError.unsupported(path, "Cannot store dirty bitmaps in qcow2 v2 files") }
            if bitmapState == nil { bitmapState = BitmapState(list: [], directoryOffset: 0, directorySize: 0) }
            let s = bitmapState!
            try body(s)
            try storeBitmapsNow(s)
            // Bitmaps that track writes stay loaded and marked in use while the image is open.
            bitmapState = nil
            try openBitmapsForWriting()
        }
    }

    func bitmapIndex(_ s: BitmapState, _ name: String) throws -> Int {
        guard let i = s.list.firstIndex(where: { $0.name == name }) else {
            throw DiskImageError.invalid("\(path): Dirty bitmap '\(name)' not found")
        }
        return i
    }

    /// Adds an empty bitmap (`img bitmap --add`); `granularity` defaults to the cluster size within 4 KiB…64 KiB, as
    /// qemu-img's.
    public func addBitmap(_ name: String, granularity: UInt64? = nil, enabled: Bool = true) throws {
        let g = granularity ?? min(65536, max(4096, cs))
        guard g.nonzeroBitCount == 1, g >= 512, g <= 1 << 31 else {
            throw DiskImageError.invalid("Granularity must be power of 2, and at least 512 (at most 2 GiB): \(g)")
        }
        let nameBytes = Array(name.utf8)
        guard !nameBytes.isEmpty, nameBytes.count <= Qcow2BitmapLimits.maxNameBytes else {
            throw DiskImageError.invalid("bitmap name must be 1 to \(Qcow2BitmapLimits.maxNameBytes) bytes")
        }
        try mutateBitmaps { s in
            if s.list.contains(where: { $0.name == name }) { throw DiskImageError.invalid("\(path): Bitmap already exists: \(name)") }
            guard s.list.count < Qcow2BitmapLimits.maxBitmaps else { throw DiskImageError.invalid("\(path): too many bitmaps") }
            let b = Qcow2Bitmap(name: name, granularityBits: UInt8(g.trailingZeroBitCount), flags: enabled ? Qcow2Bitmap.autoFlag : 0,
                                tableOffset: 0, tableSize: 0)
            s.list.append(b)
            s.data[name] = [UInt8](repeating: 0, count: b.dataBytes(size: virtualSize))
            s.changed.insert(name)
        }
    }

    /// Removes a bitmap and frees its clusters (`img bitmap --remove`).
    public func removeBitmap(_ name: String) throws {
        try mutateBitmaps { s in
            let i = try bitmapIndex(s, name)
            let b = s.list.remove(at: i)
            s.data[name] = nil
            s.changed.remove(name)
            if b.tableSize > 0 {
                let t = try file.preadExact(at: b.tableOffset, count: Int(b.tableSize) * 8, what: "bitmap table")
                for k in 0..<Int(b.tableSize) {
                    let off = t.be64(k * 8) & Qcow2Limits.offsetMask
                    if off != 0 { pendingFrees.append(off) }
                }
                var c = b.tableOffset
                while c < b.tableOffset + UInt64(b.tableSize) * 8 { pendingFrees.append(c); c += cs }
            }
        }
    }

    /// Clears every bit of a bitmap (`img bitmap --clear`).
    public func clearBitmap(_ name: String) throws {
        try mutateBitmaps { s in
            let b = s.list[try bitmapIndex(s, name)]
            s.data[name] = [UInt8](repeating: 0, count: b.dataBytes(size: virtualSize))
            s.changed.insert(name)
        }
    }

    /// Enables or disables a bitmap (`img bitmap --enable|--disable`).
    public func setBitmapEnabled(_ name: String, _ enabled: Bool) throws {
        try mutateBitmaps { s in
            let i = try bitmapIndex(s, name)
            if s.data[name] == nil { s.data[name] = try loadBitmapData(s.list[i]) }
            if enabled { s.list[i].flags |= Qcow2Bitmap.autoFlag } else { s.list[i].flags &= ~Qcow2Bitmap.autoFlag }
            s.changed.insert(name)
        }
    }

    /// ORs the bits of `source` (a bitmap of the same image or another, read as bytes with its granularity) into
    /// bitmap `name` (`img bitmap --merge`).
    public func mergeBitmap(into name: String, sourceBits: [UInt8], sourceGranularity: UInt64) throws {
        try mutateBitmaps { s in
            let i = try bitmapIndex(s, name)
            let b = s.list[i]
            var d = try s.data[name] ?? loadBitmapData(b)
            let gs = UInt64(sourceGranularity.trailingZeroBitCount)
            for (byte, v) in sourceBits.enumerated() where v != 0 {
                for bit in 0..<8 where v & (1 << UInt8(bit)) != 0 {
                    let start = UInt64(byte * 8 + bit) << gs
                    if start >= virtualSize { continue }
                    let end = min(virtualSize, start + (1 << gs))
                    var k = start >> UInt64(b.granularityBits)
                    while k <= (end - 1) >> UInt64(b.granularityBits) && Int(k / 8) < d.count {
                        d[Int(k / 8)] |= 1 << UInt8(k % 8)
                        k += 1
                    }
                }
            }
            s.data[name] = d
            s.changed.insert(name)
        }
    }
}
