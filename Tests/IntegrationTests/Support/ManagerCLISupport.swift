import Foundation
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// Helpers of the manager CLI and console-socket tests: the built binary, guest programs, child
/// processes spawned with `posix_spawn` whose output is read on plain threads with blocking
/// `read(2)` (never `FileHandle.readabilityHandler`), console-socket clients and temp dirs.
enum MCSupport {
    /// The swiftkvm binary the other integration tests use (`ProcessRunner.swiftkvmPath`).
    static var swiftkvm: String? { GuestTestEnvironment.swiftkvmPath }

    /// guest/build/NAME.elf once `make -C guest` ran (once per test run); nil when it cannot be built.
    static func guestProgram(_ name: String) -> String? {
        guard GuestTestEnvironment.guestBuildError == nil else { return nil }
        let path = GuestTestEnvironment.guestImage(name)
        return FileManager.default.fileExists(atPath: path) ? path : nil
    }
    static let ticker: String? = guestProgram("ticker")
    static let serial: String? = guestProgram("serial")

    /// Whether the end-to-end tests can run here.
    static var canRunGuests: Bool { GuestTestEnvironment.kvmAvailable && swiftkvm != nil && ticker != nil }

    static let tscKHz = TimeDilation.hostTSCkHz()

    /// Boot arguments of the ticker (ticks=0 runs until stopped).
    static func tickerArgs(ticks: Int, periodMs: Int = 10) -> String { "tsc_khz=\(tscKHz) period_ms=\(periodMs) ticks=\(ticks)" }

    /// Polls `condition` every 20 ms for at most `seconds`.
    @discardableResult
    static func wait(seconds: Double, _ condition: () -> Bool) -> Bool {
        let end = Date().addingTimeInterval(seconds)
        while Date() < end {
            if condition() { return true }
            usleep(20_000)
        }
        return condition()
    }

    /// One request to a Firecracker API socket through curl: the HTTP status ("204"…), "000" when it failed.
    static func apiCall(_ socket: String, _ method: String, _ path: String, _ body: String) -> String {
        let r = try? MCChild.run("/usr/bin/curl", ["-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", socket,
                                                   "-X", method, "http://localhost" + path, "-H", "Content-Type: application/json",
                                                   "-d", body], timeout: 30)
        return r?.stdout ?? "000"
    }

    /// A GET to a Firecracker API socket through curl: the body, nil when the request failed or the
    /// status was not 200.
    static func apiGet(_ socket: String, _ path: String) -> String? {
        guard let r = try? MCChild.run("/usr/bin/curl", ["-s", "-f", "--unix-socket", socket, "http://localhost" + path], timeout: 30),
              r.status == 0 else { return nil }
        return r.stdout
    }

    /// The resident set of process `pid` in KiB (VmRSS), nil when it cannot be read.
    static func rssKiB(_ pid: pid_t) -> Int? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("VmRSS:") {
            return Int(line.dropFirst(6).trimmingCharacters(in: .whitespaces).split(separator: " ").first ?? "")
        }
        return nil
    }

    /// Number of "tick N" lines in `text`.
    static func ticks(in text: String) -> Int {
        // Newlines of either kind ("\r\n" from a terminal is one Character).
        text.split(whereSeparator: \.isNewline).filter { $0.hasPrefix("tick ") }.count
    }
}

/// A short temporary directory (Unix socket paths must stay under 108 bytes), removed by `remove()`.
struct MCTempDir {
    let path: String
    init(prefix: String = "skc") {
        var template = Array("/tmp/\(prefix)-XXXXXX".utf8CString)
        let p = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        path = p.map { String(cString: $0) } ?? "/tmp/\(prefix)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        if p == nil { try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true) }
    }
    func file(_ name: String, _ contents: String) -> String {
        let p = path + "/" + name
        FileManager.default.createFile(atPath: p, contents: Data(contents.utf8))
        return p
    }
    func remove() { try? FileManager.default.removeItem(atPath: path) }
}

/// A child process started with `posix_spawn`: stdout and stderr captured by `PipeDrainer`s, stdin a
/// pipe (`writeInput`, `closeInput`) or /dev/null. Killed only by its own PID.
final class MCChild: @unchecked Sendable {
    struct SpawnError: Error, CustomStringConvertible { var description: String }

    let pid: pid_t
    let stdout: PipeDrainer
    let stderr: PipeDrainer
    let commandLine: String
    private var stdinFD: Int32
    private var status: Int32?

