import CKVM
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Host threads for devices and the VMM, on pthreads directly (no Foundation `Thread`, so the
/// binary links FoundationEssentials only and starts without loading ICU).
public enum HostThread {
    /// Why a thread could not be started.
    public struct StartError: Error, CustomStringConvertible {
        /// The errno pthread_create returned.
        public var code: Int32
        /// The thread's name.
        public var name: String
        public var description: String { "cannot start thread '\(name)': \(String(cString: strerror(code)))" }
    }

    /// A started thread that can be joined.
    public struct Handle: @unchecked Sendable {
        let thread: pthread_t
        /// Waits for the thread to end (call once).
        public func join() { pthread_join(thread, nil) }
    }

    private final class Start {
        let name: String
        let blockStopSignals: Bool
        let kind: ThreadKind?
        let gate: StartGate?
        let body: () -> Void
        init(name: String, blockStopSignals: Bool, kind: ThreadKind?, gate: StartGate?, body: @escaping () -> Void) {
            self.name = name
            self.blockStopSignals = blockStopSignals
            self.kind = kind
            self.gate = gate
            self.body = body
        }
    }

    /// Starts `body` on a new thread named `name` (at most 15 bytes are kept). With
    /// `blockStopSignals` (the default) SIGINT and SIGTERM are blocked on it, so they reach the
    /// thread that waits for them (the VMM's main thread) instead of a device thread.
    /// `stackSize` 0 keeps the default size.
    ///
    /// With a `kind`, the thread installs that kind's seccomp filter (`Seccomp.confineCurrentThread`) before
    /// anything else, so `body` runs confined; with a `gate` it then waits for the gate to open (the control
    /// thread opens it once its own filter is installed: no guest code runs before every filter is in place).
    @discardableResult
    public static func start(name: String, kind: ThreadKind? = nil, gate: StartGate? = nil,
                             blockStopSignals: Bool = true, stackSize: Int = 0,
                             _ body: @escaping @Sendable () -> Void) throws(StartError) -> Handle {
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        defer { pthread_attr_destroy(&attr) }
        if stackSize > 0 { pthread_attr_setstacksize(&attr, stackSize) }
        let box = Unmanaged.passRetained(Start(name: name, blockStopSignals: blockStopSignals, kind: kind, gate: gate, body: body)).toOpaque()
        var tid = pthread_t()
        let rc = pthread_create(&tid, &attr, { arg in
            guard let arg else { return nil }
            // SAFETY: `arg` is the Start box retained above; this takes that reference back.
            let start = Unmanaged<HostThread.Start>.fromOpaque(arg).takeRetainedValue()
            _ = ckvm_set_thread_name(String(start.name.utf8.prefix(15)) ?? "swiftkvm")
            if start.blockStopSignals { StopSignals.block() }
            if let kind = start.kind { Seccomp.confineCurrentThread(kind) }
            start.gate?.wait()
            start.body()
            return nil
        }, box)
        guard rc == 0 else {
            Unmanaged<Start>.fromOpaque(box).release()
            throw StartError(code: rc, name: name)
        }
        return Handle(thread: tid)
    }
}

/// A one-shot gate threads wait at before their body runs (`HostThread.start(gate:)`): closed until `open()`.
public final class StartGate: Sendable {
    private let lock = ConditionLock()
    private let isOpen = Atomic<Bool>(false)
    public init() {}
    /// Lets every waiting and later thread through.
    public func open() {
        lock.withLock { isOpen.store(true, ordering: .releasing); lock.broadcast() }
    }
    /// Waits until the gate is open.
    public func wait() {
        guard !isOpen.load(ordering: .acquiring) else { return }
        lock.withLock { while !isOpen.load(ordering: .acquiring) { lock.wait() } }
    }
}

/// A job run every `interval` seconds on its own thread (a `vmm`-kind thread under seccomp), until `cancel()`.
public final class PeriodicTask: @unchecked Sendable {
    private let lock = ConditionLock()
    private var cancelled = false
    private let name: String
    private let interval: Double
    private let job: @Sendable () -> Void

    public init(name: String, interval: Double, _ job: @escaping @Sendable () -> Void) {
        self.name = name
        self.interval = interval
        self.job = job
    }

    /// Starts the thread (the first run is `interval` seconds from now).
    public func start() throws(HostThread.StartError) {
        try HostThread.start(name: name, kind: .vmm) { [self] in
            while lock.withLock({ () -> Bool in
                if !cancelled { _ = lock.wait(seconds: interval) }
                return !cancelled
            }) {
                job()
            }
        }
    }

    /// Stops the runs (a run in progress finishes).
    public func cancel() { lock.withLock { cancelled = true; lock.broadcast() } }
}

/// SIGINT and SIGTERM, which stop a VM: blocked on every thread but the one that waits for them.
public enum StopSignals {
    /// The set {SIGINT, SIGTERM}.
    public static var set: sigset_t {
        var s = sigset_t()
        sigemptyset(&s)
        sigaddset(&s, SIGINT)
        sigaddset(&s, SIGTERM)
        return s
    }

    /// Blocks SIGINT and SIGTERM on the calling thread (threads started later inherit the mask).
    public static func block() {
        var s = set
        pthread_sigmask(SIG_BLOCK, &s, nil)
    }

    /// Prepares the process's main thread to wait for SIGINT/SIGTERM with `sigtimedwait`: blocks
    /// them (every thread started afterwards inherits the mask) and restores their default
    /// disposition, since an ignored signal is discarded rather than left pending (a parent may
    /// have started us with them ignored). Returns the set to wait on.
    public static func takeOver() -> sigset_t {
        block()
        signal(SIGINT, SIG_DFL)
        signal(SIGTERM, SIG_DFL)
        return set
    }
}

/// A mutex with a condition variable (pthreads), for threads that wait for work or for
/// in-flight requests to drain. Use `withLock`, and `wait()` only while holding the lock.
public final class ConditionLock: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let cond: UnsafeMutablePointer<pthread_cond_t>

    public init() {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        cond = .allocate(capacity: 1)
        cond.initialize(to: pthread_cond_t())
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        cond.deallocate()
        mutex.deallocate()
    }

    /// Takes the lock.
    public func lock() { pthread_mutex_lock(mutex) }
    /// Releases the lock.
    public func unlock() { pthread_mutex_unlock(mutex) }

    /// Runs `body` holding the lock.
    public func withLock<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Releases the lock, waits for a signal, takes the lock again (spurious wake-ups happen:
    /// wait in a loop on the condition).
    public func wait() { pthread_cond_wait(cond, mutex) }

    /// As `wait()`, giving up after `seconds`; false on timeout.
    public func wait(seconds: Double) -> Bool {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        let whole = Int(seconds.rounded(.down))
        var nsec = now.tv_nsec + Int((seconds - Double(whole)) * 1e9)
        var sec = now.tv_sec + whole
        if nsec >= 1_000_000_000 { sec += 1; nsec -= 1_000_000_000 }
        var deadline = timespec(tv_sec: sec, tv_nsec: nsec)
        return pthread_cond_timedwait(cond, mutex, &deadline) == 0
    }

    /// Wakes one waiter.
    public func signal() { pthread_cond_signal(cond) }
    /// Wakes every waiter.
    public func broadcast() { pthread_cond_broadcast(cond) }
}
