import API
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Devices
import DiskImage
import Logging
import VMM

/// The manager's core (libvirt's role): VM definitions, one supervised `swiftkvm vmm` process per
/// running VM, state changes and events. Thread-safe; its actions block (run them off the event
/// loop). VMs keep running when the manager goes away; `start()` re-attaches to them.
public final class VMManager: @unchecked Sendable {
    /// Settings.
    public struct Options: Sendable {
        /// The state directory.
        public var stateDirectory: String
        /// The executable started as `EXE vmm …`: nil = the running executable (/proc/self/exe).
        public var vmmExecutable: String?
        /// The default guest's assets folder (nil: found from the vmm executable or $SWIFTKVM_ASSETS).
        public var assetsDirectory: String?
        /// Seconds to wait for a started vmm's API socket.
        public var startTimeout: Double = 10
        /// Seconds between SIGTERM and SIGKILL in destroy.
        public var destroyGrace: Double = 3
        public var logger = Logger(label: "swiftkvm.manager")
        /// The host programs networks use (`ip`, `nft`, `dnsmasq`).
        public var hostTools = HostTools()

        public init(stateDirectory: String) { self.stateDirectory = stateDirectory }
    }

    /// One VM: its definition and its runtime state. Guarded by `VMManager.lock`.
    final class Record {
        var definition: VMDefinition
        var state: VMState = .shutOff
        var pid: pid_t?
        var startTime: UInt64?
        var startedAt: Date?
        var lastExit: VMExitInfo?
        var destroying = false
        /// The run's guest moved to another VMM (`migrate`): its vmm's exit is reported as `migrated`.
        var migrated = false
        /// Incremented per run, so a late exit notice of an old run changes nothing.
        var generation: UInt64 = 0
        /// Serializes start/shutdown/pause/resume of this VM.
        let actionLock = ConditionLock()
        init(definition: VMDefinition) { self.definition = definition }
    }

    /// The settings it was made with.
    public let options: Options
    /// The state directory's files.
    public let paths: StatePaths
    /// The definitions on disk.
    public let store: DefinitionStore
    /// The event log (`GET /events`).
    public let events: EventLog
    /// The networks, and the TAPs of VM NICs.
    public let networks: NetworkManager
    let vmmExecutable: String
    let assetsDirectory: String?
    private let lock = ConditionLock()
    private var records: [String: Record] = [:]
    private var stopped = false
    var logger: Logger { options.logger }

    public init(options: Options) throws(ManagerError) {
        self.options = options
        paths = StatePaths(root: options.stateDirectory)
        store = DefinitionStore(directory: paths.vms)
        for dir in [paths.root, paths.vms, paths.run, paths.logs] { try AtomicFile.makeDirectory(dir) }
        events = EventLog(path: paths.events)
        networks = NetworkManager(paths: paths, tools: options.hostTools, logger: options.logger, events: events)
        guard let exe = options.vmmExecutable ?? DefaultGuest.executablePath() else {
            throw ManagerError(.host, "cannot find the swiftkvm executable (/proc/self/exe)")
        }
        vmmExecutable = exe
        assetsDirectory = options.assetsDirectory
            ?? DefaultGuest.assetsDirectory(environment: ProcessInfo.processInfo.environment, executablePath: exe)
    }

    // MARK: start-up

    /// Loads the definitions (bad files are logged by name and skipped), re-attaches to VMs still
    /// running, cleans stale runtime directories. Returns the errors of skipped files.
    @discardableResult
    public func load() -> [ManagerError] {
        // Networks first: re-attached VMs' TAPs are recorded against them.
        let netErrors = networks.load()
        let (defs, errors) = store.loadAll()
        for e in errors { logger.error("skipping a definition: \(e.message)") }
        lock.lock()
        for d in defs { records[d.name] = Record(definition: d) }
        lock.unlock()
        for d in defs { reattachOrClean(d.name) }
        // Runtime directories of VMs that have no definition any more.
        if let names = try? FileManager.default.contentsOfDirectory(atPath: paths.run) {
            for n in names where lock.withLock({ records[n] == nil }) {
                if let rs = readRunState(n), isOurVMM(rs, name: n) {
                    logger.warning("vm '\(n)' has no definition but its vmm (pid \(rs.pid)) runs: leaving it alone")
                    continue
                }
                try? FileManager.default.removeItem(atPath: paths.runDir(n))
            }
        }
        return netErrors + errors
    }

    /// Starts every autostart network, then every autostart VM that is shut off (errors are
    /// logged and reported as events).
    public func autostart() {
        networks.autostart()
        let names = lock.withLock { records.values.filter { $0.definition.autostart && $0.state == .shutOff }.map(\.definition.name) }
        for name in names.sorted() {
            do {
                _ = try start(name)
            } catch {
                logger.error("autostart of vm '\(name)' failed: \(error.message)")
            }
        }
    }

