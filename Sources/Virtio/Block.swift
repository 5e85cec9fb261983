import DiskImage
import GuestMemory
import Devices
import Synchronization

/// virtio-blk (virtio 1.x, section 5.2) on any `BlockBackend`.
///
/// Requests: IN, OUT, FLUSH (answered only after the backend's flush, i.e. fdatasync, returned),
/// GET_ID, DISCARD and WRITE_ZEROES (UNMAP punches holes where the backend can). Sector ranges are
/// checked against the disk size; a read-only backend offers VIRTIO_BLK_F_RO and answers writes
/// with IOERR; unknown request types get UNSUPP. The status byte must be the last device-writable
/// byte of the chain. (Mutable state is guarded by `active`, a Mutex, and `inflight`, a ConditionLock.)
///
/// A `RateLimiter` (bandwidth: the data bytes of IN and OUT requests; ops: every request) holds
/// the queue when it runs out of tokens: the request that did not fit waits (in order) until a
/// timer on the device's event loop resumes the queue. `replaceBackend` swaps the disk between
/// requests (Firecracker's "update block device path") and signals a configuration change.
public final class VirtioBlock: VirtioDevice, @unchecked Sendable {
    /// Feature bits (section 5.2.3).
    public enum Feature {
        public static let sizeMax: UInt64 = 1 << 1
        public static let segMax: UInt64 = 1 << 2
        public static let readOnly: UInt64 = 1 << 5
        public static let blockSize: UInt64 = 1 << 6
        public static let flush: UInt64 = 1 << 9
        public static let discard: UInt64 = 1 << 13
        public static let writeZeroes: UInt64 = 1 << 14
    }
    /// Request types.
    public enum RequestType {
        public static let input: UInt32 = 0
        public static let output: UInt32 = 1
        public static let flush: UInt32 = 4
        public static let getID: UInt32 = 8
        public static let discard: UInt32 = 11
        public static let writeZeroes: UInt32 = 13
    }
    /// Status byte values.
    public enum Status {
        public static let ok: UInt8 = 0
        public static let ioError: UInt8 = 1
        public static let unsupported: UInt8 = 2
    }

    /// Sector size of the protocol.
    public static let sectorSize: UInt64 = 512
    /// Queue size offered.
    public static let queueSize: UInt16 = 256
    /// Largest segment (size_max) and segment count (seg_max) advertised.
    public static let sizeMax: UInt32 = 1 << 20
    public static let segMax: UInt32 = 254
    /// Discard / write-zeroes limits advertised (sectors per request, segments per request).
    public static let maxDiscardSectors: UInt32 = 1 << 22
    public static let maxDiscardSegments: UInt32 = 32
    /// Length of a GET_ID answer.
    public static let idLength = 20

    /// The disk now in use.
    public var backend: any BlockBackend { disk.withLock { $0.backend } }
    /// Serial number returned by GET_ID (at most 20 bytes).
    public let serial: [UInt8]
    /// Limits requests (bandwidth and ops); updatable at run time.
    public let rateLimiter: RateLimiter
    let log: VirtioLog
    /// The backend and its size in sectors, swapped together by `replaceBackend`.
    private struct Disk { var backend: any BlockBackend; var capacitySectors: UInt64 }
    private let disk: Mutex<Disk>
    private let readOnly: Bool
    private let active = Mutex<VirtioActivation?>(nil)
    /// Resumes a queue held by the rate limiter.
    private let throttleTimer: ThrottleTimer
    /// The request popped from the ring that the rate limiter held back; it goes first next time.
    /// Guarded by `active` (only touched inside `active.withLock`).
    private let held = HeldRequest()
    /// Threads running requests in parallel (nil: requests run on the event-loop thread).
    private let workers: IOWorkerPool?
    /// Requests handed to `workers`: their completions, and a generation that a reset bumps.
    private let inflight = ConditionLock()
    private var inflightCount = 0           // guarded by inflight
    private var generation: UInt64 = 0      // guarded by inflight
    private var completions: [(head: UInt16, length: UInt32)] = [] // guarded by inflight

