/// What `check -r` repairs.
public enum Qcow2RepairMode: String, Sendable {
    /// Only leaked clusters (refcount higher than references).
    case leaks
    /// Leaks and corruptions (refcount lower than references, wrong COPIED flags, broken refcount structures, which
    /// are rebuilt from the references).
    case all
}

/// Result of a consistency check, with the fields of `qemu-img check --output=json`.
public struct Qcow2CheckResult: Sendable, Equatable {
    /// Clusters whose refcount is too low, or other metadata errors.
    public var corruptions = 0
    /// Clusters with a refcount but no reference.
    public var leaks = 0
    /// Errors that prevented checking or repairing (I/O, unreadable refcounts, a repair that needs a rebuild).
    public var checkErrors = 0
    /// Corruptions repaired.
    public var corruptionsFixed = 0
    /// Leaks repaired.
    public var leaksFixed = 0
    /// Offset just past the highest used cluster.
    public var imageEndOffset: UInt64 = 0
    /// Guest clusters in the virtual disk.
    public var totalClusters: UInt64 = 0
    /// Guest clusters allocated in this image.
    public var allocatedClusters: UInt64 = 0
    /// Allocated guest clusters not contiguous with the previous one (compressed clusters always count).
    public var fragmentedClusters: UInt64 = 0
    /// Compressed guest clusters.
    public var compressedClusters: UInt64 = 0
    /// Human-readable findings, one per problem, worded as qemu-img's (which prints them on stderr).
    public var messages: [String] = []
}

extension Qcow2Image {
    /// Checks (and optionally repairs) the image the way `qemu-img check` does: every reference (header, L1/L2
    /// tables of the active state and of every snapshot, refcount structures, snapshot table, persistent bitmaps) is
    /// counted in memory and compared with the stored refcounts; reserved bits, misaligned entries and wrong COPIED
    /// flags are reported. With `repair`, leaks are released, refcounts that are too low are raised, misaligned
    /// zero-flagged L2 entries become plain zero clusters, broken refcount structures are rebuilt from the counted
    /// references and COPIED flags are corrected. After a repair the image is checked again and that second result
    /// is returned (with the counts of what was fixed), so a result without errors is true of the image on disk.
    public func check(repair: Qcow2RepairMode? = nil) throws -> Qcow2CheckResult {
        try lock.withLock { _ in
            try checkOpen()
            if repair != nil && file.readOnly { throw DiskImageError.invalid("\(path): repair needs a writable image") }
            var r = try checkLocked(repair: repair)
            if repair != nil && (r.leaksFixed > 0 || r.corruptionsFixed > 0) {
                // Report what remains after the repair, as qemu-img does.
                var after = try checkLocked(repair: nil)
                after.leaksFixed = r.leaksFixed
                after.corruptionsFixed = r.corruptionsFixed
                after.messages = r.messages + after.messages
                r = after
            }
            return r
        }
    }

    func checkLocked(repair: Qcow2RepairMode?) throws -> Qcow2CheckResult {
        if !file.readOnly { try flushLocked() }
        let c = try RefcountCheck(self, repair: repair)
        let r = try c.run()
        if repair != nil && !file.readOnly {
            try file.datasync()
            try reloadMetadata()
        }
        return r
    }

    /// Drops every cached table and reads the header, L1 and refcount tables again (after a repair wrote the file
    /// directly).
    func reloadMetadata() throws {
        l2Cache.entries.removeAll()
        refCache.entries.removeAll()
        l1Dirty.removeAll()
        refTableDirty.removeAll()
        refTableRelocated = false
        compressedCursor = 0
        let fsize = try file.fileSize()
        let hb = try file.pread(at: 0, count: Int(min(max(fsize, UInt64(Qcow2Header.size)), UInt64(Qcow2Limits.maxHeaderExtensionBytes))))
        header = try Qcow2Header(bytes: hb, path: path, fileSize: fsize)
        let l1b = try file.pread(at: header.l1TableOffset, count: Int(header.l1Size) * 8)
        l1 = (0..<Int(header.l1Size)).map { l1b.be64($0 * 8) }
        let rtb = try file.pread(at: header.refcountTableOffset, count: Int(UInt64(header.refcountTableClusters) * cs))
        refTable = (0..<(rtb.count / 8)).map { rtb.be64($0 * 8) }
        fileEnd = fsize
        nextFree = max(nextFree, try safeAllocationStart())
        allocationStartAtOpen = nextFree
    }
}

