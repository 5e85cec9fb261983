import Devices
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Logging
import Synchronization
import VMM

/// The body of `swiftkvm vmm` (and of a binary named `firecracker`): one microVM per process,
/// controlled through Firecracker's API on a Unix socket and/or started from a config file.
///
/// Exit codes: as `swiftkvm run` once the guest ran (0 power-off, 3 reset — e.g. after
/// SendCtrlAltDel —, (v<<1)|1 debug-exit, 1 VMM failure, 4 internal error, 128+N after a signal);
/// 2 for bad options or a bad config file; 1 when the API socket cannot be bound.
/// SIGINT/SIGTERM stop the guest (or the process before InstanceStart); the socket is removed at exit.
public enum VMMProcess {
    /// Command-line settings.
    public struct Options: Sendable {
        public var apiSocket: String = "/run/firecracker.socket"
        public var noAPI = false
        public var instanceID = "anonymous-instance"
        public var configFile: String?
        public var logPath: String?
        public var level: String?
        public var showLevel = false
        public var showLogOrigin = false
        public var metricsPath: String?
        public var metricsInterval: Double = 60
        public var maxPayloadSize = APIServer.defaultMaxBodySize
        /// `--api-sock-mode`: the API socket's permission bits.
        public var apiSocketMode: mode_t = 0o600
        /// `--api-max-connections`, `--api-idle-timeout`: the API's connection bounds.
        public var apiLimits = APIConnectionLimits()
        /// `--console-sock`: serve the serial console on this Unix socket (`ConsoleServer`).
        public var consoleSocket: String?
        /// `--serial-log`: append serial output to this file instead of writing it to stdout.
        public var serialLog: String?
        /// `--ready-fd`: an inherited descriptor that gets `ready\n` and is closed once the API is
        /// up and the config file's VM (if any) has started. A supervisor waiting on it sees EOF
        /// without the line when the process exits before that.
        public var readyFD: Int32?
        /// Whether stdin feeds the serial input (as Firecracker's): nil = when stdin is open and
        /// not /dev/null.
        public var stdinInput: Bool?
        /// `--no-seccomp`: no seccomp filters.
        public var noSeccomp = false
        /// `--seccomp-filter`: filters from this file (`SeccompFile`) instead of the built-in ones.
        public var seccompFilter: String?
        /// `--incoming`: receive a live migration here (the guest comes from the source's stream).
        public var incoming: MigrationEndpoint?
        /// `--enable-pci`: the virtio devices on PCI instead of virtio-mmio (Firecracker's flag).
        public var enablePCI = false
        /// `--ksm`: guest RAM may be merged by the kernel's KSM (`MADV_MERGEABLE`), as QEMU's `mem-merge`.
        public var ksm = false
        public init() {}
    }

    /// Largest config file read.
    public static let maxConfigFileSize = 1 << 20

