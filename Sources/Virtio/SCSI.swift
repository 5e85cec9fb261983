import DiskImage
import GuestMemory
import Synchronization

/// virtio-scsi (virtio 1.x, section 5.6): one host adapter whose targets 0… each have one logical unit
/// (LUN 0), a disk or a CD/DVD-ROM drive (`SCSILogicalUnit`). Queues: control (task management and
/// asynchronous-notification queries), event (buffers kept: no events are reported), and one request queue.
///
/// Requests run synchronously on the device's event-loop thread. The response carries the SCSI status,
/// autosense (up to the driver's `sense_size`) and the residual; a data buffer too small for a transfer
/// is answered with VIRTIO_SCSI_S_OVERRUN and nothing moved. LUNs other than 0, or LUN addresses that
/// are not single-level, get CHECK CONDITION (LOGICAL UNIT NOT SUPPORTED) from an existing target and
/// VIRTIO_SCSI_S_BAD_TARGET otherwise. Errors of the image become MEDIUM ERROR sense, never a crash.
public final class VirtioSCSI: VirtioDevice, Sendable {
    /// virtio-scsi response codes.
    public enum Response {
        public static let ok: UInt8 = 0
        public static let overrun: UInt8 = 1
        public static let badTarget: UInt8 = 3
        public static let failure: UInt8 = 9
        public static let functionRejected: UInt8 = 11
        public static let incorrectLUN: UInt8 = 12
    }
    /// Request header size before the CDB: lun (8), id (8), task attribute, priority, CRN.
    static let requestHeader = 19
    /// Response header size before the sense bytes: sense_len, residual, status qualifier, status, response.
    static let responseHeader = 12
    /// Queue sizes: control, event, request.
    public static let queueSizes: [UInt16] = [128, 128, 256]
    /// SCSI status GOOD and CHECK CONDITION.
    static let good: UInt8 = 0, checkCondition: UInt8 = 2

    /// The logical units, by target number.
    public let units: [SCSILogicalUnit]
    let log: VirtioLog
    private struct Config { var senseSize: UInt32 = 96; var cdbSize: UInt32 = 32 }
    private let config = Mutex(Config())
    private let active = Mutex<VirtioActivation?>(nil)
    /// A host adapter with `units` as targets 0, 1, ….
    public init(units: [SCSILogicalUnit], log: VirtioLog = .discard) {
        self.units = units
        self.log = log
    }

    public var deviceType: VirtioDeviceType { .scsi }
    public var deviceFeatures: UInt64 { 0 }
    public var queueMaxSizes: [UInt16] { Self.queueSizes }
    public var configSize: Int { 36 }

    var configBytes: [UInt8] {
        let c = config.withLock { $0 }
        var b = [UInt8](repeating: 0, count: 36)
        b.putLE(UInt32(1), at: 0)                            // num_queues
        b.putLE(UInt32(126), at: 4)                          // seg_max
        b.putLE(UInt32(SCSILogicalUnit.maxTransferBytes / 512), at: 8)   // max_sectors
        b.putLE(UInt32(128), at: 12)                         // cmd_per_lun
        b.putLE(UInt32(16), at: 16)                          // event_info_size
        b.putLE(c.senseSize, at: 20)
        b.putLE(c.cdbSize, at: 24)
        b.putLE(UInt16(0), at: 28)                           // max_channel
        b.putLE(UInt16(max(units.count, 1) - 1), at: 30)     // max_target
        b.putLE(UInt32(0), at: 32)                           // max_lun
        return b
    }

    public func readConfig(offset: Int, data: UnsafeMutableRawBufferPointer) { copyConfig(configBytes, offset: offset, into: data) }

    /// The driver may set sense_size (offset 20) and cdb_size (24); values are capped at 256.
    public func writeConfig(offset: Int, data: UnsafeRawBufferPointer) {
        guard data.count == 4 else { return }
        let v = min(UInt32(data[0]) | UInt32(data[1]) << 8 | UInt32(data[2]) << 16 | UInt32(data[3]) << 24, 256)
        config.withLock { c in
            if offset == 20 { c.senseSize = v }
            if offset == 24 { c.cdbSize = max(v, 6) }
        }
    }

