import Logging
#if canImport(Glibc)
import Glibc
#endif

/// `swiftkvm run`'s log handler: swift-log's `StreamLogHandler` line format on standard error, with the
/// timestamp made by `localtime_r`. swift-log's handler calls `localtime`, which re-reads the time zone and
/// stats /etc/localtime on every call: a guest-caused warning logged on a vCPU thread then died in that
/// thread's seccomp filter (and `localtime`'s static buffer is shared by every thread that logs).
struct RunLogHandler: LogHandler {
    let label: String
    var logLevel: Logger.Level = .info
    var metadata: Logger.Metadata = [:]

    init(label: String) { self.label = label }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(level: Logger.Level, message: Logger.Message, metadata explicit: Logger.Metadata?, source: String,
             file: String, function: String, line: UInt) {
        var all = metadata
        if let explicit { all.merge(explicit) { _, new in new } }
        let pretty = all.isEmpty ? "" : " " + all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        let text = "\(Self.timestamp()) \(level)\(label.isEmpty ? "" : " ")\(label):\(pretty) [\(source)] \(message)\n"
        var bytes = Array(text.utf8)[...]
        while !bytes.isEmpty {
            let n = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            bytes = bytes.dropFirst(n)
        }
    }

    /// Local time as `yyyy-MM-ddTHH:mm:ss±hhmm`, as `StreamLogHandler` prints it.
    static func timestamp() -> String {
        var now = time(nil)
        var parts = tm()
        localtime_r(&now, &parts)
        var buffer = [CChar](repeating: 0, count: 64)
        _ = strftime(&buffer, buffer.count, "%Y-%m-%dT%H:%M:%S%z", &parts)
        return String(cString: buffer)
    }
}