    /// Spawns `executable` with `arguments`; `environment` entries are added to the test's own.
    /// With `terminal` (a pty's slave path), stdin, stdout and stderr are that terminal instead.
    init(_ executable: String, _ arguments: [String], stdinPipe: Bool = false,
         environment: [String: String] = [:], stdoutFile: String? = nil, terminal: String? = nil) throws {
        commandLine = ([executable] + arguments).joined(separator: " ")
        var outPipe: [Int32] = [-1, -1], errPipe: [Int32] = [-1, -1], inPipe: [Int32] = [-1, -1]
        guard pipe(&outPipe) == 0, pipe(&errPipe) == 0 else { throw SpawnError(description: "pipe: \(errno)") }
        if stdinPipe { guard pipe(&inPipe) == 0 else { throw SpawnError(description: "pipe: \(errno)") } }
        // The parent's ends must not leak into other children spawned by parallel tests.
        for fd in [outPipe[0], errPipe[0], inPipe[1]] where fd >= 0 { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        if stdinPipe {
            posix_spawn_file_actions_adddup2(&actions, inPipe[0], 0)
        } else {
            posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        }
        if let stdoutFile {
            posix_spawn_file_actions_addopen(&actions, 1, stdoutFile, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        } else {
            posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
        }
        posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
        if let terminal {
            posix_spawn_file_actions_addopen(&actions, 0, terminal, O_RDWR, 0)
            posix_spawn_file_actions_addopen(&actions, 1, terminal, O_RDWR, 0)
            posix_spawn_file_actions_addopen(&actions, 2, terminal, O_RDWR, 0)
        }
        for fd in [outPipe[0], outPipe[1], errPipe[0], errPipe[1], inPipe[0], inPipe[1]] where fd > 2 {
            posix_spawn_file_actions_addclose(&actions, fd)
        }
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            argv.forEach { free($0) }
            envp.forEach { free($0) }
        }
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        // Default signal dispositions and an empty mask in the child.
        var all = sigset_t(), none = sigset_t()
        sigfillset(&all); sigemptyset(&none)
        posix_spawnattr_setsigdefault(&attr, &all)
        posix_spawnattr_setsigmask(&attr, &none)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))
        var child: pid_t = 0
        let rc = posix_spawn(&child, executable, &actions, &attr, argv, envp)
        close(outPipe[1]); close(errPipe[1])
        if inPipe[0] >= 0 { close(inPipe[0]) }
        guard rc == 0 else {
            close(outPipe[0]); close(errPipe[0])
            if inPipe[1] >= 0 { close(inPipe[1]) }
            throw SpawnError(description: "cannot spawn \(executable): \(String(cString: strerror(rc)))")
        }
        pid = child
        stdinFD = inPipe[1]
        stdout = PipeDrainer(fd: outPipe[0], name: "mc-stdout")
        stderr = PipeDrainer(fd: errPipe[0], name: "mc-stderr")
    }

    deinit {
        if status == nil { _ = kill(pid, SIGKILL); _ = wait(timeout: 5) }
        if stdinFD >= 0 { close(stdinFD) }
    }

    /// Writes `text` to the child's stdin pipe.
    func writeInput(_ text: String) {
        guard stdinFD >= 0 else { return }
        let bytes = Array(text.utf8)
        _ = bytes.withUnsafeBytes { write(stdinFD, $0.baseAddress!, $0.count) }
    }

    /// Closes the child's stdin pipe (EOF).
    func closeInput() {
        if stdinFD >= 0 { close(stdinFD); stdinFD = -1 }
    }

    /// Exit status (128 + N after signal N) if it has ended, without waiting.
    func poll() -> Int32? {
        if let status { return status }
        var st: Int32 = 0
        let r = waitpid(pid, &st, WNOHANG)
        guard r == pid else { return nil }
        status = Self.decode(st)
        return status
    }

    /// Waits up to `timeout` seconds for the exit; nil on timeout.
    @discardableResult
    func wait(timeout: Double) -> Int32? {
        let end = Date().addingTimeInterval(timeout)
        while Date() < end {
            if let s = poll() { return s }
            usleep(10_000)
        }
        return poll()
    }

    /// Sends `signal` to this child only.
    func signal(_ sig: Int32) {
        if status == nil { _ = kill(pid, sig) }
    }

    /// SIGTERM, then SIGKILL after `grace` seconds; reaps the child.
    func stop(grace: Double = 5) {
        guard poll() == nil else { return }
        signal(SIGTERM)
        if wait(timeout: grace) == nil {
            signal(SIGKILL)
            wait(timeout: 5)
        }
    }

    private static func decode(_ st: Int32) -> Int32 {
        let sig = st & 0x7f
        return sig == 0 ? (st >> 8) & 0xff : 128 + sig
    }

    /// What a finished command did.
    struct Result {
        var status: Int32
        var stdout: String
        var stderr: String
        var timedOut: Bool
    }

    /// Runs a command to completion (killed after `timeout`), optionally feeding `input` then EOF.
    static func run(_ executable: String, _ arguments: [String], input: String? = nil,
                    environment: [String: String] = [:], timeout: Double = 60) throws -> Result {
        let c = try MCChild(executable, arguments, stdinPipe: input != nil, environment: environment)
        if let input {
            c.writeInput(input)
            c.closeInput()
        }
        var status = c.wait(timeout: timeout)
        let timedOut = status == nil
        if timedOut {
            c.stop(grace: 2)
            status = c.poll()
        }
        c.stdout.waitForEnd(timeout: 5)
        c.stderr.waitForEnd(timeout: 5)
        return Result(status: status ?? -1, stdout: c.stdout.text, stderr: c.stderr.text, timedOut: timedOut)
    }
}

