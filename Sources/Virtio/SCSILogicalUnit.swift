import DiskImage
import Synchronization

/// SCSI sense data (fixed format, SPC-4 4.5.3): sense key, additional sense code and qualifier.
public struct SCSISense: Sendable, Equatable, CustomStringConvertible {
    public var key: UInt8
    public var asc: UInt8
    public var ascq: UInt8
    public init(key: UInt8, asc: UInt8, ascq: UInt8) { self.key = key; self.asc = asc; self.ascq = ascq }

    public static let noSense = SCSISense(key: 0, asc: 0, ascq: 0)
    /// NOT READY, MEDIUM NOT PRESENT.
    public static let mediumNotPresent = SCSISense(key: 0x02, asc: 0x3a, ascq: 0)
    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE.
    public static let invalidOpcode = SCSISense(key: 0x05, asc: 0x20, ascq: 0)
    /// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE.
    public static let lbaOutOfRange = SCSISense(key: 0x05, asc: 0x21, ascq: 0)
    /// ILLEGAL REQUEST, INVALID FIELD IN CDB.
    public static let invalidField = SCSISense(key: 0x05, asc: 0x24, ascq: 0)
    /// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED.
    public static let lunNotSupported = SCSISense(key: 0x05, asc: 0x25, ascq: 0)
    /// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST.
    public static let invalidParameter = SCSISense(key: 0x05, asc: 0x26, ascq: 0)
    /// ILLEGAL REQUEST, SAVING PARAMETERS NOT SUPPORTED.
    public static let savingNotSupported = SCSISense(key: 0x05, asc: 0x39, ascq: 0)
    /// ILLEGAL REQUEST, MEDIUM REMOVAL PREVENTED.
    public static let removalPrevented = SCSISense(key: 0x05, asc: 0x53, ascq: 0x02)
    /// ILLEGAL REQUEST, CANNOT READ MEDIUM - INCOMPATIBLE FORMAT.
    public static let incompatibleFormat = SCSISense(key: 0x05, asc: 0x30, ascq: 0x02)
    /// UNIT ATTENTION, NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED.
    public static let mediumChanged = SCSISense(key: 0x06, asc: 0x28, ascq: 0)
    /// UNIT ATTENTION, POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
    public static let resetOccurred = SCSISense(key: 0x06, asc: 0x29, ascq: 0)
    /// DATA PROTECT, WRITE PROTECTED.
    public static let writeProtected = SCSISense(key: 0x07, asc: 0x27, ascq: 0)
    /// MEDIUM ERROR, UNRECOVERED READ ERROR.
    public static let readError = SCSISense(key: 0x03, asc: 0x11, ascq: 0)
    /// MEDIUM ERROR, WRITE ERROR.
    public static let writeError = SCSISense(key: 0x03, asc: 0x0c, ascq: 0)
    /// DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT (the host file system is full).
    public static let spaceAllocationFailed = SCSISense(key: 0x07, asc: 0x27, ascq: 0x07)

    /// The 18-byte fixed-format sense data (response code 0x70, current error).
    public var bytes: [UInt8] {
        var b = [UInt8](repeating: 0, count: 18)
        b[0] = 0x70
        b[2] = key
        b[7] = 10
        b[12] = asc
        b[13] = ascq
        return b
    }

    public var description: String {
        "sense key 0x\(String(key, radix: 16)) asc 0x\(String(asc, radix: 16)) ascq 0x\(String(ascq, radix: 16))"
    }
}

