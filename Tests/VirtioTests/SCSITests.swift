import DiskImage
import Foundation
import GuestMemory
import Testing
@testable import Virtio

/// The SCSI command set of a logical unit (no queues): SBC for disks, the MMC subset for CD-ROMs.
@Suite("SCSI logical unit")
struct SCSILogicalUnitTests {
    func raw(_ disk: TempDisk, readOnly: Bool = false) throws -> any BlockBackend {
        try openDiskImage(path: disk.path, options: .init(readOnly: readOnly, allowBackingFiles: false, format: "raw"))
    }
    func data(_ a: SCSIAction) -> [UInt8]? { if case .dataIn(let b) = a { b } else { nil } }

    @Test("INQUIRY: a disk is type 0 with VPD pages 0, 0x80, 0x83, 0xb0-0xb2; a CD-ROM is removable type 5")
    func inquiry() throws {
        let disk = try TempDisk(size: 1 << 20)
        let u = SCSILogicalUnit(kind: .disk, backend: try raw(disk), serial: "serial-1")
        let std = try #require(data(u.decode([0x12, 0, 0, 0, 96, 0])))
        #expect(std.count == 36 && std[0] == 0 && std[1] == 0 && std[4] == 31)
        #expect(String(decoding: std[8..<16], as: UTF8.self) == "SWIFTKVM")
        #expect(data(u.decode([0x12, 1, 0, 0, 255, 0])) == [0, 0, 0, 6, 0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2])
        #expect(data(u.decode([0x12, 1, 0x80, 0, 255, 0])) == [0, 0x80, 0, 8] + Array("serial-1".utf8))
        #expect(data(u.decode([0x12, 0, 0, 0, 5, 0]))?.count == 5, "allocation length truncates")
        #expect(u.decode([0x12, 1, 0x99, 0, 255, 0]) == .checkCondition(.invalidField))
        #expect(u.decode([0x12, 0, 0x80, 0, 255, 0]) == .checkCondition(.invalidField), "a page code without EVPD")
        let cd = SCSILogicalUnit(kind: .cdrom, backend: try raw(disk, readOnly: true), serial: "cd")
        let c = try #require(data(cd.decode([0x12, 0, 0, 0, 36, 0])))
        #expect(c[0] == 5 && c[1] == 0x80)
        #expect(cd.decode([0x12, 1, 0xb0, 0, 255, 0]) == .checkCondition(.invalidField), "no block limits on a CD")
    }

