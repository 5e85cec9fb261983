// The vmm's serial console on a Unix socket (`swiftkvm vmm --console-sock PATH`), the socket
// `swiftkvm vm console` attaches to.
import Devices
import FoundationEssentials
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The guest's serial console served on a Unix stream socket.
///
/// Every connected client receives the serial output from the moment it connects; bytes a client
/// sends go to `inputHandler` (the UART's input, and hvc0 when present). Several clients may be
/// connected at once (up to `maxClients`; further connections are accepted and closed at once).
///
/// The guest never waits for a client: `write` (called on a vCPU thread) tries a non-blocking
/// send and keeps what the socket did not take in a per-client buffer of at most
/// `clientBufferLimit` bytes; output that does not fit is dropped for that client and counted
/// (`droppedBytes`). A thread named `console-sock` accepts clients, reads their input and sends
/// buffered output as the sockets drain. `stop()` closes everything and removes the socket path.
public final class ConsoleServer: SerialOutput, Sendable {
    /// Largest output backlog kept for one client.
    public static let clientBufferLimit = 256 * 1024
    /// Most clients served at once.
    public static let maxClients = 32

    private struct Client {
        var fd: Int32
        /// Output not yet sent; `pending[pendingStart...]` is the live part.
        var pending: [UInt8] = []
        var pendingStart = 0
        var pendingCount: Int { pending.count - pendingStart }
    }

    private struct State {
        var listenFD: Int32 = -1
        var wakeRead: Int32 = -1
        var wakeWrite: Int32 = -1
        var clients: [Client] = []
        var finished = false
        var running = false
        var dropped: UInt64 = 0
        var accepted: UInt64 = 0
        var inputHandler: (@Sendable ([UInt8]) -> Void)?
        var wakePending = false
    }

    /// The socket path.
    public let path: String
    private let state = Mutex(State())
    private let stopped = Atomic<Bool>(false)
    /// Set once this object created the socket file (only then does `stop()` remove the path).
    private let bound = Atomic<Bool>(false)

    /// Binds and listens on `path`; nothing is served until `start()`.
    /// Fails (status 500) when the path exists, is longer than 107 bytes, or cannot be bound.
    public init(path: String) throws(APIError) {
        self.path = path
        var st = stat()
        if lstat(path, &st) == 0 {
            throw APIError(status: 500, "the console socket path \(path) already exists (another VMM, or a stale socket: remove it)")
        }
        guard !path.isEmpty, path.utf8.count < 108 else {
            throw APIError(status: 500, "the console socket path \(path) is \(path.isEmpty ? "empty" : "too long (\(path.utf8.count) bytes, at most 107)")")
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { throw APIError(status: 500, "cannot create the console socket \(path): \(String(cString: strerror(errno)))") }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in path.utf8.enumerated() { p[i] = b }
        }
        let bindResult = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bindResult == 0, listen(fd, 16) == 0 else {
            let e = errno
            _ = Glibc.close(fd)
            if bindResult == 0 { unlink(path) }
            throw APIError(status: 500, "cannot bind the console socket \(path): \(String(cString: strerror(e)))")
        }
        self.bound.store(true, ordering: .sequentiallyConsistent)
        var wake: [Int32] = [-1, -1]
        guard pipe(&wake) == 0 else {
            let e = errno
            _ = Glibc.close(fd)
            unlink(path)
            throw APIError(status: 500, "console socket \(path): pipe: \(String(cString: strerror(e)))")
        }
        for w in wake { Self.setNonBlockingCloexec(w) }
        state.withLock { s in
            s.listenFD = fd
            s.wakeRead = wake[0]
            s.wakeWrite = wake[1]
        }
    }

    deinit { stop() }

    /// Where client input goes (the UART, and hvc0). Input that arrives before a handler is set
    /// is discarded.
    public func setInputHandler(_ handler: @escaping @Sendable ([UInt8]) -> Void) {
        state.withLock { $0.inputHandler = handler }
    }