/// Masks of qcow2 entries (docs/interop/qcow2.txt).
enum Qcow2Masks {
    /// L1 entry bits that must be zero: 1–8 are reserved, 56–62 too.
    static let l1Reserved: UInt64 = 0x7f00_0000_0000_01ff
    /// Standard L2 entry bits that must be zero: 1–8 and 56–61.
    static let l2Reserved: UInt64 = 0x3f00_0000_0000_01fe
    /// Refcount table entry bits that must be zero (0–8).
    static let refTableReserved: UInt64 = 0x1ff
    /// Bitmap table entry bits that must be zero.
    static let bitmapTableReserved: UInt64 = 0xff00_0000_0000_01fe
}

/// One run of qemu's consistency check over an image (block/qcow2-refcount.c's algorithm, written anew): references
/// are counted in memory, compared with the stored refcounts, and optionally repaired. It reads the file directly
/// (bytes past the end read as zero, as qemu reads them) and writes repairs directly; the image reloads its
/// metadata afterwards.
final class RefcountCheck {
    let img: Qcow2Image
    let file: ImageFile
    let repair: Qcow2RepairMode?
    let cs: UInt64
    let clusterBits: UInt64
    let refBlockEntries: UInt64
    let bits: UInt64
    let refMax: UInt64
    var fileLen: UInt64
    /// Counted references per host cluster.
    var refs: [UInt64] = []
    var refTable: [UInt64]
    var blocks: [UInt64: [UInt8]] = [:]
    var r = Qcow2CheckResult()
    var rebuild = false
    var highest: UInt64 = 0
    let maxMessages = 2000
    /// Regions referenced a cluster or more past the end of the file (not counted): a rebuilt refcount structure
    /// never lands on one, so no damaged entry ends up pointing into it.
    var pastEndRegions: [(start: UInt64, end: UInt64)] = []
    /// How far past the end of the file the engine trusts tables and refcounts when choosing where to allocate.
    static let rebuildGuard: UInt64 = 64 << 20

    init(_ img: Qcow2Image, repair: Qcow2RepairMode?) throws {
        self.img = img
        file = img.file
        self.repair = repair
        cs = img.cs
        clusterBits = img.clusterBits
        refBlockEntries = img.refBlockEntries
        bits = img.refcountBits
        refMax = img.maxRefcount
        fileLen = try img.file.fileSize()
        refTable = img.refTable
    }

    var fixErrors: Bool { repair == .all }
    var fixLeaks: Bool { repair != nil }

    func say(_ m: String) { if r.messages.count < maxMessages { r.messages.append(m) } }
    func hex(_ v: UInt64) -> String { String(v, radix: 16) }