    @Test("READ CAPACITY (10)/(16), READ and WRITE (6/10/12/16) with range checks, write protection")
    func capacityAndTransfers() throws {
        let disk = try TempDisk(size: 1 << 20)
        let u = SCSILogicalUnit(kind: .disk, backend: try raw(disk), serial: "d")
        #expect(data(u.decode([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0])) == [0, 0, 0x07, 0xff, 0, 0, 2, 0])
        let rc16 = try #require(data(u.decode([0x9e, 0x10] + [UInt8](repeating: 0, count: 8) + [0, 0, 0, 32, 0, 0])))
        #expect(rc16.count == 32 && rc16[7] == 0xff && rc16[6] == 0x07 && rc16[14] == 0xc0)
        #expect(u.decode([0x28, 0, 0, 0, 0, 2, 0, 0, 4, 0]) == .read(offset: 1024, length: 2048))
        #expect(u.decode([0x08, 0, 0, 1, 0, 0]) == .read(offset: 512, length: 256 * 512), "READ(6) length 0 is 256")
        #expect(u.decode([0x2a, 0x08, 0, 0, 0, 1, 0, 0, 1, 0]) == .write(offset: 512, length: 512, fua: true))
        #expect(u.decode([0x88, 0, 0, 0, 0, 0, 0, 0, 0x07, 0xff, 0, 0, 0, 1, 0, 0]) == .read(offset: 2047 * 512, length: 512))
        #expect(u.decode([0x88, 0, 0, 0, 0, 0, 0, 0, 0x07, 0xff, 0, 0, 0, 2, 0, 0]) == .checkCondition(.lbaOutOfRange))
        #expect(u.decode([0x88, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 2, 0, 0]) == .checkCondition(.lbaOutOfRange),
                "an LBA near 2^64 does not overflow")
        #expect(u.decode([0x28, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0]) == .checkCondition(.lbaOutOfRange))
        #expect(u.decode([0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]) == .flush)
        #expect(u.decode([0x28, 0]) == .checkCondition(.invalidField), "a CDB shorter than its group's length")
        #expect(u.decode([0xc0, 0, 0, 0, 0, 0]) == .checkCondition(.invalidOpcode))
        let ro = SCSILogicalUnit(kind: .disk, backend: try raw(disk, readOnly: true), serial: "ro")
        #expect(ro.decode([0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0]) == .checkCondition(.writeProtected))
        let sense6 = try #require(data(ro.decode([0x1a, 0x08, 0x08, 0, 255, 0])))
        #expect(sense6[2] == 0x80, "MODE SENSE shows WP on a read-only disk")
    }

    @Test("MODE SENSE (6)/(10): caching page with WCE, block descriptor, all pages, changeable values, saved refused")
    func modeSense() throws {
        let disk = try TempDisk(size: 1 << 20)
        let u = SCSILogicalUnit(kind: .disk, backend: try raw(disk), serial: "d")
        let m = try #require(data(u.decode([0x1a, 0, 0x08, 0, 255, 0])))
        #expect(m[0] == UInt8(m.count - 1) && m[3] == 8 && m[12] == 0x08 && m[13] == 18 && m[14] & 0x04 != 0)
        let all = try #require(data(u.decode([0x5a, 0x08, 0x3f, 0, 0, 0, 0, 1, 0, 0])))
        #expect(Int(all[0]) << 8 | Int(all[1]) == all.count - 2 && all[8] == 0x01 && all[20] == 0x08)
        let changeable = try #require(data(u.decode([0x1a, 0x08, 0x48, 0, 255, 0])))
        #expect(changeable[6...].allSatisfy { $0 == 0 })
        #expect(u.decode([0x1a, 0, 0xc8, 0, 255, 0]) == .checkCondition(.savingNotSupported))
        #expect(u.decode([0x1a, 0, 0x2a, 0, 255, 0]) == .checkCondition(.invalidField), "no CD capabilities on a disk")
    }

    @Test("CD-ROM: 2048-byte blocks, TOC, GET CONFIGURATION profile, GESN, lock and eject, media change")
    func cdrom() throws {
        let iso = try TempDisk(size: 2048 * 100)
        let u = SCSILogicalUnit(kind: .cdrom, backend: try raw(iso, readOnly: true), serial: "cd")
        #expect(data(u.decode([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0])) == [0, 0, 0, 99, 0, 0, 8, 0])
        #expect(u.decode([0x28, 0, 0, 0, 0, 16, 0, 0, 1, 0]) == .read(offset: 16 * 2048, length: 2048))
        #expect(u.decode([0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0]) == .checkCondition(.invalidOpcode), "no WRITE on a CD-ROM")
        let toc = try #require(data(u.decode([0x43, 0, 0, 0, 0, 0, 0, 0, 100, 0])))
        #expect(toc == [0, 18, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0, 0, 0x14, 0xaa, 0, 0, 0, 0, 100])
        let msf = try #require(data(u.decode([0x43, 0x02, 0, 0, 0, 0, 0, 0, 100, 0])))
        #expect(Array(msf[16..<20]) == [0, 0, 3, 25], "lead-out at LBA 100 + 150 = 00:03:25")
        #expect(data(u.decode([0x43, 0, 1, 0, 0, 0, 0, 0, 12, 0])) == [0, 10, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0])
        let conf = try #require(data(u.decode([0x46, 0, 0, 0, 0, 0, 0, 1, 0, 0])))
        #expect(conf[6] == 0 && conf[7] == 0x08, "current profile CD-ROM")
        let caps = try #require(data(u.decode([0x5a, 0x08, 0x2a, 0, 0, 0, 0, 0, 255, 0])))
        #expect(caps[8] == 0x2a && caps[9] == 18)
        // Lock, then an eject is refused; unlock, eject, the tray is empty.
        #expect(u.decode([0x1e, 0, 0, 0, 1, 0]) == .dataIn([]))
        #expect(u.decode([0x1b, 0, 0, 0, 0x02, 0]) == .checkCondition(.removalPrevented))
        #expect(u.decode([0x1e, 0, 0, 0, 0, 0]) == .dataIn([]))
        #expect(u.decode([0x1b, 0, 0, 0, 0x02, 0]) == .dataIn([]))
        #expect(u.backend == nil && u.allMedia.count == 1, "the medium waits in the open tray")
        #expect(u.decode([0x00, 0, 0, 0, 0, 0]) == .checkCondition(.mediumNotPresent))
        #expect(u.decode([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]) == .checkCondition(.mediumNotPresent))
        #expect(data(u.decode([0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0])) == [0, 6, 4, 0x10, 3, 0, 0, 0], "media removal, no medium")
        #expect(data(u.decode([0x03, 0, 0, 0, 18, 0]))?[12] == 0x3a, "REQUEST SENSE: medium not present")
        // Loading the tray puts the medium back (unit attention, new-media event); eject it again for the host change.
        #expect(u.decode([0x1b, 0, 0, 0, 0x03, 0]) == .dataIn([]))
        #expect(u.backend != nil && u.decode([0x00, 0, 0, 0, 0, 0]) == .checkCondition(.mediumChanged))
        #expect(data(u.decode([0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0])) == [0, 6, 4, 0x10, 2, 2, 0, 0])
        #expect(u.decode([0x1b, 0, 0, 0, 0x02, 0]) == .dataIn([]))
        // The host puts a new medium in: one UNIT ATTENTION, then a new-media event.
        let (changed, old) = u.changeMedium(try raw(iso, readOnly: true))
        #expect(changed && old != nil && u.allMedia.count == 1, "the medium from the open tray is handed back")
        try old?.close()
        #expect(u.decode([0x00, 0, 0, 0, 0, 0]) == .checkCondition(.mediumChanged))
        #expect(u.decode([0x00, 0, 0, 0, 0, 0]) == .dataIn([]))
        #expect(data(u.decode([0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0])) == [0, 6, 4, 0x10, 2, 2, 0, 0])
        #expect(data(u.decode([0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0])) == [0, 6, 4, 0x10, 0, 2, 0, 0], "reported once")
        #expect(u.decode([0x4a, 0, 0, 0, 0x10, 0, 0, 0, 8, 0]) == .checkCondition(.invalidField), "asynchronous GESN")
        // State survives a snapshot round trip.
        _ = u.decode([0x1e, 0, 0, 0, 1, 0])
        let copy = SCSILogicalUnit(kind: .cdrom, backend: try raw(iso, readOnly: true), serial: "cd")
        try copy.restoreState(u.savedState)
        #expect(copy.isLocked)
        #expect(throws: VirtioError.self) { try copy.restoreState([1, 2]) }
        try u.backend?.close()
        try copy.backend?.close()
    }

    @Test("a DVD-sized medium reports the DVD-ROM profile")
    func dvdProfile() throws {
        let u = SCSILogicalUnit(kind: .cdrom, backend: ZeroBackend(size: 4 << 30), serial: "dvd")
        let conf = try #require(data(u.decode([0x46, 0, 0, 0, 0, 0, 0, 1, 0, 0])))
        #expect(conf[7] == 0x10)
    }

    @Test("random CDBs never crash and always give GOOD data or CHECK CONDITION within bounds")
    func randomCDBs() throws {
        let disk = try TempDisk(size: 64 << 10)
        var rng = SystemRandomNumberGenerator()
        for kind in [SCSILogicalUnit.Kind.disk, .cdrom] {
            let u = SCSILogicalUnit(kind: kind, backend: try raw(disk, readOnly: kind == .cdrom), serial: "fuzz")
            for _ in 0..<20000 {
                let n = Int.random(in: 0...20, using: &rng)
                let cdb = (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) }
                switch u.decode(cdb) {
                case .read(let o, let l), .write(let o, let l, _): #expect(o + l <= 64 << 10)
                case .writeSame(let o, let b, _): #expect(o + b * 512 <= 64 << 10)
                default: break
                }
            }
            try u.backend?.close()
        }
    }
}

