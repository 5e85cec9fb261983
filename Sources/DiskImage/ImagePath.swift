#if canImport(Glibc)
import Glibc
#endif

/// Path and formatting helpers that need no Foundation (the library links FoundationEssentials
/// only, which keeps process start-up free of ICU).
enum ImagePath {
    /// The directory part of `path` ("." when it has none, "/" for a file at the root).
    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    /// Where the backing file `name` stored in the image at `path` is: absolute, or relative to the image's folder
    /// (spelled as qemu spells it: `name` alone for an image in the working directory).
    static func backing(_ name: String, of path: String) -> String {
        name.hasPrefix("/") || !path.contains("/") ? name : directory(of: path) + "/" + name
    }

    /// `path` with symbolic links and `.`/`..` resolved (realpath); `path` itself when it does not exist.
    static func resolved(_ path: String) -> String {
        guard let p = realpath(path, nil) else { return path }
        defer { free(p) }
        return String(cString: p)
    }

    /// `value` as 8 lower-case hex digits.
    static func hex8(_ value: UInt32) -> String {
        let digits = String(value, radix: 16)
        return String(repeating: "0", count: max(0, 8 - digits.count)) + digits
    }
}
