/// The single error type of the DiskImage module. Every message names the problem and where it was found
/// (file path, byte offset, field).
public struct DiskImageError: Error, CustomStringConvertible, Sendable, Equatable {
    /// Broad category of the failure, for programmatic matching.
    public enum Kind: Sendable, Equatable {
        /// A system call failed (the errno is in `errno`).
        case io
        /// The image's on-disk structures are malformed or inconsistent.
        case corrupt
        /// The image uses a feature this implementation refuses (unknown incompatible bit, encryption, …).
        case unsupported
        /// The caller asked for something invalid (out-of-range request, bad option, read-only write).
        case invalidArgument
        /// A backing chain is cyclic, too deep, or backing files are not allowed.
        case backingChain
        /// Another holder's image lock (qemu's locking protocol, `ImageLock`) conflicts with the one asked for.
        case locked
    }

    /// The category of the error.
    public let kind: Kind
    /// Human-readable description naming the problem and its location.
    public let message: String
    /// The errno, for `.io` errors.
    public let errno: Int32?

    /// Creates an error of the given kind.
    public init(_ kind: Kind, _ message: String, errno: Int32? = nil) {
        self.kind = kind
        self.message = message
        self.errno = errno
    }

    public var description: String { message }

    static func corrupt(_ path: String, _ what: String) -> DiskImageError {
        DiskImageError(.corrupt, "\(path): \(what)")
    }
    static func unsupported(_ path: String, _ what: String) -> DiskImageError {
        DiskImageError(.unsupported, "\(path): \(what)")
    }
    /// An invalid-argument error.
    public static func invalid(_ what: String) -> DiskImageError {
        DiskImageError(.invalidArgument, what)
    }
}
