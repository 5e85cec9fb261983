// The client side of `swiftkvm vm …`: talks to the daemon's HTTP API and formats its replies
// the way virsh prints them.
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// A VM as the daemon reports it (`VMInfo` of the daemon API), decoded leniently: only `name` and
/// `state` are required, so that a newer daemon with more fields still works with this client.
public struct VMSummary: Decodable, Sendable, Equatable {
    /// How the VM's last run ended.
    public struct LastExit: Decodable, Sendable, Equatable {
        public var reason: String
        public var status: Int?
        public var at: String?
    }

    public var name: String
    /// `shut off`, `starting`, `running`, `paused` or `shutting down` (printed unchanged).
    public var state: String
    public var autostart: Bool?
    public var pid: Int?
    public var vcpus: Int?
    public var memMib: Int?
    public var uptimeS: Double?
    public var apiSocket: String?
    public var consoleSocket: String?
    public var serialLog: String?
    public var vmmLog: String?
    public var lastExit: LastExit?
    /// The NICs' TAPs while the VM runs.
    public var nics: [TapAttachment]?

    enum CodingKeys: String, CodingKey {
        case nics
        case name, state, autostart, pid, vcpus
        case memMib = "mem_mib", uptimeS = "uptime_s", apiSocket = "api_socket"
        case consoleSocket = "console_socket", serialLog = "serial_log", vmmLog = "vmm_log"
        case lastExit = "last_exit"
    }

    public init(name: String, state: String, autostart: Bool? = nil, pid: Int? = nil, vcpus: Int? = nil,
                memMib: Int? = nil, uptimeS: Double? = nil, apiSocket: String? = nil, consoleSocket: String? = nil,
                serialLog: String? = nil, vmmLog: String? = nil, lastExit: LastExit? = nil) {
        self.name = name
        self.state = state
        self.autostart = autostart
        self.pid = pid
        self.vcpus = vcpus
        self.memMib = memMib
        self.uptimeS = uptimeS
        self.apiSocket = apiSocket
        self.consoleSocket = consoleSocket
        self.serialLog = serialLog
        self.vmmLog = vmmLog
        self.lastExit = lastExit
    }

    /// Whether the VM has a process (its console can be attached).
    public var isActive: Bool { ["running", "paused", "starting", "shutting down"].contains(state) }
}

/// A client of the `swiftkvm daemon` API for the `swiftkvm vm` verbs. Every failure is a
/// `ManagerError` whose message is ready to print: a daemon that is not running says so and how
/// to start it; a daemon error carries its `fault_message`.
public struct VMClient: Sendable {
    /// The daemon's socket.
    public let socketPath: String
    let http: UnixHTTPClient

    /// A client of the daemon at `socketPath`.
    public init(socketPath: String) {
        self.socketPath = socketPath
        self.http = UnixHTTPClient(socketPath: socketPath, timeout: 60)
    }

