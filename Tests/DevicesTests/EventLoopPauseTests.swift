import Devices
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite("EventLoop pause")
struct EventLoopPauseTests {
    @Test("while paused no handler runs; a signal that arrived meanwhile is handled after resume; pause nests and stop ends a paused loop")
    func pauseResume() throws {
        let loop = try EventLoop(name: "pause-test")
        let fd = try EventFD()
        let runs = Mutex(0)
        try loop.add(fd) { runs.withLock { $0 += 1 } }
        loop.pause()                      // not started: returns at once
        loop.resume()
        try loop.start()
        fd.signal()
        #expect(wait { runs.withLock { $0 } == 1 })
        loop.pause()
        loop.pause()
        fd.signal()
        usleep(100_000)
        #expect(runs.withLock { $0 } == 1, "no handler runs while paused")
        loop.resume()
        usleep(100_000)
        #expect(runs.withLock { $0 } == 1, "one pause is still in effect")
        loop.resume()
        #expect(wait { runs.withLock { $0 } == 2 }, "the signal is handled after the last resume")
        loop.pause()
        loop.stop()                       // a parked loop stops (this returns)
    }

    func wait(_ cond: () -> Bool) -> Bool {
        for _ in 0..<500 where !cond() { usleep(10_000) }
        return cond()
    }
}