    /// A block device on `backend`; `serial` (truncated to 20 bytes) answers GET_ID. With
    /// `ioThreads` > 0, requests run on that many threads in parallel (for backends without an
    /// internal lock, such as `RawFileBackend`) and complete in any order. `rateLimit` limits
    /// the requests; the timer that resumes a throttled queue runs on `eventLoop` (the loop that
    /// processes this device's queue; nil: a dispatch timer).
    public init(backend: any BlockBackend, serial: String, ioThreads: Int = 0, rateLimit: RateLimitConfig? = nil,
                eventLoop: EventLoop? = nil, log: VirtioLog = .discard) {
        self.disk = Mutex(Disk(backend: backend, capacitySectors: backend.size / Self.sectorSize))
        self.readOnly = backend.isReadOnly
        self.serial = Array(serial.utf8.prefix(Self.idLength))
        self.log = log
        self.rateLimiter = RateLimiter(rateLimit ?? RateLimitConfig())
        self.workers = ioThreads > 0 ? IOWorkerPool(threads: ioThreads, name: "virtio-blk-io") : nil
        self.throttleTimer = ThrottleTimer(loop: eventLoop, log: log)
        throttleTimer.setAction { [weak self] in self?.resume() }
    }

    /// Capacity of the disk now in use, in 512-byte sectors.
    public var capacitySectors: UInt64 { disk.withLock { $0.capacitySectors } }

    /// Asks for the queue to be processed again (the throttle timer fired, or the limits changed).
    public func resume() {
        active.withLock { $0 }?.schedule(0)
    }

    /// Changes the rate limiter's buckets and lets a held request try again at once.
    public func updateRateLimit(bandwidth: RateLimiter.BucketUpdate, ops: RateLimiter.BucketUpdate) {
        rateLimiter.update(bandwidth: bandwidth, ops: ops)
        resume()
    }

    /// Swaps in a new backend between requests: waits for the requests in flight on the old disk
    /// (new ones wait too), flushes it, calls `open` for the new one, switches, updates the
    /// capacity in the configuration space and signals a configuration change. Flushing first
    /// matters when `open` reopens the same image (a qcow2 image's cached metadata is written
    /// before the new instance reads it). Returns the old backend (the caller closes it), or nil
    /// when the new backend's read-only state differs (the driver negotiated VIRTIO_BLK_F_RO; the
    /// new one is closed and the old one stays). Errors of the flush or of `open` are thrown and
    /// leave the old backend in use.
    public func replaceBackend(_ open: () throws -> any BlockBackend) throws -> (any BlockBackend)? {
        let (old, activation): ((any BlockBackend)?, VirtioActivation?) = try active.withLock { a in
            // Holding `active` keeps new requests from starting; wait for the running ones.
            inflight.lock()
            defer { inflight.unlock() }
            while inflightCount > 0 { inflight.wait() }
            let current = disk.withLock { $0.backend }
            try current.flush()
            let newBackend = try open()
            guard newBackend.isReadOnly == readOnly else {
                try? newBackend.close()
                return (nil, nil)
            }
            disk.withLock { $0 = Disk(backend: newBackend, capacitySectors: newBackend.size / Self.sectorSize) }
            return (current, a)
        }
        activation?.interrupt.signalConfigChange()
        return old
    }

    public var deviceType: VirtioDeviceType { .block }

    public var deviceFeatures: UInt64 {
        var f = Feature.sizeMax | Feature.segMax | Feature.blockSize | Feature.flush
        if readOnly { f |= Feature.readOnly } else { f |= Feature.discard | Feature.writeZeroes }
        return f
    }

    public var queueMaxSizes: [UInt16] { [Self.queueSize] }

    public var configSize: Int { 60 }

    /// The configuration image (struct virtio_blk_config).
    var configBytes: [UInt8] {
        var c = [UInt8](repeating: 0, count: 60)
        c.putLE(disk.withLock { $0.capacitySectors }, at: 0)
        c.putLE(Self.sizeMax, at: 8)
        c.putLE(Self.segMax, at: 12)
        c.putLE(UInt32(Self.sectorSize), at: 20)      // blk_size
        c.putLE(UInt16(1), at: 34)                    // num_queues
        c.putLE(Self.maxDiscardSectors, at: 36)
        c.putLE(Self.maxDiscardSegments, at: 40)
        c.putLE(UInt32(1), at: 44)                    // discard_sector_alignment
        c.putLE(Self.maxDiscardSectors, at: 48)       // max_write_zeroes_sectors
        c.putLE(Self.maxDiscardSegments, at: 52)
        c[56] = 1                                     // write_zeroes_may_unmap
        return c
    }

