import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// Errors from host event primitives (eventfd, epoll).
public struct EventError: Error, CustomStringConvertible, Equatable {
    /// The call that failed, e.g. "eventfd".
    public let operation: String
    /// errno of the failure.
    public let errno: Int32

    public init(operation: String, errno: Int32) {
        self.operation = operation
        self.errno = errno
    }

    public var description: String { "\(operation) failed: \(String(cString: strerror(errno))) (errno \(errno))" }
}

/// A Linux eventfd (non-blocking, close-on-exec), owned by this object and closed on deinit.
///
/// Used for KVM irqfd (device → guest interrupt) and ioeventfd (guest notify → device), and to
/// wake event loops. `signal()` adds 1 to the counter; `drain()` reads and resets it.
public final class EventFD: @unchecked Sendable {
    /// The file descriptor (valid for the lifetime of this object).
    public let fd: Int32

    /// Creates an eventfd with counter 0 (`EFD_NONBLOCK | EFD_CLOEXEC`).
    public init() throws {
        // 0o4000 = EFD_NONBLOCK, 0o2000000 = EFD_CLOEXEC (same values as O_NONBLOCK/O_CLOEXEC).
        let fd = ckvm_eventfd(0, O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else { throw EventError(operation: "eventfd", errno: -fd) }
        self.fd = fd
    }

    /// Takes ownership of `fd`, another descriptor whose 8-byte reads drain it (e.g. a timerfd),
    /// so that event loops can watch it like an eventfd. It is closed on deinit.
    public init(adopting fd: Int32) { self.fd = fd }

    deinit { close(fd) }

    /// Adds 1 to the counter, waking whoever polls the fd.
    public func signal() {
        var one: UInt64 = 1
        while true {
            let n = write(fd, &one, 8)
            if n == 8 || (n < 0 && Glibc.errno != EINTR) { return }
        }
    }

    /// Reads and resets the counter; returns it (0 if it was not signalled).
    @discardableResult
    public func drain() -> UInt64 {
        var value: UInt64 = 0
        while true {
            let n = read(fd, &value, 8)
            if n == 8 { return value }
            if n < 0 && Glibc.errno == EINTR { continue }
            return 0
        }
    }
}
