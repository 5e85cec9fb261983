import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// Process helpers: posix_spawn of the vmm, /proc inspection, exit statuses, pidfds.
enum ProcessTools {
    /// glibc's POSIX_SPAWN_SETSID (a GNU extension the Swift importer may not see).
    static let spawnSetsid: Int32 = 0x80

    /// Starts `executable` with `arguments` in a new session: stdin /dev/null, stdout and stderr
    /// appended to `logPath`, default signal handling and an empty signal mask; other file
    /// descriptors are closed, except `passing`, which the child gets as descriptor 3. Returns the pid.
    static func spawn(_ executable: String, _ arguments: [String], logPath: String,
                      passing: Int32? = nil) throws(ManagerError) -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_APPEND | O_CREAT, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        if let passing { posix_spawn_file_actions_adddup2(&actions, passing, 3) }
        if let closeFrom = addCloseFrom { _ = closeFrom(&actions, passing == nil ? 3 : 4) }

        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attr, &empty)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for s in [SIGINT, SIGTERM, SIGPIPE, SIGHUP, SIGCHLD] { sigaddset(&defaults, s) }
        posix_spawnattr_setsigdefault(&attr, &defaults)
        posix_spawnattr_setflags(&attr, Int16(spawnSetsid | Int32(POSIX_SPAWN_SETSIGMASK) | Int32(POSIX_SPAWN_SETSIGDEF)))

        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, executable, &actions, &attr, argv, environ)
        guard rc == 0 else {
            throw ManagerError(.host, "cannot start \(executable): \(ManagerError.errnoText(rc))")
        }
        return pid
    }

    /// Field 22 of /proc/PID/stat (start time in clock ticks since boot), nil if gone.
    static func startTime(of pid: pid_t) -> UInt64? {
        guard let bytes = try? AtomicFile.read("/proc/\(pid)/stat", limit: 8192) else { return nil }
        let text = String(decoding: bytes, as: UTF8.self)
        guard let close = text.lastIndex(of: ")") else { return nil }
        // Fields after the command: state is field 3, so start time is the 20th after ')'.
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count >= 20 else { return nil }
        return UInt64(fields[19])
    }

    /// The NUL-separated arguments of /proc/PID/cmdline.
    static func commandLine(of pid: pid_t) -> [String] {
        guard let bytes = try? AtomicFile.read("/proc/\(pid)/cmdline", limit: 1 << 16) else { return [] }
        return bytes.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
    }

    /// Whether `pid` exists and is not a zombie (`startTime` tells a reused pid).
    static func isAlive(_ pid: pid_t) -> Bool {
        guard pid > 0, kill(pid, 0) == 0 || errno == EPERM else { return false }
        guard let bytes = try? AtomicFile.read("/proc/\(pid)/stat", limit: 8192) else { return false }
        let text = String(decoding: bytes, as: UTF8.self)
        guard let close = text.lastIndex(of: ")") else { return true }
        let state = text[text.index(after: close)...].split(separator: " ").first
        return state != "Z" && state != "X"
    }

    /// A decoded wait status.
    struct Exit: Sendable, Equatable {
        var code: Int32?
        var signal: Int32?
    }

    static func decode(waitStatus st: Int32) -> Exit {
        let low = st & 0x7f
        if low == 0 { return Exit(code: (st >> 8) & 0xff, signal: nil) }
        return Exit(code: nil, signal: low)
    }

    /// Blocks until child `pid` exits (EINTR retried); nil when it is not our child.
    static func waitChild(_ pid: pid_t) -> Exit? {
        var st: Int32 = 0
        while true {
            let r = waitpid(pid, &st, 0)
            if r == pid { return decode(waitStatus: st) }
            if r < 0 && errno == EINTR { continue }
            return nil
        }
    }

    private typealias AddCloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
    /// glibc 2.34's posix_spawn_file_actions_addclosefrom_np (not imported into Swift).
    private static let addCloseFrom: AddCloseFrom? = {
        guard let sym = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addclosefrom_np") else { return nil }
        return unsafeBitCast(sym, to: AddCloseFrom.self)
    }()

    private typealias PidfdOpen = @convention(c) (pid_t, UInt32) -> Int32
    private static let pidfdOpenFunction: PidfdOpen? = {
        guard let sym = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "pidfd_open") else { return nil }
        return unsafeBitCast(sym, to: PidfdOpen.self)
    }()

    /// A pidfd for `pid` (Linux 5.3+, glibc 2.36+), or nil.
    static func pidfdOpen(_ pid: pid_t) -> Int32? {
        guard let f = pidfdOpenFunction else { return nil }
        let fd = f(pid, 0)
        return fd >= 0 ? fd : nil
    }

    /// Blocks until a process that is not our child exits: poll(2) on its pidfd, or (without
    /// pidfds) a check every 100 ms that the pid still has `startTime`. `stop` ends the wait early
    /// (returns false).
    static func waitForeign(_ pid: pid_t, startTime: UInt64, stop: @Sendable () -> Bool) -> Bool {
        if let fd = pidfdOpen(pid) {
            defer { close(fd) }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            while !stop() {
                let r = poll(&p, 1, 200)
                if r > 0 { return true }
                if r < 0 && errno != EINTR { break }
            }
            if stop() { return false }
        }
        while !stop() {
            guard isAlive(pid), self.startTime(of: pid) == startTime else { return true }
            usleep(100_000)
        }
        return false
    }
}
