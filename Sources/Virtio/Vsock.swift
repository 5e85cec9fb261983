import Devices
import GuestMemory
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Counters of one virtio-vsock device (named after Firecracker's `vsock` metrics).
public struct VsockCounters: Sendable, Equatable, Codable {
    /// Packets and payload bytes handed to the guest (rx queue).
    public var rxPackets: UInt64 = 0
    public var rxBytes: UInt64 = 0
    /// Packets and payload bytes the guest sent (tx queue).
    public var txPackets: UInt64 = 0
    public var txBytes: UInt64 = 0
    /// Transmit chains that were not a packet: shorter than the header, `len` larger than the
    /// chain or than 64 KiB, buffers outside RAM. Returned unused.
    public var txMalformed: UInt64 = 0
    /// Packets with a source CID other than the guest's or a destination other than the host (2).
    public var badCID: UInt64 = 0
    /// Packets of a type other than STREAM, or with an unknown op.
    public var badType: UInt64 = 0
    /// Packets for a connection that does not exist.
    public var unknownConnection: UInt64 = 0
    /// RW packets beyond the credit the device advertised (the connection is reset).
    public var creditViolations: UInt64 = 0
    /// RST packets sent to the guest.
    public var rstSent: UInt64 = 0
    /// Receive chains without room for a header, or with device-readable buffers.
    public var rxMalformed: UInt64 = 0
    /// Control packets dropped because too many waited for guest buffers.
    public var rxQueueOverflows: UInt64 = 0
    /// Guest-initiated connections to `<uds_path>_<port>` that failed (nothing listening there).
    public var connectFails: UInt64 = 0
    /// Connections refused because the connection table was full.
    public var connectionsRefused: UInt64 = 0
    /// Connections established from the host and from the guest.
    public var hostConnections: UInt64 = 0
    public var guestConnections: UInt64 = 0
    /// Host-initiated requests the guest did not answer in time.
    public var requestTimeouts: UInt64 = 0
    public init() {}
}

/// The 44-byte `virtio_vsock_hdr` (virtio 1.x 5.10.6, little-endian).
public struct VsockHeader: Equatable, Sendable {
    public static let size = 44
    public var srcCID: UInt64 = 0
    public var dstCID: UInt64 = 0
    public var srcPort: UInt32 = 0
    public var dstPort: UInt32 = 0
    public var len: UInt32 = 0
    public var type: UInt16 = VsockHeader.typeStream
    public var op: UInt16 = 0
    public var flags: UInt32 = 0
    public var bufAlloc: UInt32 = 0
    public var fwdCnt: UInt32 = 0

    /// VIRTIO_VSOCK_TYPE_STREAM.
    public static let typeStream: UInt16 = 1
    /// Operations.
    public enum Op {
        public static let request: UInt16 = 1
        public static let response: UInt16 = 2
        public static let rst: UInt16 = 3
        public static let shutdown: UInt16 = 4
        public static let rw: UInt16 = 5
        public static let creditUpdate: UInt16 = 6
        public static let creditRequest: UInt16 = 7
    }
    /// SHUTDOWN flags: the sender will receive (RCV) or send (SEND) no more data.
    public static let shutdownReceive: UInt32 = 1
    public static let shutdownSend: UInt32 = 2

    public init(srcCID: UInt64 = 0, dstCID: UInt64 = 0, srcPort: UInt32 = 0, dstPort: UInt32 = 0, len: UInt32 = 0,
                type: UInt16 = VsockHeader.typeStream, op: UInt16 = 0, flags: UInt32 = 0, bufAlloc: UInt32 = 0, fwdCnt: UInt32 = 0) {
        self.srcCID = srcCID; self.dstCID = dstCID; self.srcPort = srcPort; self.dstPort = dstPort; self.len = len
        self.type = type; self.op = op; self.flags = flags; self.bufAlloc = bufAlloc; self.fwdCnt = fwdCnt
    }

    /// Decodes the first 44 bytes; nil when there are fewer.
    public init?(bytes: [UInt8]) {
        guard bytes.count >= Self.size else { return nil }
        srcCID = bytes.getLE(at: 0)!
        dstCID = bytes.getLE(at: 8)!
        srcPort = bytes.getLE(at: 16)!
        dstPort = bytes.getLE(at: 20)!
        len = bytes.getLE(at: 24)!
        type = bytes.getLE(at: 28)!
        op = bytes.getLE(at: 30)!
        flags = bytes.getLE(at: 32)!
        bufAlloc = bytes.getLE(at: 36)!
        fwdCnt = bytes.getLE(at: 40)!
    }

    /// The 44 header bytes.
    public func encode() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: Self.size)
        b.putLE(srcCID, at: 0)
        b.putLE(dstCID, at: 8)
        b.putLE(srcPort, at: 16)
        b.putLE(dstPort, at: 20)
        b.putLE(len, at: 24)
        b.putLE(type, at: 28)
        b.putLE(op, at: 30)
        b.putLE(flags, at: 32)
        b.putLE(bufAlloc, at: 36)
        b.putLE(fwdCnt, at: 40)
        return b
    }
}

