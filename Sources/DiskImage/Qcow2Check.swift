/// What `check -r` repairs.
public enum Qcow2RepairMode: String, Sendable {
    /// Only leaked clusters (refcount higher than references).
    case leaks
    /// Leaks and corruptions (refcount lower than references, wrong COPIED flags).
    case all
}

/// Result of a consistency check, with the fields of `qemu-img check --output=json`.
public struct Qcow2CheckResult: Sendable, Equatable {
    /// Clusters whose refcount is too low, or other metadata errors.
    public var corruptions = 0
    /// Clusters with a refcount but no reference.
    public var leaks = 0
    /// Errors that prevented checking (I/O).
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
    /// Allocated guest clusters not contiguous with the previous one.
    public var fragmentedClusters: UInt64 = 0
    /// Compressed guest clusters.
    public var compressedClusters: UInt64 = 0
    /// Human-readable findings, one per problem.
    public var messages: [String] = []
}

extension Qcow2Image {
    /// Checks (and optionally repairs) the refcounts against every reference in the image: header, L1/L2 tables of
    /// the active state and of every snapshot, refcount structures and the snapshot table.
    public func check(repair: Qcow2RepairMode? = nil) throws -> Qcow2CheckResult {
        try lock.withLock { _ in
            try checkOpen()
            if repair != nil && file.readOnly { throw DiskImageError.invalid("\(path): repair needs a writable image") }
            var r = try checkLocked(repair: repair)
            if repair != nil && (r.leaksFixed > 0 || r.corruptionsFixed > 0) {
                // Report what remains after the repair, as qemu-img does.
                let after = try checkLocked(repair: nil)
                r.leaks = after.leaks
                r.corruptions = after.corruptions
                r.imageEndOffset = after.imageEndOffset
            }
            return r
        }
    }

