import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Testing
@testable import Manager

/// The daemon's wait on a vmm's start-up pipe (`--ready-fd`): the `ready` line, EOF, garbage and
/// silence, with a plain pipe in place of the vmm.
@Suite("Start-up pipe")
struct StartPipeTests {
    func withPipe(_ body: (_ read: Int32, _ write: Int32) -> Void) {
        var fds: [Int32] = [-1, -1]
        #expect(pipe(&fds) == 0)
        body(fds[0], fds[1])
        close(fds[0])
    }

    @Test("the ready line, even written in pieces, is a start")
    func ready() {
        withPipe { r, w in
            let writer = Thread {
                _ = write(w, "rea", 3)
                usleep(20_000)
                _ = write(w, "dy\n", 3)
            }
            writer.start()
            #expect(VMManager.awaitReady(fd: r, timeout: 10) == .ready)
            close(w)
        }
    }

    @Test("EOF before the line (the vmm exited) and a wrong line are exits, not starts")
    func exited() {
        withPipe { r, w in
            close(w)
            #expect(VMManager.awaitReady(fd: r, timeout: 10) == .exited)
        }
        withPipe { r, w in
            _ = write(w, "nope!!\n", 7)
            #expect(VMManager.awaitReady(fd: r, timeout: 10) == .exited)
            close(w)
        }
        withPipe { r, w in
            _ = write(w, "rea", 3)
            close(w)
            #expect(VMManager.awaitReady(fd: r, timeout: 10) == .exited)
        }
    }

    @Test("silence ends at the timeout")
    func silence() {
        withPipe { r, w in
            let t0 = Date()
            #expect(VMManager.awaitReady(fd: r, timeout: 0.3) == .timedOut)
            #expect(Date().timeIntervalSince(t0) >= 0.29)
            close(w)
        }
    }
}
