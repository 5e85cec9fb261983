import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Devices
import Logging

/// A network's state, as `swiftkvm net list` prints it.
public enum NetworkState: String, Codable, Sendable {
    case active
    case inactive
}

/// What the daemon reports about a network (`GET /networks`, `GET /networks/NAME`).
public struct NetworkInfo: Codable, Sendable, Equatable {
    public struct Range: Codable, Sendable, Equatable {
        public var start: String
        public var end: String
    }
    public var name: String
    public var state: NetworkState
    public var autostart: Bool
    public var mode: String
    public var bridge: String
    /// The host's address with the prefix (nil in mode bridge).
    public var address: String?
    public var dhcpRange: Range?
    /// The nftables table while active (nat, routed, isolated).
    public var nftTable: String?
    public var dnsmasqPid: Int?
    public var leaseFile: String?
    public var dnsmasqLog: String?
    /// Whether the daemon turned on net.ipv4.ip_forward (it turns it off again when the last
    /// network that needs it stops).
    public var ipForwardChangedByDaemon: Bool?
    /// Running VMs with a NIC on the network.
    public var vms: [String]

    enum CodingKeys: String, CodingKey {
        case name, state, autostart, mode, bridge, address, dhcpRange = "dhcp_range", nftTable = "nft_table"
        case dnsmasqPid = "dnsmasq_pid", leaseFile = "lease_file", dnsmasqLog = "dnsmasq_log"
        case ipForwardChangedByDaemon = "ip_forward_changed_by_daemon", vms
    }
}

/// A VM NIC's TAP while the VM runs: created by `NetworkManager.attach`, removed by `detach`.
public struct TapAttachment: Codable, Sendable, Equatable {
    public var tap: String
    public var bridge: String
    /// The swiftkvm network, or nil for a NIC on a named host bridge.
    public var network: String?
    public var ifaceId: String
    public var mac: String

    enum CodingKeys: String, CodingKey { case tap, bridge, network, ifaceId = "iface_id", mac }
}

/// The manager's networks (libvirt's bridge driver): definitions, and for each running network
/// what the daemon added to the host, so that stopping removes exactly that:
///
/// - nat, routed, isolated: a bridge with the host's address, an nftables table
///   `swiftkvm-NAME` (masquerade for nat; forwarding rules), `net.ipv4.ip_forward` for nat and
///   routed (turned off again when the last network that needed it stops, if the daemon turned
///   it on), and one dnsmasq (DHCP and DNS) supervised by the daemon;
/// - bridge: an existing host bridge, nothing is created.
///
/// VM NICs get a TAP on the network's bridge (`attach`), removed when the VM stops (`detach`).
/// Running networks survive the daemon; `load()` re-attaches to them (and restarts a dnsmasq
/// that died). Host commands act on the daemon's network namespace.
public final class NetworkManager: @unchecked Sendable {
    /// The runtime state of an active network (`netstate/NAME.json`): the definition it was
    /// started with (a redefinition takes effect at the next start) and its dnsmasq.
    struct Runtime: Codable {
        var definition: JSONValue
        var dnsmasqPid: Int32?
        var dnsmasqStartTime: UInt64?
        var startedAt: String
        enum CodingKeys: String, CodingKey {
            case definition, dnsmasqPid = "dnsmasq_pid", dnsmasqStartTime = "dnsmasq_start_time", startedAt = "started_at"
        }
    }

    /// One network; guarded by `NetworkManager.lock`.
    final class Record: @unchecked Sendable {
        var definition: NetworkDefinition
        /// The definition it runs with, while active.
        var running: NetworkDefinition?
        var dnsmasqPid: pid_t?
        var dnsmasqStartTime: UInt64?
        var startedAt = ""
        /// Set while stopping: the supervisor does not restart dnsmasq, no new TAPs attach.
        var stopping = false
        /// Bumped whenever dnsmasq is (re)started or stopped, so an old watcher does nothing.
        var dnsmasqGeneration: UInt64 = 0
        var restarts: [Date] = []
        /// Serializes start/stop (and dnsmasq restarts) of this network.
        let actionLock = ConditionLock()
        init(definition: NetworkDefinition) { self.definition = definition }
    }

