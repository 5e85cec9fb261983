import Devices
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Logging
import Synchronization
import Virtio
import VMM
import GuestMemory

/// A running guest as the controller sees it. `Machine` is one; tests may supply fakes.
public protocol VMInstance: AnyObject, Sendable {
    /// Runs the guest until it stops (blocks the calling thread).
    func runToCompletion() -> MachineExit
    /// Asks the guest to stop with `exit`.
    func stop(_ exit: MachineExit)
    /// Parks every vCPU; returns once they are stopped.
    func pause(timeoutMs: Int) throws
    /// Lets the vCPUs run again.
    func resume()
    /// Presses Ctrl+Alt+Del on the guest's keyboard.
    func sendCtrlAltDel() throws
    /// Live counters.
    var metrics: MachineMetrics { get }
    /// Writes a snapshot of the paused guest (state file and memory file): Full, or with `diff`
    /// only the pages written since the previous snapshot.
    func saveSnapshot(statePath: String, memoryPath: String, diff: Bool) throws
    /// Asks the balloon for `mib` MiB (`PATCH /balloon`).
    func setBalloonTarget(mib: UInt32) throws
    /// Changes the balloon's statistics polling interval.
    func setBalloonStatsInterval(_ seconds: UInt32) throws
    /// The balloon's figures and statistics (nil: no balloon).
    var balloonStatus: (status: VirtioBalloon.Status, statistics: [String: UInt64])? { get }
    /// Live-migrates the guest to `endpoint` (see `Machine.migrate`).
    func migrate(to endpoint: MigrationEndpoint, maxDowntimeMs: Int, progress: (String) -> Void) throws -> MigrationReport
    /// Keeps the vCPUs parked from the start (call before `runToCompletion`), as for a snapshot
    /// loaded without `resume_vm`.
    func startPaused()
    /// Changes the rate limit of virtio-blk disk `index` (position in `VMConfiguration.disks`):
    /// per bucket, nil keeps it, size or refill time 0 removes it, anything else replaces it.
    func updateDiskRateLimit(index: Int, bandwidth: TokenBucketConfig?, ops: TokenBucketConfig?) throws
    /// Swaps the backing file of virtio-blk disk `index` for `path`; on error the old one stays.
    func replaceDiskImage(index: Int, path: String) throws
    /// Changes the rate limits of virtio-net NIC `id` (nil buckets are kept).
    func updateNetRateLimit(id: String, rx: (bandwidth: TokenBucketConfig?, ops: TokenBucketConfig?),
                            tx: (bandwidth: TokenBucketConfig?, ops: TokenBucketConfig?)) throws
}

extension VMInstance {
    public func saveSnapshot(statePath: String, memoryPath: String, diff: Bool) throws {
        throw VMMError.setup("this guest cannot be snapshotted")
    }
    public func startPaused() {}
    public func setBalloonTarget(mib: UInt32) throws { throw VMMError.setup("this guest has no balloon") }
    public func setBalloonStatsInterval(_ seconds: UInt32) throws { throw VMMError.setup("this guest has no balloon") }
    public var balloonStatus: (status: VirtioBalloon.Status, statistics: [String: UInt64])? { nil }
    public func migrate(to endpoint: MigrationEndpoint, maxDowntimeMs: Int, progress: (String) -> Void) throws -> MigrationReport {
        throw VMMError.setup("this guest cannot be migrated")
    }
    public func updateDiskRateLimit(index: Int, bandwidth: TokenBucketConfig?, ops: TokenBucketConfig?) throws {
        throw VMMError.setup("this guest cannot change disk rate limits")
    }
    public func replaceDiskImage(index: Int, path: String) throws {
        throw VMMError.setup("this guest cannot replace disk images")
    }
    public func updateNetRateLimit(id: String, rx: (bandwidth: TokenBucketConfig?, ops: TokenBucketConfig?),
                                   tx: (bandwidth: TokenBucketConfig?, ops: TokenBucketConfig?)) throws {
        throw VMMError.setup("this guest cannot change network rate limits")
    }
}

extension Machine: VMInstance {
    public func runToCompletion() -> MachineExit { run(handleSignals: false) }
}

/// Builds a guest from a configuration, or from a snapshot when the last argument is set (the
/// default builds a `Machine`).
public typealias VMBuilder = @Sendable (VMConfiguration, any SerialOutput, Logger, MachineRestore?) throws -> any VMInstance

/// A successful API response: the status and the JSON body (empty for 204).
public struct APIResponse: Sendable, Equatable {
    public var status: Int
    public var body: [UInt8]
    public static let noContent = APIResponse(status: 204, body: [])
    /// 200 with `value` as JSON.
    static func json<T: Encodable>(_ value: T) -> APIResponse {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.withoutEscapingSlashes, .sortedKeys]
        return APIResponse(status: 200, body: Array((try? encoder.encode(value)) ?? Data("{}".utf8)))
    }
}