/// Why a vsock device could not be set up (the message names the path).
public struct VsockError: Error, CustomStringConvertible, Equatable, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// virtio-vsock (virtio 1.x, section 5.10; device type 19) with Firecracker's host side: the
/// VMM itself carries every stream between guest packets and Unix sockets (no vhost).
///
/// - **Host-initiated**: a host process connects to the listening socket `udsPath` and writes
///   `CONNECT <port>\n`. The device picks a host port, sends REQUEST to the guest's port; on the
///   guest's RESPONSE it writes `OK <hostport>\n` to the host socket and bytes flow both ways. A
///   guest that does not answer within `requestTimeoutNs` (or answers RST) gets the host socket
///   closed.
/// - **Guest-initiated**: a REQUEST to CID 2 port P connects to the Unix socket `<udsPath>_<P>`;
///   RESPONSE when that works, RST when nothing listens there.
/// - **Flow control** (credit): the device never sends the guest more than its
///   `buf_alloc - (tx_cnt - fwd_cnt)`, and asks for credit (CREDIT_REQUEST) when it has none. It
///   advertises `bufferSize` per connection and counts as forwarded (`fwd_cnt`) what reached the
///   host socket; guest bytes the host socket did not take yet wait in a per-connection buffer
///   that this credit bounds. A CREDIT_UPDATE goes out when the guest's view of our free space has
///   fallen below half the buffer while forwarded bytes are unreported.
/// - **Shutdown**: the guest's SHUTDOWN half-closes the host socket (SEND) once its buffered bytes
///   are written, and both flags end the connection with an RST; the host's EOF becomes SHUTDOWN
///   (SEND, plus RECEIVE when the host socket is fully closed).
/// - **Hostile input** (short headers, `len` beyond the chain, wrong CIDs, unknown connections,
///   credit violations, floods) is dropped and counted, answered with RST where a connection can
///   be named; at most `maxConnections` connections and `maxControlPackets` queued control packets.
///
/// Every socket is non-blocking and watched through the device's `EventLoop`; queue work and socket
/// readiness run on that thread, and one lock guards the state against activate/reset from vCPU
/// threads.
public final class VirtioVsock: VirtioDevice, @unchecked Sendable {
    /// The host's CID.
    public static let hostCID: UInt64 = 2
    /// Queue sizes offered (rx, tx, event).
    public static let queueSize: UInt16 = 256
    public static let eventQueueSize: UInt16 = 16
    /// Receive buffer space the device advertises per connection (buf_alloc).
    public static let bufferSize: UInt32 = 256 << 10
    /// Largest payload of one packet (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
    public static let maxPayload = 64 << 10
    /// Connection table limit.
    public static let maxConnections = 1024
    /// Control packets (RST, RESPONSE, credit…) waiting for guest receive buffers.
    public static let maxControlPackets = 2048
    /// Host connections accepted whose `CONNECT` line has not arrived yet.
    public static let maxPendingAccepts = 64
    /// First host port given to host-initiated connections.
    public static let firstLocalPort: UInt32 = 1 << 30
    /// Packets handled per wake-up and queue before yielding to the loop.
    static let batch = 256

    /// The guest's CID (configuration space).
    public let guestCID: UInt64
    /// The listening socket's path.
    public let udsPath: String
    /// How long a host-initiated REQUEST waits for the guest.
    public let requestTimeoutNs: UInt64
    let log: VirtioLog
    private let loop: EventLoop
    private let listenFD: Int32
    private let listenIdentity: (dev: UInt64, ino: UInt64)
    private let requestTimer: ThrottleTimer

    struct Key: Hashable {
        /// The host side's port.
        var local: UInt32
        /// The guest side's port.
        var peer: UInt32
    }

    struct Connection {
        let id: UInt64
        let key: Key
        let fd: Int32
        var token: EventLoop.Token?
        /// A host-initiated REQUEST waits for the guest's RESPONSE.
        var connecting: Bool
        var requestedAt: UInt64 = 0
        /// The guest's credit: its buffer and what it has forwarded of ours.
        var peerBufAlloc: UInt32 = 0
        var peerFwdCnt: UInt32 = 0
        /// Payload bytes sent to the guest.
        var txCnt: UInt32 = 0
        /// Guest payload bytes accepted (written or buffered) and written to the host socket.
        var rxCnt: UInt32 = 0
        var fwdCnt: UInt32 = 0
        /// The fwd_cnt last sent to the guest.
        var fwdCntSent: UInt32 = 0
        /// Guest bytes waiting for the host socket (at most `bufferSize`), from `pendingStart`.
        var pending: [UInt8] = []
        var pendingStart = 0
        /// Bytes at the front of `pending` that are not the guest's (the `OK <port>` line): not counted in fwd_cnt.
        var pendingOwn = 0
        /// The host socket has data (or EOF) to read.
        var hostReadable = false
        /// The host socket reached EOF (SHUTDOWN sent to the guest).
        var hostEOF = false
        /// The host socket hung up or failed: no more readiness events are wanted.
        var hostHungUp = false
        /// SHUTDOWN flags the guest sent.
        var guestShutdown: UInt32 = 0
        var creditRequested = false
        var creditUpdateQueued = false
        var watching: EventLoop.Readiness = []

        var pendingCount: Int { pending.count - pendingStart }
        /// What the guest may still receive.
        var peerCredit: UInt32 {
            let inFlight = txCnt &- peerFwdCnt
            return inFlight > peerBufAlloc ? 0 : peerBufAlloc - inFlight
        }
        /// Whether payload may go to the guest (apart from credit).
        var canSend: Bool { !connecting && !hostEOF && guestShutdown & VsockHeader.shutdownReceive == 0 }
    }

    /// An accepted host connection waiting for its `CONNECT <port>\n` line.
    struct PendingAccept {
        let fd: Int32
        var token: EventLoop.Token?
        /// The line so far.
        var line: [UInt8] = []
    }

    /// A control packet waiting for a receive buffer; credit fields are filled when it is sent.
    struct Control {
        var header: VsockHeader
        var key: Key?
    }

    struct State {
        var active: VirtioActivation?
        var connections: [Key: Connection] = [:]
        var pendingAccepts: [UInt64: PendingAccept] = [:]
        var control: [Control] = []
        var controlStart = 0
        /// Connections whose host socket is readable and that may send (round robin).
        var ready: [Key] = []
        /// A receive chain taken from the ring and not used yet.
        var spareRx: (chain: DescriptorChain, iov: [iovec], space: Int)?
        var nextID: UInt64 = 1
        var nextLocalPort: UInt32 = VirtioVsock.firstLocalPort
        var listenWatch: EventLoop.Token?
        var listening = false
        /// The request timer is pending (re-arming would postpone older deadlines).
        var timerArmed = false
        var counters = VsockCounters()
        var closed = false
        var controlCount: Int { control.count - controlStart }
    }
    private let state = Mutex(State())

