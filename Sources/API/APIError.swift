import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// An API failure: the HTTP status and Firecracker's `{"fault_message": …}` text.
///
/// Every message names what was wrong and where (the request path, the JSON field, the state
/// the microVM is in). Statuses follow Firecracker: 400 for bad requests and for operations not
/// allowed in the current state, 413 for a body over the size limit, 500 for host failures.
public struct APIError: Error, Equatable, Sendable, CustomStringConvertible {
    /// HTTP status code.
    public var status: Int
    /// The `fault_message` text.
    public var message: String

    public init(status: Int = 400, _ message: String) {
        self.status = status
        self.message = message
    }

    public var description: String { "\(status): \(message)" }

    /// 400 with `message`.
    public static func badRequest(_ message: String) -> APIError { APIError(status: 400, message) }

    /// Firecracker's text for an operation refused after InstanceStart.
    public static let notSupportedAfterStart =
        APIError("The requested operation is not supported after starting the microVM.")
    /// Firecracker's text for an operation refused before InstanceStart.
    public static let notSupportedBeforeStart =
        APIError("The requested operation is not supported before starting the microVM.")

    /// A Firecracker endpoint SwiftKVM does not implement yet.
    public static func notSupportedYet(_ what: String) -> APIError {
        APIError("\(what) is not supported yet by SwiftKVM.")
    }

    /// The JSON body of the error response.
    public var jsonBody: [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.withoutEscapingSlashes]
        return Array((try? encoder.encode(["fault_message": message])) ?? Data("{\"fault_message\":\"error\"}".utf8))
    }
}