/// The per-VM controller: holds the pre-boot configuration, starts the guest on InstanceStart
/// and carries out runtime actions (Firecracker's pre-boot and runtime controllers in one state
/// machine). Every request is validated before anything changes: a refused request leaves the
/// configuration and the guest as they were.
///
/// `handle` is synchronous and may block (InstanceStart loads the kernel; Pause waits for the
/// vCPUs): call it from a dedicated thread or queue, never from an event loop. The guest runs on
/// its own thread ("vmm"); when it stops, `onExit` is called with how it ended.
public final class VMController: @unchecked Sendable {
    /// Settings of a controller.
    public struct Options: Sendable {
        /// Instance id (`GET /` "id", log lines).
        public var instanceID = "anonymous-instance"
        /// Seconds between periodic metrics lines (Firecracker: 60); 0 disables them.
        public var metricsInterval: Double = 60
        /// Serial output when no `PUT /serial` path is set.
        public var defaultSerial: SerialSpec = .stdio
        /// Builds the guest.
        public var builder: VMBuilder = { config, serial, logger, restoring in
            try Machine(config: config, serialOutput: serial, logger: logger, restoring: restoring)
        }
        /// Called on the guest's thread after it stopped (the `vmm` process exits here).
        public var onExit: @Sendable (MachineExit) -> Void = { _ in }
        /// The virtio transport of the devices: virtio-mmio unless `--enable-pci`, as Firecracker.
        public var virtioTransport: VirtioTransportKind = .mmio
        /// Guest RAM of every machine built here (booted, loaded from a snapshot, or received by a
        /// migration) may be merged by KSM (`swiftkvm vmm --ksm`).
        public var mergeableMemory = false
        public init() {}
    }

    /// The lifecycle state.
    public enum Phase: Sendable, Equatable {
        case notStarted
        case running
        case paused
        case stopped(MachineExit)

        /// `InstanceInfo.state`: "Not started", "Running" or "Paused" (a stopped guest reports
        /// "Running": the process is ending).
        public var apiName: String {
            switch self {
            case .notStarted: return "Not started"
            case .running, .stopped: return "Running"
            case .paused: return "Paused"
            }
        }
    }

    /// What `PUT` requests configured before InstanceStart.
    struct Resources {
        var bootSource: BootSourceConfig?
        var machineConfig = MachineConfig.default
        var drives: [DriveConfig] = []
        var networkInterfaces: [NetworkInterfaceConfig] = []
        var entropy: EntropyDeviceConfig?
        var cpuConfig: CPUConfig?
        var serial: SerialDeviceConfig?
        var vsock: VsockConfig?
        var balloon: BalloonConfig?
    }

    private struct State {
        var phase: Phase = .notStarted
        var resources = Resources()
        var instance: (any VMInstance)?
        /// Drive ids in the guest's disk order (set by InstanceStart).
        var driveOrder: [String] = []
    }

    private let state = Mutex(State())
    public let options: Options
    /// Log destination and level (`PUT /logger`).
    public let logSink: LogSink
    /// Metrics (`PUT /metrics`, FlushMetrics).
    public let metrics: MetricsRecorder
    let logger: Logger
    /// Serializes request handling (Firecracker handles one request at a time).
    private let requestLock = Mutex(())

    /// Version reported by `GET /version` (the Firecracker API level implemented).
    public static let firecrackerAPIVersion = "1.17.0"
    /// Version reported as `vmm_version`.
    public static let vmmVersion = "swiftkvm-0.1.0"
    /// Boot arguments when `boot_args` is absent with the devices on virtio-mmio: Firecracker's default with the
    /// serial console on.
    public static let defaultBootArgs = "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"
    /// Boot arguments when `boot_args` is absent with the devices on PCI (`--enable-pci`): the same without
    /// `pci=off` (the guest must find its devices on PCI) and `nomodule` (a kernel whose virtio-pci driver is a
    /// module must be able to load it).
    public static let defaultPCIBootArgs = "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"

    /// The boot arguments used when `boot_args` is absent, for the devices' transport.
    public static func defaultBootArgs(for transport: VirtioTransportKind) -> String {
        transport == .pci ? defaultPCIBootArgs : defaultBootArgs
    }

    public init(options: Options = Options(), logSink: LogSink? = nil) {
        self.options = options
        self.logSink = logSink ?? LogSink(instanceID: options.instanceID)
        self.metrics = MetricsRecorder(instanceID: options.instanceID)
        self.logger = self.logSink.makeLogger(label: "swiftkvm.vmm")
    }

    /// The current phase.
    public var phase: Phase { state.withLock { $0.phase } }

    /// Carries out one request. Blocking; serialized with other calls.
    public func handle(_ request: APIRequest) -> Result<APIResponse, APIError> {
        requestLock.withLock { _ in
            logger.info("The API server received a \(request.name) request.")
            let result: Result<APIResponse, APIError>
            do throws(APIError) {
                result = .success(try perform(request))
            } catch {
                result = .failure(error)
            }
            metrics.count(request, failed: (try? result.get()) == nil)
            if case .failure(let e) = result {
                logger.error("Received Error. Status code: \(e.status). Message: \(e.message)")
            }
            return result
        }
    }