    /// Stops watching (VMs keep running). Watch threads of re-attached VMs end.
    public func shutdownManager() {
        networks.shutdownManager()
        lock.withLock { stopped = true }
    }

    private func readRunState(_ name: String) -> RunState? {
        guard let bytes = try? AtomicFile.read(paths.stateFile(name)) else { return nil }
        return try? JSONDecoder().decode(RunState.self, from: Data(bytes))
    }

    /// The process of `rs` is alive, has the same start time, and is the vmm of this VM.
    private func isOurVMM(_ rs: RunState, name: String) -> Bool {
        guard rs.pid > 0, ProcessTools.isAlive(rs.pid), ProcessTools.startTime(of: rs.pid) == rs.startTime else { return false }
        return ProcessTools.commandLine(of: rs.pid).contains(paths.apiSocket(name))
    }

    /// The TAP names VM `name` may have left behind: those of its definition's NICs and those
    /// recorded in its state file.
    private func possibleTaps(_ name: String, _ rs: RunState?) -> [String] {
        let count = lock.withLock { records[name]?.definition.nics.count ?? 0 }
        return (0..<count).map { VMNIC.tapName(vmName: name, index: $0) } + (rs?.taps ?? []).map(\.tap)
    }

    private func reattachOrClean(_ name: String) {
        let saved = readRunState(name)
        guard let rs = saved, isOurVMM(rs, name: name) else {
            networks.detach(vm: name, extra: possibleTaps(name, saved))
            removeRuntimeFiles(name)
            return
        }
        networks.adopt(vm: name, rs.taps ?? [])
        var state = VMState.running
        if let r = try? UnixHTTPClient(socketPath: paths.apiSocket(name), timeout: 2).request("GET", "/"),
           JSONValue.object(from: r.body)?["state"]?.stringValue == "Paused" {
            state = .paused
        }
        let generation: UInt64? = lock.withLock {
            guard let rec = records[name] else { return nil }
            rec.generation += 1
            rec.state = state
            rec.pid = rs.pid
            rec.startTime = rs.startTime
            rec.startedAt = Timestamp.date(rs.startedAt) ?? Date()
            rec.destroying = false
            return rec.generation
        }
        guard let generation else { return }
        logger.info("re-attached to vm '\(name)' (pid \(rs.pid))")
        events.emit(vm: name, "reattached", "pid \(rs.pid)")
        let pid = rs.pid, startTime = rs.startTime
        do {
            try HostThread.start(name: "watch \(name)", blockStopSignals: false) { [weak self] in
                let exited = ProcessTools.waitForeign(pid, startTime: startTime) { [weak self] in
                    guard let self else { return true }
                    return self.lock.withLock { self.stopped }
                }
                if exited { self?.processExited(name, generation: generation, exit: nil) }
            }
        } catch {
            logger.error("vm '\(name)': \(error); its exit will not be noticed until the daemon restarts")
        }
    }

    private func removeRuntimeFiles(_ name: String) {
        for p in [paths.apiSocket(name), paths.consoleSocket(name), paths.stateFile(name)] { unlink(p) }
    }

    // MARK: queries

    /// The VM named `name`, or a 404 error.
    private func record(_ name: String) throws(ManagerError) -> Record {
        guard let r = lock.withLock({ records[name] }) else {
            throw ManagerError(.notFound, "vm '\(name)' is not defined")
        }
        return r
    }

    private func info(_ r: Record) -> VMInfo {
        let name = r.definition.name
        return VMInfo(name: name, state: r.state, autostart: r.definition.autostart, pid: r.pid.map(Int.init),
                      vcpus: r.definition.vcpus, memMib: r.definition.memMib,
                      uptimeS: r.startedAt.map { (Date().timeIntervalSince($0) * 1000).rounded() / 1000 },
                      apiSocket: paths.apiSocket(name), consoleSocket: paths.consoleSocket(name),
                      serialLog: paths.serialLog(name), vmmLog: paths.vmmLog(name), lastExit: r.lastExit,
                      nics: r.pid == nil ? [] : networks.taps(of: name))
    }

    /// The VM's info (404 if undefined).
    public func info(_ name: String) throws(ManagerError) -> VMInfo {
        let r = try record(name)
        return lock.withLock { info(r) }
    }

    /// All VMs sorted by name (`all`), or only those not shut off.
    public func list(all: Bool) -> [VMInfo] {
        lock.withLock {
            records.values.filter { all || $0.state != .shutOff }.map { info($0) }.sorted { $0.name < $1.name }
        }
    }

    // MARK: definitions

