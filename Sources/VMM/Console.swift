// The host side of the guest's serial console: stdin → UART input, UART output → stdout/file/nothing.
#if canImport(Glibc)
import Glibc
#endif
#if canImport(CKVM)
import CKVM
#endif
import Devices
import Synchronization

/// Errors from setting up the console; each message names the problem and the offending value.
public enum ConsoleError: Error, Equatable, CustomStringConvertible {
    /// A `--serial` value that is not `stdio`, `file:PATH` or `none`.
    case badSerialSpec(String)
    /// The `--serial file:PATH` file could not be opened.
    case cannotOpen(path: String, errno: Int32)
    /// A terminal or thread operation on the console failed.
    case system(operation: String, errno: Int32)

    public var description: String {
        switch self {
        case .badSerialSpec(let s):
            return "invalid --serial value \"\(s)\": expected stdio, file:PATH or none"
        case .cannotOpen(let path, let e):
            return "cannot open serial output file \(path): \(String(cString: strerror(e)))"
        case .system(let op, let e):
            return "console: \(op) failed: \(String(cString: strerror(e)))"
        }
    }
}

/// Where the guest's serial console goes, as given by `--serial stdio|file:PATH|none`.
public enum SerialSpec: Equatable, Sendable, CustomStringConvertible {
    /// Output to stdout, input from stdin (the default).
    case stdio
    /// Output to a file (created or truncated); no input.
    case file(String)
    /// Output discarded; no input.
    case none

    /// Parses `stdio`, `file:PATH` (PATH not empty) or `none`.
    public init(parsing text: String) throws(ConsoleError) {
        if text == "stdio" {
            self = .stdio
        } else if text == "none" {
            self = .none
        } else if text.hasPrefix("file:"), text.count > 5 {
            self = .file(String(text.dropFirst(5)))
        } else {
            throw .badSerialSpec(text)
        }
    }

    public var description: String {
        switch self {
        case .stdio: return "stdio"
        case .file(let p): return "file:\(p)"
        case .none: return "none"
        }
    }
}

// MARK: - Output

/// Console output: unbuffered `write(2)` to stdout or a file, or nothing.
///
/// Every `write` hands all its bytes to the kernel before returning (partial writes are
/// continued, EINTR retried, EAGAIN waited out with `poll`), so nothing is held in user space
/// and nothing is lost at exit. Writes from several threads are serialized. Bytes that cannot
/// be written (EPIPE, EIO…) are counted in `droppedBytes`, never fatal. The VMM should ignore
/// SIGPIPE so that a closed stdout pipe shows up as EPIPE here instead of killing the process.
public final class ConsoleOutput: SerialOutput, Sendable {
    private struct State {
        var fd: Int32
        var owns: Bool
        var dropped: UInt64 = 0
        var written: UInt64 = 0
    }
    private let state: Mutex<State>

    /// Opens the output `spec` names (stdout for `.stdio`, a created/truncated file for `.file`).
    public init(spec: SerialSpec) throws(ConsoleError) {
        switch spec {
        case .stdio:
            state = Mutex(State(fd: STDOUT_FILENO, owns: false))
        case .none:
            state = Mutex(State(fd: -1, owns: false))
        case .file(let path):
            let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw .cannotOpen(path: path, errno: errno) }
            state = Mutex(State(fd: fd, owns: true))
        }
    }

    /// Writes to `fileDescriptor`; closes it on `close()`/deinit only when `owning`.
    public init(fileDescriptor: Int32, owning: Bool) {
        state = Mutex(State(fd: fileDescriptor, owns: owning))
    }

    deinit { close() }

    /// Bytes that could not be written because of an error on the descriptor.
    public var droppedBytes: UInt64 { state.withLock { $0.dropped } }
    /// Bytes written successfully.
    public var writtenBytes: UInt64 { state.withLock { $0.written } }

    public func write(_ bytes: [UInt8]) {
        guard !bytes.isEmpty else { return }
        state.withLock { s in
            guard s.fd >= 0 else { return }
            let n = bytes.withUnsafeBytes { writeAll(fd: s.fd, $0) }
            s.written += UInt64(n)
            s.dropped += UInt64(bytes.count - n)
        }
    }

    /// Returns once every earlier `write` is in the kernel (writes are unbuffered).
    public func flush() {
        state.withLock { _ in }
    }

    /// Closes an owned descriptor; later writes are discarded.
    public func close() {
        state.withLock { s in
            if s.owns && s.fd >= 0 { _ = Glibc.close(s.fd) }
            s.fd = -1
        }
    }
}