/// A client of a console socket: connects, reads on a thread (`reader`), sends with `send`.
/// With `reading: false` it never reads (a stuck client).
final class MCConsoleClient: @unchecked Sendable {
    let fd: Int32
    let reader: PipeDrainer?

    init(path: String, reading: Bool = true, receiveBuffer: Int32? = nil) throws {
        let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard s >= 0 else { throw MCChild.SpawnError(description: "socket: \(errno)") }
        _ = fcntl(s, F_SETFD, FD_CLOEXEC)
        if var size = receiveBuffer {
            setsockopt(s, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in path.utf8.prefix(p.count - 1).enumerated() { p[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else {
            let e = errno
            Glibc.close(s)
            throw MCChild.SpawnError(description: "connect \(path): \(String(cString: strerror(e)))")
        }
        if reading {
            let dup = Glibc.dup(s)
            _ = fcntl(dup, F_SETFD, FD_CLOEXEC)
            fd = s
            reader = PipeDrainer(fd: dup, name: "mc-console")
        } else {
            fd = s
            reader = nil
        }
    }

    func send(_ text: String) {
        let bytes = Array(text.utf8)
        _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress!, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    /// Shuts the connection down (the reader sees EOF) and closes it.
    func close() {
        shutdown(fd, Int32(SHUT_RDWR))
        Glibc.close(fd)
    }
}

/// A pseudo-terminal pair for tests of terminal behaviour: the master side is read on a thread.
final class MCPty: @unchecked Sendable {
    let master: Int32
    let slavePath: String
    /// Kept open so that reading the master never fails with EIO while no child has the slave open.
    let slave: Int32
    let reader: PipeDrainer

    init() throws {
        // posix_openpt/grantpt/unlockpt/ptsname do not import into Swift: the Linux ioctls they use.
        let TIOCSPTLCK: UInt = 0x4004_5431, TIOCGPTN: UInt = 0x8004_5430   // _IOW/_IOR('T', 0x31/0x30, int)
        let m = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC)
        var unlock: Int32 = 0, number: UInt32 = 0
        guard m >= 0, ioctl(m, TIOCSPTLCK, &unlock) == 0, ioctl(m, TIOCGPTN, &number) == 0 else {
            let e = errno
            if m >= 0 { Glibc.close(m) }
            throw MCChild.SpawnError(description: "no pseudo-terminal: \(String(cString: strerror(e)))")
        }
        master = m
        slavePath = "/dev/pts/\(number)"
        slave = open(slavePath, O_RDWR | O_NOCTTY | O_CLOEXEC)
        let dup = Glibc.dup(m)
        _ = fcntl(dup, F_SETFD, FD_CLOEXEC)
        reader = PipeDrainer(fd: dup, name: "mc-pty")
    }

    /// Types `bytes` on the terminal.
    func type(_ bytes: [UInt8]) {
        _ = bytes.withUnsafeBytes { write(master, $0.baseAddress!, $0.count) }
    }

    /// The slave's current local-mode flags (ICANON, ECHO…).
    func localFlags() -> tcflag_t? {
        let fd = open(slavePath, O_RDWR | O_NOCTTY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { Glibc.close(fd) }
        var t = termios()
        return tcgetattr(fd, &t) == 0 ? t.c_lflag : nil
    }

    func close() {
        if slave >= 0 { Glibc.close(slave) }
        Glibc.close(master)
    }
}