    /// Runs the process; returns only on an error before the guest started (otherwise the
    /// process exits from the guest's thread or the signal loop).
    public static func run(_ options: Options) -> Int32 {
        signal(SIGPIPE, SIG_IGN)
        var stopSignals = StopSignals.takeOver()
        // The ready descriptor is the supervisor's alone: children (passt) must not keep it open.
        if let fd = options.readyFD { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }

        guard !options.noAPI || options.configFile != nil else {
            fail("--no-api requires --config-file (without the API the VM must be configured by the file)")
            return MachineExit.usageExitCode
        }
        guard options.maxPayloadSize > 0 else {
            fail("invalid --http-api-max-payload-size \(options.maxPayloadSize): must be positive")
            return MachineExit.usageExitCode
        }
        // Seccomp: each thread confines itself as it starts (docs/SECCOMP.md); a bad filter file is a usage error.
        do throws(SeccompError) {
            try SeccompFile.enable(disabled: options.noSeccomp, filterFile: options.seccompFilter)
        } catch {
            fail(error.description)
            return MachineExit.usageExitCode
        }
        let sink = LogSink(instanceID: options.instanceID)
        do throws(APIError) {
            try sink.configure(LoggerConfig(logPath: options.logPath, level: options.level ?? "Warning",
                                            showLevel: options.showLevel, showLogOrigin: options.showLogOrigin))
        } catch {
            fail("invalid logger options: \(error.message)")
            return MachineExit.usageExitCode
        }

        // Parse the config file before binding anything.
        var fileConfig: FullVMConfiguration?
        if let path = options.configFile {
            do throws(APIError) {
                fileConfig = try readConfigFile(path)
            } catch {
                fail(error.message)
                return MachineExit.usageExitCode
            }
        }

        // The console socket and the serial log (SwiftKVM extensions, used by `swiftkvm daemon`).
        let console: ConsoleServer?
        do throws(APIError) {
            console = try options.consoleSocket.map { p throws(APIError) in try ConsoleServer(path: p) }
        } catch {
            fail(error.message)
            return 1
        }
        var openedLog: ConsoleOutput?
        if let path = options.serialLog {
            let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
            guard fd >= 0 else {
                fail("cannot open the serial log \(path) (--serial-log): \(String(cString: strerror(errno)))")
                console?.stop()
                return 1
            }
            openedLog = ConsoleOutput(fileDescriptor: fd, owning: true)
        }
        let serialLog = openedLog
        let feedStdin = options.stdinInput ?? stdinIsLive()

        let exiting = Atomic<Bool>(false)
        let serverBox = Mutex<APIServer?>(nil)
        let metricsBox = Mutex<MetricsRecorder?>(nil)
        let stdinBox = Mutex<ConsoleInput?>(nil)
        let terminate: @Sendable (Int32) -> Void = { code in
            guard !exiting.exchange(true, ordering: .sequentiallyConsistent) else { return }
            serverBox.withLock { $0 }?.stop(exiting: true)
            if let dropped = console?.droppedBytes, dropped > 0 {
                sink.makeLogger(label: "swiftkvm.vmm").warning("console socket: \(dropped) bytes of serial output were dropped for clients that did not read")
            }
            console?.stop()
            stdinBox.withLock { $0 }?.restore()
            metricsBox.withLock { $0 }?.close()
            serialLog?.flush()
            exit(code)
        }
        var controllerOptions = VMController.Options()
        controllerOptions.instanceID = options.instanceID
        controllerOptions.metricsInterval = options.metricsInterval
        controllerOptions.virtioTransport = options.enablePCI ? .pci : .mmio
        controllerOptions.mergeableMemory = options.ksm
        if serialLog != nil { controllerOptions.defaultSerial = .none }
        if console != nil || serialLog != nil || feedStdin {
            let defaultBuilder = controllerOptions.builder
            controllerOptions.builder = { config, serial, logger, restoring in
                var sinks: [any SerialOutput] = [serial]
                if let serialLog { sinks.append(serialLog) }
                if let console { sinks.append(console) }
                let output: any SerialOutput = sinks.count == 1 ? serial : TeeSerialOutput(sinks)
                let instance = try defaultBuilder(config, output, logger, restoring)
                guard let machine = instance as? Machine else { return instance }
                console?.setInputHandler { machine.enqueueConsoleInput($0) }
                if feedStdin {
                    let reader = ConsoleInput(onInput: { machine.enqueueConsoleInput($0) },
                                              onQuit: { machine.stop(.userQuit) })
                    do {
                        try reader.start()
                        stdinBox.withLock { $0 = reader }
                    } catch {
                        logger.warning("stdin cannot feed the serial console: \(error)")
                    }
                }
                return machine
            }
        }
        controllerOptions.onExit = { exit in
            switch exit {
            case .internalError(let m), .vmmFailure(let m): fail(m)
            // The guest left by PUT /migrate, whose answer is still on its way to the client.
            case .migrated: usleep(300_000)
            default: break
            }
            terminate(exit.exitCode)
        }
        let controller = VMController(options: controllerOptions, logSink: sink)
        metricsBox.withLock { $0 = controller.metrics }

        if let metricsPath = options.metricsPath {
            if case .failure(let e) = controller.handle(.putMetrics(MetricsConfig(metricsPath: metricsPath))) {
                fail("--metrics-path: \(e.message)")
                console?.stop()
                return MachineExit.usageExitCode
            }
        }
        if !options.noAPI {
            let server = APIServer(socketPath: options.apiSocket, controller: controller, maxBodySize: options.maxPayloadSize,
                                   limits: options.apiLimits, socketMode: options.apiSocketMode)
            do {
                try server.start()
            } catch {
                fail("\(error is APIError ? (error as! APIError).message : "\(error)")")
                console?.stop()
                return 1
            }
            serverBox.withLock { $0 = server }
        }
        do { try console?.start() } catch {
            fail("--console-sock: \(error)")
            console?.stop()
            serverBox.withLock { $0 }?.stop()
            return 1
        }
        controller.metrics.startupWallUs.store(processAgeUs(), ordering: .relaxed)
        controller.metrics.startupCPUUs.store(processCPUUs(), ordering: .relaxed)
        sink.makeLogger(label: "swiftkvm.vmm").info("API server ready on \(options.noAPI ? "(none)" : options.apiSocket)")

        if let fileConfig {
            do throws(APIError) {
                try controller.start(from: fileConfig)
            } catch {
                fail(error.message)
                terminate(MachineExit.usageExitCode)
            }
        }
        if let incoming = options.incoming {
            // Listening before anything waits for this process; receiving on a thread of its own
            // (unconfined: it builds the machine), so that the signal loop below still answers SIGTERM.
            let logger = sink.makeLogger(label: "swiftkvm.vmm")
            do {
                let listener = try IncomingMigration.listen(on: incoming)
                logger.info("migration: waiting for the source on \(incoming)")
                try HostThread.start(name: "incoming") {
                    let m: IncomingMigration
                    do { m = try IncomingMigration.receive(listener: listener, endpoint: incoming, logger: logger) } catch {
                        fail("\(error)")
                        terminate(1)
                        return
                    }
                    do throws(APIError) { try controller.startIncoming(m.restore) } catch {
                        m.refuse(error.message)
                        fail(error.message)
                        terminate(1)
                        return
                    }
                    guard m.confirmReady() else {
                        // The source keeps (or resumed) its guest: this copy must not run.
                        fail("the migration source did not tell this side to run the guest; stopping")
                        controller.stopGuest(.vmmFailure("migration not confirmed by the source"))
                        return
                    }
                    controller.resumeIncoming()
                    m.reportRunning()
                    logger.info("migration: the guest runs here")
                }
            } catch {
                fail("\(error)")
                terminate(1)
            }
        }

        if let fd = options.readyFD {
            // A closed or invalid descriptor is the supervisor's problem, not the guest's: ignored.
            _ = "ready\n".withCString { write(fd, $0, 6) }
            close(fd)
        }
        // Signal loop: SIGINT/SIGTERM stop the guest, or the process before InstanceStart.
        Seccomp.confineCurrentThread(.vmm)
        while true {
            var info = siginfo_t()
            var ts = timespec(tv_sec: 1, tv_nsec: 0)
            let sig = sigtimedwait(&stopSignals, &info, &ts)
            guard sig == SIGINT || sig == SIGTERM else { continue }
            switch controller.phase {
            case .running, .paused:
                controller.stopGuest(.signal(sig))
            case .notStarted, .stopped:
                terminate(128 + sig)
            }
        }
    }

