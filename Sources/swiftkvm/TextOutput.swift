#if canImport(Glibc)
import Glibc
#endif

// Text helpers for the CLI without Foundation (the binary links FoundationEssentials only, so
// start-up does not load ICU).

/// printf-style formatting through vsnprintf; arguments must match the C conversions
/// (`%lld`/`%llu` for Int/UInt64, `%f` for Double).
func cFormat(_ format: String, _ arguments: CVarArg...) -> String {
    withVaList(arguments) { list in
        var buffer = [CChar](repeating: 0, count: 512)
        let n = Int(vsnprintf(&buffer, buffer.count, format, list))
        guard n >= buffer.count else { return String(cString: buffer) }
        buffer = [CChar](repeating: 0, count: n + 1)
        return withVaList(arguments) { again in
            _ = vsnprintf(&buffer, buffer.count, format, again)
            return String(cString: buffer)
        }
    }
}

extension String {
    /// The string cut or padded with spaces on the right to exactly `width` characters.
    func padded(to width: Int) -> String {
        count >= width ? String(prefix(width)) : self + String(repeating: " ", count: width - count)
    }
}

/// Writes `text` to a file descriptor (all of it, retrying on EINTR; errors are ignored).
func writeText(_ text: String, to fd: Int32) {
    var bytes = Array(text.utf8)[...]
    while !bytes.isEmpty {
        let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress!, $0.count) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { return }
        bytes = bytes.dropFirst(n)
    }
}

/// `seconds` since the epoch as local "yyyy-MM-dd HH:mm:ss".
func localDateTime(_ seconds: Int) -> String {
    var t = time_t(seconds)
    var parts = tm()
    localtime_r(&t, &parts)
    var buffer = [CChar](repeating: 0, count: 32)
    _ = strftime(&buffer, buffer.count, "%Y-%m-%d %H:%M:%S", &parts)
    return String(cString: buffer)
}
