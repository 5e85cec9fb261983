import CKVM
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Logging
import Synchronization

/// Where the VMM's log lines go and how they look (`PUT /logger`, `--log-path`, `--level`).
///
/// Lines look like Firecracker's: `2026-11-23T17:50:00.123456789 [ID:THREAD:LEVEL:file:line] message`,
/// the level and origin only with `show_level` / `show_log_origin`. Until a path is set, lines go
/// to stderr (stdout carries the serial console). A path is opened for appending (created if
/// missing; a FIFO is opened read-write and non-blocking so a missing reader never stalls the VMM).
public final class LogSink: Sendable {
    struct Settings {
        var fd: Int32 = STDERR_FILENO
        var ownsFD = false
        var path: String?
        var level: Logger.Level? = .warning
        var showLevel = false
        var showOrigin = false
    }
    private let settings = Mutex(Settings())
    /// The instance id printed in every line.
    public let instanceID: String

    public init(instanceID: String) { self.instanceID = instanceID }

    /// Firecracker's level names mapped to swift-log levels (`Off` is nil).
    public static func level(named name: String) -> Logger.Level?? {
        switch name.lowercased() {
        case "error": return .some(.error)
        case "warning", "warn": return .some(.warning)
        case "info": return .some(.info)
        case "debug": return .some(.debug)
        case "trace": return .some(.trace)
        case "off": return .some(nil)
        default: return nil
        }
    }

    /// Applies a `PUT /logger` body. The path is opened before anything changes.
    public func configure(_ config: LoggerConfig) throws(APIError) {
        var newFD: Int32? = nil
        if let path = config.logPath {
            let fd = Self.openForAppend(path)
            guard fd >= 0 else {
                throw .badRequest("Invalid log_path: cannot open \(path): \(String(cString: strerror(errno))).")
            }
            newFD = fd
        }
        var level: Logger.Level?? = nil
        if let name = config.level {
            guard let l = Self.level(named: name) else { throw .badRequest("Invalid level '\(name)'.") }
            level = l
        }
        settings.withLock { s in
            if let newFD {
                if s.ownsFD { close(s.fd) }
                s.fd = newFD
                s.ownsFD = true
                s.path = config.logPath
            }
            if let level { s.level = level }
            if let v = config.showLevel { s.showLevel = v }
            if let v = config.showLogOrigin { s.showOrigin = v }
        }
    }

    /// The current configuration (for `GET /vm/config`).
    public var current: LoggerConfig? {
        settings.withLock { s in
            guard s.path != nil else { return nil }
            let name = s.level.map { l -> String in
                switch l {
                case .trace: return "Trace"
                case .debug: return "Debug"
                case .info, .notice: return "Info"
                case .warning: return "Warning"
                case .error, .critical: return "Error"
                }
            } ?? "Off"
            return LoggerConfig(logPath: s.path, level: name, showLevel: s.showLevel, showLogOrigin: s.showOrigin)
        }
    }

    /// The lowest level written (`.critical` when logging is off; the sink drops those too).
    var thresholdLevel: Logger.Level { settings.withLock { $0.level ?? .critical } }

    /// Whether messages of `level` are written.
    func enabled(_ level: Logger.Level) -> Bool {
        settings.withLock { s in s.level.map { level >= $0 } ?? false }
    }

    /// Writes one formatted line (dropped if the destination is full or gone).
    func write(level: Logger.Level, message: String, file: String, line: UInt) {
        let (fd, showLevel, showOrigin, on) = settings.withLock { s in
            (s.fd, s.showLevel, s.showOrigin, s.level.map { level >= $0 } ?? false)
        }
        guard on else { return }
        var tag = "\(instanceID):\(Self.threadName())"
        if showLevel { tag += ":\(level.rawValue.uppercased())" }
        if showOrigin { tag += ":\(file.split(separator: "/").last.map(String.init) ?? file):\(line)" }
        let text = "\(Self.timestamp()) [\(tag)] \(message)\n"
        settings.withLock { _ in
            _ = text.withCString { p in Glibc.write(fd, p, strlen(p)) }
        }
    }

    /// A logger writing here.
    public func makeLogger(label: String) -> Logger {
        Logger(label: label) { label in LogSinkHandler(sink: self, label: label) }
    }

    static func openForAppend(_ path: String) -> Int32 {
        var st = stat()
        if stat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFIFO {
            return open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC)
        }
        return open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o644)
    }

    static func threadName() -> String {
        if ckvm_is_main_thread() != 0 { return "main" }
        var buffer = [CChar](repeating: 0, count: 32)
        let name = ckvm_get_thread_name(&buffer, UInt(buffer.count)) == 0 ? String(cString: buffer) : ""
        // Dispatch worker threads carry queue-internal names: they serve the API.
        return name.isEmpty || name.hasPrefix("-") || name.contains("qos") ? "api" : name
    }

    static func timestamp() -> String {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var t = ts.tv_sec
        var tmv = tm()
        gmtime_r(&t, &tmv)
        func pad(_ v: Int, _ width: Int) -> String {
            let d = String(v)
            return String(repeating: "0", count: max(0, width - d.count)) + d
        }
        return "\(pad(Int(tmv.tm_year) + 1900, 4))-\(pad(Int(tmv.tm_mon) + 1, 2))-\(pad(Int(tmv.tm_mday), 2))T"
            + "\(pad(Int(tmv.tm_hour), 2)):\(pad(Int(tmv.tm_min), 2)):\(pad(Int(tmv.tm_sec), 2)).\(pad(ts.tv_nsec, 9))"
    }
}

/// swift-log handler forwarding to a `LogSink`.
struct LogSinkHandler: LogHandler {
    let sink: LogSink
    let label: String
    var metadata: Logger.Metadata = [:]
    /// Follows the sink's level, so that disabled messages are never formatted.
    var logLevel: Logger.Level {
        get { sink.thresholdLevel }
        set {}
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        sink.write(level: event.level, message: "\(event.message)", file: event.file, line: event.line)
    }
}