    func run() throws -> Qcow2CheckResult {
        r.totalClusters = (img.virtualSize + cs - 1) / cs
        try calculate(fix: repair)
        let before = r
        compare(fixLeaks: false, fixErrors: false)
        if rebuild && fixErrors {
            let old = r
            say("Rebuilding refcount structure")
            try rebuildStructure()
            r = Qcow2CheckResult()
            r.totalClusters = before.totalClusters
            r.messages = old.messages
            r.corruptionsFixed = before.corruptionsFixed
            r.leaksFixed = before.leaksFixed
            r.checkErrors = old.checkErrors
            rebuild = false
            refs.removeAll()
            blocks.removeAll()
            try calculate(fix: nil)
            let saved = r
            r.leaks = 0
            r.corruptions = 0
            compare(fixLeaks: true, fixErrors: false)
            if rebuild {
                say("ERROR rebuilt refcount structure is still broken")
                r.checkErrors += 1
            }
            let freshLeaks = r.leaks
            let fixedLeaks = r.leaksFixed
            let msgs = r.messages
            let errs = r.checkErrors
            r = saved
            r.corruptions += snapshotCorruptions
            r.messages = msgs
            r.checkErrors = errs
            r.leaksFixed = fixedLeaks
            if r.corruptions < old.corruptions { r.corruptionsFixed += old.corruptions - r.corruptions }
            if r.leaks < old.leaks { r.leaksFixed += old.leaks - r.leaks }
            r.leaks += freshLeaks
        } else if repair != nil {
            if rebuild {
                say("ERROR need to rebuild refcount structures")
                r.checkErrors += 1
                r.imageEndOffset = (highest + 1) * cs
                return r
            }
            if r.leaks > 0 || r.corruptions > 0 {
                let msgs = r.messages
                r = before
                r.messages = msgs
                compare(fixLeaks: fixLeaks, fixErrors: fixErrors)
            }
        }
        try checkCopiedFlags()
        r.imageEndOffset = (highest + 1) * cs
        if repair != nil && r.checkErrors == 0 && r.corruptions == 0 {
            // Mark clean and consistent: clear the dirty and corrupt bits.
            let inc = img.header.incompatible
            if img.header.version == 3 && (inc.contains(.dirty) || inc.contains(.corrupt)) {
                var v = inc
                v.remove(.dirty)
                v.remove(.corrupt)
                var b = [UInt8](repeating: 0, count: 8)
                b.putBE64(v.rawValue, at: 0)
                try file.pwrite(b, at: 72)
                try file.datasync()
                img.header.incompatible = v
                img.dirtyBitWritten = false
            }
        }
        return r
    }

    // MARK: Counting references

    /// Counts one reference to every cluster of [offset, offset + size).
    func inc(_ offset: UInt64, _ size: UInt64) {
        if size == 0 { return }
        // The last cluster may be partly past the end of the file, never a whole cluster or more.
        let (end, o) = offset.addingReportingOverflow(size)
        if o || (end > fileLen && end - fileLen >= cs) {
            if pastEndRegions.count < 100_000 { pastEndRegions.append((offset, o ? UInt64.max : end)) }
            say("ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x\(hex(offset)) size 0x\(hex(size))")
            r.corruptions += 1
            return
        }
        var c = offset >> clusterBits
        let last = (end - 1) >> clusterBits
        while c <= last {
            if c >= UInt64(refs.count) { refs += [UInt64](repeating: 0, count: Int(c) + 1 - refs.count) }
            if refs[Int(c)] >= refMax {
                say("ERROR: overflow cluster offset=0x\(hex(c << clusterBits))")
                r.corruptions += 1
            } else {
                refs[Int(c)] += 1
            }
            c += 1
        }
    }

    /// Whether `readSnapshotTable` reports problems (once per run, as qemu checks the table once before the
    /// refcounts).
    var countSnapshotProblems = true
    var snapshotCorruptions = 0

    func calculate(fix: Qcow2RepairMode?) throws {
        defer { countSnapshotProblems = false }
        let h = img.header
        refs = [UInt64](repeating: 0, count: Int((fileLen + cs - 1) / cs))
        inc(0, cs)
        try checkL1(h.l1TableOffset, Int(h.l1Size), fragInfo: true, active: true, fix: fix)
        let (snaps, snapBytes) = readSnapshotTable()
        for (n, s) in snaps.enumerated() {
            if s.l1Offset & (cs - 1) != 0 {
                say("ERROR snapshot \(n) l1_offset=0x\(hex(s.l1Offset)): L1 table is not cluster aligned; snapshot table entry corrupted")
                r.corruptions += 1
                continue
            }
            if UInt64(s.l1Size) * 8 > Qcow2Limits.maxL1Bytes {
                say("ERROR snapshot \(n) l1_size=0x\(hex(UInt64(s.l1Size))): L1 table is too large; snapshot table entry corrupted")
                r.corruptions += 1
                continue
            }
            try checkL1(s.l1Offset, Int(s.l1Size), fragInfo: false, active: false, fix: fix)
        }
        inc(h.snapshotsOffset, snapBytes)
        inc(h.refcountTableOffset, UInt64(h.refcountTableClusters) * cs)
        try countBitmaps()
        try checkRefBlocks(fix: fix)
    }

