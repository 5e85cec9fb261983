import Devices
import GuestMemory
import Net
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Counters of one virtio-net device, named as Firecracker's `net` metrics.
public struct NetCounters: Sendable, Equatable, Codable {
    /// Frames handed to the guest and their bytes (without the virtio header).
    public var rxPackets: UInt64 = 0
    public var rxBytes: UInt64 = 0
    /// Frames sent by the guest and their bytes.
    public var txPackets: UInt64 = 0
    public var txBytes: UInt64 = 0
    /// Backend read errors, and frames too short to be Ethernet.
    public var rxFails: UInt64 = 0
    /// Frames the MAC filter dropped (not for this NIC, promiscuous mode off).
    public var rxFiltered: UInt64 = 0
    /// Backend write errors (a TAP refusing a bad offload header is one).
    public var txFails: UInt64 = 0
    /// Guest chains that were not a valid frame (no header, too long, bad buffers): returned unused.
    public var txMalformedFrames: UInt64 = 0
    /// Malformed receive chains (returned with length 0).
    public var rxMalformedChains: UInt64 = 0
    /// Times the receive path stopped for lack of guest buffers.
    public var noRxAvailBuffer: UInt64 = 0
    /// Times a rate limiter held a direction back.
    public var rxRateLimiterThrottled: UInt64 = 0
    public var txRateLimiterThrottled: UInt64 = 0
    /// Used-buffer interrupts raised per direction.
    public var rxInterrupts: UInt64 = 0
    public var txInterrupts: UInt64 = 0
    public init() {}
}

/// virtio-net (virtio 1.x, section 5.1) on any `NetBackend`: one receive/transmit queue pair and
/// a control queue.
///
/// - Frames move between guest buffers and the backend without a copy: the device gathers the
///   guest's buffers as iovecs and the backend reads (readv) or writes (writev) them directly.
///   The 12-byte `virtio_net_hdr` passes through to a TAP as it is, so checksum and segmentation
///   offloads (CSUM, HOST_TSO4/6/ECN/UFO; GUEST_* enabled on the TAP with TUNSETOFFLOAD) cost
///   nothing here.
/// - Receive: with MRG_RXBUF a frame spans as many buffers as it needs (`num_buffers`); the
///   device keeps the buffers it took but did not fill for the next frame. When the guest has no
///   room for a largest frame, the device stops watching the backend (the frame waits in the
///   backend's queue) and asks the driver for a notification.
/// - Transmit: a chain whose readable part is not a header plus at most a largest frame, or lies
///   outside RAM, is returned unused and counted; a backend that would block holds the chain and
///   the device waits until the backend is writable.
/// - Control queue: RX mode (promiscuous, all-multicast, …), MAC tables and MAC address, guest
///   offloads. Received frames are filtered by destination MAC unless promiscuous.
/// - Rate limiters (Firecracker's token buckets) per direction: bytes and frames.
///
/// Backend readiness, queue notifications and throttle timers all run on one `EventLoop`
/// thread; a lock guards the state against activate/reset from vCPU threads.
public final class VirtioNet: VirtioDevice, @unchecked Sendable {
    /// Feature bits (virtio 1.x 5.1.3).
    public enum Feature {
        public static let csum: UInt64 = 1 << 0
        public static let guestCsum: UInt64 = 1 << 1
        public static let ctrlGuestOffloads: UInt64 = 1 << 2
        public static let mac: UInt64 = 1 << 5
        public static let guestTSO4: UInt64 = 1 << 7
        public static let guestTSO6: UInt64 = 1 << 8
        public static let guestECN: UInt64 = 1 << 9
        public static let guestUFO: UInt64 = 1 << 10
        public static let hostTSO4: UInt64 = 1 << 11
        public static let hostTSO6: UInt64 = 1 << 12
        public static let hostECN: UInt64 = 1 << 13
        public static let hostUFO: UInt64 = 1 << 14
        public static let mrgRxbuf: UInt64 = 1 << 15
        public static let status: UInt64 = 1 << 16
        public static let ctrlVQ: UInt64 = 1 << 17
        public static let ctrlRx: UInt64 = 1 << 18
        public static let ctrlMacAddr: UInt64 = 1 << 23
    }
    /// Queue size offered for each queue.
    public static let queueSize: UInt16 = 256
    /// The virtio_net_hdr size (virtio 1.x: with num_buffers).
    public static let headerSize = 12
    /// Largest frame without segmentation offloads: 1514 bytes plus a VLAN tag.
    public static let maxPlainFrame = 1518
    /// Largest frame with segmentation offloads (Linux's 64 KiB GSO limit plus headers).
    public static let maxOffloadFrame = 65550
    /// Frames handled per wake-up and direction before yielding to the other work of the loop.
    static let batch = 256