/// What a SCSI command asks of the data path, as `SCSILogicalUnit.decode` returns it.
public enum SCSIAction: Sendable, Equatable {
    /// GOOD status with these data-in bytes (the caller truncates them to the buffer).
    case dataIn([UInt8])
    /// Read `length` bytes at byte `offset` of the medium into the data-in buffer.
    case read(offset: UInt64, length: UInt64)
    /// Write `length` bytes of the data-out buffer at byte `offset` (then flush when `fua`).
    case write(offset: UInt64, length: UInt64, fua: Bool)
    /// Write one block of the data-out buffer `count` times from `offset` (WRITE SAME), or zeroes when
    /// the block is all zeroes (`unmap`: the zeroes may be deallocated).
    case writeSame(offset: UInt64, blocks: UInt64, unmap: Bool)
    /// Deallocate the ranges in the data-out buffer (UNMAP's parameter list).
    case unmap(parameterLength: Int)
    /// Make completed writes durable.
    case flush
    /// CHECK CONDITION with this sense.
    case checkCondition(SCSISense)
}

/// One emulated SCSI logical unit over a `BlockBackend`: a direct-access disk (SBC-3) or an MMC
/// CD/DVD-ROM drive with removable medium. It decodes CDBs into `SCSIAction`s (the caller moves the data),
/// and keeps what SCSI keeps per unit: the medium and its lock, a pending unit attention, and the media
/// event a GET EVENT STATUS NOTIFICATION reports. All guest-controlled fields are range-checked; anything it
/// does not implement is a CHECK CONDITION with ILLEGAL REQUEST, never a crash.
public final class SCSILogicalUnit: Sendable {
    /// The kind of unit.
    public enum Kind: String, Sendable, Codable {
        /// A direct-access block device (peripheral type 0), 512-byte blocks.
        case disk
        /// A CD/DVD-ROM drive (peripheral type 5), 2048-byte blocks, removable and read-only.
        case cdrom
    }

    /// Media events for GET EVENT STATUS NOTIFICATION (MMC-6 table 152).
    enum MediaEvent: UInt8 {
        case none = 0, ejectRequest = 1, newMedia = 2, mediaRemoval = 3
    }

    struct State {
        var backend: (any BlockBackend)?
        var locked = false
        var unitAttention: SCSISense?
        var mediaEvent: MediaEvent = .none
        /// The medium in the open tray: the guest ejected it, and loading the tray (START STOP UNIT) puts it back.
        var tray: (any BlockBackend)?
    }

    /// Largest transfer accepted in one command, in bytes (Block Limits VPD's maximum transfer length).
    public static let maxTransferBytes: UInt64 = 32 << 20
    /// Most UNMAP descriptors in one command.
    public static let maxUnmapDescriptors: UInt32 = 256
    /// A CD's largest size in 2048-byte blocks (80 minutes); larger media report the DVD-ROM profile.
    static let cdMaxBlocks: UInt64 = 80 * 60 * 75

    public let kind: Kind
    /// Bytes per logical block: 512 (disk) or 2048 (cdrom).
    public let blockSize: UInt64
    /// The unit serial number (VPD page 0x80), at most 20 ASCII bytes.
    public let serial: [UInt8]
    private let state: Mutex<State>

    /// A unit over `backend` (nil: a CD-ROM drive without a medium). A disk needs a backend.
    public init(kind: Kind, backend: (any BlockBackend)?, serial: String) {
        self.kind = kind
        blockSize = kind == .cdrom ? 2048 : 512
        self.serial = Array(serial.utf8.prefix(20)).map { (0x20..<0x7f).contains($0) ? $0 : UInt8(ascii: "_") }
        state = Mutex(State(backend: backend))
    }

    /// The medium in use (nil: none).
    public var backend: (any BlockBackend)? { state.withLock { $0.backend } }
    /// Whether the medium is locked in (PREVENT ALLOW MEDIUM REMOVAL).
    public var isLocked: Bool { state.withLock { $0.locked } }

    /// Capacity in blocks of the medium (0 without one).
    func blocks(_ s: State) -> UInt64 { (s.backend?.size ?? 0) / blockSize }