    /// The snapshot table's L1 tables and its size in bytes (entries read leniently; check reports what they hold).
    func readSnapshotTable() -> ([(l1Offset: UInt64, l1Size: UInt32)], UInt64) {
        let h = img.header
        var out: [(UInt64, UInt32)] = []
        var pos = h.snapshotsOffset
        for n in 0..<Int(h.nbSnapshots) {
            guard let fixed = try? file.pread(at: pos, count: Qcow2Snapshot.size) else { break }
            let extra = Int(fixed.be32(36))
            let varLen = extra + Int(fixed.be16(12)) + Int(fixed.be16(14))
            if h.version >= 3 && extra < 16 && countSnapshotProblems {
                // Version 3 entries carry at least the 64-bit VM state size and the disk size.
                say("ERROR snapshot table entry \(n) is incomplete (extra data of \(extra) bytes at offset \(pos + 36), at least 16 needed)")
                r.corruptions += 1
                snapshotCorruptions += 1
            }
            out.append((fixed.be64(0), fixed.be32(8)))
            pos += UInt64((40 + varLen + 7) & ~7)
        }
        return (out.map { (l1Offset: $0.0, l1Size: $0.1) }, pos - h.snapshotsOffset)
    }

    func checkL1(_ l1Offset: UInt64, _ l1Size: Int, fragInfo: Bool, active: Bool, fix: Qcow2RepairMode?) throws {
        if l1Size == 0 { return }
        inc(l1Offset, UInt64(l1Size) * 8)
        let b = try file.pread(at: l1Offset, count: l1Size * 8)
        var next: UInt64 = 0
        for i in 0..<l1Size {
            let e = b.be64(i * 8)
            if e == 0 { continue }
            if e & Qcow2Masks.l1Reserved != 0 {
                say("ERROR found L1 entry with reserved bits set: \(hex(e)) (L1 index \(i), offset \(l1Offset + UInt64(i) * 8))")
                r.corruptions += 1
            }
            let l2 = e & Qcow2Limits.offsetMask
            inc(l2, cs)
            if l2 & (cs - 1) != 0 {
                say("ERROR l2_offset=\(hex(l2)): Table is not cluster aligned; L1 entry corrupted (L1 index \(i))")
                r.corruptions += 1
            }
            try checkL2(l2, fragInfo: fragInfo, active: active, fix: fix, next: &next)
        }
    }

