import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// A VM's state, with virsh's names (`"shut off"`…), used unchanged in JSON and by the CLI.
public enum VMState: String, Codable, Sendable, CaseIterable {
    case shutOff = "shut off"
    case starting = "starting"
    case running = "running"
    case paused = "paused"
    case shuttingDown = "shutting down"
}

/// How a VM's last run ended.
public struct VMExitInfo: Codable, Sendable, Equatable {
    /// `poweroff`, `reset`, `signal`, `crashed`, `destroyed` or `unknown` (a re-attached VM whose
    /// status the daemon cannot know).
    public var reason: String
    /// The vmm's exit status (128+N for a signal), nil when unknown.
    public var status: Int?
    /// ISO 8601 time.
    public var at: String

    public init(reason: String, status: Int?, at: String) {
        self.reason = reason; self.status = status; self.at = at
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(reason, forKey: .reason)
        try c.encode(status, forKey: .status)
        try c.encode(at, forKey: .at)
    }
}

/// What the daemon reports about a VM (`GET /vms`, `GET /vms/NAME`). Absent values are `null`.
public struct VMInfo: Codable, Sendable, Equatable {
    public var name: String
    public var state: VMState
    public var autostart: Bool
    /// The vmm's pid while it runs.
    public var pid: Int?
    public var vcpus: Int
    public var memMib: Int
    /// Seconds since the vmm started, while it runs.
    public var uptimeS: Double?
    public var apiSocket: String
    public var consoleSocket: String
    public var serialLog: String
    public var vmmLog: String
    public var lastExit: VMExitInfo?
    /// The TAPs of the VM's `nics` while it runs.
    public var nics: [TapAttachment] = []

    enum CodingKeys: String, CodingKey {
        case name, state, autostart, pid, vcpus, memMib = "mem_mib", uptimeS = "uptime_s"
        case apiSocket = "api_socket", consoleSocket = "console_socket", serialLog = "serial_log"
        case vmmLog = "vmm_log", lastExit = "last_exit", nics
    }

    public init(name: String, state: VMState, autostart: Bool, pid: Int?, vcpus: Int, memMib: Int, uptimeS: Double?,
                apiSocket: String, consoleSocket: String, serialLog: String, vmmLog: String, lastExit: VMExitInfo?,
                nics: [TapAttachment] = []) {
        self.nics = nics
        self.name = name; self.state = state; self.autostart = autostart; self.pid = pid
        self.vcpus = vcpus; self.memMib = memMib; self.uptimeS = uptimeS
        self.apiSocket = apiSocket; self.consoleSocket = consoleSocket
        self.serialLog = serialLog; self.vmmLog = vmmLog; self.lastExit = lastExit
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(name, forKey: .name)
        try c.encode(state, forKey: .state)
        try c.encode(autostart, forKey: .autostart)
        try c.encode(pid, forKey: .pid)
        try c.encode(vcpus, forKey: .vcpus)
        try c.encode(memMib, forKey: .memMib)
        try c.encode(uptimeS, forKey: .uptimeS)
        try c.encode(apiSocket, forKey: .apiSocket)
        try c.encode(consoleSocket, forKey: .consoleSocket)
        try c.encode(serialLog, forKey: .serialLog)
        try c.encode(vmmLog, forKey: .vmmLog)
        try c.encode(lastExit, forKey: .lastExit)
        try c.encode(nics, forKey: .nics)
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try c.decode(String.self, forKey: .name)
        state = try c.decode(VMState.self, forKey: .state)
        autostart = try c.decode(Bool.self, forKey: .autostart)
        pid = try c.decodeIfPresent(Int.self, forKey: .pid)
        vcpus = try c.decode(Int.self, forKey: .vcpus)
        memMib = try c.decode(Int.self, forKey: .memMib)
        uptimeS = try c.decodeIfPresent(Double.self, forKey: .uptimeS)
        apiSocket = try c.decode(String.self, forKey: .apiSocket)
        consoleSocket = try c.decode(String.self, forKey: .consoleSocket)
        serialLog = try c.decode(String.self, forKey: .serialLog)
        vmmLog = try c.decode(String.self, forKey: .vmmLog)
        lastExit = try c.decodeIfPresent(VMExitInfo.self, forKey: .lastExit)
        nics = try c.decodeIfPresent([TapAttachment].self, forKey: .nics) ?? []
    }
}

/// `GET /` of the daemon.
public struct DaemonInfo: Codable, Sendable, Equatable {
    public var name: String
    public var version: String
    public var pid: Int
    public var stateDir: String
    enum CodingKeys: String, CodingKey { case name, version, pid, stateDir = "state_dir" }
    public init(name: String = "swiftkvm-daemon", version: String, pid: Int, stateDir: String) {
        self.name = name; self.version = version; self.pid = pid; self.stateDir = stateDir
    }
}

/// The files of a state directory (see the manager contract).
public struct StatePaths: Sendable {
    /// The state directory.
    public let root: String
    /// The paths under `root`.
    public init(root: String) { self.root = root }
    public var socket: String { root + "/daemon.sock" }
    public var lock: String { root + "/daemon.lock" }
    public var vms: String { root + "/vms" }
    public var run: String { root + "/run" }
    public var logs: String { root + "/logs" }
    public var events: String { root + "/events.log" }
    /// Network definitions (`networks/NAME.json`).
    public var networks: String { root + "/networks" }
    /// Running networks' state, nftables scripts and dnsmasq pid files.
    public var netState: String { root + "/netstate" }
    /// dnsmasq lease files (`dnsmasq/NAME.leases`), kept across network restarts.
    public var dnsmasq: String { root + "/dnsmasq" }
    public func runDir(_ name: String) -> String { run + "/" + name }
    public func apiSocket(_ name: String) -> String { runDir(name) + "/api.sock" }
    public func consoleSocket(_ name: String) -> String { runDir(name) + "/console.sock" }
    public func configFile(_ name: String) -> String { runDir(name) + "/config.json" }
    public func stateFile(_ name: String) -> String { runDir(name) + "/state.json" }
    public func serialLog(_ name: String) -> String { logs + "/" + name + ".serial.log" }
    public func vmmLog(_ name: String) -> String { logs + "/" + name + ".vmm.log" }
    public func metricsFile(_ name: String) -> String { logs + "/" + name + ".metrics.json" }
    /// The snapshot a clone starts from (`vm clone`), removed once its vmm loaded it.
    public func cloneSnapshot(_ name: String) -> String { runDir(name) + "/clone-snapshot" }
}

/// `run/NAME/state.json`: what a restarted daemon needs to re-attach.
struct RunState: Codable, Equatable {
    var pid: Int32
    var startTime: UInt64
    var startedAt: String
    /// The TAPs the daemon made for the VM's NICs.
    var taps: [TapAttachment]? = nil
    enum CodingKeys: String, CodingKey { case pid, startTime = "start_time", startedAt = "started_at", taps }
}