    /// Puts a new medium in (a host-side media change; nil ejects): the old one is returned for the
    /// caller to close; the guest sees UNIT ATTENTION (medium may have changed) and a media event.
    /// Refused (nil returned, nothing changes) for a disk.
    public func changeMedium(_ new: (any BlockBackend)?) -> (changed: Bool, old: (any BlockBackend)?) {
        guard kind == .cdrom else { return (false, nil) }
        return state.withLock { s in
            let old = s.backend ?? s.tray
            s.tray = nil
            s.backend = new
            s.unitAttention = .mediumChanged
            s.mediaEvent = new == nil ? .mediaRemoval : .newMedia
            return (true, old)
        }
    }

    /// Saved state for snapshots: medium present, locked, a pending unit attention and media event.
    public var savedState: [UInt8] {
        state.withLock { s in
            let ua = s.unitAttention
            return [s.backend != nil ? 1 : 0, s.locked ? 1 : 0, ua == nil ? 0 : 1, ua?.key ?? 0, ua?.asc ?? 0, ua?.ascq ?? 0,
                    s.mediaEvent.rawValue]
        }
    }

    /// Restores `savedState` (the medium itself comes from the configuration; a snapshot taken with the medium
    /// ejected puts it back in the open tray).
    public func restoreState(_ b: [UInt8]) throws(VirtioError) {
        guard b.count == 7, let event = MediaEvent(rawValue: b[6]) else {
            throw .deviceState("SCSI unit state: \(b.count) bytes, expected 7 with a known media event")
        }
        state.withLock { s in
            if b[0] == 0, kind == .cdrom, s.backend != nil { s.tray = s.backend; s.backend = nil }
            s.locked = b[1] != 0
            s.unitAttention = b[2] != 0 ? SCSISense(key: b[3], asc: b[4], ascq: b[5]) : nil
            s.mediaEvent = event
        }
    }

    /// A bus or LUN reset: a reset unit attention; the lock is released.
    public func reset() {
        state.withLock { s in
            s.locked = false
            s.unitAttention = .resetOccurred
        }
    }

    // MARK: Commands

    /// Decodes `cdb` and updates the unit's state; returns what the data path must do.
    public func decode(_ cdb: [UInt8]) -> SCSIAction {
        guard let op = cdb.first else { return .checkCondition(.invalidOpcode) }
        guard cdb.count >= Self.cdbLength(op) else { return .checkCondition(.invalidField) }
        return state.withLock { s in
            // A pending unit attention is reported once, by the first command that is not exempt (SPC-4 5.14).
            if let ua = s.unitAttention, ![0x12, 0x03, 0xa0, 0x4a].contains(op) {
                s.unitAttention = nil
                return .checkCondition(ua)
            }
            return command(op, cdb, &s)
        }
    }

    /// The length of the CDB for `op` (its group code).
    static func cdbLength(_ op: UInt8) -> Int {
        switch op >> 5 {
        case 0: 6
        case 1, 2: 10
        case 4: 16
        case 5: 12
        default: 6
        }
    }