    /// The backend frames go to and come from.
    public let backend: any NetBackend
    /// The MAC address reported in the configuration space.
    public let mac: [UInt8]
    let log: VirtioLog
    /// Limits received bytes and frames.
    public let rxRateLimiter: RateLimiter
    /// Limits sent bytes and frames.
    public let txRateLimiter: RateLimiter
    private let loop: EventLoop
    private let rxTimer: ThrottleTimer
    private let txTimer: ThrottleTimer
    private let watch = Mutex<EventLoop.Token?>(nil)

    /// A receive chain taken from the ring and not yet used, with its buffers as host iovecs.
    struct RxChain {
        let chain: DescriptorChain
        let iov: [iovec]
        let space: Int
    }
    /// Receive filtering (the control queue's RX and MAC classes).
    struct Filter: Equatable {
        var promiscuous = true
        var allMulticast = false
        var allUnicast = false
        var noMulticast = false
        var noUnicast = false
        var noBroadcast = false
        var unicast: [[UInt8]] = []
        var multicast: [[UInt8]] = []
    }
    struct State {
        var active: VirtioActivation?
        var mergeable = false
        var maxFrame = VirtioNet.maxPlainFrame
        var rxChains: [RxChain] = []
        var rxSpace = 0
        var rxStarved = false
        var rxThrottled = false
        var txHeld: DescriptorChain?
        var txBlocked = false
        var txThrottled = false
        /// The backend closed its end (a passt process ended): nothing more to read.
        var backendGone = false
        var watching: EventLoop.Readiness = []
        var mac: [UInt8]
        var filter = Filter()
        var counters = NetCounters()
        var iov: [iovec] = []
    }
    private let state: Mutex<State>

    /// A device on `backend` with address `mac` (6 bytes), whose backend readiness and timers run
    /// on `eventLoop` (the loop its transport uses). Guest-caused errors go to `log`.
    public init(backend: any NetBackend, mac: [UInt8], eventLoop: EventLoop, rxRateLimit: RateLimitConfig? = nil,
                txRateLimit: RateLimitConfig? = nil, log: VirtioLog = .discard) throws {
        precondition(mac.count == 6, "a MAC address has 6 bytes")
        self.backend = backend
        self.mac = mac
        self.log = log
        self.loop = eventLoop
        rxRateLimiter = RateLimiter(rxRateLimit ?? RateLimitConfig())
        txRateLimiter = RateLimiter(txRateLimit ?? RateLimitConfig())
        rxTimer = ThrottleTimer(loop: eventLoop, log: log)
        txTimer = ThrottleTimer(loop: eventLoop, log: log)
        state = Mutex(State(mac: mac))
        rxTimer.setAction { [weak self] in self?.rxUnthrottled() }
        txTimer.setAction { [weak self] in self?.txUnthrottled() }
        let token = try eventLoop.watch(backend.fd, for: []) { [weak self] events in self?.backendReady(events) }
        watch.withLock { $0 = token }
    }

    deinit {
        if let t = watch.withLock({ $0 }) { loop.remove(t) }
    }

    public var deviceType: VirtioDeviceType { .net }