    public func readConfig(offset: Int, data: UnsafeMutableRawBufferPointer) {
        copyConfig(configBytes, offset: offset, into: data)
    }

    public func writeConfig(offset: Int, data: UnsafeRawBufferPointer) {
        // Only `writeback` would be writable (CONFIG_WCE, not offered): ignore.
    }

    public func activate(_ activation: VirtioActivation) throws(VirtioError) {
        guard activation.queues.first.flatMap({ $0 }) != nil else {
            throw .queueConfiguration(queue: 0, reason: "virtio-blk needs its request queue enabled")
        }
        active.withLock { $0 = activation }
    }

    public func reset() {
        // Requests still running write guest memory: wait for them, and drop their completions.
        inflight.lock()
        generation &+= 1
        while inflightCount > 0 { inflight.wait() }
        completions = []
        inflight.unlock()
        active.withLock { a in
            a = nil
            held.chain = nil
        }
    }

    public func shutdown() {
        reset()
        workers?.shutdown()
    }

    /// Waits for the requests running on the I/O threads and returns their completions to the ring.
    public func quiesce() {
        guard workers != nil else { return }
        inflight.lock()
        while inflightCount > 0 { inflight.wait() }
        let done = completions
        completions = []
        inflight.unlock()
        guard !done.isEmpty else { return }
        active.withLock { a in
            guard let a, let q = a.queues.first ?? nil else { return }
            for c in done { q.addUsed(head: c.head, length: c.length) }
            if q.needsInterrupt() { a.interrupt.signalQueue(0) }
        }
    }

    /// The request the rate limiter holds back.
    public func unconsumedChains(queue index: Int) -> UInt16 {
        active.withLock { _ in index == 0 && held.chain != nil ? 1 : 0 }
    }

    public func processQueue(_ index: Int) throws(VirtioError) {
        let result: Result<Void, VirtioError> = active.withLock { a in
            guard let a, index == 0, let q = a.queues.first ?? nil else { return .success(()) }
            do throws(VirtioError) {
                if let workers {
                    try processAsync(q, a, workers)
                } else {
                    let added = try pump(q, a) { chain in
                        q.addUsed(head: chain.head, length: handle(chain, memory: a.memory))
                        return true
                    }
                    if added && q.needsInterrupt() { a.interrupt.signalQueue(0) }
                }
                return .success(())
            } catch { return .failure(error) }
        }
        try result.get()
    }

    /// Takes requests from the ring (the held one first) while the rate limiter allows them; see
    /// `Virtqueue.serve(throttledBy:…)`. Call inside `active.withLock`.
    private func pump(_ q: Virtqueue, _ a: VirtioActivation, submit: (DescriptorChain) -> Bool) throws(VirtioError) -> Bool {
        try q.serve(throttledBy: rateLimiter, timer: throttleTimer, held: held, log: log,
                    cost: { dataBytes($0, memory: a.memory) }, handle: submit)
    }

    /// The data bytes a request moves, as the bandwidth bucket counts them: the buffer of IN and
    /// OUT requests, 0 for the others (and for requests too short to have a type; they fail).
    func dataBytes(_ chain: DescriptorChain, memory: GuestMemory) -> UInt64 {
        // The type may straddle descriptors: read it as the request handler does.
        var reader = ChainReader(memory: memory, chain: chain)
        guard let bytes = try? reader.read(4), let type = bytes.getLE(UInt32.self, at: 0) else { return 0 }
        switch type {
        case RequestType.input: return chain.writableLength > 0 ? chain.writableLength - 1 : 0
        case RequestType.output: return chain.readableLength > 16 ? chain.readableLength - 16 : 0
        default: return 0
        }
    }