    private func command(_ op: UInt8, _ cdb: [UInt8], _ s: inout State) -> SCSIAction {
        switch op {
        case 0x00:  // TEST UNIT READY
            return s.backend == nil ? .checkCondition(.mediumNotPresent) : .dataIn([])
        case 0x03:  // REQUEST SENSE
            var sense = SCSISense.noSense
            if let ua = s.unitAttention { sense = ua; s.unitAttention = nil }
            else if s.backend == nil { sense = .mediumNotPresent }
            return .dataIn(Array(sense.bytes.prefix(Int(cdb[4]))))
        case 0x12:
            return inquiry(cdb)
        case 0xa0:  // REPORT LUNS: LUN 0 only
            let alloc = Int(be32(cdb, 6))
            guard alloc >= 16 else { return .checkCondition(.invalidField) }
            var b = [UInt8](repeating: 0, count: 16)
            b[3] = 8
            return .dataIn(b)
        case 0x1a, 0x5a:
            return modeSense(cdb, s)
        case 0x15, 0x55:  // MODE SELECT: no changeable parameters
            return .checkCondition(.invalidOpcode)
        case 0x1b:  // START STOP UNIT
            let loadEject = cdb[4] & 0x02 != 0, start = cdb[4] & 0x01 != 0
            guard kind == .cdrom, loadEject else { return .dataIn([]) }
            if !start {
                guard !s.locked else { return .checkCondition(.removalPrevented) }
                if s.backend != nil {
                    // Eject: the medium goes to the open tray (kept open and locked by the VMM, as QEMU keeps it).
                    s.tray = s.backend
                    s.backend = nil
                    s.mediaEvent = .mediaRemoval
                }
            } else if s.backend == nil, let medium = s.tray {
                // Load: the tray closes with the medium it holds.
                s.backend = medium
                s.tray = nil
                s.unitAttention = .mediumChanged
                s.mediaEvent = .newMedia
            }
            return .dataIn([])
        case 0x1e:  // PREVENT ALLOW MEDIUM REMOVAL
            s.locked = cdb[4] & 0x03 != 0
            return .dataIn([])
        case 0x25:  // READ CAPACITY (10)
            guard s.backend != nil else { return .checkCondition(.mediumNotPresent) }
            let last = blocks(s) == 0 ? 0 : blocks(s) - 1
            var b = [UInt8](repeating: 0, count: 8)
            putBE(&b, 0, UInt32(min(last, 0xffff_ffff)), 4)
            putBE(&b, 4, UInt32(blockSize), 4)
            return .dataIn(b)
        case 0x9e where cdb[1] & 0x1f == 0x10:  // SERVICE ACTION IN: READ CAPACITY (16)
            guard s.backend != nil else { return .checkCondition(.mediumNotPresent) }
            var b = [UInt8](repeating: 0, count: 32)
            putBE(&b, 0, blocks(s) == 0 ? 0 : blocks(s) - 1, 8)
            putBE(&b, 8, UInt32(blockSize), 4)
            if kind == .disk, !isReadOnlyLocked(s) { b[14] = 0xc0 }   // LBPME, LBPRZ
            return .dataIn(Array(b.prefix(Int(be32(cdb, 10)))))
        case 0x08, 0x28, 0xa8, 0x88:
            return transfer(op, cdb, s, write: false)
        case 0x0a, 0x2a, 0xaa, 0x8a:
            guard kind == .disk else { return .checkCondition(.invalidOpcode) }
            return transfer(op, cdb, s, write: true)
        case 0x35, 0x91:  // SYNCHRONIZE CACHE (10)/(16)
            guard s.backend != nil else { return .checkCondition(.mediumNotPresent) }
            return .flush
        case 0x2f, 0x8f:  // VERIFY (10)/(16), without byte compare
            guard s.backend != nil else { return .checkCondition(.mediumNotPresent) }
            guard cdb[1] & 0x06 == 0 else { return .checkCondition(.invalidField) }
            return .dataIn([])
        case 0x1d:  // SEND DIAGNOSTIC (self-test: passes)
            return .dataIn([])
        case 0x42 where kind == .disk:  // UNMAP
            guard !isReadOnlyLocked(s) else { return .checkCondition(.writeProtected) }
            return .unmap(parameterLength: Int(be16(cdb, 7)))
        case 0x93 where kind == .disk:  // WRITE SAME (16)
            guard !isReadOnlyLocked(s) else { return .checkCondition(.writeProtected) }
            let lba = be64(cdb, 2), count = UInt64(be32(cdb, 10))
            guard cdb[1] & 0x01 == 0 else { return .checkCondition(.invalidField) }   // NDOB
            guard count > 0, count * blockSize <= Self.maxTransferBytes * 8 else { return .checkCondition(.invalidField) }
            guard lba <= blocks(s), count <= blocks(s) - lba else { return .checkCondition(.lbaOutOfRange) }
            return .writeSame(offset: lba * blockSize, blocks: count, unmap: cdb[1] & 0x08 != 0)
        default:
            guard kind == .cdrom else { return .checkCondition(.invalidOpcode) }
            return mmc(op, cdb, &s)
        }
    }