/// The virtio-scsi adapter over mock queues: request/response layout, LUN addressing, data movement.
@Suite("virtio-scsi")
struct VirtioSCSITests {
    struct Reply { var response: UInt8; var status: UInt8; var senseLength: UInt32; var residual: UInt32; var sense: [UInt8]; var data: [UInt8]; var used: UInt32 }

    /// Submits one command to the request queue (queue 2).
    func command(_ dev: VirtioSCSI, _ h: Harness, target: UInt8 = 0, lun: UInt16 = 0, cdb: [UInt8], out: [UInt8] = [],
                 inLength: Int = 0) throws -> Reply {
        let d = h.drivers[2]
        var req = [UInt8](repeating: 0, count: 19 + 32)
        req[0] = 1; req[1] = target; req[2] = 0x40 | UInt8(lun >> 8); req[3] = UInt8(lun & 0xff)
        req.replaceSubrange(19..<(19 + cdb.count), with: cdb)
        var bufs: [(addr: UInt64, len: UInt32, writable: Bool)] = [(try d.alloc(req.count, fill: req), UInt32(req.count), false)]
        if !out.isEmpty { bufs.append((try d.alloc(out.count, fill: out), UInt32(out.count), false)) }
        let resp = try d.alloc(108, fill: [UInt8](repeating: 0xee, count: 108))
        bufs.append((resp, 108, true))
        var dataAddr: UInt64 = 0
        if inLength > 0 { dataAddr = try d.alloc(inLength); bufs.append((dataAddr, UInt32(inLength), true)) }
        try d.addChain(bufs)
        try dev.processQueue(2)
        let used = try d.takeUsed()
        let r = try h.memory.read(at: resp, count: 108)
        let senseLength = r.getLE(UInt32.self, at: 0) ?? 0
        return Reply(response: r[11], status: r[10], senseLength: senseLength, residual: r.getLE(UInt32.self, at: 4) ?? 0,
                     sense: Array(r[12..<(12 + Int(min(senseLength, 96)))]),
                     data: inLength > 0 ? try h.memory.read(at: dataAddr, count: inLength) : [], used: used.first?.len ?? 0)
    }

