import CKVM
import Dispatch
#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// One thread waiting with epoll for file descriptors to become ready and running their handlers:
/// device work happens here, not on vCPU threads.
///
/// Two kinds of registration share the loop:
/// - `add(_:handler:)` watches an `EventFD` (a queue notification from ioeventfd, a timerfd, a
///   wake-up): the loop drains its counter, then runs the handler;
/// - `watch(_:for:handler:)` watches any fd for readiness (a TAP, a socket) and never reads it:
///   the handler gets the ready events and does its own I/O, so packet data reaches the device
///   untouched. Watches are level-triggered; `change(_:to:)` narrows or widens what is watched
///   (a device that cannot take more input stops watching for it until it can).
///
/// Handlers run one at a time on the loop thread. `add`, `watch`, `change` and `remove` may be
/// called from any thread.
public final class EventLoop: Sendable {
    /// A handler registration.
    public struct Token: Hashable, Sendable { let id: UInt64 }

    /// Readiness events (epoll's bits).
    public struct Readiness: OptionSet, Sendable, Hashable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// Data can be read (EPOLLIN).
        public static let readable = Readiness(rawValue: 0x001)
        /// Data can be written (EPOLLOUT).
        public static let writable = Readiness(rawValue: 0x004)
        /// An error condition (EPOLLERR; always reported).
        public static let error = Readiness(rawValue: 0x008)
        /// The peer hung up (EPOLLHUP; always reported).
        public static let hangUp = Readiness(rawValue: 0x010)
    }

    private enum Handler {
        case eventFD(EventFD, @Sendable () -> Void)
        case readiness(Int32, @Sendable (Readiness) -> Void)
        var fd: Int32 {
            switch self {
            case .eventFD(let e, _): return e.fd
            case .readiness(let fd, _): return fd
            }
        }
    }
    private struct State {
        var entries: [UInt64: Handler] = [:]
        var nextID: UInt64 = 1
        var running = false
        var stopping = false
        /// `pause()` asked the thread to park; `parked` says it did.
        var pauseRequested = 0
        var parked = false
    }

    /// Thread name (at most 15 characters are kept).
    public let name: String
    private let epfd: Int32
    private let wake: EventFD
    private let state = Mutex(State())
    private let finished = DispatchSemaphore(value: 0)
    /// Where the parked thread and `pause()` wait (the flags are in `state`).
    private let parking = ConditionLock()

    /// Creates the epoll instance; `start()` launches the thread.
    public init(name: String = "virtio") throws {
        self.name = name
        let ep = ckvm_epoll_create()
        guard ep >= 0 else { throw EventError(operation: "epoll_create1", errno: -ep) }
        epfd = ep
        wake = try EventFD()
        let r = ckvm_epoll_ctl(epfd, 1, wake.fd, Readiness.readable.rawValue, 0)
        guard r == 0 else { close(ep); throw EventError(operation: "epoll_ctl(ADD wake eventfd)", errno: -r) }
    }

    deinit { close(epfd) }

    /// Runs `handler` on the loop thread whenever `fd` is signalled (its counter is drained first).
    @discardableResult
    public func add(_ fd: EventFD, handler: @escaping @Sendable () -> Void) throws -> Token {
        try register(.eventFD(fd, handler), events: .readable, what: "eventfd \(fd.fd)")
    }

    /// Runs `handler` on the loop thread while `fd` is ready for any of `events` (level-triggered;
    /// errors and hang-ups are always reported). The loop never reads or writes `fd`, and does not
    /// own it: remove the watch before closing it.
    @discardableResult
    public func watch(_ fd: Int32, for events: Readiness,
                      handler: @escaping @Sendable (Readiness) -> Void) throws -> Token {
        try register(.readiness(fd, handler), events: events, what: "fd \(fd)")
    }

    /// Changes the events a `watch` waits for (an empty set keeps only errors and hang-ups).
    public func change(_ token: Token, to events: Readiness) throws {
        guard let entry = state.withLock({ $0.entries[token.id] }) else { return }
        let r = ckvm_epoll_ctl(epfd, 3, entry.fd, events.rawValue, token.id)
        guard r == 0 else { throw EventError(operation: "epoll_ctl(MOD fd \(entry.fd))", errno: -r) }
    }

    /// Stops watching a registration (a handler already running finishes).
    public func remove(_ token: Token) {
        let entry = state.withLock { $0.entries.removeValue(forKey: token.id) }
        if let entry { _ = ckvm_epoll_ctl(epfd, 2, entry.fd, 0, 0) }
    }

    private func register(_ handler: Handler, events: Readiness, what: String) throws -> Token {
        let id = state.withLock { s -> UInt64 in
            let id = s.nextID
            s.nextID += 1
            s.entries[id] = handler
            return id
        }
        let r = ckvm_epoll_ctl(epfd, 1, handler.fd, events.rawValue, id)
        guard r == 0 else {
            _ = state.withLock { $0.entries.removeValue(forKey: id) }
            throw EventError(operation: "epoll_ctl(ADD \(what))", errno: -r)
        }
        return Token(id: id)
    }

    /// Starts the loop thread (once).
    public func start() throws(HostThread.StartError) {
        let go = state.withLock { s -> Bool in
            guard !s.running, !s.stopping else { return false }
            s.running = true
            return true
        }
        guard go else { return }
        // Devices must not receive the VMM's stop signals (HostThread blocks them).
        do {
            try HostThread.start(name: name, kind: .device) { [self] in
                run()
                finished.signal()
            }
        } catch {
            state.withLock { $0.running = false }
            throw error
        }
    }

    /// Stops the loop thread and waits for it to end. Safe to call more than once.
    public func stop() {
        let wasRunning = state.withLock { s -> Bool in
            let r = s.running && !s.stopping
            s.stopping = true
            return r
        }
        guard wasRunning else { return }
        wake.signal()
        parking.withLock { parking.broadcast() } // a parked thread stops too
        finished.wait()
    }

    /// Parks the loop thread between handlers and returns once it is parked (at once when the
    /// thread is not running): no handler runs until `resume()`. Readiness and signals that
    /// arrive meanwhile stay pending and are handled after it. Snapshots use it to hold device
    /// work still while they read device state and guest memory. Calls nest.
    public func pause() {
        let running = state.withLock { s -> Bool in
            s.pauseRequested += 1
            return s.running && !s.stopping
        }
        guard running else { return }
        wake.signal()
        parking.lock()
        while !state.withLock({ $0.parked || $0.stopping || !$0.running }) { parking.wait() }
        parking.unlock()
    }

    /// Lets the thread run again after `pause()` (once every pause was resumed).
    public func resume() {
        state.withLock { s in s.pauseRequested = max(0, s.pauseRequested - 1) }
        parking.withLock { parking.broadcast() }
    }

    /// Parks while a pause is requested (on the loop thread).
    private func parkIfRequested() {
        guard state.withLock({ $0.pauseRequested > 0 && !$0.stopping }) else { return }
        parking.lock()
        state.withLock { $0.parked = true }
        parking.broadcast()
        while state.withLock({ $0.pauseRequested > 0 && !$0.stopping }) { parking.wait() }
        state.withLock { $0.parked = false }
        parking.unlock()
    }

    private func run() {
        let max = 32
        var datas = [UInt64](repeating: 0, count: max)
        var events = [UInt32](repeating: 0, count: max)
        while true {
            let n = ckvm_epoll_wait(epfd, &datas, &events, Int32(max), -1)
            if n < 0 {
                if -n == EINTR { continue }
                break
            }
            for i in 0..<Int(n) {
                let id = datas[i]
                if id == 0 {
                    wake.drain()
                    if state.withLock({ $0.stopping }) { return }
                    parkIfRequested()
                    continue
                }
                guard let entry = state.withLock({ $0.entries[id] }) else { continue }
                switch entry {
                case .eventFD(let fd, let handler):
                    fd.drain()
                    handler()
                case .readiness(_, let handler):
                    handler(Readiness(rawValue: events[i]))
                }
            }
        }
    }
}