    /// Whether the unit refuses writes (a CD-ROM, or a read-only image or none).
    private func isReadOnlyLocked(_ s: State) -> Bool { kind == .cdrom || (s.backend?.isReadOnly ?? true) }

    /// READ and WRITE (6), (10), (12), (16).
    private func transfer(_ op: UInt8, _ cdb: [UInt8], _ s: State, write: Bool) -> SCSIAction {
        guard s.backend != nil else { return .checkCondition(.mediumNotPresent) }
        if write, isReadOnlyLocked(s) { return .checkCondition(.writeProtected) }
        let lba: UInt64, count: UInt64
        var fua = false
        switch op {
        case 0x08, 0x0a:
            lba = UInt64(cdb[1] & 0x1f) << 16 | UInt64(cdb[2]) << 8 | UInt64(cdb[3])
            count = cdb[4] == 0 ? 256 : UInt64(cdb[4])
        case 0x28, 0x2a:
            lba = UInt64(be32(cdb, 2)); count = UInt64(be16(cdb, 7)); fua = cdb[1] & 0x08 != 0
        case 0xa8, 0xaa:
            lba = UInt64(be32(cdb, 2)); count = UInt64(be32(cdb, 6)); fua = cdb[1] & 0x08 != 0
        default:
            lba = be64(cdb, 2); count = UInt64(be32(cdb, 10)); fua = cdb[1] & 0x08 != 0
        }
        let total = blocks(s)
        guard lba <= total, count <= total - lba else { return .checkCondition(.lbaOutOfRange) }
        guard count * blockSize <= Self.maxTransferBytes else { return .checkCondition(.invalidField) }
        if count == 0 { return .dataIn([]) }
        return write ? .write(offset: lba * blockSize, length: count * blockSize, fua: fua)
                     : .read(offset: lba * blockSize, length: count * blockSize)
    }

    private var vendor: String { "SWIFTKVM" }
    private var product: String { kind == .cdrom ? "VIRTUAL CD-ROM" : "VIRTUAL DISK" }

    private func inquiry(_ cdb: [UInt8]) -> SCSIAction {
        let alloc = Int(be16(cdb, 3))
        let evpd = cdb[1] & 0x01 != 0
        let type: UInt8 = kind == .cdrom ? 0x05 : 0x00
        guard evpd else {
            guard cdb[2] == 0, cdb[1] & 0x02 == 0 else { return .checkCondition(.invalidField) }
            var b = [UInt8](repeating: 0x20, count: 36)
            b[0] = type
            b[1] = kind == .cdrom ? 0x80 : 0x00      // RMB
            b[2] = 0x05                                // SPC-3
            b[3] = 0x02                                // response data format 2
            b[4] = 31                                  // additional length
            b[5] = 0; b[6] = 0
            b[7] = kind == .disk ? 0x02 : 0x00         // CmdQue
            putASCII(&b, 8, vendor, 8)
            putASCII(&b, 16, product, 16)
            putASCII(&b, 32, "1.0", 4)
            return .dataIn(Array(b.prefix(alloc)))
        }
        var pages: [UInt8] = [0x00, 0x80, 0x83]
        if kind == .disk { pages += [0xb0, 0xb1, 0xb2] }
        var body: [UInt8]
        switch cdb[2] {
        case 0x00: body = pages
        case 0x80: body = serial
        case 0x83:
            // One T10 vendor ID designator (ASCII): vendor, then the serial.
            let id = Array(vendor.utf8) + serial
            body = [0x02, 0x01, 0x00, UInt8(id.count)] + id
        case 0xb0 where kind == .disk:  // Block Limits
            body = [UInt8](repeating: 0, count: 0x3c)
            putBE(&body, 4, UInt32(Self.maxTransferBytes / blockSize), 4)     // maximum transfer length
            putBE(&body, 8, UInt32(Self.maxTransferBytes / blockSize), 4)     // optimal transfer length
            putBE(&body, 16, UInt32(Self.maxTransferBytes / blockSize), 4)    // maximum unmap LBA count
            putBE(&body, 20, Self.maxUnmapDescriptors, 4)                     // maximum unmap descriptors
            putBE(&body, 24, UInt32(1), 4)                                    // optimal unmap granularity
            putBE(&body, 32, UInt64(Self.maxTransferBytes * 8 / blockSize), 8) // maximum WRITE SAME length
        case 0xb1 where kind == .disk:  // Block Device Characteristics: non-rotating
            body = [UInt8](repeating: 0, count: 0x3c)
            body[1] = 0x01
        case 0xb2 where kind == .disk:  // Logical Block Provisioning: UNMAP and WRITE SAME (16) with UNMAP
            body = [0, 0xc0 | 0x04, 0, 0]
        default:
            return .checkCondition(.invalidField)
        }
        var b: [UInt8] = [type, cdb[2]]
        b += [UInt8(body.count >> 8), UInt8(body.count & 0xff)]
        return .dataIn(Array((b + body).prefix(alloc)))
    }

