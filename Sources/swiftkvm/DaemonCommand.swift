import ArgumentParser
import FoundationEssentials
import Logging
import API
import Manager
#if canImport(Glibc)
import Glibc
#endif

/// `swiftkvm daemon`: the VM manager (libvirt's role), in the foreground like `libvirtd`.
struct DaemonCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "daemon",
        abstract: "Run the VM manager daemon in the foreground (clients: `swiftkvm vm …`).",
        discussion: """
        The daemon keeps VM definitions in STATE/vms, runs each started VM as its own \
        `swiftkvm vmm` process (logs and serial output in STATE/logs) and answers on \
        STATE/daemon.sock. SIGTERM or SIGINT stop the daemon and leave the VMs running; a daemon \
        started again on the same state directory re-attaches to them. Exit status 1 when \
        another daemon uses the directory or the socket cannot be bound.
        """)

    @Option(name: .customLong("state-dir"), help: "State directory (default $SWIFTKVM_STATE_DIR or /var/lib/swiftkvm).")
    var stateDir: String?
    @Option(help: "The API socket (default STATE/daemon.sock).")
    var socket: String?
    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: String = "info"
    @Option(name: .customLong("max-connections"), help: "Socket connections kept open at most; a new one closes the one idle longest (default 256).")
    var maxConnections: Int = APIConnectionLimits.daemon.maxConnections
    @Option(name: .customLong("idle-timeout"), help: "Seconds after which a connection that sends nothing (with no request or event stream in progress) is closed (default 300).")
    var idleTimeout: Int = 300

    func validate() throws {
        if let error = APIConnectionLimits.optionError(maxConnections: maxConnections, connectionsOption: "--max-connections",
                                                       idleSeconds: idleTimeout, idleOption: "--idle-timeout") {
            throw ValidationError(error)
        }
        guard Logger.Level(rawValue: logLevel.lowercased()) != nil else {
            throw ValidationError("invalid --log-level '\(logLevel)': expected trace, debug, info, notice, warning, error or critical")
        }
    }

    func run() throws {
        let level = Logger.Level(rawValue: logLevel.lowercased()) ?? .info
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
        // Block the stop signals in every thread; the main thread waits for them below.
        var stop = sigset_t()
        sigemptyset(&stop)
        sigaddset(&stop, SIGTERM)
        sigaddset(&stop, SIGINT)
        pthread_sigmask(SIG_BLOCK, &stop, nil)
        signal(SIGPIPE, SIG_IGN)

        let dir = stateDir ?? Daemon.defaultStateDirectory()
        var options = Daemon.Options(stateDirectory: dir.hasPrefix("/") ? dir : FileManager.default.currentDirectoryPath + "/" + dir)
        options.socketPath = socket
        options.limits = APIConnectionLimits(maxConnections: maxConnections, idleTimeout: .seconds(Int64(idleTimeout)))
        options.manager.logger = Logger(label: "swiftkvm.daemon")
        let daemon = Daemon(options: options)
        do {
            try daemon.start()
        } catch {
            let line = "swiftkvm: error: \(error.message)\n"
            _ = line.withCString { write(2, $0, strlen($0)) }
            throw ExitCode(1)
        }
        var sig: Int32 = 0
        sigwait(&stop, &sig)
        options.manager.logger.info("signal \(sig): stopping the daemon; VMs keep running")
        daemon.stop()
        throw ExitCode(0)
    }
}
