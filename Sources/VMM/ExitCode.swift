#if canImport(Glibc)
import Glibc
#endif

/// How a VM run ended, and the process exit code for it.
///
/// Every code of the VMM's own is even, so none is a debug-exit value (those are odd: `(v << 1) | 1`).
///
/// | exit code | meaning |
/// |---|---|
/// | 0 | live migration done (the guest runs elsewhere), or guest power-off: a vCPU halted with interrupts disabled and nothing pending (a flat program's HLT), a KVM shutdown system event, or Ctrl-A x |
/// | 2 | bad usage or input (CLI values, files, kernel that does not fit) — reported before the VM runs |
/// | 4 | unhandled KVM internal error or failed VM entry (RIP and instruction bytes are logged) |
/// | 6 | VMM failure (an unexpected KVM or host error, before or while running) |
/// | 8 | guest reset or triple fault with `--on-reboot exit` |
/// | (v << 1) \| 1 | the guest wrote v to the debug-exit port (1, 3, 5, …, 255) |
/// | 130, 143 | stopped by SIGINT, SIGTERM (the shell's 128 + signal; 143 is also debug-exit 71) |
public enum MachineExit: Equatable, Sendable, CustomStringConvertible {
    case powerOff
    case reset
    case internalError(String)
    case debugExit(status: Int32)
    case signal(Int32)
    case userQuit
    case vmmFailure(String)
    /// The guest moved to another VMM (live migration): this one stops.
    case migrated(String)

    /// Exit code for bad usage or input.
    public static let usageExitCode: Int32 = 2
    /// Exit code for a VMM failure.
    public static let vmmFailureExitCode: Int32 = 6
    /// Exit code for a guest reset or triple fault (`--on-reboot exit`).
    public static let resetExitCode: Int32 = 8

    /// The process exit code.
    public var exitCode: Int32 {
        switch self {
        case .powerOff, .userQuit, .migrated: return 0
        case .vmmFailure: return Self.vmmFailureExitCode
        case .reset: return Self.resetExitCode
        case .internalError: return 4
        case .debugExit(let s): return s
        case .signal(let s): return 128 + s
        }
    }

    public var description: String {
        switch self {
        case .powerOff: return "guest powered off"
        case .reset: return "guest reset"
        case .internalError(let s): return "internal error: \(s)"
        case .debugExit(let s): return "debug-exit with status \(s)"
        case .signal(let s): return "stopped by signal \(s)"
        case .userQuit: return "quit from the console"
        case .vmmFailure(let s): return "VMM failure: \(s)"
        case .migrated(let to): return "migrated to \(to)"
        }
    }
}