    private func modeSense(_ cdb: [UInt8], _ s: State) -> SCSIAction {
        let ten = cdb[0] == 0x5a
        let dbd = cdb[1] & 0x08 != 0
        let control = cdb[2] >> 6, page = cdb[2] & 0x3f, subpage = cdb[3]
        let alloc = ten ? Int(be16(cdb, 7)) : Int(cdb[4])
        guard control != 3 else { return .checkCondition(.savingNotSupported) }
        guard subpage == 0 || (page == 0x3f && subpage == 0xff) else { return .checkCondition(.invalidField) }
        let changeable = control == 1
        var pages: [UInt8] = []
        func add(_ code: UInt8, _ body: [UInt8]) {
            pages += [code, UInt8(body.count)] + (changeable ? [UInt8](repeating: 0, count: body.count) : body)
        }
        let wanted: [UInt8] = page == 0x3f ? (kind == .cdrom ? [0x01, 0x08, 0x2a] : [0x01, 0x08]) : [page]
        for p in wanted {
            switch p {
            case 0x01:  // Read-Write Error Recovery
                var b = [UInt8](repeating: 0, count: 10)
                b[0] = 0x80   // AWRE
                add(p, b)
            case 0x08:  // Caching: write cache enabled (the host page cache; SYNCHRONIZE CACHE flushes)
                var b = [UInt8](repeating: 0, count: 18)
                b[0] = 0x04   // WCE
                add(p, b)
            case 0x2a where kind == .cdrom:  // MM Capabilities and Mechanical Status
                var b = [UInt8](repeating: 0, count: 18)
                b[0] = 0x3b   // reads CD-R/RW, DVD-ROM, DVD-R, DVD-RAM
                b[2] = 0x71   // audio play, multisession, mode 2 form 1/2
                b[3] = 0xff
                b[4] = 0x29 | (s.locked ? 0x02 : 0)   // lock supported, eject supported, tray loading mechanism
                b[5] = 0x00
                putBE(&b, 6, UInt16(704), 2)           // maximum read speed (kB/s, 4x)
                putBE(&b, 8, UInt16(2), 2)             // volume levels
                putBE(&b, 10, UInt16(2048), 2)         // buffer size (KB)
                putBE(&b, 12, UInt16(704), 2)          // current read speed
                add(p, b)
            default:
                return .checkCondition(.invalidField)
            }
        }
        var descriptor: [UInt8] = []
        if kind == .disk, !dbd {
            descriptor = [UInt8](repeating: 0, count: 8)
            putBE(&descriptor, 0, UInt32(min(blocks(s), 0xff_ffff)), 4)
            descriptor[0] = 0   // density code
            putBE(&descriptor, 4, UInt32(blockSize), 4)
            descriptor[4] = 0
        }
        let wp: UInt8 = kind == .disk && isReadOnlyLocked(s) ? 0x80 : 0x00
        var header: [UInt8]
        if ten {
            header = [0, 0, 0, wp, 0, 0, 0, UInt8(descriptor.count)]
            putBE(&header, 0, UInt16(6 + descriptor.count + pages.count), 2)
        } else {
            header = [UInt8(3 + descriptor.count + pages.count), 0, wp, UInt8(descriptor.count)]
        }
        return .dataIn(Array((header + descriptor + pages).prefix(alloc)))
    }

