import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// A manager failure: what went wrong and where (the VM, the file, the key, the socket).
///
/// `status` is the HTTP status the daemon answers with when the error reaches its API
/// (400 bad definition or request, 404 unknown VM, 409 action that does not fit the state,
/// 500 host failure); `kind` lets clients tell a daemon that is not running from other failures.
public struct ManagerError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The broad class of a failure.
    public enum Kind: Sendable, Equatable {
        /// A definition or a request is invalid (400).
        case invalid
        /// The named VM does not exist (404).
        case notFound
        /// The action does not fit the VM's current state (409).
        case conflict
        /// A socket could not be connected (the daemon or the VMM is not running).
        case cannotConnect
        /// A deadline passed.
        case timeout
        /// An HTTP exchange failed (connection closed early, protocol error).
        case transport
        /// A host operation failed (file system, process, signal).
        case host
    }

    public var kind: Kind
    /// The message, naming what and where.
    public var message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    /// The HTTP status the daemon replies with for this error.
    public var status: Int {
        switch kind {
        case .invalid: return 400
        case .notFound: return 404
        case .conflict: return 409
        case .timeout: return 504
        case .cannotConnect, .transport, .host: return 500
        }
    }

    public var description: String { message }

    /// `strerror` text of `code`.
    static func errnoText(_ code: Int32 = errno) -> String { String(cString: strerror(code)) }
}