    /// Reads and decodes a Firecracker config file; errors name the file and the field.
    public static func readConfigFile(_ path: String) throws(APIError) -> FullVMConfiguration {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw .badRequest("cannot read the config file \(path): \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        var data: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while data.count <= maxConfigFileSize {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n < 0 { throw .badRequest("cannot read the config file \(path): \(String(cString: strerror(errno)))") }
            if n == 0 { break }
            data += chunk[0..<n]
        }
        guard data.count <= maxConfigFileSize else {
            throw .badRequest("the config file \(path) is larger than \(maxConfigFileSize) bytes")
        }
        do {
            return try StrictJSON.decode(FullVMConfiguration.self, from: data)
        } catch {
            throw .badRequest("invalid config file \(path): \(error.message.replacing(StrictJSON.prefix, with: ""))")
        }
    }

    /// Whether stdin is worth reading as console input: open and not /dev/null (Firecracker reads
    /// its stdin into the serial device; a closed pipe simply ends at EOF).
    static func stdinIsLive() -> Bool {
        var st = stat()
        guard fstat(STDIN_FILENO, &st) == 0 else { return false }
        if (st.st_mode & S_IFMT) == S_IFCHR {
            var null = stat()
            if stat("/dev/null", &null) == 0 && null.st_rdev == st.st_rdev { return false }
        }
        return true
    }

    static func fail(_ message: String) {
        let line = "swiftkvm: error: \(message)\n"
        _ = line.withCString { Glibc.write(STDERR_FILENO, $0, strlen($0)) }
    }

    /// Microseconds since the process started (from /proc/self/stat), 0 if unknown.
    static func processAgeUs() -> UInt64 {
        guard let stat = try? String(contentsOfFile: "/proc/self/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return 0 }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        // Field 22 (starttime) is the 20th after the command name.
        guard fields.count > 19, let start = UInt64(fields[19]) else { return 0 }
        let hz = UInt64(sysconf(Int32(_SC_CLK_TCK)))
        var ts = timespec()
        clock_gettime(CLOCK_BOOTTIME, &ts)
        let nowUs = UInt64(ts.tv_sec) * 1_000_000 + UInt64(ts.tv_nsec) / 1000
        let startUs = start * 1_000_000 / max(hz, 1)
        return nowUs > startUs ? nowUs - startUs : 0
    }

    /// CPU time the process used so far, in microseconds.
    static func processCPUUs() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts)
        return UInt64(ts.tv_sec) * 1_000_000 + UInt64(ts.tv_nsec) / 1000
    }
}

extension VMMProcess.Options {
    /// Parses `--api-sock-mode`: octal permission bits such as 600, 0660 or 0o600 (at most 777).
    public static func socketMode(_ text: String) -> mode_t? {
        var digits = Substring(text)
        if digits.hasPrefix("0o") { digits = digits.dropFirst(2) }
        guard !digits.isEmpty, digits.count <= 4, let v = mode_t(digits, radix: 8), v <= 0o777 else { return nil }
        return v
    }
}