    // MARK: MMC

    private func mmc(_ op: UInt8, _ cdb: [UInt8], _ s: inout State) -> SCSIAction {
        switch op {
        case 0x43:  // READ TOC/PMA/ATIP
            guard s.backend != nil else { return .checkCondition(.mediumNotPresent) }
            return readTOC(cdb, blocks: blocks(s))
        case 0x46:
            return getConfiguration(cdb, s)
        case 0x4a:  // GET EVENT STATUS NOTIFICATION (polled only)
            guard cdb[1] & 0x01 != 0 else { return .checkCondition(.invalidField) }
            let alloc = Int(be16(cdb, 7))
            let mediaClass: UInt8 = 0x10
            guard cdb[4] & mediaClass != 0 else {
                return .dataIn(Array([0, 2, 0x80, mediaClass].prefix(alloc)))   // NEA: no requested class supported
            }
            let event = s.mediaEvent
            // A new medium is reported once; the tray state is always current.
            if event != .none { s.mediaEvent = .none }
            let status: UInt8 = s.backend != nil ? 0x02 : 0x00
            return .dataIn(Array([0, 6, 0x04, mediaClass, event.rawValue, status, 0, 0].prefix(alloc)))
        case 0x51:  // READ DISC INFORMATION (standard disc information)
            guard s.backend != nil else { return .checkCondition(.mediumNotPresent) }
            guard cdb[1] & 0x07 == 0 else { return .checkCondition(.invalidField) }
            var b = [UInt8](repeating: 0, count: 34)
            b[1] = 32
            b[2] = 0x0e          // last session complete, disc finalized
            b[3] = 1             // first track
            b[4] = 1             // sessions
            b[5] = 1             // first track in last session
            b[6] = 1             // last track in last session
            b[7] = 0x20          // unrestricted use
            for i in 16..<24 { b[i] = 0xff }   // no lead-in / lead-out start times
            return .dataIn(Array(b.prefix(Int(be16(cdb, 7)))))
        case 0xbd:  // MECHANISM STATUS: no changer
            var b = [UInt8](repeating: 0, count: 8)
            b[1] = s.backend == nil ? 0x10 : 0x00   // door open without a medium
            return .dataIn(Array(b.prefix(Int(be16(cdb, 8)))))
        case 0xbb:  // SET CD SPEED: nothing to set on a virtual drive
            return .dataIn([])
        case 0xad:  // READ DISC STRUCTURE: DVD structures are not emulated
            guard s.backend != nil else { return .checkCondition(.mediumNotPresent) }
            return .checkCondition(.incompatibleFormat)
        default:
            return .checkCondition(.invalidOpcode)
        }
    }

    /// READ TOC formats 0 (TOC) and 1 (session information): one data track from LBA 0.
    private func readTOC(_ cdb: [UInt8], blocks: UInt64) -> SCSIAction {
        let msf = cdb[1] & 0x02 != 0
        let format = cdb[2] & 0x0f
        let start = cdb[6]
        let alloc = Int(be16(cdb, 7))
        func address(_ lba: UInt64) -> [UInt8] {
            guard msf else {
                var a = [UInt8](repeating: 0, count: 4)
                putBE(&a, 0, UInt32(min(lba, 0xffff_ffff)), 4)
                return a
            }
            let frames = lba + 150
            return [0, UInt8(min(frames / 4500, 255)), UInt8(frames / 75 % 60), UInt8(frames % 75)]
        }
        var b: [UInt8]
        switch format {
        case 0:
            guard start <= 1 || start == 0xaa else { return .checkCondition(.invalidField) }
            b = [0, 0, 1, 1]
            if start <= 1 { b += [0, 0x14, 1, 0] + address(0) }
            b += [0, 0x14, 0xaa, 0] + address(blocks)
        case 1:
            b = [0, 0, 1, 1, 0, 0x14, 1, 0] + address(0)
        default:
            return .checkCondition(.invalidField)
        }
        putBE(&b, 0, UInt16(b.count - 2), 2)
        return .dataIn(Array(b.prefix(alloc)))
    }