    func checkLocked(repair: Qcow2RepairMode?) throws -> Qcow2CheckResult {
        var r = Qcow2CheckResult()
        if !file.readOnly { try flushLocked() }
        let end = max(fileEnd, nextFree)
        let nClusters = Int((end + cs - 1) / cs)
        var expected = [UInt64](repeating: 0, count: nClusters)
        func inc(_ off: UInt64, _ count: UInt64, _ what: String) {
            var c = off / cs
            let last = (off + max(count, 1) - 1) / cs
            while c <= last {
                if c >= UInt64(nClusters) {
                    r.corruptions += 1
                    r.messages.append("ERROR \(what) at offset \(off) is past the end of the image file (\(end) bytes)")
                    return
                }
                expected[Int(c)] += 1
                c += 1
            }
        }
        inc(0, cs, "header")
        inc(header.l1TableOffset, UInt64(header.l1Size) * 8, "L1 table")
        inc(header.refcountTableOffset, UInt64(header.refcountTableClusters) * cs, "refcount table")
        for (i, e) in refTable.enumerated() where e & ~UInt64(0x1ff) != 0 {
            inc(e & ~UInt64(0x1ff), cs, "refcount block \(i)")
        }
        let (snaps, snapBytes) = try readSnapshots()
        if header.nbSnapshots > 0 { inc(header.snapshotsOffset, snapBytes, "snapshot table") }
        r.totalClusters = (virtualSize + cs - 1) / cs
        var copiedFixes: [(Int, Int?)] = []  // (L1 index, L2 index or nil)
        func walk(l1Table: [UInt64], l1Offset: UInt64, active: Bool) throws {
            var expectNext: UInt64?
            for (i, e) in l1Table.enumerated() {
                let l2off = e & Qcow2Limits.offsetMask
                if l2off == 0 { continue }
                if l2off % cs != 0 || l2off < cs || l2off + cs > end {
                    r.corruptions += 1
                    r.messages.append("ERROR L1 entry \(i) at offset \(l1Offset + UInt64(i) * 8): L2 table offset \(l2off) is misaligned, in the header or past the end")
                    continue
                }
                inc(l2off, cs, "L2 table")
                let l2rc = try refcount(of: l2off)
                if active && (e & Self.copiedFlag != 0) != (l2rc == 1) {
                    copiedFixes.append((i, nil))
                }
                let t = try loadL2(l2off).data
                let stride = extendedL2 ? 2 : 1
                for k in Swift.stride(from: 0, to: t.count, by: stride) {
                    let le = t[k]
                    let idx = k / stride
                    let guestCluster = UInt64(i) * l2Entries + UInt64(idx)
                    if le & Self.compressedFlag != 0 {
                        let x = 62 - (clusterBits - 8)
                        let host = le & ((1 << x) - 1)
                        let nsect = (le >> x) & ((1 << (clusterBits - 8)) - 1)
                        let bytes = (nsect + 1) * 512 - (host & 511)
                        if host < cs {
                            r.corruptions += 1
                            r.messages.append("ERROR L2 entry \(idx) of the table at offset \(l2off): compressed data at \(host) points into the header")
                            continue
                        }
                        inc(host, bytes, "compressed cluster")
                        if active && guestCluster < r.totalClusters { r.allocatedClusters += 1; r.compressedClusters += 1 }
                        expectNext = nil
                        continue
                    }
                    let host = le & Qcow2Limits.offsetMask
                    if host == 0 { continue }
                    if host % cs != 0 || host < cs {
                        r.corruptions += 1
                        r.messages.append("ERROR L2 entry \(idx) of the table at offset \(l2off): data offset \(host) is misaligned or points into the header")
                        continue
                    }
                    inc(host, cs, "data cluster")
                    if active {
                        if guestCluster < r.totalClusters {
                            r.allocatedClusters += 1
                            if let n = expectNext, n != host { r.fragmentedClusters += 1 }
                            expectNext = host + cs
                        }
                        let hrc = try refcount(of: host)
                        if (le & Self.copiedFlag != 0) != (hrc == 1) { copiedFixes.append((i, k)) }
                    }
                }
            }
        }
        try walk(l1Table: l1, l1Offset: header.l1TableOffset, active: true)
        for s in snaps {
            inc(s.l1TableOffset, UInt64(s.l1Size) * 8, "snapshot L1 table")
            try walk(l1Table: try readL1(at: s.l1TableOffset, count: Int(s.l1Size)), l1Offset: s.l1TableOffset, active: false)
        }
        // Compare with the stored refcounts.
        var highest = 0
        for c in 0..<nClusters {
            let off = UInt64(c) * cs
            let stored = try refcount(of: off)
            let want = expected[c]
            if want > 0 || stored > 0 { highest = c }
            if stored == want { continue }
            if stored > want {
                r.leaks += 1
                if r.messages.count < 1000 { r.messages.append("Leaked cluster \(c) refcount=\(stored) reference=\(want)") }
                if repair != nil { try addRefcount(off, -Int64(stored - want)); r.leaksFixed += 1 }
            } else {
                r.corruptions += 1
                if r.messages.count < 1000 { r.messages.append("ERROR cluster \(c) refcount=\(stored) reference=\(want)") }
                if repair == .all {
                    guard want <= maxRefcount else { continue }
                    try addRefcount(off, Int64(want - stored)); r.corruptionsFixed += 1
                }
            }
        }
        for (i, k) in copiedFixes {
            r.corruptions += 1
            r.messages.append("ERROR OFLAG_COPIED \(k == nil ? "L2 table" : "data cluster") for L1 index \(i)\(k.map { ", L2 index \($0)" } ?? "")")
            if repair == .all {
                let l2off = l1[i] & Qcow2Limits.offsetMask
                if let k {
                    let t = try loadL2(l2off).data
                    let host = t[k] & Qcow2Limits.offsetMask
                    let fixed = try refcount(of: host) == 1 ? t[k] | Self.copiedFlag : t[k] & ~Self.copiedFlag
                    try setL2Entry(l2off, k, fixed)
                } else {
                    if try refcount(of: l2off) == 1 { l1[i] |= Self.copiedFlag } else { l1[i] &= ~Self.copiedFlag }
                    l1Dirty.insert(i)
                }
                r.corruptionsFixed += 1
            }
        }
        r.imageEndOffset = UInt64(highest + 1) * cs
        if repair != nil && !file.readOnly { try flushLocked() }
        return r
    }
}