    /// The daemon socket the CLI uses: `--socket` if given, else `$SWIFTKVM_SOCKET`, else
    /// `daemon.sock` in the state dir (`$SWIFTKVM_STATE_DIR`, default /var/lib/swiftkvm).
    public static func socketPath(option: String?, environment: [String: String] = ProcessInfo.processInfo.environment) -> String {
        if let option, !option.isEmpty { return option }
        if let s = environment["SWIFTKVM_SOCKET"], !s.isEmpty { return s }
        let dir = environment["SWIFTKVM_STATE_DIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/var/lib/swiftkvm"
        return (dir.hasSuffix("/") ? String(dir.dropLast()) : dir) + "/daemon.sock"
    }

    /// `name` escaped for a request path (names are validated by the daemon).
    static func pathComponent(_ name: String) -> String {
        var out = ""
        for b in name.utf8 {
            let unreserved = (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5a) || (b >= 0x61 && b <= 0x7a)
                || b == UInt8(ascii: "-") || b == UInt8(ascii: ".") || b == UInt8(ascii: "_") || b == UInt8(ascii: "~")
            if unreserved {
                out.unicodeScalars.append(Unicode.Scalar(b))
            } else {
                let hex = String(b, radix: 16, uppercase: true)
                out += "%" + (hex.count == 1 ? "0" + hex : hex)
            }
        }
        return out
    }

    /// Sends a request; decodes a 2xx reply's body with `decode`, or throws the daemon's fault.
    func call<T>(_ method: String, _ path: String, body: [UInt8]? = nil, timeout: TimeInterval? = nil,
                 decode: (HTTPResponse) throws -> T) throws(ManagerError) -> T {
        let response: HTTPResponse
        do {
            response = try http.request(method, path, body: body, timeout: timeout)
        } catch let e as ManagerError {
            throw connectionError(e)
        } catch {
            throw ManagerError(.transport, "\(method) \(path) on \(socketPath): \(error)")
        }
        guard (200..<300).contains(response.status) else {
            let text = String(response.text.drop(while: \.isWhitespace).reversed().drop(while: \.isWhitespace).reversed())
            throw ManagerError(UnixHTTPClient.kind(forStatus: response.status),
                               response.faultMessage ?? "the daemon answered \(method) \(path) with HTTP \(response.status)\(text.isEmpty ? "" : ": \(text.prefix(300))")")
        }
        do {
            return try decode(response)
        } catch {
            throw ManagerError(.transport, "unexpected reply to \(method) \(path) from the daemon (\(error)): \(response.text.prefix(300))")
        }
    }

    /// A `cannotConnect` error reworded for users; others unchanged.
    func connectionError(_ e: ManagerError) -> ManagerError {
        guard e.kind == .cannotConnect else { return e }
        var reason = e.message
        if let r = reason.firstRange(of: "cannot connect to \(socketPath): ") { reason = String(reason[r.upperBound...]) }
        return ManagerError(.cannotConnect, "cannot connect to the swiftkvm daemon at \(socketPath): \(reason) (start it with `swiftkvm daemon`)")
    }

    static func decodeVM(_ r: HTTPResponse) throws -> VMSummary {
        try JSONDecoder().decode(VMSummary.self, from: Data(r.body))
    }

    /// `POST /vms` with a definition file's bytes; returns the VM and whether it replaced one.
    public func define(_ definition: [UInt8]) throws(ManagerError) -> (vm: VMSummary, replaced: Bool) {
        try call("POST", "/vms", body: definition) { r in (try Self.decodeVM(r), r.status == 200) }
    }

    /// `DELETE /vms/NAME`.
    public func undefine(_ name: String) throws(ManagerError) {
        try call("DELETE", "/vms/\(Self.pathComponent(name))") { _ in () }
    }

    /// `GET /vms` (`all`: also the shut-off ones).
    public func list(all: Bool) throws(ManagerError) -> [VMSummary] {
        try call("GET", all ? "/vms?all=true" : "/vms") { r in try JSONDecoder().decode([VMSummary].self, from: Data(r.body)) }
    }

    /// `GET /vms/NAME`.
    public func info(_ name: String) throws(ManagerError) -> VMSummary {
        try call("GET", "/vms/\(Self.pathComponent(name))", decode: Self.decodeVM)
    }

    /// `PUT /vms/NAME/state` with `action` (start, shutdown, destroy, pause, resume); the reply
    /// comes once the change happened. `timeoutS` is shutdown's grace period.
    public func changeState(_ name: String, action: String, timeoutS: Double? = nil) throws(ManagerError) -> VMSummary {
        struct Body: Encodable {
            var action: String
            var timeout_s: Double?
        }
        let bytes = Array((try? JSONEncoder().encode(Body(action: action, timeout_s: timeoutS))) ?? Data())
        // Shutdown waits for the guest (then destroys it): allow its whole grace period.
        let deadline: TimeInterval = action == "shutdown" ? (timeoutS.map { $0 + 30 } ?? 3600) : 120
        return try call("PUT", "/vms/\(Self.pathComponent(name))/state", body: bytes, timeout: deadline, decode: Self.decodeVM)
    }

    /// `PUT /vms/NAME/state` with action `save`: snapshot into the directory `path` (absolute), then stop.
    public func save(_ name: String, to path: String) throws(ManagerError) -> VMSummary {
        struct Body: Encodable { var action = "save", path: String }
        let bytes = Array((try? JSONEncoder().encode(Body(path: path))) ?? Data())
        return try call("PUT", "/vms/\(Self.pathComponent(name))/state", body: bytes, timeout: 900, decode: Self.decodeVM)
    }

    /// `PUT /vms/NAME/state` with action `migrate`: live migration to `destination`; returns the report's JSON.
    public func migrate(_ name: String, to destination: String, maxDowntimeMs: Int?) throws(ManagerError) -> String {
        struct Body: Encodable { var action = "migrate", destination: String, max_downtime_ms: Int? }
        let bytes = Array((try? JSONEncoder().encode(Body(destination: destination, max_downtime_ms: maxDowntimeMs))) ?? Data())
        return try call("PUT", "/vms/\(Self.pathComponent(name))/state", body: bytes, timeout: 3700) { String(decoding: $0.body, as: UTF8.self) }
    }

    /// `POST /vms/restore`: start the VM saved in the directory `path` (absolute) from its snapshot.
    public func restore(from path: String) throws(ManagerError) -> VMSummary {
        struct Body: Encodable { var path: String }
        let bytes = Array((try? JSONEncoder().encode(Body(path: path))) ?? Data())
        return try call("POST", "/vms/restore", body: bytes, timeout: 300, decode: Self.decodeVM)
    }

    /// `POST /vms/NAME/clone`: a running copy named `newName`, started from a snapshot of the VM.
    public func clone(_ name: String, as newName: String) throws(ManagerError) -> VMSummary {
        struct Body: Encodable { var name: String }
        let bytes = Array((try? JSONEncoder().encode(Body(name: newName))) ?? Data())
        return try call("POST", "/vms/\(Self.pathComponent(name))/clone", body: bytes, timeout: 3600, decode: Self.decodeVM)
    }

    /// `PUT /vms/NAME/autostart`.
    public func setAutostart(_ name: String, _ on: Bool) throws(ManagerError) -> VMSummary {
        try call("PUT", "/vms/\(Self.pathComponent(name))/autostart", body: Array("{\"autostart\":\(on)}".utf8), decode: Self.decodeVM)
    }

    /// `PUT /vms/NAME/memory`: the memory the guest keeps, the balloon takes the rest.
    public func setMemory(_ name: String, currentMiB: Int) throws(ManagerError) -> VMSummary {
        try call("PUT", "/vms/\(Self.pathComponent(name))/memory", body: Array("{\"current_mib\":\(currentMiB)}".utf8), decode: Self.decodeVM)
    }

    /// `GET /events` (optionally `?since=SEQ`): calls `onLine` with each event line as it arrives
    /// until `onLine` returns false, `duration` seconds pass, or the daemon ends the stream.
    public func events(since: Int? = nil, duration: TimeInterval? = nil,
                       onLine: @escaping @Sendable (String) -> Bool) throws(ManagerError) {
        let path = since.map { "/events?since=\($0)" } ?? "/events"
        let response: HTTPResponse
        do {
            response = try http.streamLines("GET", path, duration: duration, connectTimeout: 30, onLine: onLine)
        } catch let e as ManagerError {
            throw connectionError(e)
        } catch {
            throw ManagerError(.transport, "GET \(path) on \(socketPath): \(error)")
        }
        guard (200..<300).contains(response.status) else {
            throw ManagerError(UnixHTTPClient.kind(forStatus: response.status),
                               response.faultMessage ?? "the daemon answered GET \(path) with HTTP \(response.status)")
        }
    }
}

/// How `swiftkvm vm` prints what the daemon says (virsh's layouts).
public enum VMFormat {
    /// `text` padded with spaces on the right to `width` characters (longer text is kept whole).
    static func pad(_ text: String, _ width: Int) -> String {
        text.count >= width ? text : text + String(repeating: " ", count: width - text.count)
    }