    /// Returns finished requests to the ring, then hands new ones to the workers.
    private func processAsync(_ q: Virtqueue, _ a: VirtioActivation, _ workers: IOWorkerPool) throws(VirtioError) {
        inflight.lock()
        let done = completions
        completions = []
        let gen = generation
        inflight.unlock()
        for c in done { q.addUsed(head: c.head, length: c.length) }
        var added = !done.isEmpty
        if try pump(q, a, submit: { chain in
                inflight.lock()
                inflightCount += 1
                inflight.unlock()
                let memory = a.memory, schedule = a.schedule
                workers.submit { [self] in
                    let length = handle(chain, memory: memory)
                    inflight.lock()
                    if generation == gen { completions.append((chain.head, length)) }
                    inflightCount -= 1
                    inflight.broadcast()
                    inflight.unlock()
                    schedule(0)
                }
                return false
        }) { added = true }
        if added && q.needsInterrupt() { a.interrupt.signalQueue(0) }
    }

    /// Executes one request chain; returns the used length (data written + status byte).
    func handle(_ chain: DescriptorChain, memory: GuestMemory) -> UInt32 {
        let disk = self.disk.withLock { $0 }
        let backend = disk.backend
        // The status byte is the chain's last writable byte.
        guard let last = chain.writable.last(where: { $0.length > 0 }) else {
            log.error("\(VirtioError.badRequest(queue: chain.queue, head: chain.head, reason: "virtio-blk request without a device-writable status byte"))")
            return 0
        }
        let statusAddress = last.address + UInt64(last.length) - 1
        let dataWritable = chain.writableLength - 1
        var reader = ChainReader(memory: memory, chain: chain)
        var status = Status.ok
        var written: UInt64 = 0
        do {
            let header = try reader.read(16)
            let type = header.getLE(UInt32.self, at: 0) ?? 0
            let sector = header.getLE(UInt64.self, at: 8) ?? 0
            switch type {
            case RequestType.input:
                guard reader.remaining == 0 else {
                    throw BlockRequestError.status(Status.ioError, "read request with \(reader.remaining) device-readable data bytes (the data buffer must be device-writable)")
                }
                let n = dataWritable
                try checkData(chain, sector: sector, bytes: n, capacity: disk.capacitySectors)
                var writer = ChainWriter(memory: memory, chain: chain)
                var pos = sector * Self.sectorSize
                if let vectored = backend as? any VectoredBlockBackend {
                    // SAFETY: the slices point into guest RAM, which `memory` keeps mapped during the call.
                    var segments: [UnsafeMutableRawBufferPointer] = []
                    try writer.forEachSegment(Int(n)) { segments.append($0) }
                    try vectored.read(into: segments, at: pos)
                } else {
                    try writer.forEachSegment(Int(n)) { seg in
                        try backend.read(into: seg, at: pos)
                        pos += UInt64(seg.count)
                    }
                }
                written = n
            case RequestType.output:
                guard !backend.isReadOnly else { throw BlockRequestError.status(Status.ioError, "write to a read-only disk") }
                guard dataWritable == 0 else {
                    throw BlockRequestError.status(Status.ioError, "write request with \(dataWritable) device-writable data bytes (the data buffer must be device-readable)")
                }
                let n = reader.remaining
                try checkData(chain, sector: sector, bytes: n, capacity: disk.capacitySectors)
                var pos = sector * Self.sectorSize
                if let vectored = backend as? any VectoredBlockBackend {
                    // SAFETY: as for IN above.
                    var segments: [UnsafeRawBufferPointer] = []
                    try reader.forEachSegment(Int(n)) { segments.append(UnsafeRawBufferPointer($0)) }
                    try vectored.write(segments, at: pos)
                } else {
                    try reader.forEachSegment(Int(n)) { seg in
                        try backend.write(UnsafeRawBufferPointer(seg), at: pos)
                        pos += UInt64(seg.count)
                    }
                }
            case RequestType.flush:
                try backend.flush()
            case RequestType.getID:
                let n = Int(min(UInt64(Self.idLength), dataWritable))
                var id = serial + [UInt8](repeating: 0, count: Self.idLength - serial.count)
                id.removeLast(Self.idLength - n)
                var writer = ChainWriter(memory: memory, chain: chain)
                try writer.write(id)
                written = UInt64(n)
            case RequestType.discard, RequestType.writeZeroes:
                guard !backend.isReadOnly else { throw BlockRequestError.status(Status.ioError, "discard/write-zeroes on a read-only disk") }
                try discardOrZero(type: type, reader: &reader, chain: chain, backend: backend, capacity: disk.capacitySectors)
            default:
                throw BlockRequestError.status(Status.unsupported, "unsupported request type \(type)")
            }
        } catch let e as BlockRequestError {
            if case .status(let s, let why) = e {
                status = s
                if s == Status.ioError { log.error("virtio-blk \(serialString), request at head \(chain.head): \(why)") }
            }
        } catch let e as VirtioError {
            status = Status.ioError
            log.error("virtio-blk \(serialString): \(e)")
        } catch {
            status = Status.ioError
            log.error("virtio-blk \(serialString), request at head \(chain.head): backend error: \(error)")
        }
        do {
            try memory.write([status], at: statusAddress)
        } catch {
            log.error("\(VirtioError.memory(queue: chain.queue, head: chain.head, address: statusAddress, length: 1))")
            return 0
        }
        return UInt32(truncatingIfNeeded: written + 1)
    }

