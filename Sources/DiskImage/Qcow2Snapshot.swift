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
            let fixed = try file.preadExact(at: pos, count: Qcow2Snapshot.size, what: "snapshot \(n) header")
            let idLen = Int(fixed.be16(12)), nameLen = Int(fixed.be16(14))
            let extraLen = Int(fixed.be32(36))
            guard extraLen <= Qcow2Snapshot.maxExtraData else {
                throw DiskImageError.corrupt(path, "snapshot \(n) at offset \(pos): extra data size \(extraLen) exceeds \(Qcow2Snapshot.maxExtraData)")
            }
            let varLen = extraLen + idLen + nameLen
            let rest = try file.preadExact(at: pos + 40, count: varLen, what: "snapshot \(n) data")
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
        try lock.withLock { try readSnapshots().0 }
    }

    func readL1(at off: UInt64, count: Int) throws -> [UInt64] {
        let b = try file.preadExact(at: off, count: count * 8, what: "L1 table")
        return (0..<count).map { b.be64($0 * 8) }
    }
}