    /// Applies a `--config-file` document (Firecracker's order), then starts the guest.
    public func start(from config: FullVMConfiguration) throws(APIError) {
        var steps: [APIRequest] = []
        if let l = config.logger { steps.append(.putLogger(l)) }
        if let m = config.metrics { steps.append(.putMetrics(m)) }
        if let b = config.bootSource { steps.append(.putBootSource(b)) }
        if let m = config.machineConfig { steps.append(.putMachineConfig(m)) }
        steps += config.drives.map { .putDrive($0) }
        steps += config.networkInterfaces.map { .putNetworkInterface($0) }
        if let c = config.cpuConfig { steps.append(.putCPUConfig(c)) }
        if let path = config.cpuConfigPath {
            // Firecracker's config file names the template's JSON file.
            let data: [UInt8]
            do { data = try Machine.readFile(path, limit: 1 << 20, what: "CPU template", limitName: "a CPU template's largest size") } catch {
                throw APIError.badRequest("cpu-config from the config file: cannot read the CPU template: \(error)")
            }
            do { steps.append(.putCPUConfig(try StrictJSON.decode(CPUConfig.self, from: data))) } catch {
                throw APIError.badRequest("cpu-config from the config file: \(path): \(error.message)")
            }
        }
        if let e = config.entropy { steps.append(.putEntropy(e)) }
        if let s = config.serial { steps.append(.putSerial(s)) }
        if let v = config.vsock { steps.append(.putVsock(v)) }
        if let b = config.balloon { steps.append(.putBalloon(b)) }
        steps.append(.action(.instanceStart))
        for step in steps {
            if case .failure(let e) = handle(step) {
                throw APIError(status: e.status, "\(step.name) from the config file: \(e.message)")
            }
        }
    }

    // MARK: - Actions

