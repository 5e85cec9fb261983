import Devices
import Foundation
import Synchronization
import Testing

@Suite struct EventLoopTests {
    /// A readiness watch hands the fd over untouched: the handler reads every byte the peer wrote.
    @Test func readinessWatchLeavesDataToTheHandler() throws {
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        for fd in fds { _ = fcntl(fd, F_SETFL, O_NONBLOCK) }
        defer { close(fds[0]); close(fds[1]) }
        let loop = try EventLoop(name: "loop-test")
        let got = Mutex<[UInt8]>([])
        let done = DispatchSemaphore(value: 0)
        let readFD = fds[0]
        try loop.watch(readFD, for: .readable) { events in
            #expect(events.contains(.readable))
            var buf = [UInt8](repeating: 0, count: 64)
            let n = read(readFD, &buf, buf.count)
            guard n > 0 else { return }
            let total = got.withLock { $0.append(contentsOf: buf[0..<n]); return $0.count }
            if total >= 11 { done.signal() }
        }
        try loop.start()
        defer { loop.stop() }
        let bytes: [UInt8] = Array("hello world".utf8)
        #expect(write(fds[1], bytes, 5) == 5)
        #expect(write(fds[1], Array(bytes[5...]), 6) == 6)
        #expect(done.wait(timeout: .now() + 5) == .success)
        #expect(got.withLock { $0 } == bytes)
    }

    /// `change` to no events stops the calls (level-triggered data stays in the fd), and widening
    /// again resumes them; a writable watch fires on an empty pipe.
    @Test func changeNarrowsAndWidensAWatch() throws {
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        for fd in fds { _ = fcntl(fd, F_SETFL, O_NONBLOCK) }
        defer { close(fds[0]); close(fds[1]) }
        let loop = try EventLoop(name: "loop-test")
        let calls = Mutex(0)
        let fired = DispatchSemaphore(value: 0)
        let token = Mutex<EventLoop.Token?>(nil)
        let t = try loop.watch(fds[0], for: .readable) { _ in
            calls.withLock { $0 += 1 }
            // Do not read: stop watching instead, as a device without buffers does.
            if let t = token.withLock({ $0 }) { try? loop.change(t, to: []) }
            fired.signal()
        }
        token.withLock { $0 = t }
        try loop.start()
        defer { loop.stop() }
        #expect(write(fds[1], "x", 1) == 1)
        #expect(fired.wait(timeout: .now() + 5) == .success)
        usleep(100_000)
        #expect(calls.withLock { $0 } == 1)
        try loop.change(t, to: .readable)
        #expect(fired.wait(timeout: .now() + 5) == .success)
        #expect(calls.withLock { $0 } == 2)

        let writable = DispatchSemaphore(value: 0)
        let w = try loop.watch(fds[1], for: .writable) { events in
            if events.contains(.writable) { writable.signal() }
        }
        #expect(writable.wait(timeout: .now() + 5) == .success)
        loop.remove(w)
    }
}
