import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Reads one descriptor (a pipe, socket or pty) to EOF on its own thread with blocking `read(2)`.
///
/// This replaces `FileHandle.readabilityHandler`: that handler is a libdispatch read source on
/// the pipe's fd, and when the handle is closed (or released) while the source is still
/// registered, the fd number can be reused by another test's pipe and libdispatch's event loop
/// crashes (SIGSEGV in `_dispatch_event_loop_drain`, seen in a parallel test run). Here the
/// reader owns its descriptor until it has seen EOF, so no other code closes it under it.
final class PipeDrainer: @unchecked Sendable {
    private let condition = NSCondition()
    private var data = Data()
    private var ended = false
    /// Keeps a FileHandle's descriptor open while reading (nil for a raw descriptor).
    private let handle: FileHandle?

    /// Starts reading `handle` (the read end of a pipe) at once; the handle closes it when released.
    convenience init(_ handle: FileHandle) {
        self.init(fd: handle.fileDescriptor, handle: handle, name: "pipe-drainer")
    }

    /// Starts reading `fd` at once; the reader owns it and closes it at EOF.
    convenience init(fd: Int32, name: String = "pipe-drainer") {
        self.init(fd: fd, handle: nil, name: name)
    }

    private init(fd: Int32, handle: FileHandle?, name: String) {
        self.handle = handle
        let thread = Thread { [self] in self.readLoop(fd) }
        thread.name = name
        thread.start()
    }

    private func readLoop(_ fd: Int32) {
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            if n > 0 {
                condition.lock()
                data.append(contentsOf: buffer[0..<n])
                condition.broadcast()
                condition.unlock()
                continue
            }
            if n < 0 && errno == EINTR { continue }
            break
        }
        if handle == nil { close(fd) }
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

    /// Everything read so far, as UTF-8 text.
    var text: String { String(decoding: bytes, as: UTF8.self) }

    /// Whether the writer side has closed (EOF seen).
    var isEnded: Bool {
        condition.lock(); defer { condition.unlock() }
        return ended
    }

    /// Waits until the text contains `needle` (true) or `timeout` passes / EOF comes first (false).
    func waitFor(_ needle: String, timeout: TimeInterval) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        condition.lock(); defer { condition.unlock() }
        while !String(decoding: data, as: UTF8.self).contains(needle) {
            if ended || !condition.wait(until: deadline) {
                return String(decoding: data, as: UTF8.self).contains(needle)
            }
        }
        return true
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