    public var deviceFeatures: UInt64 {
        var f = Feature.mac | Feature.status | Feature.mrgRxbuf | Feature.ctrlVQ | Feature.ctrlRx | Feature.ctrlMacAddr
        if backend.hasVnetHeader {
            let o = backend.supportedOffloads
            if o.contains(.checksum) {
                f |= Feature.csum | Feature.guestCsum | Feature.ctrlGuestOffloads
                if o.contains(.tso4) { f |= Feature.hostTSO4 | Feature.guestTSO4 }
                if o.contains(.tso6) { f |= Feature.hostTSO6 | Feature.guestTSO6 }
                if o.contains(.tsoECN) { f |= Feature.hostECN | Feature.guestECN }
                if o.contains(.ufo) { f |= Feature.hostUFO | Feature.guestUFO }
            }
        }
        return f
    }

    public var queueMaxSizes: [UInt16] { [Self.queueSize, Self.queueSize, 64] }
    public var configSize: Int { 12 }

    public func readConfig(offset: Int, data: UnsafeMutableRawBufferPointer) {
        var c = state.withLock { $0.mac } + [UInt8](repeating: 0, count: 6)
        c.putLE(UInt16(1), at: 6) // status: VIRTIO_NET_S_LINK_UP
        c.putLE(UInt16(1), at: 8) // max_virtqueue_pairs
        c.putLE(UInt16(1500), at: 10) // mtu (meaningful only with VIRTIO_NET_F_MTU, not offered)
        copyConfig(c, offset: offset, into: data)
    }

    /// The configuration is read-only in virtio 1.x (the MAC changes through the control queue).
    public func writeConfig(offset: Int, data: UnsafeRawBufferPointer) {}

    /// A snapshot of the counters.
    public var counters: NetCounters { state.withLock { $0.counters } }

    /// The current MAC address (changed by the driver with VIRTIO_NET_CTRL_MAC_ADDR_SET).
    public var currentMAC: [UInt8] { state.withLock { $0.mac } }

    /// Offloads the guest accepts, from its GUEST_* features.
    static func guestOffloads(_ features: UInt64) -> NetOffloads {
        var o: NetOffloads = []
        if features & Feature.guestCsum != 0 { o.insert(.checksum) }
        if features & Feature.guestTSO4 != 0 { o.insert(.tso4) }
        if features & Feature.guestTSO6 != 0 { o.insert(.tso6) }
        if features & Feature.guestECN != 0 { o.insert(.tsoECN) }
        if features & Feature.guestUFO != 0 { o.insert(.ufo) }
        return o
    }

    /// The largest frame the backend may deliver with these guest offloads.
    func maxFrame(_ offloads: NetOffloads) -> Int {
        if let m = backend.maximumFrameSize { return m }
        return offloads.isDisjoint(with: [.tso4, .tso6, .ufo]) ? Self.maxPlainFrame : Self.maxOffloadFrame
    }

    public func activate(_ activation: VirtioActivation) throws(VirtioError) {
        let offloads = Self.guestOffloads(activation.features)
        if backend.hasVnetHeader {
            do throws(NetError) { try backend.setOffloads(offloads) } catch { log.error("virtio-net \(backend.label): \(error)") }
        }
        state.withLock { s in
            s = State(mac: s.mac)
            s.active = activation
            s.mergeable = activation.features & Feature.mrgRxbuf != 0
            s.maxFrame = maxFrame(offloads)
            updateWatch(&s)
        }
    }

    public func reset() {
        state.withLock { s in
            s.active = nil
            s.rxChains = []
            s.rxSpace = 0
            s.txHeld = nil
            s.filter = Filter()
            s.mac = mac
            updateWatch(&s)
        }
        if backend.hasVnetHeader { try? backend.setOffloads([]) }
    }

    /// Receive chains taken ahead of frames (queue 0) and the transmit chain the backend or the
    /// rate limiter holds back (queue 1).
    public func unconsumedChains(queue index: Int) -> UInt16 {
        state.withLock { s in
            switch index {
            case 0: UInt16(clamping: s.rxChains.count)
            case 1: s.txHeld == nil ? 0 : 1
            default: 0
            }
        }
    }

