// `swiftkvm vm console NAME`: attaches the terminal (or pipes) to a VM's console socket.
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// The terminal settings a signal handler restores (written before the handlers are installed).
nonisolated(unsafe) private var signalTerminal = termios()
nonisolated(unsafe) private var signalTerminalFD: Int32 = 0

/// Copies between stdin/stdout and a VM's console socket (`swiftkvm vmm --console-sock`).
///
/// On a terminal, stdin is put in raw mode (restored on every exit path) and `Ctrl-]` detaches,
/// as in virsh. With pipes, stdin is copied until its EOF, then output is still shown for
/// `drainAfterEOF` seconds; the copy also ends when the VM exits (the socket closes).
public enum ConsoleAttach {
    /// virsh's escape: Ctrl-].
    public static let escapeByte: UInt8 = 0x1d
    /// How long output keeps flowing after stdin ends (pipes).
    public static let drainAfterEOF: Double = 0.5

    /// Why the copy ended.
    public enum Outcome: Equatable, Sendable {
        /// Ctrl-] on the terminal.
        case detached
        /// stdin ended (pipe) and the drain time passed.
        case inputEnded
        /// The console socket closed (the VM stopped).
        case vmExited
    }

    /// Connects to `socketPath` (a stream Unix socket); the descriptor, or a `ManagerError`
    /// naming the VM and the path.
    public static func connect(socketPath: String, vm: String) throws(ManagerError) -> Int32 {
        guard socketPath.utf8.count < 108 else {
            throw ManagerError(.cannotConnect, "the console socket of vm '\(vm)' (\(socketPath)) is too long for a Unix socket")
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw ManagerError(.host, "socket: \(ManagerError.errnoText())") }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in socketPath.utf8.enumerated() { p[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else {
            let e = errno
            _ = Glibc.close(fd)
            throw ManagerError(.cannotConnect, "cannot connect to the console of vm '\(vm)' at \(socketPath): \(ManagerError.errnoText(e))")
        }
        return fd
    }

    /// Copies between `input`/`output` and the connected console `socket` until one of the
    /// `Outcome`s; closes `socket`. Raw mode and Ctrl-] apply when `input` is a terminal.
    public static func run(socket: Int32, input: Int32 = STDIN_FILENO, output: Int32 = STDOUT_FILENO) -> Outcome {
        defer { _ = Glibc.close(socket) }
        let terminal = isatty(input) == 1
        var saved = termios()
        var raw = false
        if terminal, tcgetattr(input, &saved) == 0 {
            var t = saved
            cfmakeraw(&t)
            t.c_oflag |= tcflag_t(OPOST)        // keep "\n" → "\r\n" for guests that send bare newlines
            signalTerminal = saved
            signalTerminalFD = input
            for sig in [SIGTERM, SIGHUP, SIGQUIT] {
                signal(sig) { sig in
                    _ = tcsetattr(signalTerminalFD, TCSANOW, &signalTerminal)
                    signal(sig, SIG_DFL)
                    raise(sig)
                }
            }
            raw = tcsetattr(input, TCSANOW, &t) == 0
            if raw {
                let banner = "Connected to the console (escape character is ^], Ctrl + ])\n"
                _ = writeAll(STDERR_FILENO, Array(banner.utf8)[...])
            }
        }
        defer {
            if raw {
                _ = tcsetattr(input, TCSANOW, &saved)
                for sig in [SIGTERM, SIGHUP, SIGQUIT] { signal(sig, SIG_DFL) }
                _ = writeAll(STDERR_FILENO, Array("\n".utf8)[...])
            }
        }

        var inputOpen = true
        var drainDeadline: Double?
        var buf = [UInt8](repeating: 0, count: 16384)
        while true {
            var fds = [pollfd(fd: socket, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: inputOpen ? input : -1, events: Int16(POLLIN), revents: 0)]
            var timeoutMs: Int32 = -1
            if let d = drainDeadline {
                let left = d - now()
                if left <= 0 { return .inputEnded }
                timeoutMs = Int32(left * 1000) + 1
            }
            let r = poll(&fds, 2, timeoutMs)
            if r < 0 {
                if errno == EINTR { continue }
                return .vmExited
            }
            if fds[0].revents != 0 {
                let n = buf.withUnsafeMutableBytes { read(socket, $0.baseAddress, $0.count) }
                if n > 0 {
                    if !writeAll(output, buf[0..<n]) { return .inputEnded }
                } else if n == 0 || (errno != EINTR && errno != EAGAIN) {
                    return .vmExited
                }
            }
            if inputOpen && fds[1].revents != 0 {
                let n = buf.withUnsafeMutableBytes { read(input, $0.baseAddress, $0.count) }
                if n > 0 {
                    var chunk = buf[0..<n]
                    var detach = false
                    if terminal, let i = chunk.firstIndex(of: escapeByte) {
                        chunk = chunk[..<i]
                        detach = true
                    }
                    if !chunk.isEmpty && !sendAll(socket, chunk) { return .vmExited }
                    if detach { return .detached }
                } else if n == 0 || (errno != EINTR && errno != EAGAIN) {
                    inputOpen = false
                    drainDeadline = now() + drainAfterEOF
                }
            }
        }
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    static func writeAll(_ fd: Int32, _ bytes: ArraySlice<UInt8>) -> Bool {
        var rest = bytes
        while !rest.isEmpty {
            let n = rest.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
            if n > 0 { rest = rest.dropFirst(n) } else if n < 0 && errno == EINTR { continue } else { return false }
        }
        return true
    }

    static func sendAll(_ fd: Int32, _ bytes: ArraySlice<UInt8>) -> Bool {
        var rest = bytes
        while !rest.isEmpty {
            let n = rest.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n > 0 { rest = rest.dropFirst(n) } else if n < 0 && errno == EINTR { continue } else { return false }
        }
        return true
    }
}