    @Test("reads and writes a disk unit; a CD-ROM unit at target 1; absent LUNs and targets")
    func requests() throws {
        let disk = try TempDisk(size: 64 << 10)
        let iso = try TempDisk(size: 2048 * 8)
        let backend = try openDiskImage(path: disk.path, options: .init(readOnly: false, allowBackingFiles: false, format: "raw"))
        let cdBackend = try openDiskImage(path: iso.path, options: .init(readOnly: true, allowBackingFiles: false, format: "raw"))
        let dev = VirtioSCSI(units: [SCSILogicalUnit(kind: .disk, backend: backend, serial: "d0"),
                                     SCSILogicalUnit(kind: .cdrom, backend: cdBackend, serial: "cd1")])
        let h = try Harness(device: dev, queueCount: 3)
        let original = try disk.contents()
        let r = try command(dev, h, cdb: [0x28, 0, 0, 0, 0, 2, 0, 0, 2, 0], inLength: 1024)
        #expect(r.response == 0 && r.status == 0 && r.residual == 0 && r.used == 108 + 1024)
        #expect(r.data == Array(original[1024..<2048]))
        let payload = (0..<512).map { UInt8(truncatingIfNeeded: $0 * 3) }
        let w = try command(dev, h, cdb: [0x2a, 0, 0, 0, 0, 5, 0, 0, 1, 0], out: payload)
        #expect(w.response == 0 && w.status == 0 && w.residual == 0)
        #expect(try command(dev, h, cdb: [0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]).status == 0)
        #expect(Array(try disk.contents()[2560..<3072]) == payload)
        // A short INQUIRY answer leaves a residual.
        let inq = try command(dev, h, target: 1, cdb: [0x12, 0, 0, 0, 96, 0], inLength: 96)
        #expect(inq.status == 0 && inq.data[0] == 5 && inq.residual == 60 && inq.used == 108 + 36)
        let cdRead = try command(dev, h, target: 1, cdb: [0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0], inLength: 2048)
        let isoBytes = try iso.contents()
        #expect(cdRead.status == 0 && cdRead.data == Array(isoBytes[2048..<4096]))
        // A data buffer smaller than the transfer: OVERRUN, nothing moved.
        #expect(try command(dev, h, cdb: [0x28, 0, 0, 0, 0, 0, 0, 0, 4, 0], inLength: 512).response == VirtioSCSI.Response.overrun)
        // Out of range: CHECK CONDITION with autosense.
        let bad = try command(dev, h, cdb: [0x28, 0, 0, 0, 0x10, 0, 0, 0, 1, 0], inLength: 512)
        #expect(bad.status == 2 && bad.senseLength == 18 && bad.sense[2] == 5 && bad.sense[12] == 0x21)
        // LUN 3 of target 0: INQUIRY says "no unit", other commands LOGICAL UNIT NOT SUPPORTED.
        #expect(try command(dev, h, lun: 3, cdb: [0x12, 0, 0, 0, 36, 0], inLength: 36).data[0] == 0x7f)
        #expect(try command(dev, h, lun: 3, cdb: [0x00, 0, 0, 0, 0, 0]).sense[12] == 0x25)
        #expect(try command(dev, h, target: 9, cdb: [0x00, 0, 0, 0, 0, 0]).response == VirtioSCSI.Response.badTarget)
    }