    public func shutdown() {
        reset()
        if let t = watch.withLock({ v -> EventLoop.Token? in defer { v = nil }; return v }) { loop.remove(t) }
    }

    public func processQueue(_ index: Int) throws(VirtioError) {
        switch index {
        case 0:
            try withActive { s, a throws(VirtioError) in
                s.rxStarved = false
                try receive(&s, a)
            }
        case 1: try withActive { s, a throws(VirtioError) in try transmit(&s, a) }
        case 2: try withActive { s, a throws(VirtioError) in try control(&s, a) }
        default: break
        }
    }

    /// The rate limiters were changed: retry whatever they held back.
    public func rateLimitsChanged() {
        rxTimer.arm(afterNs: 1)
        txTimer.arm(afterNs: 1)
    }

    // MARK: Event-loop entry points

    private func backendReady(_ events: EventLoop.Readiness) {
        let result: Result<Void, VirtioError> = state.withLock { s in
            guard let a = s.active else { updateWatch(&s); return .success(()) }
            do throws(VirtioError) {
                if events.contains(.writable) || events.contains(.error) || events.contains(.hangUp) {
                    s.txBlocked = false
                    if s.txHeld != nil { try transmit(&s, a) }
                }
                if events.contains(.readable) || events.contains(.error) { try receive(&s, a) }
                if events.contains(.hangUp) && !events.contains(.readable) && !s.backendGone {
                    // The peer went away (a passt process ended): stop watching it.
                    log.error("virtio-net \(backend.label): the backend hung up")
                    s.backendGone = true
                    updateWatch(&s)
                }
                return .success(())
            } catch { return .failure(error) }
        }
        if case .failure(let e) = result { fail(e) }
    }

    private func rxUnthrottled() {
        let result: Result<Void, VirtioError> = state.withLock { s in
            s.rxThrottled = false
            guard let a = s.active else { return .success(()) }
            do throws(VirtioError) { try receive(&s, a) } catch { return .failure(error) }
            return .success(())
        }
        if case .failure(let e) = result { fail(e) }
    }

    private func txUnthrottled() {
        let result: Result<Void, VirtioError> = state.withLock { s in
            s.txThrottled = false
            guard let a = s.active else { return .success(()) }
            do throws(VirtioError) { try transmit(&s, a) } catch { return .failure(error) }
            return .success(())
        }
        if case .failure(let e) = result { fail(e) }
    }

    /// A queue-fatal error outside `processQueue` (where the transport would handle it): the
    /// device stops using its queues, as after DEVICE_NEEDS_RESET, until the driver resets it.
    private func fail(_ error: VirtioError) {
        log.error("virtio-net \(backend.label): \(error); the device stops until the driver resets it")
        state.withLock { s in
            s.active = nil
            updateWatch(&s)
        }
    }

    private func withActive(_ body: (inout State, VirtioActivation) throws(VirtioError) -> Void) throws(VirtioError) {
        let r: Result<Void, VirtioError> = state.withLock { s in
            guard let a = s.active else { return .success(()) }
            do throws(VirtioError) { try body(&s, a) } catch { return .failure(error) }
            return .success(())
        }
        try r.get()
    }

    /// Watches the backend for what the device can do now: reading while the guest has buffers
    /// and the limiter allows, writing while a frame waits for room.
    private func updateWatch(_ s: inout State) {
        var want: EventLoop.Readiness = []
        if s.active != nil {
            if !s.rxStarved && !s.rxThrottled && !s.backendGone { want.insert(.readable) }
            if s.txBlocked { want.insert(.writable) }
        }
        guard want != s.watching, let token = watch.withLock({ $0 }) else { return }
        do {
            try loop.change(token, to: want)
            s.watching = want
        } catch {
            log.error("virtio-net \(backend.label): \(error)")
        }
    }

    // MARK: Receive