    func checkL2(_ l2Offset: UInt64, fragInfo: Bool, active: Bool, fix: Qcow2RepairMode?, next: inout UInt64) throws {
        let ext = img.extendedL2
        var t = try file.pread(at: l2Offset, count: Int(cs))
        let entries = Int(img.l2Entries)
        let esize = ext ? 16 : 8
        next = 0
        let x = 62 - (clusterBits - 8)
        for i in 0..<entries {
            let e = t.be64(i * esize)
            let bitmap: UInt64 = ext ? t.be64(i * esize + 8) : 0
            if e & Qcow2Image.compressedFlag != 0 {
                if e & Qcow2Image.copiedFlag != 0 {
                    say("ERROR: coffset=0x\(hex(e & ((1 << x) - 1))): copied flag must never be set for compressed clusters")
                    r.corruptions += 1
                }
                if bitmap != 0 {
                    say("ERROR compressed cluster \(i) with non-zero subcluster allocation bitmap, entry=0x\(hex(e))")
                    r.corruptions += 1
                    continue
                }
                let host = e & ((1 << x) - 1)
                let nsect = ((e >> x) & ((1 << (clusterBits - 8)) - 1)) + 1
                inc(host, nsect * 512 - (host & 511))
                if fragInfo {
                    r.allocatedClusters += 1
                    r.compressedClusters += 1
                    r.fragmentedClusters += 1
                }
                continue
            }
            if e & Qcow2Masks.l2Reserved != 0 {
                say("ERROR found l2 entry with reserved bits set: \(hex(e)) (L2 table at offset \(l2Offset), index \(i))")
                r.corruptions += 1
            }
            let off = e & Qcow2Limits.offsetMask
            let zeroFlag = !ext && e & Qcow2Image.zeroFlag != 0
            if off == 0 {
                if ext && bitmap & 0xffff_ffff != 0 {
                    say("ERROR: Unallocated cluster has non-zero subcluster allocation map (L2 table at offset \(l2Offset), index \(i))")
                    r.corruptions += 1
                }
                continue
            }
            if ext && (bitmap >> 32) & bitmap != 0 {
                say("ERROR offset=\(hex(off)): Allocated cluster has corrupted subcluster allocation bitmap")
                r.corruptions += 1
            }
            if off & (cs - 1) != 0 {
                r.corruptions += 1
                let hasData = ext ? bitmap & 0xffff_ffff != 0 : !zeroFlag
                if !hasData {
                    say("\(fix == .all ? "Repairing" : "ERROR") offset=\(hex(off)): Preallocated cluster is not properly aligned; L2 entry corrupted.")
                    if fix == .all {
                        // Becomes a zero cluster without a host cluster.
                        var ne = [UInt8](repeating: 0, count: esize)
                        if ext {
                            var bm = bitmap | (bitmap << 32)
                            bm &= 0xffff_ffff_0000_0000
                            ne.putBE64(0, at: 0)
                            ne.putBE64(bm, at: 8)
                        } else {
                            ne.putBE64(Qcow2Image.zeroFlag, at: 0)
                        }
                        if overlapsMetadata(l2Offset + UInt64(i * esize), UInt64(esize), allowL2: l2Offset) {
                            say("ERROR: Overlap check failed")
                            r.checkErrors += 1
                            return
                        }
                        try file.pwrite(ne, at: l2Offset + UInt64(i * esize))
                        try file.datasync()
                        for k in 0..<esize { t[i * esize + k] = ne[k] }
                        r.corruptions -= 1
                        r.corruptionsFixed += 1
                        continue
                    }
                } else {
                    say("ERROR offset=\(hex(off)): Data cluster is not properly aligned; L2 entry corrupted.")
                }
            }
            if fragInfo {
                r.allocatedClusters += 1
                if next != 0 && off != next { r.fragmentedClusters += 1 }
                next = off + cs
            }
            inc(off, cs)
        }
    }

    /// Whether writing [off, off+len) would touch the header, the L1 or refcount tables or a refcount block (the
    /// L2 table at `allowL2` being repaired is allowed).
    func overlapsMetadata(_ off: UInt64, _ len: UInt64, allowL2: UInt64) -> Bool {
        func hits(_ a: UInt64, _ n: UInt64) -> Bool { n > 0 && off < a &+ n && a < off + len }
        let h = img.header
        if hits(0, cs) { return true }
        if hits(h.l1TableOffset, UInt64(h.l1Size) * 8) { return true }
        if hits(h.refcountTableOffset, UInt64(h.refcountTableClusters) * cs) { return true }
        for e in refTable where e & Qcow2Limits.offsetMask != 0 {
            let b = e & ~Qcow2Masks.refTableReserved
            if b != allowL2 && hits(b, cs) { return true }
        }
        return false
    }