    /// Output bytes dropped because a client's buffer was full (summed over clients).
    public var droppedBytes: UInt64 { state.withLock { $0.dropped } }
    /// Clients connected now.
    public var clientCount: Int { state.withLock { $0.clients.count } }
    /// Clients accepted since the start.
    public var acceptedCount: UInt64 { state.withLock { $0.accepted } }

    /// Starts the serving thread. Calling it twice does nothing.
    public func start() throws(HostThread.StartError) {
        let go: Bool = state.withLock { s in
            guard !s.running, s.listenFD >= 0 else { return false }
            s.running = true
            return true
        }
        guard go else { return }
        do {
            try HostThread.start(name: "console-sock", kind: .console, stackSize: 256 << 10) { [self] in serve() }
        } catch {
            state.withLock { $0.running = false }
            throw error
        }
    }

    /// Sends `bytes` to every client without blocking; what a full socket does not take is
    /// buffered (bounded) or dropped and counted.
    public func write(_ bytes: [UInt8]) {
        guard !bytes.isEmpty else { return }
        let wake: Int32 = state.withLock { s in
            var needsWake = false
            for i in s.clients.indices {
                var data = bytes[...]
                if s.clients[i].pendingCount == 0 {
                    let n = data.withUnsafeBytes { send(s.clients[i].fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT | MSG_NOSIGNAL)) }
                    if n > 0 { data = data.dropFirst(n) }
                    // Errors (EPIPE, ECONNRESET) are noticed by the serving thread, which closes the client.
                }
                guard !data.isEmpty else { continue }
                let room = Self.clientBufferLimit - s.clients[i].pendingCount
                let kept = min(room, data.count)
                if kept > 0 { s.clients[i].pending.append(contentsOf: data.prefix(kept)) }
                s.dropped += UInt64(data.count - kept)
                needsWake = true
            }
            guard needsWake, !s.wakePending else { return -1 }
            s.wakePending = true
            return s.wakeWrite
        }
        if wake >= 0 {
            var one: UInt8 = 1
            _ = Glibc.write(wake, &one, 1)
        }
    }

    /// Closes the socket and every client, removes the socket path and stops the thread.
    /// Idempotent; safe from any thread (including at `exit`).
    public func stop() {
        guard !stopped.exchange(true, ordering: .sequentiallyConsistent) else { return }
        let (wakeWrite, running) = state.withLock { s in (s.wakeWrite, s.running) }
        if bound.load(ordering: .sequentiallyConsistent) { unlink(path) }
        if running {
            var one: UInt8 = 0
            _ = Glibc.write(wakeWrite, &one, 1)
            // Wait briefly for the thread to close its descriptors (it owns them while running).
            var waited = 0
            while !state.withLock({ $0.finished }) && waited < 200 {
                usleep(5_000)
                waited += 1
            }
        } else {
            closeAll()
        }
    }

    private func closeAll() {
        state.withLock { s in
            for c in s.clients { _ = Glibc.close(c.fd) }
            s.clients = []
            for fd in [s.listenFD, s.wakeRead, s.wakeWrite] where fd >= 0 { _ = Glibc.close(fd) }
            s.listenFD = -1
            s.wakeRead = -1
            s.wakeWrite = -1
        }
    }

    /// The serving loop: accept, read input, flush backlogs; ends when `stop()` is called.
    private func serve() {
        defer {
            closeAll()
            state.withLock { $0.finished = true }
        }
        var buf = [UInt8](repeating: 0, count: 4096)
        while !stopped.load(ordering: .sequentiallyConsistent) {
            var fds: [pollfd] = state.withLock { s in
                var f = [pollfd(fd: s.listenFD, events: Int16(POLLIN), revents: 0),
                         pollfd(fd: s.wakeRead, events: Int16(POLLIN), revents: 0)]
                for c in s.clients {
                    f.append(pollfd(fd: c.fd, events: Int16(POLLIN) | (c.pendingCount > 0 ? Int16(POLLOUT) : 0), revents: 0))
                }
                return f
            }
            let r = poll(&fds, nfds_t(fds.count), 1000)
            if r < 0 && errno != EINTR { return }
            if stopped.load(ordering: .sequentiallyConsistent) { return }
            if fds[1].revents != 0 {
                state.withLock { s in
                    var sink = [UInt8](repeating: 0, count: 64)
                    while Glibc.read(s.wakeRead, &sink, sink.count) > 0 {}
                    s.wakePending = false
                }
            }
            if fds[0].revents & Int16(POLLIN) != 0 { acceptClients() }
            var closed: [Int32] = []
            for p in fds.dropFirst(2) where p.revents != 0 {
                if p.revents & Int16(POLLIN) != 0 {
                    let n = buf.withUnsafeMutableBytes { Glibc.read(p.fd, $0.baseAddress, $0.count) }
                    if n > 0 {
                        let bytes = Array(buf[0..<n])
                        state.withLock { $0.inputHandler }?(bytes)
                    } else if n == 0 || (errno != EINTR && errno != EAGAIN) {
                        closed.append(p.fd)
                        continue
                    }
                }
                if p.revents & Int16(POLLOUT) != 0 {
                    if !flush(fd: p.fd) { closed.append(p.fd) }
                } else if p.revents & Int16(POLLERR | POLLHUP | POLLNVAL) != 0 && p.revents & Int16(POLLIN) == 0 {
                    closed.append(p.fd)
                }
            }
            if !closed.isEmpty {
                state.withLock { s in
                    s.clients.removeAll { c in
                        guard closed.contains(c.fd) else { return false }
                        _ = Glibc.close(c.fd)
                        return true
                    }
                }
            }
        }
    }

    private func acceptClients() {
        while true {
            let listenFD = state.withLock { $0.listenFD }
            let c = accept(listenFD, nil, nil)
            if c < 0 {
                if errno == EINTR { continue }
                return
            }
            Self.setNonBlockingCloexec(c)
            let kept = state.withLock { s -> Bool in
                guard s.clients.count < Self.maxClients else { return false }
                s.clients.append(Client(fd: c))
                s.accepted += 1
                return true
            }
            if !kept { _ = Glibc.close(c) }
        }
    }

    private static func setNonBlockingCloexec(_ fd: Int32) {
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
    }

    /// Sends as much of a client's backlog as its socket takes; false when the client is gone.
    private func flush(fd: Int32) -> Bool {
        state.withLock { s in
            guard let i = s.clients.firstIndex(where: { $0.fd == fd }) else { return true }
            while s.clients[i].pendingCount > 0 {
                let start = s.clients[i].pendingStart
                let n = s.clients[i].pending.withUnsafeBytes { b in
                    send(fd, b.baseAddress! + start, b.count - start, Int32(MSG_DONTWAIT | MSG_NOSIGNAL))
                }
                if n > 0 {
                    s.clients[i].pendingStart += n
                } else if n < 0 && errno == EINTR {
                    continue
                } else if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
                    break
                } else {
                    return false
                }
            }
            if s.clients[i].pendingCount == 0 {
                s.clients[i].pending.removeAll(keepingCapacity: true)
                s.clients[i].pendingStart = 0
            } else if s.clients[i].pendingStart > Self.clientBufferLimit {
                s.clients[i].pending.removeFirst(s.clients[i].pendingStart)
                s.clients[i].pendingStart = 0
            }
            return true
        }
    }
}

/// Serial output copied to several sinks in order (console server, log file, stdout…).
public struct TeeSerialOutput: SerialOutput {
    /// The sinks, written in this order.
    public let sinks: [any SerialOutput]

    public init(_ sinks: [any SerialOutput]) { self.sinks = sinks }

    public func write(_ bytes: [UInt8]) {
        for s in sinks { s.write(bytes) }
    }

    public func flush() {
        for s in sinks { s.flush() }
    }
}