/// Writes all of `buf` to `fd`, continuing partial writes and retrying EINTR/EAGAIN.
/// Returns the number of bytes written (less than `buf.count` only on an error).
func writeAll(fd: Int32, _ buf: UnsafeRawBufferPointer) -> Int {
    guard let base = buf.baseAddress else { return 0 }
    var done = 0
    while done < buf.count {
        let r = Glibc.write(fd, base + done, buf.count - done)
        if r > 0 {
            done += r
        } else if r < 0 && errno == EINTR {
            continue
        } else if r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
            var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            _ = poll(&p, 1, 1000)
        } else {
            break
        }
    }
    return done
}

// MARK: - Escape handling

/// The Ctrl-A escape state machine of an interactive console, as QEMU's `-serial mon:stdio`:
/// Ctrl-A x quits, Ctrl-A Ctrl-A sends one Ctrl-A to the guest, Ctrl-A h asks for help, and
/// Ctrl-A followed by anything else is swallowed. Escapes may span chunks.
public struct ConsoleEscape: Sendable {
    /// The escape byte, Ctrl-A.
    public static let escapeByte: UInt8 = 0x01

    /// What a chunk of keyboard input amounts to, in order.
    public enum Event: Equatable, Sendable {
        /// Bytes for the guest.
        case input([UInt8])
        /// Ctrl-A x: the user wants to quit.
        case quit
        /// Ctrl-A h: show the escape keys.
        case help
    }

    /// The help text shown for Ctrl-A h.
    public static let helpText = "\r\nC-a h    print this help\r\nC-a x    exit the VM\r\nC-a C-a  send C-a\r\n"

    private var escaped = false

    public init() {}

    /// Processes `bytes`; input after a quit is discarded.
    public mutating func feed(_ bytes: [UInt8]) -> [Event] {
        var events: [Event] = []
        var run: [UInt8] = []
        func emit(_ e: Event) {
            if !run.isEmpty { events.append(.input(run)); run = [] }
            events.append(e)
        }
        for b in bytes {
            if escaped {
                escaped = false
                switch b {
                case Self.escapeByte: run.append(b)
                case UInt8(ascii: "x"), UInt8(ascii: "X"):
                    emit(.quit)
                    return events
                case UInt8(ascii: "h"), UInt8(ascii: "H"), UInt8(ascii: "?"): emit(.help)
                default: break
                }
            } else if b == Self.escapeByte {
                escaped = true
            } else {
                run.append(b)
            }
        }
        if !run.isEmpty { events.append(.input(run)) }
        return events
    }
}

// MARK: - Input

/// Terminal settings saved before entering raw mode, restorable from a signal handler.
/// Written once before `savedTerminalValid` is set (release); read after it is seen (acquire).
nonisolated(unsafe) private var savedTerminal = termios()
nonisolated(unsafe) private var savedTerminalFD: Int32 = -1
private let savedTerminalValid = Atomic<Bool>(false)
private let atexitRegistered = Atomic<Bool>(false)

/// Console input: reads stdin (or any descriptor) on a dedicated thread named `console`.
///
/// When the descriptor is a terminal it is put in raw mode (no echo, no line editing, no
/// signals: Ctrl-C goes to the guest) and the Ctrl-A escapes of `ConsoleEscape` apply; Ctrl-A x
/// calls `onQuit`. Otherwise (a pipe or file) bytes go to the guest unmodified, so tests can
/// script it, and end of file calls `onEOF` and stops reading without stopping the VM.
///
/// The terminal is restored by `stop()`, `restore()`, deinit, at `exit()` (an atexit handler),
/// and by `ConsoleInput.restoreTerminalFromSignalHandler()`, which is async-signal-safe.
public final class ConsoleInput: Sendable {
    private struct State {
        var thread: pthread_t?
        var wakeWrite: Int32 = -1
        var rawMode = false
    }

    private let fd: Int32
    private let onInput: @Sendable ([UInt8]) -> Void
    private let onQuit: @Sendable () -> Void
    private let onEOF: @Sendable () -> Void
    private let state = Mutex(State())
    /// Whether the input descriptor is a terminal (raw mode and escapes apply).
    public let isTerminal: Bool