    private func receive(_ s: inout State, _ a: VirtioActivation) throws(VirtioError) {
        guard a.queues.count > 0, let q = a.queues[0] else { return }
        var added = false
        defer {
            if added && q.needsInterrupt() {
                s.counters.rxInterrupts += 1
                a.interrupt.signalQueue(0)
            }
            updateWatch(&s)
        }
        let needed = Self.headerSize + s.maxFrame
        // Looked up once per batch (a lock round trip), not per frame.
        let limited = rxRateLimiter.isLimiting
        for _ in 0..<Self.batch {
            // Enough room for a largest frame: one chain without MRG_RXBUF, else as many as it takes.
            while s.mergeable ? s.rxSpace < needed : s.rxChains.isEmpty {
                guard let item = try q.popAvailable() else {
                    if q.enableNotification() { continue }
                    break
                }
                switch item {
                case .chain(let chain):
                    if let rx = rxChain(chain, a.memory) {
                        s.rxChains.append(rx)
                        s.rxSpace += rx.space
                    } else {
                        s.counters.rxMalformedChains += 1
                        q.addUsed(head: chain.head, length: 0)
                        added = true
                    }
                case .malformed(let head, let error):
                    log.error("\(error)")
                    s.counters.rxMalformedChains += 1
                    q.addUsed(head: head, length: 0)
                    added = true
                }
            }
            guard s.mergeable ? s.rxSpace >= needed : !s.rxChains.isEmpty else {
                s.counters.noRxAvailBuffer += 1
                s.rxStarved = true
                return
            }
            if limited, case .throttled(let ns) = rxRateLimiter.consume(bytes: 1, ops: 1) {
                s.counters.rxRateLimiterThrottled += 1
                s.rxThrottled = true
                rxTimer.arm(afterNs: ns)
                return
            }
            // The iovecs of the chains the frame may use.
            s.iov.removeAll(keepingCapacity: true)
            for rx in s.mergeable ? s.rxChains[...] : s.rxChains.prefix(1) { s.iov.append(contentsOf: rx.iov) }
            var n: Int
            if backend.hasVnetHeader {
                n = s.iov.withUnsafeBufferPointer { backend.receive(into: $0) }
            } else {
                n = s.iov.withUnsafeMutableBufferPointer { iov in
                    Self.zero(Self.headerSize, of: iov)
                    return Self.withSkipped(Self.headerSize, of: iov) { backend.receive(into: $0) }
                }
                if n >= 0 { n += Self.headerSize }
            }
            if n == -Int(EAGAIN) || n == 0 { return }
            if n == -Int(EPIPE) || n == -Int(ECONNRESET) {
                if !s.backendGone { log.error("virtio-net \(backend.label): the backend closed its end") }
                s.backendGone = true
                return
            }
            if n == -Int(EMSGSIZE) {
                // The backend dropped a frame too large for the guest's buffers.
                s.counters.rxFails += 1
                continue
            }
            if n < 0 {
                s.counters.rxFails += 1
                log.error("virtio-net \(backend.label): read failed: \(String(cString: strerror(Int32(-n))))")
                return
            }
            if limited { rxRateLimiter.charge(bytes: UInt64(n - Self.headerSize - 1)) }
            guard n >= Self.headerSize + 14 else { s.counters.rxFails += 1; continue }
            // (The filter is read in place: passing the whole State would retain each of its arrays per frame.)
            guard s.filter.promiscuous || accepts(s.filter, mac: s.mac, destination: s.iov, offset: Self.headerSize) else {
                s.counters.rxFiltered += 1
                continue
            }
            // Chains used: as many as the frame filled.
            var used = 0, left = n
            while left > 0 && used < s.rxChains.count {
                left -= min(left, s.rxChains[used].space)
                used += 1
            }
            // num_buffers (header offset 10) before the used entries are published.
            s.iov.withUnsafeBufferPointer { Self.store16(UInt16(used), at: 10, in: $0) }
            left = n
            for rx in s.rxChains.prefix(used) {
                let len = min(left, rx.space)
                q.addUsed(head: rx.chain.head, length: UInt32(len))
                left -= len
                s.rxSpace -= rx.space
            }
            s.rxChains.removeFirst(used)
            s.counters.rxPackets += 1
            s.counters.rxBytes += UInt64(n - Self.headerSize)
            added = true
        }
        // A full batch: come back after the loop's other work (a backend may hold buffered frames
        // while its fd is not readable).
        a.schedule(0)
    }

