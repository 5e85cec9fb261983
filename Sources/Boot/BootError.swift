/// Every failure of the `Boot` module. Messages name the problem and where it is
/// (file, file offset, guest address).
public enum BootError: Error, Equatable, CustomStringConvertible {
    /// A file could not be opened or read.
    case fileUnreadable(path: String, reason: String)
    /// A file is not a kernel format this loader knows.
    case unknownKernelFormat(String)
    /// A kernel image is malformed; the message names the format, field and offset.
    case invalidImage(String)
    /// The image uses a feature that is not supported.
    case unsupported(String)
    /// Something does not fit in guest RAM.
    case doesNotFit(String)
    /// Decompression of a kernel payload failed.
    case decompression(String)
    /// The command line is longer than the kernel accepts.
    case cmdlineTooLong(length: Int, limit: Int)
    /// A guest memory write failed.
    case memory(String)

    public var description: String {
        switch self {
        case .fileUnreadable(let path, let reason): return "cannot read \(path): \(reason)"
        case .unknownKernelFormat(let m): return m
        case .invalidImage(let m): return m
        case .unsupported(let m): return m
        case .doesNotFit(let m): return m
        case .decompression(let m): return m
        case .cmdlineTooLong(let length, let limit):
            return "kernel command line is \(length) bytes, longer than the kernel's limit of \(limit) bytes (cmdline_size)"
        case .memory(let m): return m
        }
    }
}

/// Hex formatting used in messages.
@inline(__always) func hex<T: BinaryInteger>(_ v: T) -> String { "0x" + String(v, radix: 16) }

/// Human-readable size in MiB (or bytes when small) for messages.
func sizeText(_ bytes: UInt64) -> String {
    bytes >= 1 << 20 ? "\(bytes >> 20) MiB" : "\(bytes) bytes"
}