    private func perform(_ request: APIRequest) throws(APIError) -> APIResponse {
        switch request {
        case .getInstanceInfo:
            return .json(InstanceInfo(appName: "SwiftKVM", id: options.instanceID, state: phase.apiName,
                                      vmmVersion: Self.vmmVersion))
        case .getVersion:
            return .json(VersionInfo(firecrackerVersion: Self.firecrackerAPIVersion))
        case .getMachineConfig:
            return .json(state.withLock { $0.resources.machineConfig })
        case .getFullConfig:
            return .json(fullConfiguration)

        case .putBootSource(let b):
            try requirePreBoot()
            try b.validate()
            state.withLock { $0.resources.bootSource = b }
        case .putMachineConfig(let m):
            try requirePreBoot()
            try m.validate()
            state.withLock { $0.resources.machineConfig = m }
        case .patchMachineConfig(let u):
            try requirePreBoot()
            let updated = u.applied(to: state.withLock { $0.resources.machineConfig })
            try updated.validate()
            state.withLock { $0.resources.machineConfig = updated }
        case .putDrive(let d):
            try requirePreBoot()
            try d.validate()
            try state.withLock { (s) throws(APIError) in
                if d.isRootDevice, s.resources.drives.contains(where: { $0.isRootDevice && $0.driveId != d.driveId }) {
                    throw APIError.badRequest("A root block device already exists (drive \(d.driveId) has is_root_device = true).")
                }
                if let i = s.resources.drives.firstIndex(where: { $0.driveId == d.driveId }) {
                    s.resources.drives[i] = d
                } else {
                    s.resources.drives.append(d)
                }
            }
        case .patchDrive(let u):
            try updateDrive(u, on: try requireRuntime())
        case .putNetworkInterface(let n):
            try requirePreBoot()
            try n.validate()
            try state.withLock { (s) throws(APIError) in
                for other in s.resources.networkInterfaces where other.ifaceId != n.ifaceId {
                    if other.hostDevName == n.hostDevName {
                        throw APIError.badRequest("Invalid host_dev_name: \(n.hostDevName) is already used by network interface \(other.ifaceId).")
                    }
                    if let mac = n.guestMac, other.guestMac?.lowercased() == mac.lowercased() {
                        throw APIError.badRequest("Invalid guest_mac: \(mac) is already used by network interface \(other.ifaceId).")
                    }
                }
                if let i = s.resources.networkInterfaces.firstIndex(where: { $0.ifaceId == n.ifaceId }) {
                    s.resources.networkInterfaces[i] = n
                } else {
                    s.resources.networkInterfaces.append(n)
                }
            }
        case .patchNetworkInterface(let u):
            let vm = try requireRuntime()
            try u.rxRateLimiter?.validate("rx_rate_limiter")
            try u.txRateLimiter?.validate("tx_rate_limiter")
            let known = state.withLock { s in s.resources.networkInterfaces.contains { $0.ifaceId == u.ifaceId } }
            guard known else { throw APIError.badRequest("Invalid iface_id '\(u.ifaceId)': no such network interface.") }
            do {
                try vm.updateNetRateLimit(id: u.ifaceId,
                                          rx: (u.rxRateLimiter?.bandwidth?.config, u.rxRateLimiter?.ops?.config),
                                          tx: (u.txRateLimiter?.bandwidth?.config, u.txRateLimiter?.ops?.config))
            } catch {
                throw APIError.badRequest("Failed to update the rate limiters of network interface \(u.ifaceId): \(error).")
            }
            state.withLock { s in
                guard let i = s.resources.networkInterfaces.firstIndex(where: { $0.ifaceId == u.ifaceId }) else { return }
                func merge(_ old: RateLimiter?, _ new: RateLimiter?) -> RateLimiter? {
                    guard let new else { return old }
                    var m = old ?? RateLimiter()
                    if let b = new.bandwidth { m.bandwidth = b }
                    if let o = new.ops { m.ops = o }
                    return m
                }
                s.resources.networkInterfaces[i].rxRateLimiter = merge(s.resources.networkInterfaces[i].rxRateLimiter, u.rxRateLimiter)
                s.resources.networkInterfaces[i].txRateLimiter = merge(s.resources.networkInterfaces[i].txRateLimiter, u.txRateLimiter)
            }
        case .putLogger(let l):
            try requirePreBoot()
            try logSink.configure(l)
        case .putMetrics(let m):
            try requirePreBoot()
            try metrics.configure(m, interval: options.metricsInterval) { [weak self] in self?.currentMachineMetrics }
        case .putBalloon(let b):
            try requirePreBoot()
            let mem = state.withLock { $0.resources.machineConfig.memSizeMib }
            guard b.amountMib >= 0, b.amountMib <= mem else {
                throw .badRequest("Invalid amount_mib \(b.amountMib): the balloon can take 0 to the guest's \(mem) MiB.")
            }
            guard (0...86_400).contains(b.statsPollingIntervalS) else {
                throw .badRequest("Invalid stats_polling_interval_s \(b.statsPollingIntervalS): expected 0 to 86400.")
            }
            state.withLock { $0.resources.balloon = b }
        case .patchBalloon(let u):
            // Before InstanceStart the update changes the configuration only (as in Firecracker).
            let vm = phase == .notStarted ? nil : try requireRuntime()
            guard let current = state.withLock({ $0.resources.balloon }) else { throw .badRequest("No balloon device is configured.") }
            guard u.amountMib >= 0, u.amountMib <= state.withLock({ $0.resources.machineConfig.memSizeMib }) else {
                throw .badRequest("Invalid amount_mib \(u.amountMib): the balloon can take 0 to the guest's memory size.")
            }
            if let vm {
                do { try vm.setBalloonTarget(mib: UInt32(u.amountMib)) } catch { throw .badRequest("Cannot update the balloon: \(error).") }
            }
            state.withLock { $0.resources.balloon = BalloonConfig(amountMib: u.amountMib, deflateOnOom: current.deflateOnOom,
                                                                  statsPollingIntervalS: current.statsPollingIntervalS,
                                                                  freePageReporting: current.freePageReporting) }
        case .getBalloon:
            guard let b = state.withLock({ $0.resources.balloon }) else { throw .badRequest("No balloon device is configured.") }
            return .json(b)
        case .getBalloonStatistics:
            let vm = try requireRuntime()
            guard let current = state.withLock({ $0.resources.balloon }), current.statsPollingIntervalS > 0 else {
                throw .badRequest("Balloon statistics are not enabled (stats_polling_interval_s is 0).")
            }
            guard let (status, stats) = vm.balloonStatus else { throw .badRequest("No balloon device is configured.") }
            var out: [String: UInt64] = stats
            out["target_pages"] = UInt64(status.targetPages)
            out["actual_pages"] = UInt64(status.actualPages)
            out["target_mib"] = UInt64(status.targetPages) / 256
            out["actual_mib"] = UInt64(status.actualPages) / 256
            return .json(out)
        case .patchBalloonStatistics(let u):
            let vm = try requireRuntime()
            guard let current = state.withLock({ $0.resources.balloon }), current.statsPollingIntervalS > 0 else {
                throw .badRequest("Balloon statistics were not enabled at boot (stats_polling_interval_s 0); they cannot be turned on now.")
            }
            guard (1...86_400).contains(u.statsPollingIntervalS) else {
                throw .badRequest("Invalid stats_polling_interval_s \(u.statsPollingIntervalS): expected 1 to 86400.")
            }
            do { try vm.setBalloonStatsInterval(UInt32(u.statsPollingIntervalS)) } catch { throw .badRequest("\(error).") }
            state.withLock { $0.resources.balloon?.statsPollingIntervalS = u.statsPollingIntervalS }
        case .putCPUConfig(let c):
            try requirePreBoot()
            _ = try c.template()
            state.withLock { $0.resources.cpuConfig = c }
        case .putEntropy(let e):
            try requirePreBoot()
            try e.rateLimiter?.validate("rate_limiter")
            state.withLock { $0.resources.entropy = e }
        case .putVsock(let v):
            try requirePreBoot()
            guard v.guestCid >= 3, v.guestCid <= 0xffff_fffe else {
                throw .badRequest("Invalid guest_cid \(v.guestCid): must be 3 to 4294967294 (0, 1 and 2 are reserved; 2 is the host).")
            }
            do {
                try VsockSpec(guestCID: UInt64(v.guestCid), udsPath: v.udsPath).validate()
            } catch {
                let reason: String
                if case .invalidValue(_, _, let r) = error as? VMMError { reason = r } else { reason = "\(error)" }
                throw .badRequest("Invalid uds_path '\(v.udsPath)': \(reason).")
            }
            state.withLock { $0.resources.vsock = v }
        case .putSerial(let s):
            try requirePreBoot()
            if let p = s.serialOutPath, p.isEmpty { throw .badRequest("Invalid serial_out_path: the path is empty.") }
            try s.rateLimiter?.validate("rate_limiter")
            state.withLock { $0.resources.serial = s }

        case .action(.instanceStart):
            try startInstance()
        case .action(.sendCtrlAltDel):
            let vm = try requireRuntime()
            do { try vm.sendCtrlAltDel() } catch { throw .badRequest("SendCtrlAltDel failed: \(error).") }
        case .action(.flushMetrics):
            try requireRuntime()
            guard metrics.isConfigured else {
                throw .badRequest("The metrics system is not initialized: configure it with PUT /metrics first.")
            }
            guard metrics.flush(machine: currentMachineMetrics) else {
                throw APIError(status: 400, "Failed to write metrics to \(metrics.path ?? "?"): the destination is full or unwritable.")
            }
        case .putSnapshotCreate(let p):
            let vm = try requireRuntime()
            guard phase == .paused else { throw .badRequest("Cannot create a snapshot: the microVM is not paused (PATCH /vm {\"state\": \"Paused\"} first).") }
            let diff: Bool
            switch p.snapshotType ?? "Full" {
            case "Full": diff = false
            case "Diff": diff = true
            case let t: throw .badRequest("Invalid snapshot_type '\(t)': expected Full or Diff.")
            }
            guard !p.snapshotPath.isEmpty, !p.memFilePath.isEmpty else { throw .badRequest("snapshot_path and mem_file_path must not be empty.") }
            do { try vm.saveSnapshot(statePath: p.snapshotPath, memoryPath: p.memFilePath, diff: diff) } catch {
                throw .badRequest("Cannot create the snapshot: \(error).")
            }
            logger.info("snapshot created (\(diff ? "Diff" : "Full")): \(p.snapshotPath), memory \(p.memFilePath)")
        case .putMigrate(let p):
            let vm = try requireRuntime()
            let endpoint: MigrationEndpoint
            do { endpoint = try MigrationEndpoint(parsing: p.destination) } catch { throw .badRequest("Invalid destination: \(error).") }
            let downtime = p.maxDowntimeMs ?? 300
            guard (1...60_000).contains(downtime) else { throw .badRequest("Invalid max_downtime_ms \(downtime): expected 1 to 60000.") }
            let report: MigrationReport
            do {
                report = try vm.migrate(to: endpoint, maxDowntimeMs: downtime) { [logger] line in logger.info("migration: \(line)") }
            } catch {
                throw .badRequest("Migration to \(endpoint) failed: \(error).")
            }
            logger.info("migration to \(endpoint) done: \(report.passes) passes, \(report.bytesSent >> 20) MiB, downtime \(Int(report.downtimeMs)) ms")
            // The guest runs on the target now (`swiftkvm vmm` lets this answer go out before it exits).
            vm.stop(.migrated(endpoint.description))
            return .json(report)
        case .putSnapshotLoad(let p):
            try requirePreBoot()
            let r = state.withLock { $0.resources }
            guard r.bootSource == nil, r.drives.isEmpty, r.networkInterfaces.isEmpty, r.vsock == nil, r.entropy == nil, r.balloon == nil,
                  r.machineConfig == MachineConfig.default else {
                throw .badRequest("Loading a microVM snapshot is not allowed after configuring boot-specific resources.")
            }
            let memoryPath: String
            switch (p.memFilePath, p.memBackend) {
            case (let path?, nil): memoryPath = path
            case (nil, let backend?):
                guard backend.backendType == "File" else {
                    if backend.backendType == "Uffd" { throw .notSupportedYet("mem_backend of type Uffd") }
                    throw .badRequest("Invalid mem_backend backend_type '\(backend.backendType)': expected File or Uffd.")
                }
                memoryPath = backend.backendPath
            default:
                throw .badRequest("Give exactly one of mem_file_path and mem_backend.")
            }
            var snapshot: MachineSnapshot
            do { snapshot = try SnapshotFile.read(p.snapshotPath) } catch { throw .badRequest("Cannot load the snapshot: \(error).") }
            try Self.applyOverrides(p, to: &snapshot.config)
            // Dirty-page tracking from the load on (Firecracker's track_dirty_pages, formerly enable_diff_snapshots).
            snapshot.config.trackDirtyPages = p.trackDirtyPages == true || p.enableDiffSnapshots == true ? true : nil
            try startInstance(restoring: MachineRestore(snapshot: snapshot, memoryPath: memoryPath), paused: p.resumeVM != true)
            if let b = snapshot.config.balloon {
                // The balloon stays configurable (PATCH /balloon), at the target the snapshot saved.
                let target = state.withLock { $0.instance?.balloonStatus?.status.targetPages }.map { Int($0) / 256 }
                state.withLock { $0.resources.balloon = BalloonConfig(amountMib: target ?? Int(b.amountMiB), deflateOnOom: b.deflateOnOOM,
                                                                      statsPollingIntervalS: Int(b.statsIntervalS),
                                                                      freePageReporting: b.freePageReporting) }
            }
            logger.info("snapshot loaded: \(p.snapshotPath)\(p.resumeVM == true ? ", resumed" : ", paused")")
        case .patchVM(.paused):
            let vm = try requireRuntime()
            if phase == .paused { return .noContent }
            do { try vm.pause(timeoutMs: 5000) } catch { throw APIError(status: 400, "Failed to pause the vCPUs: \(error).") }
            state.withLock { if $0.phase == .running { $0.phase = .paused } }
            logger.info("vCPUs paused")
        case .patchVM(.resumed):
            let vm = try requireRuntime()
            vm.resume()
            state.withLock { if $0.phase == .paused { $0.phase = .running } }
            logger.info("vCPUs resumed")
        }
        return .noContent
    }

