import Devices

/// A fixed set of threads running blocking jobs (disk I/O) in submission order, several at a time.
/// `shutdown()` ends the threads once the queued jobs ran.
public final class IOWorkerPool: @unchecked Sendable {
    private let cond = ConditionLock()
    private var jobs: [@Sendable () -> Void] = []
    private var head = 0
    private var stopping = false
    private var alive: Int

    /// Starts `threads` threads named `name`, confined as `kind` threads (nil: they confine themselves).
    public init(threads: Int, name: String, kind: ThreadKind? = .device) {
        let wanted = max(1, threads)
        alive = wanted
        for _ in 0..<wanted {
            do {
                try HostThread.start(name: name, kind: kind) { [self] in work() }
            } catch {
                // Fewer threads; with none at all, `submit` runs jobs on the caller's thread.
                cond.withLock { alive -= 1 }
            }
        }
    }

    /// Queues `job`.
    public func submit(_ job: @escaping @Sendable () -> Void) {
        cond.lock()
        guard alive > 0 else {
            cond.unlock()
            job()
            return
        }
        jobs.append(job)
        cond.signal()
        cond.unlock()
    }

    /// Lets the threads finish the queued jobs and exit; waits for them.
    public func shutdown() {
        cond.lock()
        stopping = true
        cond.broadcast()
        while alive > 0 { cond.wait() }
        cond.unlock()
    }

    private func work() {
        cond.lock()
        while true {
            if head < jobs.count {
                let job = jobs[head]
                head += 1
                if head > 64, head * 2 > jobs.count { jobs.removeFirst(head); head = 0 }
                cond.unlock()
                job()
                cond.lock()
            } else if stopping {
                alive -= 1
                cond.broadcast()
                cond.unlock()
                return
            } else {
                cond.wait()
            }
        }
    }
}