    public func activate(_ activation: VirtioActivation) throws(VirtioError) {
        guard activation.queues.count == 3, activation.queues[2] != nil else {
            throw .queueConfiguration(queue: 2, reason: "virtio-scsi needs its request queue enabled")
        }
        active.withLock { $0 = activation }
    }

    public func reset() {
        active.withLock { $0 = nil }
        config.withLock { $0 = Config() }
        for u in units { u.reset() }
    }

    public func processQueue(_ index: Int) throws(VirtioError) {
        let result: Result<Void, VirtioError> = active.withLock { a in
            guard let a, index < a.queues.count, let q = a.queues[index] else { return .success(()) }
            do throws(VirtioError) {
                switch index {
                case 0: try q.serve(log: log, interrupt: a.interrupt) { control($0, memory: a.memory) }
                case 2: try q.serve(log: log, interrupt: a.interrupt) { request($0, memory: a.memory) }
                default: break   // event buffers stay with the device until an event is reported (none are)
                }
                return .success(())
            } catch { return .failure(error) }
        }
        try result.get()
    }

    /// Saved per unit: `SCSILogicalUnit.savedState`.
    public func savedDeviceState() -> [UInt8]? { units.flatMap(\.savedState) }

    public func restoreDeviceState(_ bytes: [UInt8]) throws(VirtioError) {
        guard bytes.count == 7 * units.count else {
            throw .deviceState("virtio-scsi: \(bytes.count) bytes of unit state for \(units.count) units")
        }
        for (i, u) in units.enumerated() { try u.restoreState(Array(bytes[(7 * i)..<(7 * i + 7)])) }
    }

    /// The unit addressed by an 8-byte virtio-scsi LUN field: (target, lun) in single-level format, or nil.
    static func address(_ lun: [UInt8]) -> (target: Int, lun: Int)? {
        guard lun.count == 8, lun[0] == 1 else { return nil }
        let level = UInt16(lun[2]) << 8 | UInt16(lun[3])
        // Peripheral (0x00xx) or flat (0x40xx) single-level addressing; the other levels must be zero.
        guard level & 0xc000 == 0x4000 || level & 0xc000 == 0, lun[4...].allSatisfy({ $0 == 0 }) else {
            return (Int(lun[1]), -1)
        }
        return (Int(lun[1]), Int(level & 0x3fff))
    }

    // MARK: Control queue

    private func control(_ chain: DescriptorChain, memory: GuestMemory) -> UInt32 {
        var reader = ChainReader(memory: memory, chain: chain)
        var writer = ChainWriter(memory: memory, chain: chain)
        do {
            let type = try reader.read(4).getLE(UInt32.self, at: 0) ?? 0
            switch type {
            case 0:  // TMF: subtype, lun, id → response
                let body = try reader.read(20)
                let lun = Array(body[4..<12])
                var response = Response.ok   // FUNCTION COMPLETE: requests never stay in flight here
                if let a = Self.address(lun), a.target < units.count {
                    let subtype = body.getLE(UInt32.self, at: 0) ?? 0
                    if a.lun != 0 {
                        response = Response.incorrectLUN
                    } else if subtype == 4 || subtype == 5 {
                        // I_T NEXUS RESET and LOGICAL UNIT RESET reset the unit.
                        units[a.target].reset()
                    } else if subtype > 7 {
                        response = Response.functionRejected
                    }
                    // Aborts, CLEAR ACA/TASK SET and the queries complete: requests never stay in flight here.
                } else {
                    response = Response.badTarget
                }
                try writer.write([response])
            case 1, 2:  // AN query / subscribe: lun, event_requested → event_actual, response
                _ = try reader.read(12)
                try writer.write([0, 0, 0, 0, Response.ok])
            default:
                log.error("virtio-scsi: control request of unknown type \(type)")
                if writer.remaining >= 1 { try writer.write([Response.failure]) }
            }
        } catch {
            log.error("virtio-scsi: malformed control request at head \(chain.head): \(error)")
        }
        return UInt32(truncatingIfNeeded: writer.written)
    }

    // MARK: Request queue

    /// The outcome written into a response.
    struct Outcome {
        var response = Response.ok
        var status = VirtioSCSI.good
        var sense: [UInt8] = []
        var dataIn: UInt64 = 0
        var dataOut: UInt64 = 0
    }