    /// `PATCH /drives/{id}` on a running guest: a new backing file (opened and swapped in
    /// between requests; the guest is told the new capacity) and/or new rate-limiter buckets
    /// (applied to the live device). Everything is checked first; a bad path changes nothing.
    private func updateDrive(_ u: DriveUpdate, on vm: any VMInstance) throws(APIError) {
        try u.rateLimiter?.validate("rate_limiter")
        let (index, drive) = try state.withLock { (s) throws(APIError) -> (Int, DriveConfig) in
            guard let d = s.resources.drives.first(where: { $0.driveId == u.driveId }),
                  let i = s.driveOrder.firstIndex(of: u.driveId) else {
                throw APIError.badRequest("Invalid drive_id '\(u.driveId)': no such drive.")
            }
            return (i, d)
        }
        if let path = u.pathOnHost {
            try FileCheck.readableFile(path, what: "drive backing file", field: "path_on_host")
            do {
                try vm.replaceDiskImage(index: index, path: path)
            } catch {
                let reason: String
                if case .invalidValue(_, _, let r) = error as? VMMError { reason = r } else { reason = "\(error)" }
                throw .badRequest("Invalid path_on_host for drive \(u.driveId): cannot use \(path): \(reason). "
                                  + "The drive keeps using \(drive.pathOnHost ?? "its current file").")
            }
            state.withLock { s in
                if let i = s.resources.drives.firstIndex(where: { $0.driveId == u.driveId }) { s.resources.drives[i].pathOnHost = path }
            }
            logger.info("drive \(u.driveId) now uses \(path)")
        }
        if let r = u.rateLimiter {
            do {
                try vm.updateDiskRateLimit(index: index, bandwidth: r.bandwidth?.config, ops: r.ops?.config)
            } catch {
                throw .badRequest("Failed to update the rate limiter of drive \(u.driveId): \(error).")
            }
            state.withLock { s in
                guard let i = s.resources.drives.firstIndex(where: { $0.driveId == u.driveId }) else { return }
                var merged = s.resources.drives[i].rateLimiter ?? RateLimiter()
                if let b = r.bandwidth { merged.bandwidth = b }
                if let o = r.ops { merged.ops = o }
                s.resources.drives[i].rateLimiter = merged
            }
        }
    }