    /// GET CONFIGURATION: the profile list (CD-ROM and DVD-ROM, the current one by the medium's size), Core,
    /// Morphing and Removable Medium features.
    private func getConfiguration(_ cdb: [UInt8], _ s: State) -> SCSIAction {
        let rt = cdb[1] & 0x03
        let first = be16(cdb, 2)
        let alloc = Int(be16(cdb, 7))
        guard rt != 3 else { return .checkCondition(.invalidField) }
        let current: UInt16 = s.backend == nil ? 0 : (blocks(s) > Self.cdMaxBlocks ? 0x0010 : 0x0008)
        func feature(_ code: UInt16, version: UInt8, current: Bool, _ data: [UInt8]) -> [UInt8] {
            [UInt8(code >> 8), UInt8(code & 0xff), (version << 2) | 0x02 | (current ? 1 : 0), UInt8(data.count)] + data
        }
        let features: [(UInt16, [UInt8])] = [
            (0x0000, feature(0x0000, version: 0, current: true,
                             [0x00, 0x10, current == 0x0010 ? 1 : 0, 0, 0x00, 0x08, current == 0x0008 ? 1 : 0, 0])),
            (0x0001, feature(0x0001, version: 1, current: true, [0, 0, 0, 1, 0, 0, 0, 0])),         // SCSI family
            (0x0002, feature(0x0002, version: 1, current: true, [0x02, 0, 0, 0])),                   // polled GESN
            (0x0003, feature(0x0003, version: 0, current: true, [0x29, 0, 0, 0])),                   // tray, eject, lock
        ]
        var body: [UInt8] = []
        for (code, bytes) in features where code >= first {
            if rt == 2 && code != first { continue }
            body += bytes
        }
        var b = [UInt8](repeating: 0, count: 8)
        putBE(&b, 0, UInt32(4 + body.count), 4)
        putBE(&b, 6, current, 2)
        return .dataIn(Array((b + body).prefix(alloc)))
    }

    /// Every medium the unit holds, loaded or in the open tray (the owner closes them when the VM stops).
    public var allMedia: [any BlockBackend] { state.withLock { s in [s.backend, s.tray].compactMap { $0 } } }
}

// MARK: Big-endian helpers

func be16(_ b: [UInt8], _ o: Int) -> UInt16 { o + 2 <= b.count ? UInt16(b[o]) << 8 | UInt16(b[o + 1]) : 0 }
func be32(_ b: [UInt8], _ o: Int) -> UInt32 { o + 4 <= b.count ? UInt32(be16(b, o)) << 16 | UInt32(be16(b, o + 2)) : 0 }
func be64(_ b: [UInt8], _ o: Int) -> UInt64 { o + 8 <= b.count ? UInt64(be32(b, o)) << 32 | UInt64(be32(b, o + 4)) : 0 }

/// Stores the low `width` bytes of `v` big-endian at `o`.
func putBE<T: FixedWidthInteger>(_ b: inout [UInt8], _ o: Int, _ v: T, _ width: Int) {
    for i in 0..<width { b[o + i] = UInt8(truncatingIfNeeded: UInt64(v) >> (8 * UInt64(width - 1 - i))) }
}

/// Stores `s` as ASCII, space-padded to `width` bytes, at `o`.
func putASCII(_ b: inout [UInt8], _ o: Int, _ s: String, _ width: Int) {
    let a = Array(s.utf8.prefix(width))
    for i in 0..<width { b[o + i] = i < a.count ? a[i] : 0x20 }
}