    /// Creates the console reader; nothing happens until `start()`.
    /// - Parameters:
    ///   - fileDescriptor: where input comes from (stdin by default); not closed by this object.
    ///   - onInput: receives bytes for the guest (typically `Serial16550.enqueue`).
    ///   - onQuit: called on Ctrl-A x (terminals only).
    ///   - onEOF: called when a non-terminal input ends.
    public init(fileDescriptor: Int32 = STDIN_FILENO,
                onInput: @escaping @Sendable ([UInt8]) -> Void,
                onQuit: @escaping @Sendable () -> Void,
                onEOF: @escaping @Sendable () -> Void = {}) {
        self.fd = fileDescriptor
        self.onInput = onInput
        self.onQuit = onQuit
        self.onEOF = onEOF
        self.isTerminal = isatty(fileDescriptor) == 1
    }

    deinit { stop() }

    /// Enters raw mode (terminals) and starts the reader thread. Calling it twice does nothing.
    public func start() throws(ConsoleError) {
        let result = state.withLock { s -> ConsoleError? in
            guard s.thread == nil else { return nil }
            var fds: [Int32] = [-1, -1]
            guard pipe(&fds) == 0 else { return .system(operation: "pipe", errno: errno) }
            _ = fcntl(fds[0], F_SETFD, FD_CLOEXEC)
            _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
            if isTerminal {
                if let e = enterRawMode() {
                    _ = Glibc.close(fds[0]); _ = Glibc.close(fds[1])
                    return e
                }
                s.rawMode = true
            }
            let context = ReaderContext(fd: fd, wake: fds[0], escapes: isTerminal,
                                        onInput: onInput, onQuit: onQuit, onEOF: onEOF)
            let box = Unmanaged.passRetained(context).toOpaque()
            var tid = pthread_t()
            let rc = pthread_create(&tid, nil, { arg in
                guard let arg else { return nil }
                let ctx = Unmanaged<ReaderContext>.fromOpaque(arg).takeRetainedValue()
                #if canImport(CKVM)
                _ = ckvm_set_thread_name("console")
                #endif
                Seccomp.confineCurrentThread(.console)
                ctx.run()
                return nil
            }, box)
            guard rc == 0 else {
                Unmanaged<ReaderContext>.fromOpaque(box).release()
                _ = Glibc.close(fds[0]); _ = Glibc.close(fds[1])
                if s.rawMode { Self.restoreTerminalFromSignalHandler(); s.rawMode = false }
                return .system(operation: "pthread_create", errno: rc)
            }
            s.thread = tid
            s.wakeWrite = fds[1]
            return nil
        }
        if let result { throw result }
    }

    /// Stops the reader thread (joining it unless called from it) and restores the terminal.
    public func stop() {
        // Take the thread out under the lock, join it outside: a callback running on the reader
        // (onQuit, onEOF) may itself call stop().
        let (thread, wakeWrite, wasRaw) = state.withLock { s -> (pthread_t?, Int32, Bool) in
            defer {
                s.thread = nil
                s.wakeWrite = -1
                s.rawMode = false
            }
            return (s.thread, s.wakeWrite, s.rawMode)
        }
        if let thread {
            // Closing the write end wakes the reader's poll (POLLHUP); the reader closes the
            // read end itself when it finishes, so no descriptor is closed under it.
            _ = Glibc.close(wakeWrite)
            if pthread_equal(thread, pthread_self()) == 0 {
                _ = pthread_join(thread, nil)
            } else {
                _ = pthread_detach(thread)
            }
        }
        if wasRaw {
            Self.restoreTerminalFromSignalHandler()
            savedTerminalValid.store(false, ordering: .releasing)
        }
    }

    /// Restores the terminal settings saved by `start()` (idempotent; the reader keeps running).
    public func restore() {
        Self.restoreTerminalFromSignalHandler()
    }

    /// Restores the saved terminal settings, if any. Async-signal-safe (only `tcsetattr`).
    public static func restoreTerminalFromSignalHandler() {
        guard savedTerminalValid.load(ordering: .acquiring) else { return }
        _ = tcsetattr(savedTerminalFD, TCSANOW, &savedTerminal)
    }