    /// A device for the guest `guestCID` (3 or more) listening on the Unix socket `udsPath`. An
    /// existing socket there that nobody accepts on (left by an earlier run) is replaced; anything
    /// else at that path, or a path longer than `sun_path`, is an error.
    public init(guestCID: UInt64, udsPath: String, eventLoop: EventLoop, requestTimeoutNs: UInt64 = 2_000_000_000,
                log: VirtioLog = .discard) throws(VsockError) {
        guard guestCID >= 3, guestCID < 0xffff_ffff else {
            throw VsockError("guest CID \(guestCID): expected 3 to 4294967294 (0-2 are reserved, -1 is any)")
        }
        self.guestCID = guestCID
        self.udsPath = udsPath
        self.requestTimeoutNs = requestTimeoutNs
        self.log = log
        self.loop = eventLoop
        let fd = try Self.listen(at: udsPath)
        var st = stat()
        _ = stat(udsPath, &st)
        listenFD = fd
        listenIdentity = (UInt64(st.st_dev), UInt64(st.st_ino))
        requestTimer = ThrottleTimer(loop: eventLoop, log: log)
        requestTimer.setAction { [weak self] in self?.requestTimeouts() }
        do {
            let token = try eventLoop.watch(fd, for: []) { [weak self] _ in self?.acceptReady() }
            state.withLock { $0.listenWatch = token }
        } catch {
            close(fd)
            unlink(udsPath)
            throw VsockError("\(udsPath): \(error)")
        }
    }

    deinit { closeListener() }

    /// The length limit of a Unix socket path (sun_path, without the NUL).
    public static let maxPathLength = 107

    /// Binds and listens on `path` (non-blocking, close-on-exec).
    static func listen(at path: String) throws(VsockError) -> Int32 {
        guard !path.isEmpty else { throw VsockError("the socket path is empty") }
        guard path.utf8.count <= maxPathLength else {
            throw VsockError("\(path): \(path.utf8.count) bytes, longer than a Unix socket path may be (\(maxPathLength))")
        }
        var st = stat()
        if lstat(path, &st) == 0 {
            guard st.st_mode & S_IFMT == S_IFSOCK else { throw VsockError("\(path) exists and is not a socket") }
            // A socket: in use when someone accepts on it, else left over from an earlier run.
            let probe = connectUnix(path)
            if probe >= 0 { close(probe) }
            // Only a refused connection proves nobody listens (a full backlog says EAGAIN).
            guard probe == -ECONNREFUSED else { throw VsockError("\(path) is in use: another process listens on it") }
            unlink(path)
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw VsockError("\(path): socket: \(String(cString: strerror(errno)))") }
        var addr = sockaddr_un()
        guard fillAddress(&addr, path) else { close(fd); throw VsockError("\(path): too long for a Unix socket path") }
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard r == 0 else {
            let e = errno
            close(fd)
            throw VsockError("\(path): bind: \(String(cString: strerror(e)))")
        }
        guard Glibc.listen(fd, 128) == 0 else {
            let e = errno
            close(fd)
            unlink(path)
            throw VsockError("\(path): listen: \(String(cString: strerror(e)))")
        }
        return fd
    }