    /// Counts the clusters of the persistent dirty bitmaps (the bitmap directory, each bitmap table and the clusters
    /// it points to), when the bitmaps extension is valid (autoclear bit 0 set).
    func countBitmaps() throws {
        let h = img.header
        guard h.version == 3, h.autoclear & 1 != 0,
              let ext = h.extensions.first(where: { $0.type == Qcow2Extension.bitmaps }), ext.data.count >= 24 else { return }
        let nb = ext.data.be32(0)
        let dirSize = ext.data.be64(8)
        let dirOffset = ext.data.be64(16)
        if nb == 0 { return }
        inc(dirOffset, dirSize)
        guard dirSize <= 64 << 20, dirOffset & (cs - 1) == 0 else {
            say("ERROR bitmap directory at offset \(dirOffset) (\(dirSize) bytes) is misaligned or too large")
            r.corruptions += 1
            return
        }
        let dir = try file.pread(at: dirOffset, count: Int(dirSize))
        var pos = 0
        for n in 0..<Int(nb) {
            guard pos + 24 <= dir.count else {
                say("ERROR bitmap directory entry \(n) at offset \(dirOffset + UInt64(pos)) is past the directory's end")
                r.corruptions += 1
                return
            }
            let tOff = dir.be64(pos)
            let tSize = UInt64(dir.be32(pos + 8))
            let nameSize = Int(dir.be16(pos + 18))
            let extra = Int(dir.be32(pos + 20))
            inc(tOff, tSize * 8)
            if tOff & (cs - 1) != 0 || tSize * 8 > 64 << 20 {
                say("ERROR bitmap \(n): table at offset \(tOff) (\(tSize) entries) is misaligned or too large")
                r.corruptions += 1
                return
            }
            let table = try file.pread(at: tOff, count: Int(tSize) * 8)
            for k in 0..<Int(tSize) {
                let e = table.be64(k * 8)
                let off = e & Qcow2Limits.offsetMask
                if e & Qcow2Masks.bitmapTableReserved != 0 || off & (cs - 1) != 0 {
                    say("ERROR bitmap \(n) table entry \(k) (0x\(hex(e))) has reserved bits set or is misaligned")
                    r.corruptions += 1
                    continue
                }
                if off != 0 { inc(off, cs) }
            }
            pos += (24 + extra + nameSize + 7) & ~7
        }
    }

    /// The refcount blocks: reserved bits, alignment, inside the file, referenced exactly once.
    func checkRefBlocks(fix: Qcow2RepairMode?) throws {
        for (i, e) in refTable.enumerated() {
            let off = e & ~Qcow2Masks.refTableReserved
            if e & Qcow2Masks.refTableReserved != 0 {
                say("ERROR refcount table entry \(i) has reserved bits set")
                r.corruptions += 1
                rebuild = true
                continue
            }
            if off & (cs - 1) != 0 {
                say("ERROR refcount block \(i) is not cluster aligned; refcount table entry corrupted")
                r.corruptions += 1
                rebuild = true
                continue
            }
            let c = off >> clusterBits
            if c >= UInt64(refs.count) {
                // qemu grows the file to hold it; a rebuild gives a clean image without a file grown to that offset.
                say("ERROR refcount block \(i) is outside image (offset \(off), file is \(fileLen) bytes)")
                r.corruptions += 1
                rebuild = true
                continue
            }
            if off != 0 {
                inc(off, cs)
                if refs[Int(c)] != 1 {
                    say("ERROR refcount block \(i) refcount=\(refs[Int(c)])")
                    r.corruptions += 1
                    rebuild = true
                }
            }
        }
    }

    // MARK: Stored refcounts

    /// The stored refcount of host cluster `c`, or nil when it cannot be read (a misaligned refcount block).
    func stored(_ c: UInt64) -> UInt64? {
        let ti = Int(c / refBlockEntries)
        guard ti < refTable.count else { return 0 }
        let boff = refTable[ti] & ~Qcow2Masks.refTableReserved
        if boff == 0 { return 0 }
        // Unaligned, or beyond any file: unreadable (qemu's read fails with EIO).
        if boff & (cs - 1) != 0 || !ImageFile.representable(boff, Int(cs)) { return nil }
        guard let b = block(boff) else { return nil }
        return Qcow2Image.getRefcount(b, Int(c % refBlockEntries), bits: bits)
    }

    func block(_ off: UInt64) -> [UInt8]? {
        if let b = blocks[off] { return b }
        guard let b = try? file.pread(at: off, count: Int(cs)) else { return nil }
        if blocks.count > 4096 { blocks.removeAll() }
        blocks[off] = b
        return b
    }

