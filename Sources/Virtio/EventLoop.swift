import CKVM
import Devices
import Dispatch
#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// One thread waiting with epoll on eventfds (queue notifications from ioeventfd, wake-ups) and
/// running their handlers: device work happens here, not on vCPU threads.
///
/// Handlers run one at a time on the loop thread. `add` and `remove` may be called from any thread.
public final class EventLoop: Sendable {
    /// A handler registration.
    public struct Token: Hashable, Sendable { let id: UInt64 }

    private struct Entry { let fd: EventFD; let handler: @Sendable () -> Void }
    private struct State {
        var entries: [UInt64: Entry] = [:]
        var nextID: UInt64 = 1
        var running = false
        var stopping = false
    }

    /// Thread name (at most 15 characters are kept).
    public let name: String
    private let epfd: Int32
    private let wake: EventFD
    private let state = Mutex(State())
    private let finished = DispatchSemaphore(value: 0)

    /// Creates the epoll instance; `start()` launches the thread.
    public init(name: String = "virtio") throws {
        self.name = name
        let ep = ckvm_epoll_create()
        guard ep >= 0 else { throw EventError(operation: "epoll_create1", errno: -ep) }
        epfd = ep
        wake = try EventFD()
        let r = ckvm_epoll_ctl(epfd, 1, wake.fd, 1, 0)
        guard r == 0 else { close(ep); throw EventError(operation: "epoll_ctl(ADD wake eventfd)", errno: -r) }
    }

    deinit { close(epfd) }

    /// Runs `handler` on the loop thread whenever `fd` is signalled (its counter is drained first).
    @discardableResult
    public func add(_ fd: EventFD, handler: @escaping @Sendable () -> Void) throws -> Token {
        let id = state.withLock { s -> UInt64 in
            let id = s.nextID
            s.nextID += 1
            s.entries[id] = Entry(fd: fd, handler: handler)
            return id
        }
        let r = ckvm_epoll_ctl(epfd, 1, fd.fd, 1, id)
        guard r == 0 else {
            _ = state.withLock { $0.entries.removeValue(forKey: id) }
            throw EventError(operation: "epoll_ctl(ADD eventfd \(fd.fd))", errno: -r)
        }
        return Token(id: id)
    }

    /// Stops watching a registration (a handler already running finishes).
    public func remove(_ token: Token) {
        let entry = state.withLock { $0.entries.removeValue(forKey: token.id) }
        if let entry { _ = ckvm_epoll_ctl(epfd, 2, entry.fd.fd, 0, 0) }
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
            try HostThread.start(name: name) { [self] in
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
        finished.wait()
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
                    continue
                }
                guard let entry = state.withLock({ $0.entries[id] }) else { continue }
                entry.fd.drain()
                entry.handler()
            }
        }
    }
}