    static func fillAddress(_ addr: inout sockaddr_un, _ path: String) -> Bool {
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count <= maxPathLength else { return false }
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            p.initializeMemory(as: UInt8.self, repeating: 0)
            for (i, b) in bytes.enumerated() { p[i] = b }
        }
        return true
    }

    /// A non-blocking connect to the Unix socket `path`: the fd, or -errno.
    static func connectUnix(_ path: String) -> Int32 {
        var addr = sockaddr_un()
        guard fillAddress(&addr, path) else { return -ENAMETOOLONG }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return -errno }
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if r != 0 {
            let e = errno
            close(fd)
            return -e
        }
        return fd
    }

    // MARK: VirtioDevice

    public var deviceType: VirtioDeviceType { .vsock }
    public var deviceFeatures: UInt64 { 0 }
    public var queueMaxSizes: [UInt16] { [Self.queueSize, Self.queueSize, Self.eventQueueSize] }
    public var configSize: Int { 8 }

    public func readConfig(offset: Int, data: UnsafeMutableRawBufferPointer) {
        var c = [UInt8](repeating: 0, count: 8)
        c.putLE(guestCID, at: 0)
        copyConfig(c, offset: offset, into: data)
    }

    public func writeConfig(offset: Int, data: UnsafeRawBufferPointer) {}

    /// A snapshot of the counters.
    public var counters: VsockCounters { state.withLock { $0.counters } }

    /// Open connections (host-initiated and guest-initiated).
    public var connectionCount: Int { state.withLock { $0.connections.count } }

    public func activate(_ activation: VirtioActivation) throws(VirtioError) {
        state.withLock { s in
            dropAll(&s)
            s.active = activation
            setListening(&s, !s.closed)
        }
    }

    public func reset() {
        state.withLock { s in
            dropAll(&s)
            s.active = nil
            setListening(&s, false)
        }
    }

    public func shutdown() {
        reset()
        closeListener()
    }

    /// The receive chain taken ahead of a packet (queue 0).
    public func unconsumedChains(queue index: Int) -> UInt16 {
        state.withLock { s in index == 0 && s.spareRx != nil ? 1 : 0 }
    }

    /// After a snapshot restore, tells the driver that every connection is gone
    /// (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue), as Firecracker does: the host
    /// sockets of the snapshotted VM do not exist in this process.
    public func restored() {
        state.withLock { s in
            guard let a = s.active, a.queues.count > 2, let q = a.queues[2] else { return }
            do throws(VirtioError) {
                while let item = try q.popAvailable() {
                    switch item {
                    case .malformed(let head, let error):
                        log.error("virtio-vsock: \(error)")
                        q.addUsed(head: head, length: 0)
                    case .chain(let chain):
                        var w = ChainWriter(memory: a.memory, chain: chain)
                        do { try w.write([0, 0, 0, 0]) } catch { log.error("virtio-vsock: transport reset event: \(error)") }
                        q.addUsed(head: chain.head, length: UInt32(w.written))
                        if q.needsInterrupt() { a.interrupt.signalQueue(2) }
                        return
                    }
                }
                log.error("virtio-vsock: the driver left no event buffer for the transport reset after the restore")
            } catch {
                log.error("virtio-vsock: \(error)")
            }
        }
    }

    public func processQueue(_ index: Int) throws(VirtioError) {
        let result: Result<Void, VirtioError> = state.withLock { s in
            guard let a = s.active else { return .success(()) }
            do throws(VirtioError) {
                switch index {
                case 0: try fillRx(&s, a)
                case 1:
                    try transmit(&s, a)
                    try fillRx(&s, a)
                default: break // the event queue: buffers wait for events (none are sent)
                }
            } catch { return .failure(error) }
            return .success(())
        }
        try result.get()
    }

    /// Closes and removes the listening socket (once).
    private func closeListener() {
        let (first, token) = state.withLock { s -> (Bool, EventLoop.Token?) in
            guard !s.closed else { return (false, nil) }
            s.closed = true
            defer { s.listenWatch = nil }
            return (true, s.listenWatch)
        }
        guard first else { return }
        if let token { loop.remove(token) }
        // Remove the path only while it is still our socket.
        var st = stat()
        if stat(udsPath, &st) == 0, UInt64(st.st_dev) == listenIdentity.dev, UInt64(st.st_ino) == listenIdentity.ino {
            unlink(udsPath)
        }
        close(listenFD)
    }

    // MARK: Connection bookkeeping

    private func setListening(_ s: inout State, _ on: Bool) {
        guard let token = s.listenWatch, s.listening != on else { return }
        do {
            try loop.change(token, to: on ? .readable : [])
            s.listening = on
        } catch {
            log.error("virtio-vsock \(udsPath): \(error)")
        }
    }

    /// Closes every connection and pending host socket (driver reset, activation).
    private func dropAll(_ s: inout State) {
        for c in s.connections.values { closeConnectionFD(c) }
        for p in s.pendingAccepts.values {
            if let t = p.token { loop.remove(t) }
            close(p.fd)
        }
        s.connections = [:]
        s.pendingAccepts = [:]
        s.control = []
        s.controlStart = 0
        s.ready = []
        s.spareRx = nil
    }

    private func closeConnectionFD(_ c: Connection) {
        if let t = c.token { loop.remove(t) }
        close(c.fd)
    }

    /// Removes connection `key` and closes its host socket.
    private func drop(_ s: inout State, _ key: Key) {
        guard let c = s.connections.removeValue(forKey: key) else { return }
        closeConnectionFD(c)
        s.ready.removeAll { $0 == key }
    }

    /// Sends RST for `key` and closes the connection.
    private func reset(_ s: inout State, _ key: Key) {
        enqueue(&s, VsockHeader(op: VsockHeader.Op.rst), key: key, lookup: false)
        drop(&s, key)
    }

    /// Queues a control packet for connection `key` (host side local, guest side peer).
    private func enqueue(_ s: inout State, _ h: VsockHeader, key: Key, lookup: Bool = true) {
        guard s.controlCount < Self.maxControlPackets else {
            s.counters.rxQueueOverflows += 1
            return
        }
        var h = h
        h.srcCID = Self.hostCID
        h.dstCID = guestCID
        h.srcPort = key.local
        h.dstPort = key.peer
        h.type = VsockHeader.typeStream
        if h.op == VsockHeader.Op.rst { s.counters.rstSent += 1 }
        if s.controlStart > 1024 && s.controlStart * 2 > s.control.count {
            s.control.removeFirst(s.controlStart)
            s.controlStart = 0
        }
        s.control.append(Control(header: h, key: lookup ? key : nil))
    }

    /// Adds or removes `key` from the ready list after its state changed, and updates its watch.
    private func refresh(_ s: inout State, _ key: Key) {
        guard var c = s.connections[key] else {
            s.ready.removeAll { $0 == key }
            return
        }
        let wantsReady = c.hostReadable && c.canSend
        let listed = s.ready.contains(key)
        if wantsReady && !listed { s.ready.append(key) }
        if !wantsReady && listed { s.ready.removeAll { $0 == key } }
        // Readiness to watch for: readable while nothing is known to be readable, writable while bytes wait.
        var want: EventLoop.Readiness = []
        if !c.hostReadable && !c.connecting && !c.hostEOF && c.guestShutdown & VsockHeader.shutdownReceive == 0 {
            want.insert(.readable)
        }
        if c.pendingCount > 0 { want.insert(.writable) }
        if c.hostHungUp, let t = c.token {
            // Errors and hang-ups are always reported: stop watching a socket that hung up.
            loop.remove(t)
            c.token = nil
        } else if want != c.watching, let t = c.token {
            do { try loop.change(t, to: want) } catch { log.error("virtio-vsock: \(error)") }
            c.watching = want
        }
        s.connections[key] = c
    }

    // MARK: Host side

    private func acceptReady() {
        state.withLock { s in
            guard s.active != nil, !s.closed else { return }
            while true {
                let fd = accept(listenFD, nil, nil)
                if fd >= 0 {
                    _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                    _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
                }
                if fd < 0 {
                    if errno == EINTR { continue }
                    if errno != EAGAIN && errno != EWOULDBLOCK { log.error("virtio-vsock \(udsPath): accept: \(String(cString: strerror(errno)))") }
                    return
                }
                guard s.pendingAccepts.count < Self.maxPendingAccepts,
                      s.connections.count + s.pendingAccepts.count < Self.maxConnections else {
                    s.counters.connectionsRefused += 1
                    close(fd)
                    continue
                }
                let id = s.nextID
                s.nextID += 1
                do {
                    let token = try loop.watch(fd, for: .readable) { [weak self] _ in self?.connectLineReady(id) }
                    s.pendingAccepts[id] = PendingAccept(fd: fd, token: token)
                } catch {
                    log.error("virtio-vsock: \(error)")
                    close(fd)
                }
            }
        }
    }

    /// Reads `CONNECT <port>\n` from pending host socket `id`.
    private func connectLineReady(_ id: UInt64) {
        let result: Result<Void, VirtioError> = state.withLock { s in
            guard var p = s.pendingAccepts[id], let a = s.active else { return .success(()) }
            func discard() {
                if let t = p.token { loop.remove(t) }
                close(p.fd)
                s.pendingAccepts[id] = nil
            }
            // Byte by byte up to the newline: what follows it is stream data for the guest, and bytes
            // of an unfinished line must be consumed (a readable watch would fire again at once).
            var complete = false
            while !complete {
                var b: UInt8 = 0
                let n = recv(p.fd, &b, 1, 0)
                if n < 0 && errno == EINTR { continue }
                if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
                    s.pendingAccepts[id] = p
                    return .success(())
                }
                guard n == 1, p.line.count < 32 else {
                    // The peer left, failed, or sent a line too long to be CONNECT <port>.
                    discard()
                    return .success(())
                }
                if b == 0x0a { complete = true } else { p.line.append(b) }
            }
            let buf = p.line, nl = p.line.count
            let text = String(decoding: buf[0..<nl], as: UTF8.self)
            let parts = text.split(separator: " ", omittingEmptySubsequences: false)
            guard parts.count == 2, parts[0] == "CONNECT", let port = UInt32(parts[1].trimmingSuffix("\r")) else {
                log.error("virtio-vsock \(udsPath): expected 'CONNECT <port>', got '\(text.prefix(32))'")
                discard()
                return .success(())
            }
            if let t = p.token { loop.remove(t) }
            s.pendingAccepts[id] = nil
            // A free host port.
            var local = s.nextLocalPort
            while s.connections.keys.contains(where: { $0.local == local }) { local = local == UInt32.max ? Self.firstLocalPort : local + 1 }
            s.nextLocalPort = local == UInt32.max ? Self.firstLocalPort : local + 1
            let key = Key(local: local, peer: port)
            guard add(&s, key: key, fd: p.fd, connecting: true) else { close(p.fd); return .success(()) }
            enqueue(&s, VsockHeader(op: VsockHeader.Op.request), key: key)
            if !s.timerArmed {
                s.timerArmed = true
                requestTimer.arm(afterNs: requestTimeoutNs)
            }
            do throws(VirtioError) { try fillRx(&s, a) } catch { return .failure(error) }
            return .success(())
        }
        if case .failure(let e) = result { fail(e) }
    }

    /// Registers a connection on host socket `fd`; false when it cannot be watched.
    private func add(_ s: inout State, key: Key, fd: Int32, connecting: Bool) -> Bool {
        let id = s.nextID
        s.nextID += 1
        let token: EventLoop.Token
        do {
            token = try loop.watch(fd, for: []) { [weak self] ev in self?.hostReady(key, id, ev) }
        } catch {
            log.error("virtio-vsock: \(error)")
            return false
        }
        var c = Connection(id: id, key: key, fd: fd, token: token, connecting: connecting)
        if connecting { c.requestedAt = Self.now() }
        s.connections[key] = c
        refresh(&s, key)
        return true
    }

    static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// Host-initiated requests the guest left unanswered: closed, with an RST to the guest.
    private func requestTimeouts() {
        let result: Result<Void, VirtioError> = state.withLock { s in
            s.timerArmed = false
            guard let a = s.active else { return .success(()) }
            let now = Self.now()
            var next: UInt64?
            for (key, c) in s.connections where c.connecting {
                let age = now &- c.requestedAt
                if age >= requestTimeoutNs {
                    s.counters.requestTimeouts += 1
                    reset(&s, key)
                } else {
                    next = min(next ?? .max, requestTimeoutNs - age)
                }
            }
            if let next {
                s.timerArmed = true
                requestTimer.arm(afterNs: next)
            }
            do throws(VirtioError) { try fillRx(&s, a) } catch { return .failure(error) }
            return .success(())
        }
        if case .failure(let e) = result { fail(e) }
    }

    /// The host socket of connection `key` is ready.
    private func hostReady(_ key: Key, _ id: UInt64, _ events: EventLoop.Readiness) {
        let result: Result<Void, VirtioError> = state.withLock { s in
            guard let a = s.active, let c = s.connections[key], c.id == id else { return .success(()) }
            let broken = events.contains(.error) || events.contains(.hangUp)
            if events.contains(.writable) || broken { flush(&s, key) }
            guard var c = s.connections[key] else { return fillRxResult(&s, a) }
            if broken {
                c.hostHungUp = true
                if c.connecting {
                    // The host gave up before the guest answered.
                    s.connections[key] = c
                    reset(&s, key)
                    return fillRxResult(&s, a)
                }
            }
            if events.contains(.readable) || broken { c.hostReadable = !c.hostEOF }
            s.connections[key] = c
            refresh(&s, key)
            return fillRxResult(&s, a)
        }
        if case .failure(let e) = result { fail(e) }
    }

    private func fillRxResult(_ s: inout State, _ a: VirtioActivation) -> Result<Void, VirtioError> {
        do throws(VirtioError) { try fillRx(&s, a) } catch { return .failure(error) }
        return .success(())
    }

    /// Writes buffered guest bytes to the host socket; finishes a shutdown when they are out.
    private func flush(_ s: inout State, _ key: Key) {
        guard var c = s.connections[key] else { return }
        while c.pendingCount > 0 {
            let n = c.pending.withUnsafeBytes { p in
                send(c.fd, p.baseAddress! + c.pendingStart, c.pendingCount, Int32(MSG_NOSIGNAL))
            }
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN || errno == EWOULDBLOCK { break }
                // The host end is gone.
                s.connections[key] = c
                reset(&s, key)
                return
            }
            c.pendingStart += n
            let own = min(n, c.pendingOwn)
            c.pendingOwn -= own
            c.fwdCnt &+= UInt32(n - own)
        }
        if c.pendingCount == 0 {
            c.pending.removeAll(keepingCapacity: c.pending.capacity <= 64 << 10)
            c.pendingStart = 0
        } else if c.pendingStart > 64 << 10 {
            c.pending.removeFirst(c.pendingStart)
            c.pendingStart = 0
        }
        s.connections[key] = c
        afterForward(&s, key)
    }

    /// After guest bytes reached the host: half-close or finish a shutdown, update the guest's credit.
    private func afterForward(_ s: inout State, _ key: Key) {
        guard var c = s.connections[key] else { return }
        if c.pendingCount == 0 && c.guestShutdown & VsockHeader.shutdownSend != 0 {
            Glibc.shutdown(c.fd, Int32(SHUT_WR))
            if c.guestShutdown & VsockHeader.shutdownReceive != 0 {
                // Both directions are done: end the connection.
                reset(&s, key)
                return
            }
        }
        // The guest thinks we have bufferSize - (rxCnt - fwdCntSent) free: refresh it when low.
        let seenFree = Self.bufferSize &- (c.rxCnt &- c.fwdCntSent)
        if c.fwdCnt != c.fwdCntSent, seenFree < Self.bufferSize / 2, !c.creditUpdateQueued, !c.connecting {
            c.creditUpdateQueued = true
            s.connections[key] = c
            enqueue(&s, VsockHeader(op: VsockHeader.Op.creditUpdate), key: key)
        } else {
            s.connections[key] = c
        }
        refresh(&s, key)
    }

    // MARK: Transmit (guest → host)

    private func transmit(_ s: inout State, _ a: VirtioActivation) throws(VirtioError) {
        guard a.queues.count > 1, let q = a.queues[1] else { return }
        var added = false
        defer { if added && q.needsInterrupt() { a.interrupt.signalQueue(1) } }
        for count in 0...Self.batch {
            if count == Self.batch { a.schedule(1); return }
            guard let item = try q.popAvailable() else {
                if q.enableNotification() { continue }
                return
            }
            switch item {
            case .malformed(let head, let error):
                log.error("virtio-vsock: \(error)")
                s.counters.txMalformed += 1
                q.addUsed(head: head, length: 0)
            case .chain(let chain):
                handle(&s, a, chain)
                q.addUsed(head: chain.head, length: 0)
            }
            added = true
        }
    }

    /// One packet from the guest.
    func handle(_ s: inout State, _ a: VirtioActivation, _ chain: DescriptorChain) {
        var r = ChainReader(memory: a.memory, chain: chain)
        guard let bytes = try? r.read(VsockHeader.size), let h = VsockHeader(bytes: bytes) else {
            log.error("virtio-vsock: transmit chain \(chain.head) has \(chain.readableLength) readable bytes, less than a header")
            s.counters.txMalformed += 1
            return
        }
        let key = Key(local: UInt32(truncatingIfNeeded: h.dstPort), peer: h.srcPort)
        guard h.srcCID == guestCID, h.dstCID == Self.hostCID else {
            s.counters.badCID += 1
            log.error("virtio-vsock: packet from CID \(h.srcCID) to CID \(h.dstCID) (guest \(guestCID), host 2)")
            if h.op != VsockHeader.Op.rst { enqueue(&s, VsockHeader(op: VsockHeader.Op.rst), key: key, lookup: false) }
            return
        }
        guard UInt64(h.len) <= r.remaining, Int(h.len) <= Self.maxPayload else {
            log.error("virtio-vsock: packet len \(h.len) but the chain holds \(r.remaining) payload bytes (at most \(Self.maxPayload))")
            s.counters.txMalformed += 1
            if s.connections[key] != nil { reset(&s, key) }
            else if h.op != VsockHeader.Op.rst { enqueue(&s, VsockHeader(op: VsockHeader.Op.rst), key: key, lookup: false) }
            return
        }
        guard h.type == VsockHeader.typeStream else {
            s.counters.badType += 1
            if s.connections[key] != nil { reset(&s, key) }
            else if h.op != VsockHeader.Op.rst { enqueue(&s, VsockHeader(op: VsockHeader.Op.rst), key: key, lookup: false) }
            return
        }
        s.counters.txPackets += 1
        if h.op == VsockHeader.Op.request {
            guard s.connections[key] == nil else {
                // A second REQUEST on a live connection: a protocol error.
                reset(&s, key)
                return
            }
            connectFromGuest(&s, h, key)
            return
        }
        guard var c = s.connections[key] else {
            if h.op != VsockHeader.Op.rst {
                s.counters.unknownConnection += 1
                enqueue(&s, VsockHeader(op: VsockHeader.Op.rst), key: key, lookup: false)
            }
            return
        }
        c.peerBufAlloc = h.bufAlloc
        c.peerFwdCnt = h.fwdCnt
        if c.peerCredit > 0 { c.creditRequested = false }
        s.connections[key] = c
        switch h.op {
        case VsockHeader.Op.response:
            guard c.connecting else { reset(&s, key); return }
            c.connecting = false
            // The host learns its port before any guest byte.
            let ok = Array("OK \(key.local)\n".utf8)
            c.pending = ok + c.pending[c.pendingStart...]
            c.pendingStart = 0
            c.pendingOwn = ok.count
            s.counters.hostConnections += 1
            s.connections[key] = c
            flush(&s, key)
        case VsockHeader.Op.rst:
            drop(&s, key)
        case VsockHeader.Op.shutdown:
            c.guestShutdown |= h.flags & (VsockHeader.shutdownReceive | VsockHeader.shutdownSend)
            s.connections[key] = c
            if c.connecting { reset(&s, key); return }
            if c.guestShutdown == VsockHeader.shutdownReceive | VsockHeader.shutdownSend, c.pendingCount == 0 {
                Glibc.shutdown(c.fd, Int32(SHUT_WR))
                reset(&s, key)
                return
            }
            afterForward(&s, key)
        case VsockHeader.Op.rw:
            guard !c.connecting, c.guestShutdown & VsockHeader.shutdownSend == 0 else { reset(&s, key); return }
            receivePayload(&s, a, &r, Int(h.len), key)
        case VsockHeader.Op.creditUpdate:
            refresh(&s, key)
        case VsockHeader.Op.creditRequest:
            if !c.creditUpdateQueued {
                c.creditUpdateQueued = true
                s.connections[key] = c
                enqueue(&s, VsockHeader(op: VsockHeader.Op.creditUpdate), key: key)
            }
        default:
            s.counters.badType += 1
            reset(&s, key)
        }
    }

    /// A guest REQUEST to host port `key.local`: connect to `<udsPath>_<port>`.
    private func connectFromGuest(_ s: inout State, _ h: VsockHeader, _ key: Key) {
        guard s.connections.count + s.pendingAccepts.count < Self.maxConnections else {
            s.counters.connectionsRefused += 1
            enqueue(&s, VsockHeader(op: VsockHeader.Op.rst), key: key, lookup: false)
            return
        }
        let path = "\(udsPath)_\(key.local)"
        let fd = Self.connectUnix(path)
        guard fd >= 0 else {
            s.counters.connectFails += 1
            log.error("virtio-vsock: guest port \(key.peer) → host port \(key.local): \(path): \(String(cString: strerror(-fd)))")
            enqueue(&s, VsockHeader(op: VsockHeader.Op.rst), key: key, lookup: false)
            return
        }
        guard add(&s, key: key, fd: fd, connecting: false) else {
            close(fd)
            enqueue(&s, VsockHeader(op: VsockHeader.Op.rst), key: key, lookup: false)
            return
        }
        s.connections[key]?.peerBufAlloc = h.bufAlloc
        s.connections[key]?.peerFwdCnt = h.fwdCnt
        s.counters.guestConnections += 1
        enqueue(&s, VsockHeader(op: VsockHeader.Op.response), key: key)
    }

    /// The payload of an RW packet: written to the host socket straight from guest memory, the
    /// rest buffered within the advertised credit.
    private func receivePayload(_ s: inout State, _ a: VirtioActivation, _ r: inout ChainReader, _ len: Int, _ key: Key) {
        guard var c = s.connections[key] else { return }
        guard c.pendingCount - c.pendingOwn + len <= Int(Self.bufferSize) else {
            log.error("virtio-vsock: guest port \(key.peer) sent \(len) bytes with \(Int(Self.bufferSize) - c.pendingCount) of credit left")
            s.counters.creditViolations += 1
            reset(&s, key)
            return
        }
        s.counters.txBytes += UInt64(len)
        c.rxCnt &+= UInt32(len)
        var failed = false
        do {
            try r.forEachSegment(len) { seg in
                var off = 0
                if c.pendingCount == 0 && !failed {
                    while off < seg.count {
                        let n = send(c.fd, seg.baseAddress! + off, seg.count - off, Int32(MSG_NOSIGNAL))
                        if n < 0 {
                            if errno == EINTR { continue }
                            if errno != EAGAIN && errno != EWOULDBLOCK { failed = true }
                            break
                        }
                        off += n
                        c.fwdCnt &+= UInt32(n)
                    }
                }
                if off < seg.count && !failed { c.pending.append(contentsOf: UnsafeRawBufferPointer(rebasing: seg[off...])) }
            }
        } catch {
            failed = true
        }
        s.connections[key] = c
        if failed {
            reset(&s, key)
            return
        }
        afterForward(&s, key)
    }

    // MARK: Receive (host → guest)

    /// The next receive chain with room for a header, or nil when the guest has none.
    private func takeRx(_ s: inout State, _ q: Virtqueue, _ memory: GuestMemory) throws(VirtioError) -> (chain: DescriptorChain, iov: [iovec], space: Int)? {
        if let spare = s.spareRx {
            s.spareRx = nil
            return spare
        }
        while true {
            guard let item = try q.popAvailable() else {
                if q.enableNotification() { continue }
                return nil
            }
            switch item {
            case .malformed(let head, let error):
                log.error("virtio-vsock: \(error)")
                s.counters.rxMalformed += 1
                q.addUsed(head: head, length: 0)
            case .chain(let chain):
                var iov: [iovec] = []
                var ok = chain.readable.isEmpty && chain.writableLength >= UInt64(VsockHeader.size)
                for b in chain.writable where ok && b.length > 0 {
                    guard let p = try? memory.translate(b.address, count: UInt64(b.length)) else { ok = false; break }
                    iov.append(iovec(iov_base: p, iov_len: Int(b.length)))
                }
                guard ok else {
                    log.error("virtio-vsock: receive chain \(chain.head) has \(chain.readable.count) readable buffers and \(chain.writableLength) writable bytes")
                    s.counters.rxMalformed += 1
                    q.addUsed(head: chain.head, length: 0)
                    continue
                }
                return (chain, iov, Int(min(chain.writableLength, UInt64(Int32.max))))
            }
        }
    }

    /// Fills `h`'s credit fields from its connection and records what the guest now knows.
    private func stamp(_ s: inout State, _ h: inout VsockHeader, _ key: Key?) {
        h.bufAlloc = Self.bufferSize
        guard let key, var c = s.connections[key] else { return }
        h.fwdCnt = c.fwdCnt
        c.fwdCntSent = c.fwdCnt
        if h.op == VsockHeader.Op.creditUpdate { c.creditUpdateQueued = false }
        s.connections[key] = c
    }

    /// Sends queued control packets, then payload from readable host sockets, while the guest has
    /// receive buffers.
    func fillRx(_ s: inout State, _ a: VirtioActivation) throws(VirtioError) {
        guard let q = a.queues.first ?? nil else { return }
        var added = false
        defer { if added && q.needsInterrupt() { a.interrupt.signalQueue(0) } }
        for count in 0...Self.batch {
            if count == Self.batch { a.schedule(0); return }
            guard s.controlCount > 0 || !s.ready.isEmpty else { return }
            guard let rx = try takeRx(&s, q, a.memory) else { return }
            if s.controlCount > 0 {
                var ctl = s.control[s.controlStart]
                s.controlStart += 1
                if s.controlStart == s.control.count { s.control.removeAll(keepingCapacity: true); s.controlStart = 0 }
                stamp(&s, &ctl.header, ctl.key)
                write(ctl.header, into: rx.iov)
                q.addUsed(head: rx.chain.head, length: UInt32(VsockHeader.size))
                s.counters.rxPackets += 1
                added = true
                continue
            }
            let key = s.ready.removeFirst()
            guard var c = s.connections[key], c.hostReadable, c.canSend else {
                s.spareRx = rx
                refresh(&s, key)
                continue
            }
            let credit = Int(c.peerCredit)
            if credit == 0 {
                // Nothing may go until the guest frees space: ask once.
                s.spareRx = rx
                if !c.creditRequested {
                    c.creditRequested = true
                    s.connections[key] = c
                    enqueue(&s, VsockHeader(op: VsockHeader.Op.creditRequest), key: key)
                }
                continue
            }
            let room = min(rx.space - VsockHeader.size, credit, Self.maxPayload)
            guard room > 0 else {
                // A chain with room for a header only: keep it for a control packet.
                s.spareRx = rx
                s.ready.insert(key, at: 0)
                return
            }
            let dataIOV = Self.slice(rx.iov, from: VsockHeader.size, count: room)
            var n: Int
            repeat {
                n = dataIOV.withUnsafeBufferPointer { readv(c.fd, $0.baseAddress, Int32($0.count)) }
            } while n < 0 && errno == EINTR
            if n < 0 {
                let e = errno
                s.spareRx = rx
                if e == EAGAIN || e == EWOULDBLOCK {
                    c.hostReadable = false
                    s.connections[key] = c
                    refresh(&s, key)
                } else {
                    s.connections[key] = c
                    reset(&s, key)
                }
                continue
            }
            var h = VsockHeader(srcCID: Self.hostCID, dstCID: guestCID, srcPort: key.local, dstPort: key.peer,
                                op: VsockHeader.Op.rw)
            if n == 0 {
                // EOF: the host sends no more; a socket closed for good receives no more either.
                var p = pollfd(fd: c.fd, events: Int16(POLLOUT), revents: 0)
                let hungUp = c.hostHungUp || (poll(&p, 1, 0) == 1 && p.revents & Int16(POLLHUP) != 0)
                h.op = VsockHeader.Op.shutdown
                h.flags = VsockHeader.shutdownSend | (hungUp ? VsockHeader.shutdownReceive : 0)
                c.hostEOF = true
                c.hostReadable = false
                c.hostHungUp = c.hostHungUp || hungUp
            } else {
                h.len = UInt32(n)
                c.txCnt &+= UInt32(n)
                s.counters.rxBytes += UInt64(n)
            }
            s.connections[key] = c
            stamp(&s, &h, key)
            write(h, into: rx.iov)
            q.addUsed(head: rx.chain.head, length: UInt32(VsockHeader.size + n))
            s.counters.rxPackets += 1
            added = true
            refresh(&s, key) // back of the ready list while it stays readable
        }
    }

    /// Writes the header bytes at the start of the iovecs (which hold at least 44 bytes).
    private func write(_ h: VsockHeader, into iov: [iovec]) {
        let bytes = h.encode()
        var k = 0
        for v in iov where k < bytes.count {
            let n = min(v.iov_len, bytes.count - k)
            bytes.withUnsafeBytes { src in v.iov_base!.copyMemory(from: src.baseAddress! + k, byteCount: n) }
            k += n
        }
    }

    /// The part [offset, offset + count) of the iovecs.
    static func slice(_ iov: [iovec], from offset: Int, count: Int) -> [iovec] {
        var out: [iovec] = []
        var skip = offset, left = count
        for v in iov where left > 0 {
            if skip >= v.iov_len { skip -= v.iov_len; continue }
            let n = min(v.iov_len - skip, left)
            out.append(iovec(iov_base: v.iov_base.map { $0 + skip }, iov_len: n))
            left -= n
            skip = 0
        }
        return out
    }

    /// A queue-fatal error outside `processQueue`: the device stops until the driver resets it.
    private func fail(_ error: VirtioError) {
        log.error("virtio-vsock: \(error); the device stops until the driver resets it")
        state.withLock { s in
            dropAll(&s)
            s.active = nil
            setListening(&s, false)
        }
    }
}

extension Substring {
    fileprivate func trimmingSuffix(_ suffix: String) -> Substring {
        hasSuffix(suffix) ? dropLast(suffix.count) : self
    }
}