    /// Saves the terminal settings and switches to raw mode; nil on success.
    private func enterRawMode() -> ConsoleError? {
        var t = termios()
        guard tcgetattr(fd, &t) == 0 else { return .system(operation: "tcgetattr", errno: errno) }
        if !savedTerminalValid.load(ordering: .acquiring) {
            savedTerminal = t
            savedTerminalFD = fd
            savedTerminalValid.store(true, ordering: .releasing)
        }
        if !atexitRegistered.exchange(true, ordering: .acquiringAndReleasing) {
            atexit { ConsoleInput.restoreTerminalFromSignalHandler() }
        }
        t.c_iflag &= ~tcflag_t(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IXON)
        t.c_lflag &= ~tcflag_t(ECHO | ECHONL | ICANON | ISIG | IEXTEN)
        t.c_cflag &= ~tcflag_t(CSIZE | PARENB)
        t.c_cflag |= tcflag_t(CS8)
        withUnsafeMutableBytes(of: &t.c_cc) { cc in
            cc[Int(VMIN)] = 1
            cc[Int(VTIME)] = 0
        }
        guard tcsetattr(fd, TCSANOW, &t) == 0 else { return .system(operation: "tcsetattr", errno: errno) }
        return nil
    }
}

/// What the reader thread needs; owned by that thread.
private final class ReaderContext {
    let fd: Int32
    let wake: Int32
    let escapes: Bool
    let onInput: @Sendable ([UInt8]) -> Void
    let onQuit: @Sendable () -> Void
    let onEOF: @Sendable () -> Void

    init(fd: Int32, wake: Int32, escapes: Bool, onInput: @escaping @Sendable ([UInt8]) -> Void,
         onQuit: @escaping @Sendable () -> Void, onEOF: @escaping @Sendable () -> Void) {
        self.fd = fd
        self.wake = wake
        self.escapes = escapes
        self.onInput = onInput
        self.onQuit = onQuit
        self.onEOF = onEOF
    }

    func run() {
        defer { _ = Glibc.close(wake) }
        var escape = ConsoleEscape()
        var buf = [UInt8](repeating: 0, count: 4096)
        var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: wake, events: Int16(POLLIN), revents: 0)]
        while true {
            fds[0].revents = 0
            fds[1].revents = 0
            let r = poll(&fds, 2, -1)
            if r < 0 {
                if errno == EINTR { continue }
                return
            }
            if fds[1].revents != 0 { return }                    // stop() (or its pipe closed)
            guard fds[0].revents != 0 else { continue }
            let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK { continue }
                return
            }
            if n == 0 {
                onEOF()
                return
            }
            let chunk = Array(buf[0..<n])
            guard escapes else {
                onInput(chunk)
                continue
            }
            for event in escape.feed(chunk) {
                switch event {
                case .input(let bytes):
                    onInput(bytes)
                case .help:
                    _ = Array(ConsoleEscape.helpText.utf8).withUnsafeBytes { writeAll(fd: STDERR_FILENO, $0) }
                case .quit:
                    onQuit()
                    return
                }
            }
        }
    }
}

// MARK: - Wiring

/// The guest's serial console as `--serial` describes it: output always, input from stdin only
/// for `stdio`.
///
/// Typical use: `let console = try Console(spec: spec)`; build the UART with
/// `console.output`; `try console.attachInput(to: uart, onQuit: { … })` once the VM is built;
/// `console.shutdown()` on every exit path (it stops the reader, restores the terminal and
/// flushes the output).
public final class Console: Sendable {
    /// What `--serial` asked for.
    public let spec: SerialSpec
    /// The sink to give the UART.
    public let output: ConsoleOutput
    private let input = Mutex<ConsoleInput?>(nil)

    /// Opens the output side of `spec`.
    public init(spec: SerialSpec) throws(ConsoleError) {
        self.spec = spec
        self.output = try ConsoleOutput(spec: spec)
    }

    /// For `stdio`, starts reading stdin into `serial` (raw mode and Ctrl-A escapes on a
    /// terminal); `onQuit` is called on Ctrl-A x. Does nothing for `file:` and `none`.
    public func attachInput(to serial: Serial16550, fileDescriptor: Int32 = STDIN_FILENO,
                            onQuit: @escaping @Sendable () -> Void) throws(ConsoleError) {
        guard spec == .stdio else { return }
        let reader = ConsoleInput(fileDescriptor: fileDescriptor,
                                  onInput: { serial.enqueue($0) }, onQuit: onQuit)
        try reader.start()
        input.withLock { $0 = reader }
    }

    /// Whether stdin is an interactive terminal in raw mode.
    public var isInteractive: Bool { input.withLock { $0?.isTerminal ?? false } }

    /// Stops reading input, restores the terminal and flushes output. Idempotent.
    public func shutdown() {
        let reader = input.withLock { r -> ConsoleInput? in
            defer { r = nil }
            return r
        }
        reader?.stop()
        output.flush()
    }
}