    /// Sets the stored refcount of cluster `c` (its refcount block exists and is readable).
    func setStored(_ c: UInt64, _ v: UInt64) throws {
        let boff = refTable[Int(c / refBlockEntries)] & ~Qcow2Masks.refTableReserved
        guard var b = block(boff) else { throw DiskImageError.corrupt(img.path, "refcount block at offset \(boff) cannot be read") }
        let i = Int(c % refBlockEntries)
        Qcow2Image.setRefcount(&b, i, bits: bits, v)
        blocks[boff] = b
        let byte = i * Int(bits) / 8
        let n = max(1, Int(bits) / 8)
        try file.pwrite(Array(b[byte..<(byte + n)]), at: boff + UInt64(byte))
    }

    func compare(fixLeaks: Bool, fixErrors: Bool) {
        highest = 0
        var unreadable = 0
        for c in 0..<UInt64(refs.count) {
            let want = refs[Int(c)]
            guard let have = stored(c) else {
                unreadable += 1
                if unreadable <= 10 { say("Can't get refcount for cluster \(c): Input/output error") }
                r.checkErrors += 1
                continue
            }
            if have > 0 || want > 0 { highest = c }
            if have == want { continue }
            if have == 0 { rebuild = true }
            let fixing = have != 0 && ((have > want && fixLeaks) || (have < want && fixErrors))
            say("\(fixing ? "Repairing" : have < want ? "ERROR" : "Leaked") cluster \(c) refcount=\(have) reference=\(want)")
            if fixing, (try? setStored(c, want)) != nil {
                if have > want { r.leaksFixed += 1 } else { r.corruptionsFixed += 1 }
                continue
            }
            if have < want { r.corruptions += 1 } else { r.leaks += 1 }
        }
    }

    // MARK: Rebuild

    /// Writes a new refcount table and new refcount blocks after everything in use (never over a cluster anything
    /// may point to), from the counted references, and switches the header to them. The old structures are then
    /// leaks, released by the caller's second comparison.
    func rebuildStructure() throws {
        var end = UInt64(refs.count)
        while end > 0 && refs[Int(end - 1)] == 0 { end -= 1 }
        var start = max(end, (fileLen + cs - 1) / cs)
        let perTableCluster = cs / 8
        var tClusters: UInt64 = 1
        var needed: [UInt64] = []
        // Lay the structures out at `start`; move past any region a damaged entry points to that they would cover.
        for _ in 0...pastEndRegions.count {
            tClusters = 1
            needed = []
            var lastBlocks = -1
            while true {
                let newEnd = start + tClusters + UInt64(max(lastBlocks, 0))
                var set: [UInt64] = []
                var bi: UInt64 = 0
                while bi * refBlockEntries < newEnd {
                    let lo = bi * refBlockEntries, hi = min((bi + 1) * refBlockEntries, newEnd)
                    var used = hi > start  // the new structures themselves
                    if !used {
                        var k = lo
                        while k < min(hi, UInt64(refs.count)) { if refs[Int(k)] != 0 { used = true; break }; k += 1 }
                    }
                    if used { set.append(bi) }
                    bi += 1
                }
                let t = max(tClusters, ((set.last ?? 0) + 1 + perTableCluster - 1) / perTableCluster)
                if set.count <= lastBlocks && t == tClusters { break }
                lastBlocks = max(lastBlocks, set.count)
                tClusters = t
                needed = set
            }
            let lo = start * cs, hi = (start + tClusters + UInt64(needed.count)) * cs
            guard let hit = pastEndRegions.first(where: { $0.start < hi && lo < $0.end }) else { break }
            guard hit.end < Qcow2Limits.offsetMask else {
                throw DiskImageError.corrupt(img.path, "no room for a rebuilt refcount structure after offset \(lo)")
            }
            start = (hit.end + cs - 1) / cs
        }
        guard tClusters * cs <= Qcow2Limits.maxRefcountTableBytes else {
            throw DiskImageError.corrupt(img.path, "a rebuilt refcount table would need \(tClusters * cs) bytes, more than \(Qcow2Limits.maxRefcountTableBytes)")
        }
        let total = start + tClusters + UInt64(needed.count)
        if UInt64(refs.count) < total { refs += [UInt64](repeating: 0, count: Int(total) - refs.count) }
        for k in start..<total { refs[Int(k)] = 1 }
        var table = [UInt8](repeating: 0, count: Int(tClusters * cs))
        var newTable = [UInt64](repeating: 0, count: Int(tClusters * perTableCluster))
        for (n, bi) in needed.enumerated() {
            let boff = (start + tClusters + UInt64(n)) * cs
            var b = [UInt8](repeating: 0, count: Int(cs))
            for k in 0..<refBlockEntries {
                let c = bi * refBlockEntries + k
                if c < UInt64(refs.count), refs[Int(c)] != 0 {
                    Qcow2Image.setRefcount(&b, Int(k), bits: bits, min(refs[Int(c)], refMax))
                }
            }
            try file.pwrite(b, at: boff)
            table.putBE64(boff, at: Int(bi) * 8)
            newTable[Int(bi)] = boff
        }
        let tOff = start * cs
        try file.pwrite(table, at: tOff)
        try file.datasync()
        var h = [UInt8](repeating: 0, count: 12)
        h.putBE64(tOff, at: 0)
        h.putBE32(UInt32(tClusters), at: 8)
        try file.pwrite(h, at: 48)
        try file.datasync()
        img.header.refcountTableOffset = tOff
        img.header.refcountTableClusters = UInt32(tClusters)
        img.refTable = newTable
        refTable = newTable
        blocks.removeAll()
        fileLen = try file.fileSize()
    }