    @Test("task management and AN queries on the control queue; malformed requests are logged and answered with nothing")
    func control() throws {
        let disk = try TempDisk(size: 64 << 10)
        let backend = try openDiskImage(path: disk.path, options: .init(readOnly: false, allowBackingFiles: false, format: "raw"))
        let log = RecordingLog()
        let dev = VirtioSCSI(units: [SCSILogicalUnit(kind: .disk, backend: backend, serial: "d0")], log: log.log)
        let h = try Harness(device: dev, queueCount: 3)
        let d = h.drivers[0]
        var tmf = [UInt8](repeating: 0, count: 24)
        tmf.putLE(UInt32(0), at: 0); tmf.putLE(UInt32(5), at: 4); tmf[8] = 1; tmf[9] = 0; tmf[10] = 0x40
        let resp = try d.alloc(1, fill: [0xee])
        try d.addChain([(try d.alloc(24, fill: tmf), 24, false), (resp, 1, true)])
        try dev.processQueue(0)
        #expect(try h.memory.read(at: resp, count: 1) == [0])
        // The LUN reset leaves a unit attention for the next command.
        #expect(try command(dev, h, cdb: [0x00, 0, 0, 0, 0, 0]).sense[12] == 0x29)
        // QUERY TASK (6) completes without resetting anything; a TMF for LUN 1 of the target is INCORRECT LUN.
        tmf.putLE(UInt32(6), at: 4)
        try d.addChain([(try d.alloc(24, fill: tmf), 24, false), (resp, 1, true)])
        try dev.processQueue(0)
        #expect(try h.memory.read(at: resp, count: 1) == [0])
        #expect(try command(dev, h, cdb: [0x00, 0, 0, 0, 0, 0]).status == 0, "no unit attention after a query")
        tmf.putLE(UInt32(5), at: 4); tmf[11] = 1
        try d.addChain([(try d.alloc(24, fill: tmf), 24, false), (resp, 1, true)])
        try dev.processQueue(0)
        #expect(try h.memory.read(at: resp, count: 1) == [VirtioSCSI.Response.incorrectLUN])
        tmf[11] = 0
        tmf[9] = 7
        try d.addChain([(try d.alloc(24, fill: tmf), 24, false), (resp, 1, true)])
        try dev.processQueue(0)
        #expect(try h.memory.read(at: resp, count: 1) == [VirtioSCSI.Response.badTarget])
        try d.addChain([(try d.alloc(2, fill: [0, 0]), 2, false), (resp, 1, true)])
        try dev.processQueue(0)
        #expect(!log.all.isEmpty)
        // A request whose response does not fit is dropped with length 0 and logged.
        let q = h.drivers[2]
        try q.addChain([(try q.alloc(51, fill: [UInt8](repeating: 0, count: 51)), 51, false), (try q.alloc(8), 8, true)])
        try dev.processQueue(2)
        #expect(try q.takeUsed().first?.len == 0)
    }
}