    private func requirePreBoot() throws(APIError) {
        guard phase == .notStarted else { throw .notSupportedAfterStart }
    }

    @discardableResult
    private func requireRuntime() throws(APIError) -> any VMInstance {
        let (phase, instance) = state.withLock { ($0.phase, $0.instance) }
        switch phase {
        case .notStarted: throw .notSupportedBeforeStart
        case .stopped(let exit): throw .badRequest("The microVM has stopped (\(exit)).")
        case .running, .paused:
            guard let instance else { throw .notSupportedBeforeStart }
            return instance
        }
    }

    private var currentMachineMetrics: MachineMetrics? { state.withLock { $0.instance?.metrics } }

    /// The configuration as `GET /vm/config` reports it.
    public var fullConfiguration: FullVMConfiguration {
        let r = state.withLock { $0.resources }
        var c = FullVMConfiguration()
        c.bootSource = r.bootSource
        c.machineConfig = r.machineConfig
        c.drives = r.drives
        c.networkInterfaces = r.networkInterfaces
        c.entropy = r.entropy
        c.cpuConfig = r.cpuConfig
        c.balloon = r.balloon
        c.serial = r.serial
        c.vsock = r.vsock
        c.logger = logSink.current
        c.metrics = metrics.current
        return c
    }

    /// The `VMConfiguration` InstanceStart builds from the pre-boot resources.
    func makeConfiguration(_ r: Resources) throws(APIError) -> VMConfiguration {
        guard let boot = r.bootSource else {
            throw .badRequest("Cannot start the microVM without a kernel: configure it with PUT /boot-source first.")
        }
        var cmdline = boot.bootArgs ?? Self.defaultBootArgs(for: options.virtioTransport)
        let drives = Self.guestDriveOrder(r.drives)
        if let root = drives.first, root.isRootDevice, !cmdline.split(separator: " ").contains(where: { $0.hasPrefix("root=") }) {
            let device = root.partuuid.map { "PARTUUID=\($0)" } ?? "/dev/vda"
            cmdline += " root=\(device) \(root.isReadOnly == true ? "ro" : "rw")"
        }
        var config = VMConfiguration(payload: .kernel(path: boot.kernelImagePath, initrd: boot.initrdPath,
                                                      cmdline: cmdline, modules: []))
        config.disks = drives.map { d in
            DiskSpec(path: d.pathOnHost ?? "", readOnly: d.isReadOnly ?? false, id: String(d.driveId.prefix(20)),
                     backingFiles: false, rateLimit: d.rateLimiter?.config)
        }
        config.nets = r.networkInterfaces.map { n in
            NetSpec(backend: .tap(name: n.hostDevName), mac: n.guestMac.flatMap(NetSpec.parseMAC), id: n.ifaceId,
                    rxRateLimit: n.rxRateLimiter?.config, txRateLimit: n.txRateLimiter?.config)
        }
        config.name = options.instanceID
        config.vsock = r.vsock.map { VsockSpec(guestCID: UInt64($0.guestCid), udsPath: $0.udsPath, id: $0.vsockId) }
        config.cpuTemplate = try r.cpuConfig?.template()
        config.rng = r.entropy != nil
        config.rngRateLimit = r.entropy?.rateLimiter?.config
        if let b = r.balloon, b.amountMib > r.machineConfig.memSizeMib {
            throw .badRequest("The balloon's amount_mib \(b.amountMib) is larger than the guest's mem_size_mib \(r.machineConfig.memSizeMib).")
        }
        config.balloon = r.balloon.map {
            BalloonSpec(amountMiB: UInt32($0.amountMib), deflateOnOOM: $0.deflateOnOom,
                        statsIntervalS: UInt32($0.statsPollingIntervalS), freePageReporting: $0.freePageReporting)
        }
        config.memorySize = UInt64(r.machineConfig.memSizeMib) << 20
        switch r.machineConfig.hugePages {
        case "2M": config.memoryBackend = MemoryBackend(hugePages: .hugetlbfs)
        case "Transparent": config.memoryBackend = MemoryBackend(hugePages: .transparent)
        default: break
        }
        config.cpus = r.machineConfig.vcpuCount
        config.trackDirtyPages = r.machineConfig.trackDirtyPages ? true : nil
        config.serial = r.serial?.serialOutPath.map { "file:" + $0 } ?? options.defaultSerial.description
        config.onReboot = .exit
        config.transport = options.virtioTransport
        do {
            try config.validate(hostMemory: Self.hostMemory())
        } catch {
            throw .badRequest("Invalid machine configuration: \(error).")
        }
        return config
    }