    public let paths: StatePaths
    public let store: NetworkStore
    public let tools: HostTools
    let logger: Logger
    private let lock = ConditionLock()
    private var records: [String: Record] = [:]
    /// VM name → its TAPs.
    private var attachments: [String: [TapAttachment]] = [:]
    private var stopped = false

    /// Where network events go (the daemon's event log), if anywhere.
    let events: EventLog?

    public init(paths: StatePaths, tools: HostTools = HostTools(), logger: Logger, events: EventLog? = nil) {
        self.events = events
        self.paths = paths
        self.store = NetworkStore(directory: paths.networks)
        self.tools = tools
        self.logger = logger
    }

    // MARK: files

    func runtimeFile(_ name: String) -> String { paths.netState + "/\(name).json" }
    func nftFile(_ name: String) -> String { paths.netState + "/\(name).nft" }
    func pidFile(_ name: String) -> String { paths.netState + "/\(name).dnsmasq.pid" }
    func leaseFile(_ name: String) -> String { paths.dnsmasq + "/\(name).leases" }
    func dnsmasqLog(_ name: String) -> String { paths.logs + "/net-\(name).dnsmasq.log" }
    var sysctlFile: String { paths.root + "/net-sysctl.json" }

    private func readRuntime(_ name: String) -> Runtime? {
        guard let bytes = try? AtomicFile.read(runtimeFile(name)) else { return nil }
        return try? JSONDecoder().decode(Runtime.self, from: Data(bytes))
    }

    private func writeRuntime(_ name: String, _ r: Record) {
        guard let running = lock.withLock({ r.running }),
              let def = JSONValue.object(from: running.normalizedJSON()) else { return }
        let rt = lock.withLock { Runtime(definition: .object(def), dnsmasqPid: r.dnsmasqPid, dnsmasqStartTime: r.dnsmasqStartTime, startedAt: r.startedAt) }
        if let data = try? JSONEncoder().encode(rt) {
            do { try AtomicFile.write(Array(data), to: runtimeFile(name)) } catch { logger.error("network '\(name)': \(error.message)") }
        }
    }

