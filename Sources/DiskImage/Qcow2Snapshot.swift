import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// One internal snapshot from the qcow2 snapshot table.
public struct Qcow2Snapshot: Sendable, Equatable {
    /// Offset of the snapshot's L1 table.
    public var l1TableOffset: UInt64
    /// Number of L1 entries.
    public var l1Size: UInt32
    /// Unique ID string ("1", "2", …).
    public var id: String
    /// User-visible name.
    public var name: String
    /// Creation time, seconds since the epoch.
    public var dateSeconds: UInt32
    /// Creation time, nanoseconds part.
    public var dateNanoseconds: UInt32
    /// Guest clock at creation, nanoseconds.
    public var vmClockNanoseconds: UInt64
    /// Size of saved VM state (0 for disk-only snapshots).
    public var vmStateSize: UInt64
    /// Virtual disk size at snapshot time (from extra data), if recorded.
    public var diskSize: UInt64?
    /// Instruction counter (from extra data), if recorded.
    public var icount: UInt64?
    /// Extra data as stored.
    public var extraData: [UInt8]

    /// Size of the fixed part of an entry.
    public static let size = 40
    /// Largest extra data we accept (QEMU: 1024).
    public static let maxExtraData = 1024

    /// Encoded entry (padded to 8 bytes).
    public func encode() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: Self.size)
        b.putBE64(l1TableOffset, at: 0)
        b.putBE32(l1Size, at: 8)
        let idb = Array(id.utf8), nb = Array(name.utf8)
        b.putBE16(UInt16(idb.count), at: 12)
        b.putBE16(UInt16(nb.count), at: 14)
        b.putBE32(dateSeconds, at: 16)
        b.putBE32(dateNanoseconds, at: 20)
        b.putBE64(vmClockNanoseconds, at: 24)
        b.putBE32(UInt32(truncatingIfNeeded: vmStateSize), at: 32)
        var extra = [UInt8](repeating: 0, count: 16)
        extra.putBE64(vmStateSize, at: 0)
        extra.putBE64(diskSize ?? 0, at: 8)
        if let ic = icount { var e = [UInt8](repeating: 0, count: 8); e.putBE64(ic, at: 0); extra += e }
        b.putBE32(UInt32(extra.count), at: 36)
        b += extra + idb + nb
        b += [UInt8](repeating: 0, count: (8 - b.count % 8) % 8)
        return b
    }
}

extension Qcow2Image {
    /// Reads and validates the snapshot table. Returns the snapshots and the table's size in bytes.
    func readSnapshots() throws -> ([Qcow2Snapshot], UInt64) {
        var out: [Qcow2Snapshot] = []
        var pos = header.snapshotsOffset
        for n in 0..<Int(header.nbSnapshots) {
            // Past the end of a truncated file the table reads as zeros, as in qemu (check reports such entries).
            let fixed = try file.pread(at: pos, count: Qcow2Snapshot.size)
            let idLen = Int(fixed.be16(12)), nameLen = Int(fixed.be16(14))
            let extraLen = Int(fixed.be32(36))
            guard extraLen <= Qcow2Snapshot.maxExtraData else {
                throw DiskImageError.corrupt(path, "snapshot \(n) at offset \(pos): extra data size \(extraLen) exceeds \(Qcow2Snapshot.maxExtraData)")
            }
            let varLen = extraLen + idLen + nameLen
            let rest = try file.pread(at: pos + 40, count: varLen)
            let extra = Array(rest[0..<extraLen])
            var s = Qcow2Snapshot(
                l1TableOffset: fixed.be64(0), l1Size: fixed.be32(8),
                id: String(decoding: rest[extraLen..<(extraLen + idLen)], as: UTF8.self),
                name: String(decoding: rest[(extraLen + idLen)...], as: UTF8.self),
                dateSeconds: fixed.be32(16), dateNanoseconds: fixed.be32(20), vmClockNanoseconds: fixed.be64(24),
                vmStateSize: UInt64(fixed.be32(32)), diskSize: nil, icount: nil, extraData: extra)
            if extraLen >= 8 { s.vmStateSize = extra.be64(0) }
            if extraLen >= 16 { s.diskSize = extra.be64(8) }
            if extraLen >= 24 { s.icount = extra.be64(16) }
            guard UInt64(s.l1Size) * 8 <= Qcow2Limits.maxL1Bytes else {
                throw DiskImageError.corrupt(path, "snapshot \(n) at offset \(pos): L1 size \(s.l1Size) exceeds the limit")
            }
            guard s.l1TableOffset % cs == 0, s.l1TableOffset >= cs || s.l1Size == 0,
                  s.l1TableOffset + UInt64(s.l1Size) * 8 <= fileEnd else {
                throw DiskImageError.corrupt(path, "snapshot \(n) at offset \(pos): L1 table at offset \(s.l1TableOffset) is misaligned, in the header or past the end of the file")
            }
            out.append(s)
            pos += UInt64((40 + varLen + 7) & ~7)
        }
        return (out, pos - header.snapshotsOffset)
    }