    private func request(_ chain: DescriptorChain, memory: GuestMemory) -> UInt32 {
        let c = config.withLock { $0 }
        let responseSize = Self.responseHeader + Int(c.senseSize)
        var reader = ChainReader(memory: memory, chain: chain)
        let header: [UInt8]
        do {
            header = try reader.read(Self.requestHeader + Int(c.cdbSize))
        } catch {
            log.error("virtio-scsi: request at head \(chain.head) shorter than its header: \(error)")
            return 0
        }
        guard chain.writableLength >= UInt64(responseSize) else {
            log.error("virtio-scsi: request at head \(chain.head) has \(chain.writableLength) writable bytes, less than the \(responseSize)-byte response")
            return 0
        }
        let dataInCapacity = chain.writableLength - UInt64(responseSize)
        let dataOutLength = reader.remaining
        var outcome = Outcome()
        let cdb = Array(header[Self.requestHeader...])
        if let a = Self.address(Array(header[0..<8])), a.target < units.count {
            if a.lun == 0 {
                outcome = execute(units[a.target], cdb: cdb, reader: &reader, chain: chain, memory: memory,
                                  dataInCapacity: dataInCapacity, responseSize: responseSize)
            } else if cdb.first == 0x12 {
                // INQUIRY of an absent LUN: peripheral qualifier 3, type 0x1f.
                outcome = dataInOutcome([0x7f] + [UInt8](repeating: 0, count: 35), alloc: Int(be16(cdb, 3)),
                                        chain: chain, memory: memory, capacity: dataInCapacity, responseSize: responseSize)
            } else {
                outcome.status = Self.checkCondition
                outcome.sense = SCSISense.lunNotSupported.bytes
            }
        } else {
            outcome.response = Response.badTarget
        }
        // Response: sense_len, residual, status_qualifier, status, response, sense.
        var response = [UInt8](repeating: 0, count: responseSize)
        let sense = outcome.sense.prefix(Int(c.senseSize))
        response.putLE(UInt32(sense.count), at: 0)
        // The residual of the request's data direction: buffer bytes not transferred.
        let residual = dataOutLength > 0 ? dataOutLength - min(outcome.dataOut, dataOutLength)
                                         : dataInCapacity - min(outcome.dataIn, dataInCapacity)
        response.putLE(UInt32(truncatingIfNeeded: min(residual, UInt64(UInt32.max))), at: 4)
        response[10] = outcome.status
        response[11] = outcome.response
        response.replaceSubrange(Self.responseHeader..<(Self.responseHeader + sense.count), with: sense)
        var writer = ChainWriter(memory: memory, chain: chain)
        do { try writer.write(response) } catch {
            log.error("virtio-scsi: cannot write the response at head \(chain.head): \(error)")
            return 0
        }
        return UInt32(truncatingIfNeeded: UInt64(responseSize) + outcome.dataIn)
    }

    /// Writes `bytes` (at most `alloc` and the buffer) after the response.
    private func dataInOutcome(_ bytes: [UInt8], alloc: Int, chain: DescriptorChain, memory: GuestMemory,
                               capacity: UInt64, responseSize: Int) -> Outcome {
        var outcome = Outcome()
        let n = min(bytes.count, alloc, Int(min(capacity, UInt64(Int.max))))
        var writer = ChainWriter(memory: memory, chain: chain)
        do {
            try writer.forEachSegment(responseSize) { _ in }
            try writer.write(Array(bytes.prefix(n)))
            outcome.dataIn = UInt64(n)
        } catch {
            outcome.response = Response.failure
        }
        return outcome
    }

