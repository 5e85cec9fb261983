#if canImport(Glibc)
import Glibc
#endif

/// Why the jailer stopped. `usage` errors name the option that was wrong and exit 2 before anything
/// was created (or after what was created for them was removed again); `system` errors name the step,
/// the path and the errno, and exit 1.
public enum JailerError: Error, Equatable, CustomStringConvertible {
    case usage(option: String, message: String)
    case system(step: String, path: String, errno: Int32)

    public var exitCode: Int32 {
        switch self {
        case .usage: return 2
        case .system: return 1
        }
    }

    public var description: String {
        switch self {
        case let .usage(option, message):
            return "\(option): \(message)"
        case let .system(step, path, code):
            return "\(step) \(path): \(String(cString: strerror(code))) (errno \(code))"
        }
    }
}