    /// The image's internal snapshots.
    public func snapshots() throws -> [Qcow2Snapshot] {
        try lock.withLock { _ in try readSnapshots().0 }
    }

    func readL1(at off: UInt64, count: Int) throws -> [UInt64] {
        let b = try file.preadExact(at: off, count: count * 8, what: "L1 table")
        return (0..<count).map { b.be64($0 * 8) }
    }
}

extension Qcow2Image {
    /// Adds `delta` to the refcount of every L2 table referenced by `table` and every host cluster those L2 tables
    /// reference (the references an L1 table owns). With `collect`, records them instead of changing them.
    func adjustTree(_ table: [UInt64], delta: Int64, collect: inout [UInt64]) throws {
        for e in table {
            let l2off = e & Qcow2Limits.offsetMask
            if l2off == 0 { continue }
            if l2off % cs != 0 || l2off < cs || l2off + cs > max(fileEnd, nextFree) {
                throw DiskImageError.corrupt(path, "L2 table offset \(l2off) is misaligned, in the header or past the end of the file")
            }
            var offs: [UInt64] = [l2off]
            let t = try loadL2(l2off).data
            let stride = extendedL2 ? 2 : 1
            for k in Swift.stride(from: 0, to: t.count, by: stride) {
                let le = t[k]
                if le & Self.compressedFlag != 0 {
                    let x = 62 - (clusterBits - 8)
                    let host = le & ((1 << x) - 1)
                    let nsect = (le >> x) & ((1 << (clusterBits - 8)) - 1)
                    let end = (host & ~UInt64(511)) + (nsect + 1) * 512
                    var c = host & ~(cs - 1)
                    while c < end { offs.append(c); c += cs }
                } else if le & Qcow2Limits.offsetMask != 0 {
                    offs.append(le & Qcow2Limits.offsetMask)
                }
            }
            if delta == 0 { collect += offs } else { for o in offs { try addRefcount(o, delta) } }
        }
    }

    /// Sets or clears the COPIED flag of every active L1 and L2 entry according to its refcount.
    func fixCopiedFlags() throws {
        for i in 0..<l1.count {
            let l2off = l1[i] & Qcow2Limits.offsetMask
            if l2off == 0 { continue }
            let want = try refcount(of: l2off) == 1
            if (l1[i] & Self.copiedFlag != 0) != want {
                l1[i] = want ? l1[i] | Self.copiedFlag : l1[i] & ~Self.copiedFlag
                l1Dirty.insert(i)
            }
            let t = try loadL2(l2off).data
            let stride = extendedL2 ? 2 : 1
            for k in Swift.stride(from: 0, to: t.count, by: stride) {
                let le = t[k]
                let host = le & Qcow2Limits.offsetMask
                if le & Self.compressedFlag != 0 || host == 0 { continue }
                let w = try refcount(of: host) == 1
                if (le & Self.copiedFlag != 0) != w {
                    try setL2Entry(l2off, k, w ? le | Self.copiedFlag : le & ~Self.copiedFlag)
                }
            }
        }
    }

    /// Writes a new snapshot table and switches the header to it; the old table is freed afterwards.
    func writeSnapshotTable(_ snaps: [Qcow2Snapshot]) throws {
        let (_, oldBytes) = try readSnapshots()
        let oldOff = header.snapshotsOffset
        let oldCount = header.nbSnapshots
        var bytes: [UInt8] = []
        for s in snaps { bytes += s.encode() }
        var newOff: UInt64 = 0
        if !bytes.isEmpty {
            newOff = try allocateClusters((UInt64(bytes.count) + cs - 1) / cs)
            try file.pwrite(bytes, at: newOff)
            fileEnd = max(fileEnd, newOff + UInt64(bytes.count))
        }
        try flushLocked()
        var h = [UInt8](repeating: 0, count: 12)
        h.putBE32(UInt32(snaps.count), at: 0)
        h.putBE64(newOff, at: 4)
        try file.pwrite(h, at: 60)
        try file.datasync()
        header.nbSnapshots = UInt32(snaps.count)
        header.snapshotsOffset = newOff
        if oldCount > 0 {
            var c = oldOff & ~(cs - 1)
            while c < oldOff + oldBytes { pendingFrees.append(c); c += cs }
        }
    }