    // MARK: COPIED flags

    func checkCopiedFlags() throws {
        let doFix = fixErrors || (fixLeaks && r.checkErrors == 0 && r.corruptions == 0 && r.leaks == 0)
        let ext = img.extendedL2
        let esize = ext ? 16 : 8
        for (i, e) in img.l1.enumerated() {
            let l2 = e & Qcow2Limits.offsetMask
            if l2 == 0 { continue }
            if let rc = stored(l2 >> clusterBits) {
                if (rc == 1) != (e & Qcow2Image.copiedFlag != 0) {
                    say("\(doFix ? "Repairing" : "ERROR") OFLAG_COPIED L2 cluster: l1_index=\(i) l1_entry=\(hex(e)) refcount=\(rc)")
                    r.corruptions += 1
                    if doFix {
                        let ne = rc == 1 ? e | Qcow2Image.copiedFlag : e & ~Qcow2Image.copiedFlag
                        var b = [UInt8](repeating: 0, count: 8)
                        b.putBE64(ne, at: 0)
                        try file.pwrite(b, at: img.header.l1TableOffset + UInt64(i) * 8)
                        img.l1[i] = ne
                        r.corruptions -= 1
                        r.corruptionsFixed += 1
                    }
                }
            }
            var t = try file.pread(at: l2, count: Int(cs))
            var dirty = 0
            for j in 0..<Int(img.l2Entries) {
                let le = t.be64(j * esize)
                if le & Qcow2Image.compressedFlag != 0 { continue }
                let off = le & Qcow2Limits.offsetMask
                if off == 0 { continue }
                guard let rc = stored(off >> clusterBits) else { continue }
                if (rc == 1) != (le & Qcow2Image.copiedFlag != 0) {
                    say("\(doFix ? "Repairing" : "ERROR") OFLAG_COPIED data cluster: l2_entry=\(hex(le)) refcount=\(rc)")
                    r.corruptions += 1
                    if doFix {
                        t.putBE64(rc == 1 ? le | Qcow2Image.copiedFlag : le & ~Qcow2Image.copiedFlag, at: j * esize)
                        dirty += 1
                    }
                }
            }
            if dirty > 0 {
                if overlapsMetadata(l2, cs, allowL2: l2) {
                    say("ERROR: Could not write L2 table at offset \(l2); metadata overlap check failed")
                    r.checkErrors += 1
                    return
                }
                try file.pwrite(t, at: l2)
                r.corruptions -= dirty
                r.corruptionsFixed += dirty
            }
        }
    }
}