    /// As Firecracker: the root drive comes first (/dev/vda) and sets root= unless boot_args has one.
    static func guestDriveOrder(_ drives: [DriveConfig]) -> [DriveConfig] {
        drives.filter(\.isRootDevice) + drives.filter { !$0.isRootDevice }
    }

    static func isFIFO(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFIFO
    }

    static func hostMemory() -> UInt64? {
        let pages = sysconf(Int32(_SC_PHYS_PAGES)), size = sysconf(Int32(_SC_PAGESIZE))
        guard pages > 0, size > 0 else { return nil }
        return UInt64(pages) * UInt64(size)
    }

    /// `network_overrides` and `vsock_override` of a snapshot load: other host TAPs for the snapshot's
    /// NICs (by `iface_id`) and another socket for its vsock device. Each NIC keeps the MAC its guest uses.
    static func applyOverrides(_ p: SnapshotLoadParams, to config: inout VMConfiguration) throws(APIError) {
        var seen: Set<String> = []
        for o in p.networkOverrides ?? [] {
            guard seen.insert(o.ifaceId).inserted else {
                throw .badRequest("Invalid network_overrides: iface_id '\(o.ifaceId)' is given twice.")
            }
            guard let i = config.nets.indices.first(where: { config.nicID($0) == o.ifaceId }) else {
                let ids = config.nets.indices.map { config.nicID($0) }
                throw .badRequest("Invalid network_overrides: the snapshot has no network interface '\(o.ifaceId)' (it has \(ids.isEmpty ? "none" : ids.joined(separator: ", "))).")
            }
            guard NetSpec.validInterfaceName(o.hostDevName) else {
                throw .badRequest("Invalid network_overrides: host_dev_name '\(o.hostDevName)' of '\(o.ifaceId)' is not an interface name (1 to 15 bytes, no '/', ':' or whitespace).")
            }
            guard case .tap = config.nets[i].backend else {
                throw .badRequest("Invalid network_overrides: network interface '\(o.ifaceId)' does not use a host TAP.")
            }
            config.nets[i].mac = config.nicMAC(i)
            config.nets[i].backend = .tap(name: o.hostDevName)
        }
        if let v = p.vsockOverride {
            guard config.vsock != nil else { throw .badRequest("Invalid vsock_override: the snapshot has no vsock device.") }
            guard !v.udsPath.isEmpty, v.udsPath.utf8.count < 108 else {
                throw .badRequest("Invalid vsock_override: uds_path must be 1 to 107 bytes (a Unix socket path), not \(v.udsPath.utf8.count).")
            }
            config.vsock?.udsPath = v.udsPath
        }
    }