    /// Whether the daemon turned ip_forward on (persisted, so a restarted daemon still knows).
    private var ipForwardChanged: Bool {
        get { (try? AtomicFile.read(sysctlFile)).flatMap { JSONValue.object(from: $0) }?["ip_forward_changed"] == .bool(true) }
        set {
            if newValue {
                try? AtomicFile.write(Array(#"{"ip_forward_changed": true}"#.utf8) + [10], to: sysctlFile)
            } else {
                unlink(sysctlFile)
            }
        }
    }

    // MARK: start-up

    /// Loads the definitions (bad files are logged and skipped) and re-attaches to running
    /// networks: a network whose bridge is gone is cleaned up; a dead dnsmasq is restarted.
    @discardableResult
    public func load() -> [ManagerError] {
        for dir in [paths.networks, paths.netState, paths.dnsmasq] { try? AtomicFile.makeDirectory(dir) }
        let (defs, errors) = store.loadAll()
        for e in errors { logger.error("skipping a network definition: \(e.message)") }
        lock.withLock { for d in defs { records[d.name] = Record(definition: d) } }
        for d in defs {
            guard let rt = readRuntime(d.name), let obj = rt.definition.objectValue,
                  let bytes = try? JSONEncoder().encode(obj),
                  let running = try? NetworkDefinition.parse(Array(bytes), source: runtimeFile(d.name)),
                  let r = lock.withLock({ records[d.name] }) else { continue }
            if running.ownsBridge && !tools.interfaceExists(running.bridge) {
                logger.warning("network '\(d.name)': its bridge \(running.bridge) is gone; cleaning up")
                lock.withLock {
                    r.running = running
                    r.dnsmasqPid = rt.dnsmasqPid
                    r.dnsmasqStartTime = rt.dnsmasqStartTime
                }
                teardown(d.name, r)
                events?.emit(network: d.name, "stopped", "its bridge \(running.bridge) was gone when the daemon started")
                continue
            }
            lock.withLock {
                r.running = running
                r.startedAt = rt.startedAt
            }
            if let table = NetworkPlan.nftRuleset(running) {
                do { try applyNft(d.name, table) } catch { logger.error("network '\(d.name)': re-applying nftables: \(error.message)") }
            }
            if running.mode != .bridge {
                if let pid = rt.dnsmasqPid, let st = rt.dnsmasqStartTime, ProcessTools.isAlive(pid), ProcessTools.startTime(of: pid) == st,
                   ProcessTools.commandLine(of: pid).contains("--pid-file=\(pidFile(d.name))") {
                    let gen = lock.withLock { () -> UInt64 in
                        r.dnsmasqPid = pid
                        r.dnsmasqStartTime = st
                        r.dnsmasqGeneration += 1
                        return r.dnsmasqGeneration
                    }
                    watchForeign(d.name, r, pid: pid, startTime: st, generation: gen)
                } else {
                    logger.warning("network '\(d.name)': dnsmasq is not running; starting it again")
                    r.actionLock.withLock {
                        do throws(ManagerError) { try startDnsmasq(d.name, r, running) } catch { logger.error("network '\(d.name)': \(error.message)") }
                    }
                }
            }
            writeRuntime(d.name, r)
            logger.info("network '\(d.name)' is active (re-attached)")
            events?.emit(network: d.name, "reattached", lock.withLock { r.dnsmasqPid.map { "dnsmasq pid \($0)" } ?? "" })
        }
        return errors
    }

    /// Starts every autostart network that is inactive (errors are logged).
    public func autostart() {
        let names = lock.withLock { records.values.filter { $0.definition.autostart && $0.running == nil }.map(\.definition.name) }
        for name in names.sorted() {
            do { _ = try start(name) } catch { logger.error("autostart of network '\(name)' failed: \(error.message)") }
        }
    }

    /// Stops supervising (networks and their dnsmasq keep running).
    public func shutdownManager() { lock.withLock { stopped = true } }

    // MARK: queries

    private func record(_ name: String) throws(ManagerError) -> Record {
        guard let r = lock.withLock({ records[name] }) else { throw ManagerError(.notFound, "network '\(name)' is not defined") }
        return r
    }

    private func info(_ r: Record) -> NetworkInfo {
        let d = r.running ?? r.definition
        let name = r.definition.name
        let users = attachments.filter { $0.value.contains { $0.network == name } }.map(\.key).sorted()
        return NetworkInfo(name: name, state: r.running == nil ? .inactive : .active, autostart: r.definition.autostart,
                           mode: d.mode.rawValue, bridge: d.bridge, address: d.address?.description,
                           dhcpRange: d.dhcpRange.map { NetworkInfo.Range(start: $0.start.description, end: $0.end.description) },
                           nftTable: r.running != nil && d.mode != .bridge ? d.nftTable : nil,
                           dnsmasqPid: r.dnsmasqPid.map(Int.init),
                           leaseFile: d.dhcpRange != nil ? leaseFile(name) : nil,
                           dnsmasqLog: d.mode != .bridge ? dnsmasqLog(name) : nil,
                           ipForwardChangedByDaemon: r.running?.needsForwarding == true ? ipForwardChanged : nil,
                           vms: users)
    }

    public func info(_ name: String) throws(ManagerError) -> NetworkInfo {
        let r = try record(name)
        return lock.withLock { info(r) }
    }

    /// Networks sorted by name: all, or only the active ones.
    public func list(all: Bool) -> [NetworkInfo] {
        lock.withLock { records.values.filter { all || $0.running != nil }.map { info($0) }.sorted { $0.name < $1.name } }
    }

    /// The network's DHCP leases (dnsmasq's lease file; empty without DHCP or leases).
    public func leases(_ name: String) throws(ManagerError) -> [DHCPLease] {
        _ = try record(name)
        guard let bytes = try? AtomicFile.read(leaseFile(name)) else { return [] }
        return DHCPLease.parse(String(decoding: bytes, as: UTF8.self))
    }

    // MARK: definitions

    /// The bridges of the other active networks that own theirs (a new one must not reuse them).
    private func bridgesInUse(except name: String) -> [String: String] {
        lock.withLock {
            var out: [String: String] = [:]
            for r in records.values where r.definition.name != name {
                if r.definition.ownsBridge { out[r.definition.bridge] = r.definition.name }
                if let running = r.running, running.ownsBridge { out[running.bridge] = r.definition.name }
            }
            return out
        }
    }

    /// Defines (or replaces; takes effect at the next start) a network. The host checks run
    /// first, so a refused definition changes nothing.
    public func define(_ bytes: [UInt8], source: String = "the request body") throws(ManagerError) -> (NetworkInfo, replaced: Bool) {
        let def = try NetworkDefinition.parse(bytes, source: source)
        if def.ownsBridge, let other = bridgesInUse(except: def.name)[def.bridge] {
            throw ManagerError(.invalid, "invalid network definition (\(source)): key `bridge`: the bridge '\(def.bridge)' belongs to network '\(other)'")
        }
        if def.ownsBridge, tools.interfaceExists(def.bridge), lock.withLock({ records[def.name]?.running?.bridge }) != def.bridge {
            throw ManagerError(.invalid, "invalid network definition (\(source)): key `bridge`: an interface named '\(def.bridge)' already exists on the host")
        }
        let own = lock.withLock { records[def.name]?.running.map { Set([$0.bridge]) } ?? [] }
        try def.checkHost(routes: def.mode == .bridge ? [] : try hostRoutes(), bridgeExists: tools.isBridge, ignoringDevices: own, source: source)
        try store.save(def)
        let result = lock.withLock { () -> (NetworkInfo, Bool) in
            if let r = records[def.name] {
                r.definition = def
                return (info(r), true)
            }
            let r = Record(definition: def)
            records[def.name] = r
            return (info(r), false)
        }
        events?.emit(network: def.name, "defined", result.1 ? "replaced" : "")
        return result
    }

    private func hostRoutes() throws(ManagerError) -> [HostRoute] {
        try tools.requireIP()
        return try tools.routes()
    }

    /// Removes an inactive network's definition (409 while active).
    public func undefine(_ name: String) throws(ManagerError) {
        let r = try record(name)
        try r.actionLock.withLock { () throws(ManagerError) in
            guard lock.withLock({ r.running == nil }) else {
                throw ManagerError(.conflict, "network '\(name)' is active: stop it before undefining it")
            }
            try store.remove(name)
            lock.withLock { records[name] = nil }
            unlink(leaseFile(name))
            events?.emit(network: name, "undefined")
        }
    }

    public func setAutostart(_ name: String, _ value: Bool) throws(ManagerError) -> NetworkInfo {
        let r = try record(name)
        var def = lock.withLock { r.definition }
        def.autostart = value
        try store.save(def)
        return lock.withLock {
            r.definition.autostart = value
            return info(r)
        }
    }

    // MARK: start and stop

    /// Starts an inactive network (see the type's description). On failure everything added so
    /// far is removed again.
    public func start(_ name: String) throws(ManagerError) -> NetworkInfo {
        let r = try record(name)
        try r.actionLock.withLock { () throws(ManagerError) in
            let def = try lock.withLock { () throws(ManagerError) -> NetworkDefinition in
                guard r.running == nil else { throw ManagerError(.conflict, "network '\(name)' is already active") }
                return r.definition
            }
            try tools.requireIP()
            if def.mode == .bridge {
                guard tools.isBridge(def.bridge) else {
                    throw ManagerError(.invalid, "network '\(name)': the host bridge '\(def.bridge)' does not exist (mode bridge uses an existing bridge)")
                }
            } else {
                try tools.requireNft()
                try tools.requireDnsmasq()
                if tools.interfaceExists(def.bridge) {
                    throw ManagerError(.conflict, "network '\(name)': an interface named '\(def.bridge)' already exists on the host")
                }
                try def.checkHost(routes: try tools.routes(), bridgeExists: tools.isBridge, source: "network '\(name)'")
            }
            lock.withLock {
                r.running = def
                r.stopping = false
                r.startedAt = Timestamp.now()
            }
            do throws(ManagerError) {
                try setUp(name, r, def)
            } catch {
                logger.error("network '\(name)': start failed: \(error.message); removing what it added")
                teardown(name, r)
                events?.emit(network: name, "start-failed", error.message)
                throw error
            }
            writeRuntime(name, r)
            logger.info("network '\(name)' started (\(def.mode.rawValue), bridge \(def.bridge))")
            events?.emit(network: name, "started", "\(def.mode.rawValue), bridge \(def.bridge)")
        }
        return lock.withLock { info(r) }
    }

    private func setUp(_ name: String, _ r: Record, _ def: NetworkDefinition) throws(ManagerError) {
        guard def.mode != .bridge, let address = def.address else { return }
        try tools.ip("link", "add", def.bridge, "type", "bridge")
        try tools.ip("addr", "add", address.description, "dev", def.bridge)
        try tools.ip("link", "set", def.bridge, "up")
        if let ruleset = NetworkPlan.nftRuleset(def) { try applyNft(name, ruleset) }
        if def.needsForwarding, tools.ipForward() != true {
            try tools.setIPForward(true)
            ipForwardChanged = true
            logger.info("network '\(name)': net.ipv4.ip_forward turned on")
        }
        try startDnsmasq(name, r, def)
    }

    private func applyNft(_ name: String, _ ruleset: String) throws(ManagerError) {
        try AtomicFile.makeDirectory(paths.netState)
        try AtomicFile.write(Array(ruleset.utf8), to: nftFile(name))
        try HostTools.check(tools.nft, ["-f", nftFile(name)])
    }

    /// Stops an active network: refused while running VMs have NICs on it; removes dnsmasq, the
    /// nftables table, the bridge and the sysctl change if no other network needs it.
    public func stop(_ name: String) throws(ManagerError) -> NetworkInfo {
        let r = try record(name)
        try r.actionLock.withLock { () throws(ManagerError) in
            try lock.withLock { () throws(ManagerError) in
                guard r.running != nil else { throw ManagerError(.conflict, "network '\(name)' is not active") }
                let users = attachments.filter { $0.value.contains { $0.network == name } }.map(\.key).sorted()
                guard users.isEmpty else {
                    throw ManagerError(.conflict, "network '\(name)' is used by running vm\(users.count > 1 ? "s" : "") \(users.map { "'\($0)'" }.joined(separator: ", ")): stop \(users.count > 1 ? "them" : "it") first")
                }
                r.stopping = true
            }
            teardown(name, r)
            logger.info("network '\(name)' stopped")
            events?.emit(network: name, "stopped")
        }
        return lock.withLock { info(r) }
    }

    /// Removes everything the running definition of `r` added (each step tolerates what is already
    /// gone) and marks it inactive.
    private func teardown(_ name: String, _ r: Record) {
        let (running, pid, startTime) = lock.withLock { () -> (NetworkDefinition?, pid_t?, UInt64?) in
            r.stopping = true
            r.dnsmasqGeneration += 1
            return (r.running, r.dnsmasqPid, r.dnsmasqStartTime)
        }
        if let pid { stopProcess(pid, startTime: startTime) }
        if let running, running.mode != .bridge {
            let r1 = try? HostTools.run(tools.nft, ["delete", "table", "ip", running.nftTable])
            if let r1, r1.status != 0, !r1.output.contains("No such file") {
                logger.warning("network '\(name)': nft delete table \(running.nftTable): \(r1.output.trimmed)")
            }
            if tools.interfaceExists(running.bridge) {
                do { try tools.ip("link", "del", running.bridge) } catch { logger.error("network '\(name)': \(error.message)") }
            }
        }
        lock.withLock {
            r.running = nil
            r.dnsmasqPid = nil
            r.dnsmasqStartTime = nil
            r.startedAt = ""
            r.stopping = false
        }
        if running?.needsForwarding == true {
            let others = lock.withLock { records.values.contains { $0.running?.needsForwarding == true } }
            if !others && ipForwardChanged {
                do {
                    try tools.setIPForward(false)
                    logger.info("net.ipv4.ip_forward turned off again (no running network needs it)")
                } catch {
                    logger.error("\(error.message)")
                }
                ipForwardChanged = false
            }
        }
        for f in [runtimeFile(name), nftFile(name), pidFile(name)] { unlink(f) }
    }

    /// SIGTERM, SIGKILL after 3 s; never signals a reused pid.
    private func stopProcess(_ pid: pid_t, startTime: UInt64?) {
        func ours() -> Bool { ProcessTools.isAlive(pid) && (startTime == nil || ProcessTools.startTime(of: pid) == startTime) }
        guard ours() else { return }
        kill(pid, SIGTERM)
        let deadline = Date().addingTimeInterval(3)
        while Date() < deadline {
            if !ours() { return }
            usleep(20_000)
        }
        if ours() { kill(pid, SIGKILL) }
        let end = Date().addingTimeInterval(2)
        while Date() < end && ours() { usleep(20_000) }
    }

    // MARK: dnsmasq

    /// Starts the network's dnsmasq and waits until it has written its pid file (it has bound its
    /// sockets then); an early exit is an error with the end of its log. Caller holds the action lock.
    private func startDnsmasq(_ name: String, _ r: Record, _ def: NetworkDefinition) throws(ManagerError) {
        guard def.mode != .bridge else { return }
        try tools.requireDnsmasq()
        try AtomicFile.makeDirectory(paths.dnsmasq)
        try AtomicFile.makeDirectory(paths.logs)
        unlink(pidFile(name))
        let args = NetworkPlan.dnsmasqArguments(def, pidFile: pidFile(name), leaseFile: leaseFile(name))
        let log = dnsmasqLog(name)
        let marker = "--- \(Timestamp.now()) swiftkvm daemon starts dnsmasq for network '\(name)': \(tools.dnsmasq) \(args.joined(separator: " "))\n"
        let fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o644)
        if fd >= 0 { _ = marker.withCString { write(fd, $0, strlen($0)) }; close(fd) }
        let pid = try ProcessTools.spawn(tools.dnsmasq, args, logPath: log)
        let startTime = ProcessTools.startTime(of: pid)
        let deadline = Date().addingTimeInterval(10)
        var exited: ProcessTools.Exit?
        while true {
            var st: Int32 = 0
            if waitpid(pid, &st, WNOHANG) == pid {
                exited = ProcessTools.decode(waitStatus: st)
                break
            }
            if access(pidFile(name), F_OK) == 0 { break }
            if Date() > deadline { break }
            usleep(10_000)
        }
        if let exited {
            throw ManagerError(.host, "network '\(name)': dnsmasq exited at once (status \(exited.code.map(String.init) ?? "signal \(exited.signal ?? 0)")); \(tail(log))")
        }
        guard access(pidFile(name), F_OK) == 0 else {
            kill(pid, SIGKILL)
            _ = ProcessTools.waitChild(pid)
            throw ManagerError(.timeout, "network '\(name)': dnsmasq did not write \(pidFile(name)) within 10 s; \(tail(log))")
        }
        let gen = lock.withLock { () -> UInt64 in
            r.dnsmasqPid = pid
            r.dnsmasqStartTime = startTime
            r.dnsmasqGeneration += 1
            return r.dnsmasqGeneration
        }
        do {
            try HostThread.start(name: "dnsmasq \(name)", blockStopSignals: false) { [weak self] in
                let exit = ProcessTools.waitChild(pid)
                self?.dnsmasqExited(name, r, generation: gen, detail: exit.map { $0.code.map { "status \($0)" } ?? "signal \($0.signal ?? 0)" } ?? "unknown")
            }
        } catch {
            logger.error("network '\(name)': \(error); dnsmasq is not supervised")
        }
        logger.info("network '\(name)': dnsmasq pid \(pid)")
    }

    private func watchForeign(_ name: String, _ r: Record, pid: pid_t, startTime: UInt64, generation: UInt64) {
        do {
            try HostThread.start(name: "dnsmasq \(name)", blockStopSignals: false) { [weak self] in
                let exited = ProcessTools.waitForeign(pid, startTime: startTime) { [weak self] in
                    guard let self else { return true }
                    return self.lock.withLock { self.stopped }
                }
                if exited { self?.dnsmasqExited(name, r, generation: generation, detail: "unknown status") }
            }
        } catch {
            logger.error("network '\(name)': \(error); dnsmasq is not supervised")
        }
    }

    /// Supervision: a dnsmasq that exits while its network is active is started again (at most
    /// 5 times a minute).
    private func dnsmasqExited(_ name: String, _ r: Record, generation: UInt64, detail: String) {
        let restart = lock.withLock { () -> Bool in
            guard !stopped, r.dnsmasqGeneration == generation, r.running != nil, !r.stopping else { return false }
            r.dnsmasqPid = nil
            r.dnsmasqStartTime = nil
            let now = Date()
            r.restarts = r.restarts.filter { now.timeIntervalSince($0) < 60 } + [now]
            return r.restarts.count <= 5
        }
        guard lock.withLock({ r.dnsmasqGeneration == generation && r.running != nil && !r.stopping }) else { return }
        guard restart else {
            logger.error("network '\(name)': dnsmasq exited (\(detail)) too often; not restarting it (stop and start the network)")
            writeRuntime(name, r)
            return
        }
        logger.warning("network '\(name)': dnsmasq exited (\(detail)); starting it again")
        usleep(500_000)
        r.actionLock.withLock {
            guard let def = lock.withLock({ r.dnsmasqGeneration == generation && !r.stopping ? r.running : nil }) else { return }
            do throws(ManagerError) {
                try startDnsmasq(name, r, def)
                writeRuntime(name, r)
                events?.emit(network: name, "dnsmasq-restarted", "\(detail); pid \(lock.withLock { r.dnsmasqPid.map(String.init) ?? "?" })")
            } catch {
                logger.error("network '\(name)': \(error.message)")
            }
        }
    }

    private func tail(_ path: String) -> String {
        guard let bytes = try? AtomicFile.read(path, limit: 64 << 20) else { return "no log" }
        let lines = String(decoding: bytes.suffix(2048), as: UTF8.self).split(separator: "\n").suffix(6)
        return "last lines of \(path):\n" + lines.joined(separator: "\n")
    }

    // MARK: VM NICs

    /// Creates a TAP per NIC of VM `vm` on its bridge (up, a port of the bridge) and records it.
    /// A NIC on a network that is not defined or not active, or on a host bridge that does not
    /// exist, is refused before anything is created; on failure the TAPs made so far are removed.
    public func attach(vm: String, nics: [VMNIC]) throws(ManagerError) -> [TapAttachment] {
        guard !nics.isEmpty else { return [] }
        var planned: [TapAttachment] = []
        try lock.withLock { () throws(ManagerError) in
            for (i, nic) in nics.enumerated() {
                let bridge: String, network: String?
                switch nic.attachment {
                case .network(let n):
                    guard let r = records[n] else {
                        throw ManagerError(.invalid, "vm '\(vm)': nics[\(i)] uses network '\(n)', which is not defined")
                    }
                    guard let running = r.running, !r.stopping else {
                        throw ManagerError(.conflict, "vm '\(vm)': nics[\(i)] uses network '\(n)', which is not active (start it with `swiftkvm net start \(n)`)")
                    }
                    bridge = running.bridge
                    network = n
                case .bridge(let b):
                    guard tools.isBridge(b) else {
                        throw ManagerError(.invalid, "vm '\(vm)': nics[\(i)] uses the host bridge '\(b)', which does not exist")
                    }
                    bridge = b
                    network = nil
                }
                planned.append(TapAttachment(tap: VMNIC.tapName(vmName: vm, index: i), bridge: bridge, network: network,
                                             ifaceId: nic.ifaceId, mac: nic.guestMAC(vmName: vm)))
            }
            // Registered before the TAPs exist, so a concurrent `stop` of the network is refused.
            attachments[vm] = planned
        }
        try tools.requireIP()
        do {
            for a in planned {
                if tools.interfaceExists(a.tap) { try tools.ip("link", "del", a.tap) } // a leftover of a crash
                try tools.ip("tuntap", "add", "dev", a.tap, "mode", "tap")
                try tools.ip("link", "set", a.tap, "master", a.bridge)
                try tools.ip("link", "set", a.tap, "up")
            }
        } catch {
            detach(vm: vm)
            throw error
        }
        return planned
    }

    /// Records the TAPs of a VM the daemon re-attached to.
    public func adopt(vm: String, _ taps: [TapAttachment]) {
        guard !taps.isEmpty else { return }
        lock.withLock { attachments[vm] = taps }
    }

    /// Removes VM `vm`'s TAPs (those recorded, plus `extra` names, e.g. of a crashed run).
    public func detach(vm: String, extra: [String] = []) {
        let taps = lock.withLock { attachments.removeValue(forKey: vm) ?? [] }.map(\.tap)
        for tap in Set(taps + extra).sorted() where tools.interfaceExists(tap) {
            do { try tools.ip("link", "del", tap) } catch { logger.error("vm '\(vm)': removing TAP \(tap): \(error.message)") }
        }
    }

    /// The TAPs recorded for `vm`.
    public func taps(of vm: String) -> [TapAttachment] { lock.withLock { attachments[vm] ?? [] } }
}
