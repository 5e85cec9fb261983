import VMM
/// A fast path for the command line of `swiftkvm vmm` (and `firecracker`).
///
/// swift-argument-parser builds its model of a command by reflecting over every option before it
/// parses anything; for `swiftkvm vmm` that was a quarter of the CPU time from exec to the API
/// socket (about 3.5 of 13 ms, measured with perf on 2026-11-23). The options orchestrators pass
/// are few and simple, so `VMMArguments.parse` recognises exactly those, with the same defaults,
/// and returns nil for everything else — `--help`, an unknown or repeated-in-an-odd-form option,
/// a missing or bad value, `--no-api` without `--config-file` — so that ArgumentParser (the
/// `VMMCommand` definition stays the authority) parses it and prints its usual help or error.
public enum VMMArguments {
    /// The options for `arguments` (what follows `vmm`, or the `firecracker` binary name), or nil
    /// when ArgumentParser should handle them. (Plain string switches: no sets or generics, whose
    /// first use costs more than the parsing.)
    public static func parse(_ arguments: ArraySlice<String>) -> VMMProcess.Options? {
        var o = VMMProcess.Options()
        var seen: [String] = []
        var i = arguments.startIndex
        while i < arguments.endIndex {
            let arg = arguments[i]
            i += 1
            guard arg.hasPrefix("--"), arg.utf8.count > 2 else { return nil }
            var name = String(arg.dropFirst(2))
            var inline: String?
            if let eq = name.firstIndex(of: "=") {
                inline = String(name[name.index(after: eq)...])
                name = String(name[..<eq])
            }
            switch name {
            case "no-api", "show-level", "show-log-origin", "no-seccomp", "boot-timer", "enable-pci", "ksm":
                guard inline == nil else { return nil }
                if name == "enable-pci" { o.enablePCI = true }
                if name == "ksm" { o.ksm = true }
                if name == "no-api" { o.noAPI = true }
                if name == "show-level" { o.showLevel = true }
                if name == "show-log-origin" { o.showLogOrigin = true }
                if name == "no-seccomp" { o.noSeccomp = true }
                continue
            case "api-sock", "id", "config-file", "log-path", "level", "metrics-path", "metrics-interval",
                 "http-api-max-payload-size", "console-sock", "serial-log", "ready-fd", "seccomp-filter", "incoming",
                 "api-sock-mode", "api-max-connections", "api-idle-timeout", "mmds-size-limit",
                 // Accepted for compatibility with Firecracker tooling; no effect.
                 "start-time-us", "start-time-cpu-us", "parent-cpu-time-us", "module":
                break
            default:
                return nil
            }
            guard !seen.contains(name) else { return nil }
            seen.append(name)
            let value: String
            if let inline {
                value = inline
            } else {
                guard i < arguments.endIndex, !arguments[i].hasPrefix("-") else { return nil }
                value = arguments[i]
                i += 1
            }
            switch name {
            case "api-sock": o.apiSocket = value
            case "id": o.instanceID = value
            case "config-file": o.configFile = value
            case "log-path": o.logPath = value
            case "level":
                guard LogSink.level(named: value) != nil else { return nil }
                o.level = value
            case "metrics-path": o.metricsPath = value
            case "metrics-interval":
                guard let v = Double(value), v >= 0, v.isFinite else { return nil }
                o.metricsInterval = v
            case "http-api-max-payload-size":
                guard let v = Int(value), v > 0 else { return nil }
                o.maxPayloadSize = v
            case "api-sock-mode":
                guard let v = VMMProcess.Options.socketMode(value) else { return nil }
                o.apiSocketMode = v
            case "api-max-connections":
                guard let v = Int(value), APIConnectionLimits.connectionRange.contains(v) else { return nil }
                o.apiLimits.maxConnections = v
            case "api-idle-timeout":
                guard let v = Int(value), APIConnectionLimits.idleSecondsRange.contains(v) else { return nil }
                o.apiLimits.idleTimeout = .seconds(Int64(v))
            case "mmds-size-limit":
                guard let v = Int(value), v > 0 else { return nil }
            case "console-sock": o.consoleSocket = value
            case "serial-log": o.serialLog = value
            case "seccomp-filter": o.seccompFilter = value
            case "incoming":
                guard let e = try? MigrationEndpoint(parsing: value) else { return nil }
                o.incoming = e
            case "ready-fd":
                guard let v = Int32(value), v >= 3 else { return nil }
                o.readyFD = v
            default: break // compatibility options without effect
            }
        }
        if o.noAPI && o.configFile == nil { return nil }
        return o
    }

    /// `parse` over a whole array.
    public static func parse(_ arguments: [String]) -> VMMProcess.Options? { parse(arguments[...]) }
}