    private func startInstance(restoring: MachineRestore? = nil, paused: Bool = false) throws(APIError) {
        try requirePreBoot()
        let resources = state.withLock { $0.resources }
        var config: VMConfiguration
        if let restoring {
            // The snapshot's machine, with this process's serial output.
            config = restoring.snapshot.config
            config.serial = resources.serial?.serialOutPath.map { "file:" + $0 } ?? options.defaultSerial.description
        } else {
            config = try makeConfiguration(resources)
        }
        if options.mergeableMemory {
            var backend = config.memoryBackend ?? MemoryBackend()
            backend.mergeable = true
            config.memoryBackend = backend
        }
        let instance: any VMInstance
        do {
            let serial: any SerialOutput
            if let path = resources.serial?.serialOutPath, Self.isFIFO(path) {
                // A FIFO is opened read-write and non-blocking: opening never waits for a reader.
                let fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC)
                guard fd >= 0 else {
                    throw APIError.badRequest("Invalid serial_out_path: cannot open \(path): \(String(cString: strerror(errno))).")
                }
                serial = ConsoleOutput(fileDescriptor: fd, owning: true)
            } else {
                do { serial = try ConsoleOutput(spec: try config.serialSpec()) } catch {
                    throw APIError.badRequest("Invalid serial_out_path: \(error).")
                }
            }
            instance = try options.builder(config, serial, logger, restoring)
        } catch let e as APIError {
            throw e
        } catch {
            throw .badRequest("Failed to start the microVM: \(error).")
        }
        if paused { instance.startPaused() }
        state.withLock { s in
            s.instance = instance
            s.phase = paused ? .paused : .running
            s.driveOrder = Self.guestDriveOrder(resources.drives).map(\.driveId)
        }
        do {
            try HostThread.start(name: "vmm", blockStopSignals: false, stackSize: 1 << 20) { [self] in
                let exit = instance.runToCompletion()
                state.withLock { $0.phase = .stopped(exit) }
                logger.info("the guest stopped: \(exit)")
                if metrics.isConfigured { metrics.flush(machine: instance.metrics) }
                options.onExit(exit)
            }
        } catch {
            state.withLock { s in
                s.instance = nil
                s.phase = .notStarted
            }
            throw .badRequest("Failed to start the microVM: \(error).")
        }
        logger.info("microVM started: \(config.cpus) vCPU(s), \(config.memorySize >> 20) MiB")
        // The machine is built: from now on this thread (the API's controller, or the main thread with
        // --config-file) only drives it, confined as a `vmm` thread.
        Seccomp.confineCurrentThread(.vmm)
    }

    /// Asks a running guest to stop (SIGTERM in the `vmm` process); no effect before start.
    /// `swiftkvm vmm --incoming`: builds the machine of a received migration, paused.
    public func startIncoming(_ restore: MachineRestore) throws(APIError) {
        try requestLock.withLock { _ throws(APIError) in try startInstance(restoring: restore, paused: true) }
    }

    /// Lets a machine built by `startIncoming` run.
    public func resumeIncoming() { _ = handle(.patchVM(.resumed)) }

    public func stopGuest(_ exit: MachineExit) {
        state.withLock { $0.instance }?.stop(exit)
    }
}

extension TokenBucket {
    /// The device-side bucket (validated values are not negative).
    var config: TokenBucketConfig {
        TokenBucketConfig(size: UInt64(max(0, size)), oneTimeBurst: UInt64(max(0, oneTimeBurst ?? 0)),
                          refillTimeMs: UInt64(max(0, refillTime)))
    }
}

extension RateLimiter {
    /// The device-side rate limit.
    var config: RateLimitConfig { RateLimitConfig(bandwidth: bandwidth?.config, ops: ops?.config) }
}