    /// Defines (or replaces) a VM from definition JSON; returns its info and whether it replaced
    /// an existing definition (takes effect at the next start).
    public func define(_ bytes: [UInt8], source: String = "the request body") throws(ManagerError) -> (VMInfo, replaced: Bool) {
        let def = try VMDefinition.parse(bytes, source: source)
        try store.save(def)
        let (result, replaced) = lock.withLock { () -> (VMInfo, Bool) in
            if let r = records[def.name] {
                r.definition = def
                return (self.info(r), true)
            }
            let r = Record(definition: def)
            records[def.name] = r
            return (self.info(r), false)
        }
        events.emit(vm: def.name, "defined", replaced ? "replaced" : "")
        return (result, replaced)
    }

    /// Removes a shut-off VM's definition (409 while it runs).
    public func undefine(_ name: String) throws(ManagerError) {
        let r = try record(name)
        r.actionLock.lock()
        defer { r.actionLock.unlock() }
        let state = lock.withLock { r.state }
        guard state == .shutOff else { throw ManagerError(.conflict, "vm '\(name)' is \(state.rawValue): shut it off before undefining it") }
        try store.remove(name)
        lock.withLock { records[name] = nil }
        try? FileManager.default.removeItem(atPath: paths.runDir(name))
        events.emit(vm: name, "undefined")
    }

    /// Sets the autostart flag (stored in the definition).
    public func setAutostart(_ name: String, _ value: Bool) throws(ManagerError) -> VMInfo {
        let r = try record(name)
        var def = lock.withLock { r.definition }
        def.autostart = value
        try store.save(def)
        return lock.withLock {
            r.definition.autostart = value
            return info(r)
        }
    }

    // MARK: actions

    private func conflict(_ name: String, _ state: VMState, _ action: String) -> ManagerError {
        switch state {
        case .shutOff: return ManagerError(.conflict, "vm '\(name)' is not running (cannot \(action) it)")
        case .running where action == "start": return ManagerError(.conflict, "vm '\(name)' is already running")
        case .paused where action == "pause": return ManagerError(.conflict, "vm '\(name)' is already paused")
        default: return ManagerError(.conflict, "vm '\(name)' is \(state.rawValue) (cannot \(action) it)")
        }
    }

    /// Starts a shut-off VM: writes run/NAME/config.json, spawns the vmm, waits for its API.
    public func start(_ name: String) throws(ManagerError) -> VMInfo {
        let r = try record(name)
        r.actionLock.lock()
        defer { r.actionLock.unlock() }
        let def: VMDefinition = try lock.withLock { () throws(ManagerError) -> VMDefinition in
            guard r.state == .shutOff else { throw conflict(name, r.state, "start") }
            r.state = .starting
            r.destroying = false
            r.migrated = false
            r.generation += 1
            return r.definition
        }
        events.emit(vm: name, "starting")
        do {
            try launch(r, def)
        } catch {
            lock.withLock {
                if r.pid == nil { r.state = .shutOff }
            }
            events.emit(vm: name, "start-failed", error.message)
            throw error
        }
        return lock.withLock { info(r) }
    }

    // MARK: Save and restore

    /// The saved definition in a snapshot directory written by `save`.
    public static let savedDefinitionName = "definition.json"