    /// A receive chain's writable buffers as host iovecs, or nil when it cannot take a header
    /// (too small, or with device-readable buffers, which a receive chain must not have).
    private func rxChain(_ chain: DescriptorChain, _ memory: GuestMemory) -> RxChain? {
        guard chain.readable.isEmpty, chain.writableLength >= UInt64(Self.headerSize),
              chain.writableLength <= UInt64(Int32.max) else {
            log.error("virtio-net: receive chain \(chain.head) has \(chain.readable.count) readable buffers and \(chain.writableLength) writable bytes")
            return nil
        }
        var iov: [iovec] = []
        iov.reserveCapacity(chain.writable.count)
        for b in chain.writable where b.length > 0 {
            guard let p = try? memory.translate(b.address, count: UInt64(b.length)) else { return nil }
            iov.append(iovec(iov_base: p, iov_len: Int(b.length)))
        }
        return RxChain(chain: chain, iov: iov, space: Int(chain.writableLength))
    }

    /// Whether the filter lets a frame with this destination MAC (at `offset` of the iovecs) in.
    private func accepts(_ f: Filter, mac: [UInt8], destination iov: [iovec], offset: Int) -> Bool {
        if f.promiscuous { return true }
        var dst = [UInt8](repeating: 0, count: 6)
        iov.withUnsafeBufferPointer { Self.copyOut(&dst, at: offset, from: $0) }
        if dst.allSatisfy({ $0 == 0xff }) { return !f.noBroadcast }
        if dst[0] & 1 != 0 {
            if f.noMulticast { return false }
            return f.allMulticast || f.multicast.contains(dst)
        }
        if f.noUnicast { return false }
        return f.allUnicast || dst == mac || f.unicast.contains(dst)
    }

    // MARK: Transmit

    private func transmit(_ s: inout State, _ a: VirtioActivation) throws(VirtioError) {
        guard a.queues.count > 1, let q = a.queues[1], !s.txThrottled, !s.txBlocked else { return }
        var added = false
        defer {
            if added && q.needsInterrupt() {
                s.counters.txInterrupts += 1
                a.interrupt.signalQueue(1)
            }
            updateWatch(&s)
        }
        let maxChain = UInt64(Self.headerSize + Self.maxOffloadFrame)
        let limited = txRateLimiter.isLimiting
        for count in 0...Self.batch {
            if count == Self.batch {
                // Let the loop serve the receive side and other devices, then continue.
                a.schedule(1)
                return
            }
            let chain: DescriptorChain
            if let held = s.txHeld {
                chain = held
                s.txHeld = nil
            } else {
                guard let item = try q.popAvailable() else {
                    if q.enableNotification() { continue }
                    return
                }
                switch item {
                case .chain(let c): chain = c
                case .malformed(let head, let error):
                    log.error("\(error)")
                    s.counters.txMalformedFrames += 1
                    q.addUsed(head: head, length: 0)
                    added = true
                    continue
                }
            }
            let length = chain.readableLength
            guard length >= UInt64(Self.headerSize) + 14, length <= maxChain else {
                log.error("virtio-net: transmit chain \(chain.head) has \(length) readable bytes (a frame needs \(Self.headerSize + 14) to \(maxChain))")
                s.counters.txMalformedFrames += 1
                q.addUsed(head: chain.head, length: 0)
                added = true
                continue
            }
            if limited, case .throttled(let ns) = txRateLimiter.consume(bytes: length - UInt64(Self.headerSize)) {
                s.counters.txRateLimiterThrottled += 1
                s.txHeld = chain
                s.txThrottled = true
                txTimer.arm(afterNs: ns)
                return
            }
            s.iov.removeAll(keepingCapacity: true)
            var ok = true
            for b in chain.readable where b.length > 0 {
                guard let p = try? a.memory.translate(b.address, count: UInt64(b.length)) else { ok = false; break }
                s.iov.append(iovec(iov_base: p, iov_len: Int(b.length)))
            }
            guard ok else {
                s.counters.txMalformedFrames += 1
                q.addUsed(head: chain.head, length: 0)
                added = true
                continue
            }
            let n: Int
            if backend.hasVnetHeader {
                n = s.iov.withUnsafeBufferPointer { backend.send($0) }
            } else {
                n = s.iov.withUnsafeMutableBufferPointer { iov in Self.withSkipped(Self.headerSize, of: iov) { backend.send($0) } }
            }
            if n == -Int(EAGAIN) {
                s.txHeld = chain
                s.txBlocked = true
                return
            }
            if n < 0 {
                s.counters.txFails += 1
                log.error("virtio-net \(backend.label): frame of \(length - UInt64(Self.headerSize)) bytes refused: \(String(cString: strerror(Int32(-n))))")
            } else {
                s.counters.txPackets += 1
                s.counters.txBytes += length - UInt64(Self.headerSize)
            }
            q.addUsed(head: chain.head, length: 0)
            added = true
        }
    }