    /// `virsh list`: ` Id   Name   State`, a rule, one row per VM (Id = pid or `-`).
    public static func table(_ vms: [VMSummary]) -> String {
        let rows = vms.map { [$0.pid.map(String.init) ?? "-", $0.name, $0.state] }
        let header = ["Id", "Name", "State"]
        var widths = header.map(\.count)
        for r in rows { for (i, c) in r.enumerated() { widths[i] = max(widths[i], c.count) } }
        func line(_ cells: [String]) -> String {
            var s = ""
            for (i, c) in cells.enumerated() {
                s += " " + (i == cells.count - 1 ? c : Self.pad(c, widths[i] + 2))
            }
            return s
        }
        var out = line(header) + "\n"
        out += String(repeating: "-", count: widths.reduce(0, +) + 3 * widths.count + 1) + "\n"
        for r in rows { out += line(r) + "\n" }
        return out
    }

    /// `virsh dominfo`: `Key:  value` lines.
    public static func info(_ vm: VMSummary) -> String {
        var pairs: [(String, String)] = [
            ("Name", vm.name),
            ("State", vm.state),
            ("PID", vm.pid.map(String.init) ?? "-"),
            ("CPU(s)", vm.vcpus.map(String.init) ?? "-"),
            ("Memory", vm.memMib.map { "\($0) MiB" } ?? "-"),
            ("Autostart", vm.autostart == true ? "enable" : "disable"),
        ]
        if let up = vm.uptimeS { pairs.append(("Uptime", "\((up * 10).rounded() / 10) s")) }
        if let s = vm.apiSocket { pairs.append(("API socket", s)) }
        if let s = vm.consoleSocket { pairs.append(("Console socket", s)) }
        if let s = vm.serialLog { pairs.append(("Serial log", s)) }
        if let s = vm.vmmLog { pairs.append(("VMM log", s)) }
        if let e = vm.lastExit {
            var text = e.reason
            if let st = e.status { text += " (status \(st))" }
            if let at = e.at { text += " at \(at)" }
            pairs.append(("Last exit", text))
        }
        for n in vm.nics ?? [] {
            pairs.append(("NIC \(n.ifaceId)", "\(n.mac) on \(n.network.map { "network \($0) (\(n.bridge))" } ?? "bridge \(n.bridge)"), TAP \(n.tap)"))
        }
        // virsh's fixed 16-column keys.
        return pairs.map { Self.pad($0.0 + ":", 16) + $0.1 }
            .joined(separator: "\n") + "\n"
    }
}
