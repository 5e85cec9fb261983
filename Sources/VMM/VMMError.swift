/// Errors from configuring, building or running a machine. Messages name the bad value and where it came from.
public enum VMMError: Error, Equatable, CustomStringConvertible, Sendable {
    /// A user-supplied value is invalid (`what` names the option, `reason` says why).
    case invalidValue(what: String, value: String, reason: String)
    /// The configuration as a whole is inconsistent.
    case invalidConfiguration(String)
    /// Building the machine failed (wraps a lower-level error's text).
    case setup(String)

    public var description: String {
        switch self {
        case .invalidValue(let what, let value, let reason): return "invalid \(what) '\(value)': \(reason)"
        case .invalidConfiguration(let s): return "invalid configuration: \(s)"
        case .setup(let s): return s
        }
    }

    /// Whether this error is the user's input (exit code 2) rather than a host/VMM failure.
    public var isUsageError: Bool {
        switch self {
        case .invalidValue, .invalidConfiguration: return true
        case .setup: return false
        }
    }
}