    /// `virsh save`: pauses the VM, writes its snapshot into the directory `dir` (the state file
    /// `snapshot`, guest RAM `memory`, and the definition `definition.json`), then stops it. Until
    /// the snapshot is complete nothing is lost: on a failure the VM is resumed (when this paused it)
    /// and keeps running.
    public func save(_ name: String, to dir: String) throws(ManagerError) -> VMInfo {
        guard dir.hasPrefix("/") else { throw ManagerError(.invalid, "the snapshot directory must be an absolute path, not '\(dir)'") }
        let r = try record(name)
        r.actionLock.lock()
        defer { r.actionLock.unlock() }
        let (wasRunning, def) = try lock.withLock { () throws(ManagerError) -> (Bool, VMDefinition) in
            guard r.state == .running || r.state == .paused else { throw conflict(name, r.state, "save") }
            return (r.state == .running, r.definition)
        }
        try AtomicFile.makeDirectory(dir)
        let snap = SnapshotDirectory(dir)
        func call(_ method: String, _ path: String, _ body: String, _ what: String) throws(ManagerError) {
            try vmmRequest(name, method, path, body: body, action: what, timeout: 600)
        }
        if wasRunning { try call("PATCH", "/vm", #"{"state":"Paused"}"#, "pause") }
        do throws(ManagerError) {
            struct Body: Encodable { var snapshot_type = "Full", snapshot_path: String, mem_file_path: String }
            let body = String(decoding: (try? JSONEncoder().encode(Body(snapshot_path: snap.statePath, mem_file_path: snap.memoryPath))) ?? Data(), as: UTF8.self)
            try call("PUT", "/snapshot/create", body, "snapshot")
            try AtomicFile.write(def.normalizedJSON(), to: dir + "/" + Self.savedDefinitionName)
        } catch {
            if wasRunning { try? call("PATCH", "/vm", #"{"state":"Resumed"}"#, "resume") }
            throw error
        }
        events.emit(vm: name, "saved", dir)
        return try destroy(name, starting: false)
    }

    /// `virsh migrate --live`: moves the running VM to `destination` (`unix:PATH` or `tcp:HOST:PORT`,
    /// where a `swiftkvm vmm --incoming` waits) with `PUT /migrate`; returns the vmm's report (JSON)
    /// once the target runs it, and this VM is then shut off here. On a failure it keeps running.
    public func migrate(_ name: String, to destination: String, maxDowntimeMs: Int?) throws(ManagerError) -> [UInt8] {
        let r = try record(name)
        r.actionLock.lock()
        defer { r.actionLock.unlock() }
        try lock.withLock { () throws(ManagerError) in
            guard r.state == .running || r.state == .paused else { throw conflict(name, r.state, "migrate") }
        }
        struct Body: Encodable { var destination: String; var max_downtime_ms: Int? }
        let body = Array((try? JSONEncoder().encode(Body(destination: destination, max_downtime_ms: maxDowntimeMs))) ?? Data())
        events.emit(vm: name, "migrating", destination)
        let reply: HTTPResponse
        do {
            reply = try UnixHTTPClient(socketPath: paths.apiSocket(name), timeout: 3600).request("PUT", "/migrate", body: body)
        } catch {
            throw ManagerError(.host, "vm '\(name)': migration to \(destination) failed: \(error)")
        }
        guard reply.status == 200 else {
            let kind: ManagerError.Kind = reply.status == 400 && (reply.faultMessage ?? "").contains("Invalid") ? .invalid : .host
            throw ManagerError(kind, "vm '\(name)': \(reply.faultMessage ?? reply.text)")
        }
        lock.withLock { r.migrated = true }
        events.emit(vm: name, "migrated", destination)
        // The vmm exits on its own once it answered.
        _ = waitStopped(r, generation: lock.withLock { r.generation }, seconds: 10)
        return reply.body
    }

    /// `virsh restore`: starts the VM saved in `dir` (by `save`) from its snapshot, running at
    /// once. A VM of that name that is not defined is defined from the saved definition; one that
    /// is must be shut off, and runs with the saved definition (its networks and disks are those of
    /// the snapshot).
    public func restore(from dir: String) throws(ManagerError) -> VMInfo {
        guard dir.hasPrefix("/") else { throw ManagerError(.invalid, "the snapshot directory must be an absolute path, not '\(dir)'") }
        let path = dir + "/" + Self.savedDefinitionName
        let bytes: [UInt8]
        do { bytes = try AtomicFile.read(path) } catch {
            throw ManagerError(.invalid, "\(dir) is not a snapshot directory written by `vm save`: \(error.message)")
        }
        let saved = try VMDefinition.parse(bytes, source: path)
        do { _ = try SnapshotDirectory(dir).load() } catch {
            throw ManagerError(.invalid, "\(error)")
        }
        if (lock.withLock { records[saved.name] }) == nil { _ = try define(bytes, source: path) }
        let r = try record(saved.name)
        r.actionLock.lock()
        defer { r.actionLock.unlock() }
        try lock.withLock { () throws(ManagerError) in
            guard r.state == .shutOff else { throw conflict(saved.name, r.state, "start") }
            r.state = .starting
            r.destroying = false
            r.migrated = false
            r.generation += 1
        }
        events.emit(vm: saved.name, "restoring", dir)
        do {
            try launch(r, saved, restoring: dir)
        } catch {
            lock.withLock { if r.pid == nil { r.state = .shutOff } }
            events.emit(vm: saved.name, "start-failed", error.message)
            throw error
        }
        return lock.withLock { info(r) }
    }

    /// `vm clone`: a running copy of the running or paused VM `name`, named `newName`, started from
    /// a snapshot of it (the guest goes on in both from the same instant). The source is paused
    /// while its snapshot is written and its writable disks are copied (`ClonePlan`: beside each
    /// image, reflinked where the file system can), then resumed. The clone is defined with its own
    /// disks, vsock socket, TAPs and MACs (the MACs apply from its next boot, see `ClonePlan`) and
    /// runs at once. On any failure the source keeps running and nothing of the clone is left.
    public func clone(_ name: String, as newName: String) throws(ManagerError) -> VMInfo {
        let source = try record(name)
        // The source's actions wait from the state check until it runs on: a pause or shutdown cannot slip in
        // between (its state must still be what was read when the clone resumes it).
        source.actionLock.lock()
        var sourceLocked = true
        defer { if sourceLocked { source.actionLock.unlock() } }
        let (state, def) = lock.withLock { (source.state, source.definition) }
        guard state == .running || state == .paused else { throw conflict(name, state, "clone") }
        let wasRunning = state == .running
        let plan = try ClonePlan.make(source: def, newName: newName)
        // The new name is reserved while the clone is made.
        let c = try lock.withLock { () throws(ManagerError) -> Record in
            guard records[newName] == nil else { throw ManagerError(.conflict, "vm '\(newName)' already exists") }
            let c = Record(definition: plan.clone)
            c.state = .starting
            c.generation = 1
            records[newName] = c
            return c
        }
        let dir = paths.cloneSnapshot(newName)
        var copied: [String] = []
        func discard() {
            for path in copied { unlink(path) }
            // A clone vmm that started and died: its exit notice detaches its TAPs while the record exists.
            if lock.withLock({ c.pid != nil }) { _ = waitStopped(c, generation: c.generation, seconds: 10) }
            try? FileManager.default.removeItem(atPath: paths.runDir(newName))
            lock.withLock { if records[newName] === c { records[newName] = nil } }
        }
        events.emit(vm: name, "cloning", newName)
        do throws(ManagerError) {
            try? FileManager.default.removeItem(atPath: dir)
            try AtomicFile.makeDirectory(paths.runDir(newName))
            try AtomicFile.makeDirectory(dir)
            let snap = SnapshotDirectory(dir)
            if wasRunning { try vmmRequest(name, "PATCH", "/vm", body: #"{"state":"Paused"}"#, action: "pause") }
            do throws(ManagerError) {
                // The snapshot parks the source's device threads until it resumes: its images stay as the snapshot
                // left them while they are copied.
                struct Body: Encodable { var snapshot_type = "Full", snapshot_path: String, mem_file_path: String }
                let body = String(decoding: (try? JSONEncoder().encode(Body(snapshot_path: snap.statePath, mem_file_path: snap.memoryPath))) ?? Data(), as: UTF8.self)
                try vmmRequest(name, "PUT", "/snapshot/create", body: body, action: "snapshot for the clone", timeout: 600)
                for copy in plan.diskCopies {
                    do { _ = try FileCopy.copy(from: copy.from, to: copy.to) } catch {
                        throw ManagerError(.host, "vm '\(name)': copying its disk for the clone failed: \(error.message)")
                    }
                    copied.append(copy.to)
                }
            } catch {
                if wasRunning { _ = try? vmmRequest(name, "PATCH", "/vm", body: #"{"state":"Resumed"}"#, action: "resume") }
                throw error
            }
            if wasRunning {
                do { try vmmRequest(name, "PATCH", "/vm", body: #"{"state":"Resumed"}"#, action: "resume") } catch {
                    // It stays paused: say so in its state.
                    lock.withLock { if source.pid != nil { source.state = .paused } }
                    throw error
                }
            }
            source.actionLock.unlock()
            sourceLocked = false
            // The clone's machine: its disks, TAPs, socket and name.
            var snapshot: MachineSnapshot
            do { snapshot = try SnapshotFile.read(snap.statePath) } catch {
                throw ManagerError(.host, "vm '\(name)': reading its snapshot for the clone failed: \(error)")
            }
            try plan.rewrite(&snapshot.config)
            do { try AtomicFile.write(try SnapshotFile.encode(snapshot), to: snap.statePath) } catch let e as ManagerError {
                throw e
            } catch {
                throw ManagerError(.host, "writing the clone's snapshot failed: \(error)")
            }
            try store.save(plan.clone)
            events.emit(vm: newName, "defined", "clone of \(name)")
            do {
                try launch(c, plan.clone, restoring: dir)
            } catch {
                try? store.remove(newName)
                throw error
            }
        } catch {
            discard()
            events.emit(vm: newName, "clone-failed", error.message)
            throw error
        }
        // The vmm mapped the memory file (an unlinked file stays mapped), so the snapshot can go.
        try? FileManager.default.removeItem(atPath: dir)
        events.emit(vm: name, "cloned", newName)
        return lock.withLock { info(c) }
    }

    /// Starts the vmm of `def`: booted from its configuration, or, with `restoring`, loaded from
    /// the snapshot in that directory (`PUT /snapshot/load` once its API is up).
    private func launch(_ r: Record, _ def: VMDefinition, restoring: String? = nil) throws(ManagerError) {
        let name = def.name
        var config = try def.vmmConfig(assetsDirectory: assetsDirectory)
        // TAPs for the NICs (a leftover of a crashed run is replaced); removed again when the
        // vmm exits (processExited) or when the start fails before it was spawned.
        let taps = try networks.attach(vm: name, nics: def.nics)
        config.networkInterfaces += taps.map { NetworkInterfaceConfig(ifaceId: $0.ifaceId, hostDevName: $0.tap, guestMac: $0.mac) }
        var spawned = false
        defer { if !spawned { networks.detach(vm: name) } }
        try AtomicFile.makeDirectory(paths.runDir(name))
        try AtomicFile.makeDirectory(paths.logs)
        removeRuntimeFiles(name)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        guard let data = try? encoder.encode(config) else { throw ManagerError(.host, "cannot encode the config of vm '\(name)'") }
        try AtomicFile.write(Array(data), to: paths.configFile(name))
        let args = ["vmm", "--api-sock", paths.apiSocket(name), "--id", name]
            + (restoring == nil ? ["--config-file", paths.configFile(name)] : [])
            + ["--console-sock", paths.consoleSocket(name), "--serial-log", paths.serialLog(name),
               "--metrics-path", paths.metricsFile(name), "--ready-fd", "3",
               // Managed VMs keep their devices on PCI (MSI-X, the default guest's virtio-pci modules).
               "--enable-pci"]
        let logPath = paths.vmmLog(name)
        let marker = "--- \(Timestamp.now()) swiftkvm daemon starts vm '\(name)': \(vmmExecutable) \(args.joined(separator: " "))\n"
        let logFD = open(logPath, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o644)
        if logFD >= 0 {
            _ = marker.withCString { write(logFD, $0, strlen($0)) }
            close(logFD)
        }
        // The vmm writes "ready" to this pipe once its API is up and the guest started; EOF
        // without it means the vmm exited first.
        var ready: [Int32] = [-1, -1]
        guard pipe(&ready) == 0, fcntl(ready[0], F_SETFD, FD_CLOEXEC) == 0, fcntl(ready[1], F_SETFD, FD_CLOEXEC) == 0 else {
            throw ManagerError(.host, "vm '\(name)': cannot create the start-up pipe: \(ManagerError.errnoText(errno))")
        }
        defer { close(ready[0]) }
        let pid: pid_t
        do {
            pid = try ProcessTools.spawn(vmmExecutable, args, logPath: logPath, passing: ready[1])
            close(ready[1])
        } catch {
            close(ready[1])
            throw error
        }
        spawned = true
        let startTime = ProcessTools.startTime(of: pid) ?? 0
        let now = Date()
        let generation = lock.withLock { () -> UInt64 in
            r.pid = pid
            r.startTime = startTime
            r.startedAt = now
            return r.generation
        }
        do {
            try HostThread.start(name: "wait \(name)", blockStopSignals: false) { [weak self] in
                let exit = ProcessTools.waitChild(pid)
                self?.processExited(name, generation: generation, exit: exit)
            }
        } catch {
            logger.error("vm '\(name)': \(error); its exit will not be noticed until the daemon restarts")
        }
        let rs = RunState(pid: pid, startTime: startTime, startedAt: Timestamp.string(now), taps: taps.isEmpty ? nil : taps)
        if let bytes = try? JSONEncoder().encode(rs) {
            try? AtomicFile.write(Array(bytes), to: paths.stateFile(name))
        }
        logger.info("vm '\(name)': vmm pid \(pid) started")

        // Wait until the vmm reports its API up and the guest started (the config file's steps up
        // to InstanceStart applied).
        switch Self.awaitReady(fd: ready[0], timeout: options.startTimeout) {
        case .ready:
            break
        case .exited:
            throw ManagerError(.host, "vm '\(name)': the vmm exited during start-up; \(logTail(name))")
        case .timedOut:
            _ = try? destroy(name, starting: true)
            throw ManagerError(.timeout, "vm '\(name)': the vmm did not report its API and guest started within \(options.startTimeout) s; \(logTail(name))")
        }
        if let restoring {
            let snap = SnapshotDirectory(restoring)
            struct Backend: Encodable { var backend_type = "File", backend_path: String }
            struct Body: Encodable { var snapshot_path: String, mem_backend: Backend, resume_vm = true }
            let body = (try? JSONEncoder().encode(Body(snapshot_path: snap.statePath, mem_backend: Backend(backend_path: snap.memoryPath)))) ?? Data()
            let failure: String?
            do {
                let reply = try UnixHTTPClient(socketPath: paths.apiSocket(name), timeout: 120).request("PUT", "/snapshot/load", body: Array(body))
                failure = reply.status == 204 ? nil : "\(reply.status): \(reply.faultMessage ?? reply.text)"
            } catch {
                failure = "\(error)"
            }
            if let failure {
                _ = try? destroy(name, starting: true)
                throw ManagerError(.host, "vm '\(name)': loading the snapshot in \(restoring) failed: \(failure)")
            }
        }
        let started = lock.withLock { () -> Bool in
            guard r.generation == generation, r.pid != nil else { return false }
            r.state = .running
            return true
        }
        guard started else { throw ManagerError(.host, "vm '\(name)': the vmm exited during start-up; \(logTail(name))") }
        events.emit(vm: name, "started", "pid \(pid)")
    }

    enum StartOutcome: Equatable { case ready, exited, timedOut }

    /// Reads the vmm's start-up pipe until its `ready` line, EOF (the vmm is gone) or `timeout`.
    static func awaitReady(fd: Int32, timeout: Double) -> StartOutcome {
        let deadline = Date().addingTimeInterval(timeout)
        var line: [UInt8] = []
        while true {
            let left = deadline.timeIntervalSinceNow
            guard left > 0 else { return .timedOut }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let r = poll(&p, 1, Int32(min(left * 1000, 60_000)) + 1)
            if r < 0 && errno == EINTR { continue }
            guard r > 0 else { continue }
            var buf = [UInt8](repeating: 0, count: 64)
            let n = read(fd, &buf, buf.count)
            if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
            guard n > 0 else { return .exited }
            line += buf[..<n]
            if line.count >= 6 { return line.starts(with: Array("ready\n".utf8)) ? .ready : .exited }
        }
    }

    /// The last lines of the VM's vmm log, for errors.
    func logTail(_ name: String, lines: Int = 8) -> String {
        guard let bytes = try? AtomicFile.read(paths.vmmLog(name), limit: 64 << 20) else { return "no vmm log" }
        let tail = String(decoding: bytes.suffix(4096), as: UTF8.self).split(separator: "\n").suffix(lines)
        return "last lines of \(paths.vmmLog(name)):\n" + tail.joined(separator: "\n")
    }

    /// Called once per run when its vmm is gone.
    private func processExited(_ name: String, generation: UInt64, exit: ProcessTools.Exit?) {
        let result: (VMExitInfo, Bool)? = lock.withLock {
            guard let r = records[name], r.generation == generation, r.pid != nil else { return nil }
            var reason = "unknown", status: Int? = nil
            if let exit {
                if let code = exit.code {
                    status = Int(code)
                    switch code {
                    case 0 where r.migrated: reason = "migrated"
                    case 0: reason = "poweroff"
                    case MachineExit.resetExitCode: reason = "reset"
                    case 129...192: reason = "signal"
                    default: reason = "crashed"
                    }
                } else if let sig = exit.signal {
                    status = 128 + Int(sig)
                    reason = "signal"
                }
            }
            if r.destroying { reason = "destroyed" }
            // Under the lock, so that a new start of the VM cannot interleave with the removal.
            networks.detach(vm: name)
            let info = VMExitInfo(reason: reason, status: status, at: Timestamp.now())
            r.lastExit = info
            r.state = .shutOff
            r.pid = nil
            r.startTime = nil
            r.startedAt = nil
            r.destroying = false
            return (info, true)
        }
        guard let (info, _) = result else { return }
        removeRuntimeFiles(name)
        logger.info("vm '\(name)' stopped: \(info.reason) \(info.status.map(String.init) ?? "")")
        events.emit(vm: name, "stopped", info.reason + (info.status.map { " (status \($0))" } ?? ""))
    }

    /// Waits until run `generation` of `r` is over; false on timeout.
    private func waitStopped(_ r: Record, generation: UInt64, seconds: Double) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if lock.withLock({ r.generation != generation || r.pid == nil }) { return true }
            usleep(10_000)
        }
        return lock.withLock { r.generation != generation || r.pid == nil }
    }

    /// Kills the vmm: SIGTERM, SIGKILL after `destroyGrace` seconds; returns when it is gone.
    public func destroy(_ name: String) throws(ManagerError) -> VMInfo {
        try destroy(name, starting: false)
    }

    private func destroy(_ name: String, starting: Bool) throws(ManagerError) -> VMInfo {
        let r = try record(name)
        let (pid, generation, startTime): (pid_t, UInt64, UInt64?) = try lock.withLock { () throws(ManagerError) in
            guard let pid = r.pid, r.state != .shutOff else { throw conflict(name, r.state, "destroy") }
            guard starting || r.state != .starting else { throw ManagerError(.conflict, "vm '\(name)' is starting (cannot destroy it yet)") }
            r.destroying = true
            return (pid, r.generation, r.startTime)
        }
        // Never signal a reused pid: the process must still have the recorded start time.
        func send(_ sig: Int32) {
            if startTime == nil || ProcessTools.startTime(of: pid) == startTime { kill(pid, sig) }
        }
        send(SIGTERM)
        if !waitStopped(r, generation: generation, seconds: options.destroyGrace) {
            send(SIGKILL)
            if !waitStopped(r, generation: generation, seconds: 10) {
                throw ManagerError(.host, "vm '\(name)': the vmm (pid \(pid)) did not exit after SIGKILL")
            }
        }
        return lock.withLock { info(r) }
    }

    /// Sends Ctrl+Alt+Del, waits up to `timeout` (default: the definition's, else 30 s) for the
    /// vmm to exit, then destroys it. Returns when the VM is shut off.
    public func shutdown(_ name: String, timeout: Double? = nil) throws(ManagerError) -> VMInfo {
        let r = try record(name)
        r.actionLock.lock()
        defer { r.actionLock.unlock() }
        let (generation, limit) = try lock.withLock { () throws(ManagerError) -> (UInt64, Double) in
            guard r.state == .running || r.state == .paused else { throw conflict(name, r.state, "shut down") }
            r.state = .shuttingDown
            return (r.generation, timeout ?? r.definition.shutdownTimeout ?? VMDefinition.defaultShutdownTimeout)
        }
        events.emit(vm: name, "shutting-down")
        let client = UnixHTTPClient(socketPath: paths.apiSocket(name), timeout: 5)
        do {
            let reply = try client.request("PUT", "/actions", body: Array(#"{"action_type":"SendCtrlAltDel"}"#.utf8))
            if reply.status != 204 {
                logger.warning("vm '\(name)': SendCtrlAltDel answered \(reply.status) \(reply.faultMessage ?? reply.text)")
            }
        } catch {
            logger.warning("vm '\(name)': SendCtrlAltDel failed: \(error)")
        }
        if !waitStopped(r, generation: generation, seconds: limit) {
            logger.info("vm '\(name)' did not shut down within \(limit) s: destroying it")
            _ = try? destroy(name, starting: true)
        }
        return lock.withLock { info(r) }
    }

    /// Sets how much memory a running VM's guest keeps (`virsh setmem`): its balloon takes the rest
    /// (`PATCH /balloon` with `amount_mib` = memory size - `currentMiB`). The definition needs a
    /// `balloon` section.
    public func setMemory(_ name: String, currentMiB: Int) throws(ManagerError) -> VMInfo {
        let r = try record(name)
        r.actionLock.lock()
        defer { r.actionLock.unlock() }
        let (state, def) = lock.withLock { (r.state, r.definition) }
        guard state == .running || state == .paused else { throw conflict(name, state, "set the memory of") }
        guard def.config.balloon != nil else {
            throw ManagerError(.invalid, "vm '\(name)' has no balloon device: add a \"balloon\" section to its definition")
        }
        let size = (def.config.machineConfig ?? .default).memSizeMib
        guard currentMiB >= 1, currentMiB <= size else {
            throw ManagerError(.invalid, "vm '\(name)': memory \(currentMiB) MiB is not between 1 and its \(size) MiB")
        }
        let body = #"{"amount_mib":\#(size - currentMiB)}"#
        try vmmRequest(name, "PATCH", "/balloon", body: body, action: "setting the balloon")
        events.emit(vm: name, "memory set to \(currentMiB) MiB")
        return lock.withLock { info(r) }
    }

    /// Pauses a running VM (`PATCH /vm {"state":"Paused"}`).
    public func pause(_ name: String) throws(ManagerError) -> VMInfo {
        try changeRunState(name, to: .paused)
    }

    /// Resumes a paused VM.
    public func resume(_ name: String) throws(ManagerError) -> VMInfo {
        try changeRunState(name, to: .running)
    }

    private func changeRunState(_ name: String, to target: VMState) throws(ManagerError) -> VMInfo {
        let r = try record(name)
        r.actionLock.lock()
        defer { r.actionLock.unlock() }
        let action = target == .paused ? "pause" : "resume"
        try lock.withLock { () throws(ManagerError) in
            let from: VMState = target == .paused ? .running : .paused
            guard r.state == from else { throw conflict(name, r.state, action) }
        }
        let body = #"{"state":"\#(target == .paused ? "Paused" : "Resumed")"}"#
        try vmmRequest(name, "PATCH", "/vm", body: body, action: action)
        let result = lock.withLock { () -> VMInfo in
            if r.pid != nil { r.state = target }
            return self.info(r)
        }
        events.emit(vm: name, target == .paused ? "paused" : "resumed")
        return result
    }

    /// Sends one request to the VM's vmm API socket; a transport error or a reply other than 200/204
    /// becomes a `.host` error naming the VM and `action`. Returns the reply.
    @discardableResult
    private func vmmRequest(_ name: String, _ method: String, _ path: String, body: String, action: String,
                            timeout: Double = 10) throws(ManagerError) -> HTTPResponse {
        let reply: HTTPResponse
        do {
            reply = try UnixHTTPClient(socketPath: paths.apiSocket(name), timeout: timeout).request(method, path, body: Array(body.utf8))
        } catch {
            throw ManagerError(.host, "vm '\(name)': \(action) failed: \(error)")
        }
        guard reply.status == 204 || reply.status == 200 else {
            throw ManagerError(.host, "vm '\(name)': \(action) refused by the vmm (\(reply.status)): \(reply.faultMessage ?? reply.text)")
        }
        return reply
    }
}

