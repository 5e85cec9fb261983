import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import API
import Devices
import Logging

/// `swiftkvm daemon`: the lock, the manager and its API server together.
///
/// `start()` takes `STATE/daemon.lock` (a second daemon on the same directory fails naming the
/// first one's pid), loads definitions, re-attaches to running VMs, binds the socket, then
/// autostarts marked VMs in the background. `stop()` leaves VMs running, as libvirtd does.
public final class Daemon: @unchecked Sendable {
    /// Settings.
    public struct Options: Sendable {
        public var manager: VMManager.Options
        /// The API socket (default `STATE/daemon.sock`).
        public var socketPath: String?
        /// The version reported by `GET /`.
        public var version = "0.1.0"
        /// The socket's connection bounds (`--max-connections`, `--idle-timeout`).
        public var limits = APIConnectionLimits.daemon
        public init(stateDirectory: String) { manager = VMManager.Options(stateDirectory: stateDirectory) }
    }

    /// The default state directory: `$SWIFTKVM_STATE_DIR` or /var/lib/swiftkvm.
    public static func defaultStateDirectory(environment: [String: String] = ProcessInfo.processInfo.environment) -> String {
        if let d = environment["SWIFTKVM_STATE_DIR"], !d.isEmpty { return d }
        return "/var/lib/swiftkvm"
    }

    public let options: Options
    public private(set) var manager: VMManager?
    private var server: DaemonServer?
    private var lockFD: Int32 = -1

    public init(options: Options) { self.options = options }

    /// The socket path in use.
    public var socketPath: String { options.socketPath ?? StatePaths(root: options.manager.stateDirectory).socket }

    /// Starts the daemon (see the type's description).
    public func start() throws(ManagerError) {
        let paths = StatePaths(root: options.manager.stateDirectory)
        try AtomicFile.makeDirectory(paths.root)
        try takeLock(paths)
        do {
            let manager = try VMManager(options: options.manager)
            self.manager = manager
            manager.load()
            let server = DaemonServer(socketPath: socketPath, manager: manager, version: options.version, limits: options.limits)
            try server.start()
            self.server = server
            options.manager.logger.info("swiftkvm daemon (pid \(getpid())) listening on \(socketPath), state in \(paths.root)")
            do {
                try HostThread.start(name: "autostart", blockStopSignals: false) { manager.autostart() }
            } catch {
                options.manager.logger.error("autostart skipped: \(error)")
            }
        } catch {
            manager?.shutdownManager()
            manager = nil
            releaseLock()
            throw error
        }
    }

    /// Stops serving and removes the socket; VMs keep running.
    public func stop() {
        server?.stop()
        server = nil
        manager?.shutdownManager()
        releaseLock()
    }

    private func takeLock(_ paths: StatePaths) throws(ManagerError) {
        let fd = open(paths.lock, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw ManagerError(.host, "cannot open \(paths.lock): \(ManagerError.errnoText())") }
        if flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let code = errno
            var buf = [UInt8](repeating: 0, count: 32)
            let n = buf.withUnsafeMutableBytes { pread(fd, $0.baseAddress!, 31, 0) }
            close(fd)
            let pid = n > 0 ? String(decoding: buf[0..<n].filter { $0 > 0x20 }, as: UTF8.self) : "?"
            if code == EWOULDBLOCK {
                throw ManagerError(.conflict, "another swiftkvm daemon (pid \(pid)) uses \(paths.root)")
            }
            throw ManagerError(.host, "cannot lock \(paths.lock): \(ManagerError.errnoText(code))")
        }
        ftruncate(fd, 0)
        let text = "\(getpid())\n"
        _ = text.withCString { pwrite(fd, $0, strlen($0), 0) }
        lockFD = fd
    }

    private func releaseLock() {
        if lockFD >= 0 {
            close(lockFD)
            lockFD = -1
        }
    }
}
