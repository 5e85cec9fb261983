import API
import ArgumentParser
import VMM

/// `swiftkvm vmm`: one microVM controlled through Firecracker's API (also run as `firecracker`).
struct VMMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vmm",
        abstract: "Run one microVM controlled through Firecracker's REST API on a Unix socket.",
        discussion: """
        Configure the VM with PUT /boot-source, /machine-config… and start it with PUT /actions \
        {"action_type": "InstanceStart"}, or give --config-file (Firecracker's JSON: boot-source, \
        machine-config, drives, network-interfaces, logger, metrics…) to start at once. The process \
        exits when the guest stops, with the exit codes of `swiftkvm run` (0 power-off, 3 reset, \
        (v<<1)|1 debug-exit, 128+N after a signal); 2 for bad options or config file; 1 when the \
        socket cannot be bound. The serial console is stdout and stdin (unless stdin is /dev/null), \
        plus --console-sock clients and the --serial-log file. A binary or symlink named `firecracker` behaves like `swiftkvm vmm`.
        """)

    @Option(name: .customLong("api-sock"), help: "Path of the API Unix socket (must not exist).")
    var apiSock: String = "/run/firecracker.socket"
    @Option(help: "MicroVM id (GET / and log lines).")
    var id: String = "anonymous-instance"
    @Option(name: .customLong("config-file"), help: "Firecracker JSON config; the VM starts at once.")
    var configFile: String?
    @Flag(name: .customLong("no-api"), help: "No API socket (needs --config-file).")
    var noAPI = false
    @Option(name: .customLong("log-path"), help: "File or FIFO for log lines (default stderr).")
    var logPath: String?
    @Option(help: "Log level: Error, Warning, Info, Debug, Trace or Off.")
    var level: String?
    @Flag(name: .customLong("show-level"), help: "Print the level in log lines.")
    var showLevel = false
    @Flag(name: .customLong("show-log-origin"), help: "Print file:line in log lines.")
    var showLogOrigin = false
    @Option(name: .customLong("metrics-path"), help: "File or FIFO for JSON metrics lines.")
    var metricsPath: String?
    @Option(name: .customLong("metrics-interval"), help: "Seconds between periodic metrics lines (0: only on FlushMetrics).")
    var metricsInterval: Double = 60
    @Option(name: .customLong("http-api-max-payload-size"), help: "Largest API request body in bytes.")
    var maxPayloadSize: Int = APIServer.defaultMaxBodySize
    @Option(name: .customLong("api-sock-mode"), help: "Permission bits of the API socket, in octal (default 600: the owner only).")
    var apiSockMode: String = "600"
    @Option(name: .customLong("api-max-connections"), help: "API connections kept open at most; a new one closes the one idle longest (default 64).")
    var apiMaxConnections: Int = 64
    @Option(name: .customLong("api-idle-timeout"), help: "Seconds after which an API connection that sends nothing (and waits for no answer) is closed (default 300).")
    var apiIdleTimeout: Int = 300
    @Option(name: .customLong("console-sock"), help: "Serve the serial console on this Unix socket (must not exist); clients get the output and type the input.")
    var consoleSock: String?
    @Option(name: .customLong("serial-log"), help: "Append the serial output to this file instead of stdout.")
    var serialLog: String?
    @Option(name: .customLong("ready-fd"), help: "Write \"ready\" and a newline to this inherited file descriptor, then close it, once the API is up and the --config-file VM has started (for supervisors such as `swiftkvm daemon`).")
    var readyFD: Int32?

    @Option(help: "Receive a live migration: listen on unix:PATH or tcp:HOST:PORT for one source (`PUT /migrate` on its API, or `swiftkvm vm migrate`), build the guest from its stream and run it once the source hands over.")
    var incoming: String?

    @Flag(name: .customLong("no-seccomp"), help: "Run without the seccomp filters (docs/SECCOMP.md).")
    var noSeccomp = false
    @Flag(name: .customLong("enable-pci"), help: "Put the virtio devices on PCI (default: virtio-mmio, as Firecracker).")
    var enablePCI = false
    @Flag(name: .customLong("ksm"), help: "Let the kernel's KSM merge identical guest pages (MADV_MERGEABLE, as QEMU's mem-merge), also of a machine loaded from a snapshot or received by a migration. KSM itself runs when /sys/kernel/mm/ksm/run is 1.")
    var ksm = false
    @Option(name: .customLong("seccomp-filter"), help: "Load the seccomp filters from this JSON file (Firecracker's seccompiler format, one filter per thread kind: vmm, api, vcpu, device, console) instead of the built-in ones.")
    var seccompFilter: String?

    @Flag(name: .customLong("snapshot-version"), help: "Print the snapshot format version this VMM writes and exit.")
    var snapshotVersion = false
    @Option(name: .customLong("describe-snapshot"), help: "Print the format version of this snapshot file and exit.")
    var describeSnapshot: String?
    @Option(name: .customLong("mmds-size-limit"), help: "Largest MMDS data store in bytes (MMDS requests are refused with 400: there is no MMDS yet).")
    var mmdsSizeLimit: Int?

    // Accepted for compatibility with Firecracker tooling; they have no effect here.
    @Flag(name: .customLong("boot-timer"), help: .hidden) var bootTimer = false
    @Option(name: .customLong("start-time-us"), help: .hidden) var startTimeUs: String?
    @Option(name: .customLong("start-time-cpu-us"), help: .hidden) var startTimeCPUUs: String?
    @Option(name: .customLong("parent-cpu-time-us"), help: .hidden) var parentCPUTimeUs: String?
    @Option(name: .customLong("module"), help: .hidden) var module: String?

    func validate() throws {
        if let mmdsSizeLimit, mmdsSizeLimit <= 0 {
            throw ValidationError("invalid --mmds-size-limit \(mmdsSizeLimit): must be positive")
        }
        if snapshotVersion || describeSnapshot != nil { return }
        if noAPI && configFile == nil {
            throw ValidationError("--no-api requires --config-file")
        }
        if let level, LogSink.level(named: level) == nil {
            throw ValidationError("invalid --level '\(level)': expected Error, Warning, Info, Debug, Trace or Off")
        }
        guard metricsInterval >= 0, metricsInterval.isFinite else {
            throw ValidationError("invalid --metrics-interval \(metricsInterval): expected seconds >= 0")
        }
        if let readyFD, readyFD < 3 {
            throw ValidationError("invalid --ready-fd \(readyFD): expected an inherited descriptor >= 3")
        }
        if let incoming {
            do { _ = try MigrationEndpoint(parsing: incoming) } catch { throw ValidationError("\(error)") }
            if configFile != nil { throw ValidationError("--incoming and --config-file cannot be used together: the guest comes from the migration") }
        }
        guard maxPayloadSize > 0 else {
            throw ValidationError("invalid --http-api-max-payload-size \(maxPayloadSize): must be positive")
        }
        guard VMMProcess.Options.socketMode(apiSockMode) != nil else {
            throw ValidationError("invalid --api-sock-mode \(apiSockMode): expected octal permission bits such as 600 or 660")
        }
        if let error = APIConnectionLimits.optionError(maxConnections: apiMaxConnections, connectionsOption: "--api-max-connections",
                                                       idleSeconds: apiIdleTimeout, idleOption: "--api-idle-timeout") {
            throw ValidationError(error)
        }
    }

    func run() throws {
        // Firecracker's informational flags print a data-format version ("v1.0.0") and exit.
        if snapshotVersion {
            print("v\(SnapshotFile.version).0.0")
            return
        }
        if let path = describeSnapshot {
            do {
                print("v\(try SnapshotFile.formatVersion(of: path)).0.0")
            } catch {
                writeText("swiftkvm: error: \(error)\n", to: 2)
                throw ExitCode(2)
            }
            return
        }
        var o = VMMProcess.Options()
        o.apiSocket = apiSock
        o.noAPI = noAPI
        o.instanceID = id
        o.configFile = configFile
        o.logPath = logPath
        o.level = level
        o.showLevel = showLevel
        o.showLogOrigin = showLogOrigin
        o.metricsPath = metricsPath
        o.metricsInterval = metricsInterval
        o.maxPayloadSize = maxPayloadSize
        o.apiSocketMode = VMMProcess.Options.socketMode(apiSockMode) ?? 0o600
        o.apiLimits = APIConnectionLimits(maxConnections: apiMaxConnections, idleTimeout: .seconds(Int64(apiIdleTimeout)))
        o.consoleSocket = consoleSock
        o.serialLog = serialLog
        o.readyFD = readyFD
        o.noSeccomp = noSeccomp
        o.seccompFilter = seccompFilter
        o.incoming = try incoming.map { try MigrationEndpoint(parsing: $0) }
        o.enablePCI = enablePCI
        o.ksm = ksm
        throw ExitCode(VMMProcess.run(o))
    }
}
