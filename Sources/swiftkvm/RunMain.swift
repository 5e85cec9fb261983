import API
import Boot
import Devices
import GuestMemory
import KVM
import Logging
import Synchronization
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// The body of `swiftkvm run`: builds and runs machines and maps the outcome to an exit code.
enum RunMain {
    /// Physical RAM of the host, in bytes.
    static func hostMemory() -> UInt64? {
        let pages = sysconf(Int32(_SC_PHYS_PAGES)), size = sysconf(Int32(_SC_PAGESIZE))
        guard pages > 0, size > 0 else { return nil }
        return UInt64(pages) * UInt64(size)
    }

    /// Prints a one-line error to stderr.
    static func fail(_ message: String) {
        let line = "swiftkvm: error: \(message)\n"
        _ = line.withCString { write(STDERR_FILENO, $0, strlen($0)) }
    }

    /// Whether an error was caused by the user's input (exit code 2).
    static func isUsageError(_ error: any Error) -> Bool {
        switch error {
        case let e as VMMError: return e.isUsageError
        case is BootError, is ConsoleError, is BusError: return true
        case let e as GuestMemoryError:
            if case .mmapFailed = e { return true }
            return true
        default: return false
        }
    }

    static func execute(_ options: RunCommand) -> Int32 {
        signal(SIGPIPE, SIG_IGN)
        // SIGINT/SIGTERM are taken by the control thread (sigtimedwait); block them before any
        // other thread exists so that none of them dies of the default action.
        _ = StopSignals.takeOver()

        guard let level = Logger.Level(rawValue: options.logLevel.lowercased()) else {
            fail("invalid --log-level '\(options.logLevel)': expected trace, debug, info, notice, warning, error or critical")
            return MachineExit.usageExitCode
        }
        LoggingSystem.bootstrap { label in
            var h = RunLogHandler(label: label)
            h.logLevel = level
            return h
        }
        let logger = Logger(label: "swiftkvm")

        let config: VMConfiguration
        var restoring: MachineRestore?
        let output: ConsoleOutput
        do {
            if let dir = options.restore {
                (config, restoring) = try options.restoreConfiguration(dir)
            } else {
                config = try options.makeConfiguration()
            }
            output = try ConsoleOutput(spec: try config.serialSpec())
        } catch {
            fail("\(error)")
            return isUsageError(error) ? MachineExit.usageExitCode : MachineExit.vmmFailureExitCode
        }

        // Seccomp: every thread confines itself as it starts. With --on-reboot restart the main thread rebuilds
        // the machine after a reset, which its filter would forbid: it stays unconfined (docs/SECCOMP.md).
        do {
            try SeccompFile.enable(disabled: options.noSeccomp, filterFile: options.seccompFilter,
                                   exempt: config.onReboot == .restart ? [.vmm] : [])
        } catch {
            fail(error.description)
            return MachineExit.usageExitCode
        }

        let current = Mutex<Machine?>(nil)
        var input: ConsoleInput?
        defer { input?.stop() }
        var exit: MachineExit
        while true {
            let machine: Machine
            do {
                // A snapshot is restored once; a reset after it (--on-reboot restart) boots afresh.
                machine = try Machine(config: config, serialOutput: output, logger: logger, restoring: restoring)
                restoring = nil
            } catch {
                fail("\(error)")
                return isUsageError(error) ? MachineExit.usageExitCode : MachineExit.vmmFailureExitCode
            }
            current.withLock { $0 = machine }
            if input == nil, case .stdio = (try? config.serialSpec()) ?? .none {
                let console = ConsoleInput(
                    onInput: { bytes in current.withLock { $0 }?.enqueueConsoleInput(bytes) },
                    onQuit: { current.withLock { $0 }?.stop(.userQuit) })
                do {
                    try console.start()
                    input = console
                } catch {
                    logger.warning("console input unavailable: \(error)")
                }
            }
            exit = machine.run(handleSignals: true)
            if config.showRegs {
                input?.restore()
                let dump = machine.registerDump() + "\n"
                output.flush()
                _ = dump.withCString { write(STDOUT_FILENO, $0, strlen($0)) }
            }
            if exit == .reset && config.onReboot == .restart {
                logger.info("guest reset: restarting")
                continue
            }
            break
        }
        input?.stop()
        input = nil
        output.flush()
        switch exit {
        case .internalError(let m): fail(m)
        case .vmmFailure(let m): fail(m)
        default: logger.info("\(exit)")
        }
        return exit.exitCode
    }
}