    /// The serial as text (for messages).
    public var serialString: String { String(decoding: serial, as: UTF8.self) }

    /// Checks a data transfer: a whole number of sectors inside the disk.
    private func checkData(_ chain: DescriptorChain, sector: UInt64, bytes: UInt64, capacity: UInt64) throws {
        guard bytes % Self.sectorSize == 0 else {
            throw BlockRequestError.status(Status.ioError, "data length \(bytes) is not a multiple of 512")
        }
        try checkRange(sector: sector, sectors: bytes / Self.sectorSize, capacity: capacity)
    }

    private func checkRange(sector: UInt64, sectors: UInt64, capacity: UInt64) throws {
        let (end, o) = sector.addingReportingOverflow(sectors)
        guard !o, end <= capacity else {
            throw BlockRequestError.status(Status.ioError, "sectors \(sector)+\(sectors) are past the end of the disk (\(capacity) sectors)")
        }
    }

    private func discardOrZero(type: UInt32, reader: inout ChainReader, chain: DescriptorChain,
                               backend: any BlockBackend, capacity: UInt64) throws {
        let count = reader.remaining / 16
        guard count >= 1, reader.remaining % 16 == 0 else {
            throw BlockRequestError.status(Status.ioError, "discard/write-zeroes payload of \(reader.remaining) bytes is not whole 16-byte segments")
        }
        guard count <= UInt64(Self.maxDiscardSegments) else {
            throw BlockRequestError.status(Status.ioError, "\(count) discard/write-zeroes segments, more than \(Self.maxDiscardSegments)")
        }
        for _ in 0..<count {
            let seg = try reader.read(16)
            let sector = seg.getLE(UInt64.self, at: 0) ?? 0
            let n = UInt64(seg.getLE(UInt32.self, at: 8) ?? 0)
            let flags = seg.getLE(UInt32.self, at: 12) ?? 0
            guard n <= UInt64(Self.maxDiscardSectors) else {
                throw BlockRequestError.status(Status.ioError, "\(n) sectors in one segment, more than \(Self.maxDiscardSectors)")
            }
            if type == RequestType.discard, flags != 0 {
                throw BlockRequestError.status(Status.unsupported, "discard with flags 0x\(String(flags, radix: 16))")
            }
            if type == RequestType.writeZeroes, flags & ~1 != 0 {
                throw BlockRequestError.status(Status.unsupported, "write-zeroes with unknown flags 0x\(String(flags, radix: 16))")
            }
            try checkRange(sector: sector, sectors: n, capacity: capacity)
            if n == 0 { continue }
            if type == RequestType.discard {
                try backend.discard(at: sector * Self.sectorSize, length: n * Self.sectorSize)
            } else {
                // UNMAP or not, the backend zeroes by deallocating where it can.
                try backend.writeZeroes(at: sector * Self.sectorSize, length: n * Self.sectorSize)
            }
        }
    }
}

/// A request answered with a specific status byte.
enum BlockRequestError: Error {
    case status(UInt8, String)
}
