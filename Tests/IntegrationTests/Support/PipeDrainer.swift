import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Reads one pipe to EOF on its own thread with blocking `read(2)`.
///
/// This replaces `FileHandle.readabilityHandler`: that handler is a libdispatch read source on
/// the pipe's fd, and when the handle is closed (or released) while the source is still
/// registered, the fd number can be reused by another test's pipe and libdispatch's event loop
/// crashes (SIGSEGV in `_dispatch_event_loop_drain`, seen in a parallel test run). Here the
/// thread owns a reference to the handle, so the fd stays open until the thread has seen EOF.
final class PipeDrainer: @unchecked Sendable {
    private let condition = NSCondition()
    private var data = Data()
    private var ended = false
    private let handle: FileHandle

    /// Starts reading `handle` (the read end of a pipe) at once.
    init(_ handle: FileHandle) {
        self.handle = handle
        let thread = Thread { [self] in self.readLoop() }
        thread.name = "pipe-drainer"
        thread.start()
    }

    private func readLoop() {
        let fd = handle.fileDescriptor
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            if n > 0 {
                condition.lock()
                data.append(contentsOf: buffer[0..<n])
                condition.unlock()
                continue
            }
            if n < 0 && errno == EINTR { continue }
            break
        }
        condition.lock()
        ended = true
        condition.broadcast()
        condition.unlock()
    }

    /// Everything read so far.
    var bytes: Data {
        condition.lock(); defer { condition.unlock() }
        return data
    }

    /// Whether the writer side has closed (EOF seen).
    var isEnded: Bool {
        condition.lock(); defer { condition.unlock() }
        return ended
    }

    /// Waits until EOF or `timeout` seconds; true when EOF was seen. A grandchild that inherited
    /// the pipe can hold it open after the child exits, hence the bound.
    @discardableResult
    func waitForEnd(timeout: TimeInterval) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        condition.lock(); defer { condition.unlock() }
        while !ended {
            if !condition.wait(until: deadline) { return ended }
        }
        return true
    }
}