    /// Creates an internal snapshot of the current disk state named `name`.
    public func createSnapshot(name: String, date: UInt32 = UInt32(Date().timeIntervalSince1970)) throws {
        try lock.withLock { _ in
            try checkOpen()
            try checkWritable()
            guard !name.isEmpty, name.utf8.count < 65536 else { throw DiskImageError.invalid("\(path): invalid snapshot name") }
            var snaps = try readSnapshots().0
            if snaps.contains(where: { $0.name == name }) {
                throw DiskImageError.invalid("\(path): a snapshot named '\(name)' already exists")
            }
            try flushLocked()
            // Copy the active L1 table.
            let l1Clusters = max(1, (UInt64(l1.count) * 8 + cs - 1) / cs)
            let off = try allocateClusters(l1Clusters)
            var b = [UInt8](repeating: 0, count: Int(l1Clusters * cs))
            for (i, e) in l1.enumerated() { b.putBE64(e & ~Self.copiedFlag, at: i * 8) }
            try file.pwrite(b, at: off)
            fileEnd = max(fileEnd, off + UInt64(b.count))
            var none: [UInt64] = []
            try adjustTree(l1, delta: 1, collect: &none)
            try fixCopiedFlags()
            let nextID = (snaps.compactMap { Int($0.id) }.max() ?? 0) + 1
            snaps.append(Qcow2Snapshot(l1TableOffset: off, l1Size: UInt32(l1.count), id: String(nextID), name: name,
                                       dateSeconds: date, dateNanoseconds: 0, vmClockNanoseconds: 0, vmStateSize: 0,
                                       diskSize: virtualSize, icount: nil, extraData: []))
            try writeSnapshotTable(snaps)
            try flushLocked()
        }
    }

    func findSnapshot(_ snaps: [Qcow2Snapshot], _ nameOrID: String) throws -> Int {
        if let i = snaps.firstIndex(where: { $0.name == nameOrID }) ?? snaps.firstIndex(where: { $0.id == nameOrID }) { return i }
        throw DiskImageError.invalid("\(path): no snapshot named or with ID '\(nameOrID)'")
    }

    /// Deletes the snapshot with this name (or ID), releasing clusters only it referenced.
    public func deleteSnapshot(_ nameOrID: String) throws {
        try lock.withLock { _ in
            try checkOpen()
            try checkWritable()
            var snaps = try readSnapshots().0
            let i = try findSnapshot(snaps, nameOrID)
            let s = snaps.remove(at: i)
            try flushLocked()
            try writeSnapshotTable(snaps)
            let table = try readL1(at: s.l1TableOffset, count: Int(s.l1Size))
            var offs: [UInt64] = []
            try adjustTree(table, delta: 0, collect: &offs)
            let l1Clusters = max(1, (UInt64(s.l1Size) * 8 + cs - 1) / cs)
            for k in 0..<l1Clusters { offs.append(s.l1TableOffset + k * cs) }
            pendingFrees += offs
            try flushLocked()  // applies the frees
            try fixCopiedFlags()
            try flushLocked()
        }
    }

    /// Reverts the disk to the snapshot with this name (or ID).
    public func applySnapshot(_ nameOrID: String) throws {
        try lock.withLock { _ in
            try checkOpen()
            try checkWritable()
            let snaps = try readSnapshots().0
            let s = snaps[try findSnapshot(snaps, nameOrID)]
            guard Int(s.l1Size) <= l1.count else {
                throw DiskImageError.unsupported(path, "snapshot '\(nameOrID)' has a larger L1 table (\(s.l1Size)) than the image (\(l1.count))")
            }
            try flushLocked()
            let table = try readL1(at: s.l1TableOffset, count: Int(s.l1Size))
            var none: [UInt64] = []
            try adjustTree(table, delta: 1, collect: &none)
            var old: [UInt64] = []
            try adjustTree(l1, delta: 0, collect: &old)
            let newL1 = table.map { $0 & ~Self.copiedFlag } + [UInt64](repeating: 0, count: l1.count - table.count)
            l1 = newL1
            l1Dirty = Set(0..<l1.count)
            pendingFrees += old
            try flushLocked()
            try fixCopiedFlags()
            try flushLocked()
            if let ds = s.diskSize, ds != virtualSize, ds <= UInt64(l1.count) * l2Entries * cs {
                try writeVirtualSize(ds)
            }
        }
    }
}