    // MARK: Control queue

    /// Control classes and commands (virtio 1.x 5.1.6.5).
    enum Control {
        static let ok: UInt8 = 0, err: UInt8 = 1
        static let rx: UInt8 = 0, mac: UInt8 = 1, guestOffloads: UInt8 = 5
        static let macTableSet: UInt8 = 0, macAddrSet: UInt8 = 1
    }

    private func control(_ s: inout State, _ a: VirtioActivation) throws(VirtioError) {
        guard a.queues.count > 2, let q = a.queues[2] else { return }
        try q.serve(log: log, interrupt: a.interrupt) { chain in
            var r = ChainReader(memory: a.memory, chain: chain)
            var w = ChainWriter(memory: a.memory, chain: chain)
            guard w.remaining >= 1, let head = try? r.read(2) else {
                log.error("virtio-net: control chain \(chain.head) without a command header or an ack byte")
                return 0
            }
            let body = (try? r.read(Int(min(r.remaining, 4096)))) ?? []
            let ack = command(&s, a, cls: head[0], cmd: head[1], data: body)
            do { try w.write([ack]) } catch { return 0 }
            return 1
        }
    }

    /// Carries out one control command; returns the ack byte.
    func command(_ s: inout State, _ a: VirtioActivation, cls: UInt8, cmd: UInt8, data: [UInt8]) -> UInt8 {
        switch cls {
        case Control.rx:
            guard a.features & Feature.ctrlRx != 0, data.count >= 1 else { return Control.err }
            let on = data[0] != 0
            switch cmd {
            case 0: s.filter.promiscuous = on
            case 1: s.filter.allMulticast = on
            case 2: s.filter.allUnicast = on
            case 3: s.filter.noMulticast = on
            case 4: s.filter.noUnicast = on
            case 5: s.filter.noBroadcast = on
            default: return Control.err
            }
            return Control.ok
        case Control.mac:
            switch cmd {
            case Control.macAddrSet:
                guard a.features & Feature.ctrlMacAddr != 0, data.count == 6 else { return Control.err }
                s.mac = data
                return Control.ok
            case Control.macTableSet:
                guard a.features & Feature.ctrlRx != 0, let (uni, rest) = Self.macTable(data[...]),
                      let (multi, end) = Self.macTable(rest), end.isEmpty else { return Control.err }
                s.filter.unicast = uni
                s.filter.multicast = multi
                return Control.ok
            default: return Control.err
            }
        case Control.guestOffloads:
            guard cmd == 0, a.features & Feature.ctrlGuestOffloads != 0, data.count == 8 else { return Control.err }
            var bits: UInt64 = 0
            for (i, b) in data.enumerated() { bits |= UInt64(b) << (8 * UInt64(i)) }
            let guestBits = Feature.guestCsum | Feature.guestTSO4 | Feature.guestTSO6 | Feature.guestECN | Feature.guestUFO
            // Only offloads that were negotiated may be turned on.
            guard bits & ~(a.features & guestBits) == 0 else { return Control.err }
            do throws(NetError) { try backend.setOffloads(Self.guestOffloads(bits)) } catch {
                log.error("virtio-net \(backend.label): \(error)")
                return Control.err
            }
            s.maxFrame = maxFrame(Self.guestOffloads(bits))
            return Control.ok
        default:
            return Control.err
        }
    }

