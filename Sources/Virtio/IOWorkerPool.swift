import CKVM
import Foundation

/// A fixed set of threads running blocking jobs (disk I/O) in submission order, several at a time.
/// `shutdown()` ends the threads once the queued jobs ran.
public final class IOWorkerPool: @unchecked Sendable {
    private let cond = NSCondition()
    private var jobs: [@Sendable () -> Void] = []
    private var head = 0
    private var stopping = false
    private var alive: Int

    /// Starts `threads` threads named `name`.
    public init(threads: Int, name: String) {
        alive = max(1, threads)
        for _ in 0..<alive {
            let t = Thread { [self] in
                _ = ckvm_set_thread_name(String(name.prefix(15)))
                var set = sigset_t()
                sigemptyset(&set)
                sigaddset(&set, SIGINT)
                sigaddset(&set, SIGTERM)
                pthread_sigmask(SIG_BLOCK, &set, nil)
                work()
            }
            t.start()
        }
    }

    /// Queues `job`.
    public func submit(_ job: @escaping @Sendable () -> Void) {
        cond.lock()
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