    private func execute(_ unit: SCSILogicalUnit, cdb: [UInt8], reader: inout ChainReader, chain: DescriptorChain,
                         memory: GuestMemory, dataInCapacity: UInt64, responseSize: Int) -> Outcome {
        var outcome = Outcome()
        func fail(_ sense: SCSISense) -> Outcome {
            var o = Outcome()
            o.status = Self.checkCondition
            o.sense = sense.bytes
            return o
        }
        let action = unit.decode(cdb)
        guard let backend = unit.backend else {
            if case .dataIn(let bytes) = action {
                return dataInOutcome(bytes, alloc: bytes.count, chain: chain, memory: memory, capacity: dataInCapacity,
                                     responseSize: responseSize)
            }
            if case .checkCondition(let sense) = action { return fail(sense) }
            return fail(.mediumNotPresent)
        }
        do {
            switch action {
            case .dataIn(let bytes):
                return dataInOutcome(bytes, alloc: bytes.count, chain: chain, memory: memory, capacity: dataInCapacity,
                                     responseSize: responseSize)
            case .checkCondition(let sense):
                return fail(sense)
            case .read(let offset, let length):
                guard length <= dataInCapacity else { outcome.response = Response.overrun; return outcome }
                var writer = ChainWriter(memory: memory, chain: chain)
                try writer.forEachSegment(responseSize) { _ in }
                // SAFETY: the slices point into guest RAM, which `memory` keeps mapped during the request.
                var segments: [UnsafeMutableRawBufferPointer] = []
                try writer.forEachSegment(Int(length)) { segments.append($0) }
                var pos = offset
                do {
                    for seg in segments {
                        try backend.read(into: seg, at: pos)
                        pos += UInt64(seg.count)
                    }
                } catch {
                    log.error("virtio-scsi: read of \(length) bytes at \(offset) failed: \(error)")
                    return fail(.readError)
                }
                outcome.dataIn = length
            case .write(let offset, let length, let fua):
                guard length <= reader.remaining else { outcome.response = Response.overrun; return outcome }
                var segments: [UnsafeRawBufferPointer] = []
                try reader.forEachSegment(Int(length)) { segments.append(UnsafeRawBufferPointer($0)) }
                var pos = offset
                do {
                    for seg in segments {
                        try backend.write(seg, at: pos)
                        pos += UInt64(seg.count)
                    }
                    if fua { try backend.flush() }
                } catch {
                    log.error("virtio-scsi: write of \(length) bytes at \(offset) failed: \(error)")
                    return fail(Self.isNoSpace(error) ? .spaceAllocationFailed : .writeError)
                }
                outcome.dataOut = length
            case .flush:
                do { try backend.flush() } catch {
                    log.error("virtio-scsi: flush failed: \(error)")
                    return fail(.writeError)
                }
            case .writeSame(let offset, let blocks, let unmap):
                let block = Int(unit.blockSize)
                guard reader.remaining >= UInt64(block) else { return fail(.invalidField) }
                let data = try reader.read(block)
                outcome.dataOut = UInt64(block)
                do {
                    if data.allSatisfy({ $0 == 0 }) {
                        try backend.writeZeroes(at: offset, length: blocks * UInt64(block))
                    } else {
                        guard !unmap else { return fail(.invalidField) }
                        for i in 0..<blocks { try backend.write(data, at: offset + i * UInt64(block)) }
                    }
                } catch {
                    log.error("virtio-scsi: WRITE SAME of \(blocks) blocks at \(offset) failed: \(error)")
                    return fail(Self.isNoSpace(error) ? .spaceAllocationFailed : .writeError)
                }
            case .unmap(let parameterLength):
                let n = min(UInt64(parameterLength), reader.remaining)
                let list = try reader.read(Int(n))
                outcome.dataOut = n
                guard list.count >= 8 else { return list.isEmpty ? outcome : fail(.invalidParameter) }
                let descriptors = Int(be16(list, 2)) / 16
                guard descriptors <= Int(SCSILogicalUnit.maxUnmapDescriptors), 8 + 16 * descriptors <= list.count else {
                    return fail(.invalidParameter)
                }
                let blocks = backend.size / unit.blockSize
                var ranges: [(UInt64, UInt64)] = []
                for d in 0..<descriptors {
                    let lba = be64(list, 8 + 16 * d), count = UInt64(be32(list, 16 + 16 * d))
                    guard lba <= blocks, count <= blocks - lba else { return fail(.lbaOutOfRange) }
                    ranges.append((lba, count))
                }
                do {
                    for (lba, count) in ranges where count > 0 {
                        try backend.discard(at: lba * unit.blockSize, length: count * unit.blockSize)
                    }
                } catch {
                    log.error("virtio-scsi: UNMAP failed: \(error)")
                    return fail(.writeError)
                }
            }
        } catch {
            log.error("virtio-scsi: request at head \(chain.head): \(error)")
            outcome = Outcome()
            outcome.response = Response.failure
        }
        return outcome
    }

    /// Whether a backend error is ENOSPC (the host file system is full).
    private static func isNoSpace(_ error: any Error) -> Bool {
        (error as? DiskImageError)?.errno == 28
    }
}