    /// One `virtio_net_ctrl_mac` table: a little-endian u32 count, then count MACs.
    static func macTable(_ data: ArraySlice<UInt8>) -> ([[UInt8]], ArraySlice<UInt8>)? {
        guard data.count >= 4 else { return nil }
        let i = data.startIndex
        let n = Int(data[i]) | Int(data[i + 1]) << 8 | Int(data[i + 2]) << 16 | Int(data[i + 3]) << 24
        guard n <= 1024, data.count - 4 >= 6 * n else { return nil }
        var macs: [[UInt8]] = []
        for k in 0..<n { macs.append(Array(data[(i + 4 + 6 * k)..<(i + 10 + 6 * k)])) }
        return (macs, data[(i + 4 + 6 * n)...])
    }

    // MARK: iovec helpers

    /// Runs `body` on the iovecs with their first `count` bytes left out.
    static func withSkipped<R>(_ count: Int, of iov: UnsafeMutableBufferPointer<iovec>,
                               _ body: (UnsafeBufferPointer<iovec>) -> R) -> R {
        var skip = count, first = 0
        while first < iov.count && skip >= iov[first].iov_len { skip -= iov[first].iov_len; first += 1 }
        guard first < iov.count else { return body(UnsafeBufferPointer(start: iov.baseAddress, count: 0)) }
        let saved = iov[first]
        iov[first].iov_base = saved.iov_base.map { $0 + skip }
        iov[first].iov_len -= skip
        defer { iov[first] = saved }
        return body(UnsafeBufferPointer(rebasing: iov[first...]))
    }

    /// Zeroes the first `count` bytes of the iovecs.
    static func zero(_ count: Int, of iov: UnsafeMutableBufferPointer<iovec>) {
        var left = count
        for v in iov where left > 0 {
            let n = min(left, v.iov_len)
            v.iov_base?.initializeMemory(as: UInt8.self, repeating: 0, count: n)
            left -= n
        }
    }

    /// Stores a little-endian u16 at byte `offset` of the iovecs (the two bytes may straddle two iovecs).
    static func store16(_ value: UInt16, at offset: Int, in iov: UnsafeBufferPointer<iovec>) {
        var pos = 0, k = 0
        for v in iov {
            // Byte offset + k lies in this iovec: write it, and the next one if it is here too.
            while k < 2 && offset + k < pos + v.iov_len {
                v.iov_base!.storeBytes(of: UInt8(truncatingIfNeeded: value >> (8 * UInt16(k))),
                                       toByteOffset: offset + k - pos, as: UInt8.self)
                k += 1
            }
            if k == 2 { return }
            pos += v.iov_len
        }
    }

    /// Copies `out.count` bytes from byte `offset` of the iovecs.
    static func copyOut(_ out: inout [UInt8], at offset: Int, from iov: UnsafeBufferPointer<iovec>) {
        var pos = 0, k = 0
        for v in iov {
            if pos + v.iov_len > offset {
                var j = max(0, offset - pos)
                while j < v.iov_len && k < out.count {
                    out[k] = v.iov_base!.load(fromByteOffset: j, as: UInt8.self)
                    j += 1; k += 1
                }
            }
            pos += v.iov_len
            if k == out.count { return }
        }
    }
}
