import Devices
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import Virtio
import VMM

/// Firecracker-style metrics: newline-delimited JSON objects written to `metrics_path` on
/// `FlushMetrics` and every `interval` seconds (60 s by default, as Firecracker).
///
/// Each line has `utc_timestamp_ms` and groups of counters. As in Firecracker, counters are the
/// increase since the previous line; values that are states (startup time, vCPU CPU time) are
/// absolute. Groups: `api_server` (startup time, failed responses), `get_api_requests`,
/// `put_api_requests`, `patch_api_requests` (`<endpoint>_count` / `<endpoint>_fails`), `vcpu`
/// (`exit_<reason>` per KVM exit reason and `failures`), `vcpu_time_us` (CPU time per vCPU
/// thread), `uart` (`write_count` bytes the guest sent, `missed_read_count` input bytes dropped),
/// `vmm` (`unhandled_io`, `unhandled_mmio`).
public final class MetricsRecorder: @unchecked Sendable {
    private struct State {
        var counters: [String: [String: UInt64]] = [:]
        var last: [String: [String: UInt64]] = [:]
        var fd: Int32 = -1
        var path: String?
        var linesWritten: UInt64 = 0
        var linesDropped: UInt64 = 0
    }
    private let state = Mutex(State())
    private let timerLock = Mutex(())
    private var timer: PeriodicTask?
    /// Process start to API ready, set once by the process (microseconds, wall and CPU).
    public let startupWallUs = Atomic<UInt64>(0)
    public let startupCPUUs = Atomic<UInt64>(0)
    /// Emitted as the top-level `id` when `emit_id` is set.
    public let instanceID: String
    private let emitID = Atomic<Bool>(false)
    private let properties = Mutex<[String: String]>([:])

    public init(instanceID: String) { self.instanceID = instanceID }

    /// Adds `n` to counter `group.name`.
    public func increment(_ group: String, _ name: String, by n: UInt64 = 1) {
        state.withLock { $0.counters[group, default: [:]][name, default: 0] &+= n }
    }

    /// Counts one API request of `request` (`…_count`, and `…_fails` when it failed).
    func count(_ request: APIRequest, failed: Bool) {
        let (group, name): (String, String)
        switch request {
        case .getInstanceInfo: (group, name) = ("get_api_requests", "instance_info")
        case .getVersion: (group, name) = ("get_api_requests", "vmm_version")
        case .getMachineConfig: (group, name) = ("get_api_requests", "machine_cfg")
        case .getFullConfig: (group, name) = ("get_api_requests", "vm_config")
        case .putBootSource: (group, name) = ("put_api_requests", "boot_source")
        case .putMachineConfig: (group, name) = ("put_api_requests", "machine_cfg")
        case .patchMachineConfig: (group, name) = ("patch_api_requests", "machine_cfg")
        case .putDrive: (group, name) = ("put_api_requests", "drive")
        case .patchDrive: (group, name) = ("patch_api_requests", "drive")
        case .putNetworkInterface: (group, name) = ("put_api_requests", "network")
        case .patchNetworkInterface: (group, name) = ("patch_api_requests", "network")
        case .action: (group, name) = ("put_api_requests", "actions")
        case .patchVM: (group, name) = ("patch_api_requests", "vm")
        case .putLogger: (group, name) = ("put_api_requests", "logger")
        case .putMetrics: (group, name) = ("put_api_requests", "metrics")
        case .putEntropy: (group, name) = ("put_api_requests", "entropy")
        case .putCPUConfig: (group, name) = ("put_api_requests", "cpu_cfg")
        case .putSerial: (group, name) = ("put_api_requests", "serial")
        case .putVsock: (group, name) = ("put_api_requests", "vsock")
        case .putSnapshotCreate: (group, name) = ("put_api_requests", "create_snapshot")
        case .putSnapshotLoad: (group, name) = ("put_api_requests", "load_snapshot")
        case .putMigrate: (group, name) = ("put_api_requests", "migrate")
        case .putBalloon: (group, name) = ("put_api_requests", "balloon")
        case .patchBalloon, .patchBalloonStatistics: (group, name) = ("patch_api_requests", "balloon")
        case .getBalloon, .getBalloonStatistics: (group, name) = ("get_api_requests", "balloon")
        }
        increment(group, name + "_count")
        if failed { increment(group, name + "_fails") }
    }

    /// Counts a request refused while parsing, under its endpoint (`…_count` and `…_fails`).
    func countParseFailure(method: String, uri: String) {
        let first = uri.split(separator: "?").first?.split(separator: "/").first.map(String.init) ?? ""
        let names = ["boot-source": "boot_source", "machine-config": "machine_cfg", "drives": "drive",
                     "network-interfaces": "network", "actions": "actions", "logger": "logger", "metrics": "metrics",
                     "entropy": "entropy", "serial": "serial", "vm": "vm", "": "instance_info", "version": "vmm_version"]
        guard let name = names[first], ["GET", "PUT", "PATCH"].contains(method) else {
            increment("api_server", "invalid_requests")
            return
        }
        let group = method.lowercased() + "_api_requests"
        increment(group, name + "_count")
        increment(group, name + "_fails")
    }

    /// Whether a metrics path is configured.
    public var isConfigured: Bool { state.withLock { $0.path != nil } }
    /// The configured path.
    public var path: String? { state.withLock { $0.path } }
    /// Lines written and lines dropped (destination full or failing).
    public var lineCounts: (written: UInt64, dropped: UInt64) { state.withLock { ($0.linesWritten, $0.linesDropped) } }

    /// Opens the metrics destination (once; Firecracker refuses reinitialization) and starts
    /// the periodic flush every `interval` seconds (0: none).
    public func configure(_ config: MetricsConfig, interval: Double, machine: @escaping @Sendable () -> MachineMetrics?) throws(APIError) {
        if state.withLock({ $0.path != nil }) { throw .badRequest("Reinitialization of metrics not allowed.") }
        guard !config.metricsPath.isEmpty else { throw .badRequest("Invalid metrics_path: the path is empty.") }
        let fd = LogSink.openForAppend(config.metricsPath)
        guard fd >= 0 else {
            throw .badRequest("Invalid metrics_path: cannot open \(config.metricsPath): \(String(cString: strerror(errno))).")
        }
        emitID.store(config.emitId ?? false, ordering: .relaxed)
        properties.withLock { $0 = config.properties ?? [:] }
        var timer: PeriodicTask?
        if interval > 0 {
            timer = PeriodicTask(name: "metrics", interval: interval) { [weak self] in _ = self?.flush(machine: machine()) }
        }
        state.withLock { s in
            s.fd = fd
            s.path = config.metricsPath
        }
        timerLock.withLock { _ in self.timer = timer }
        do { try timer?.start() } catch {
            throw .badRequest("Cannot start the metrics timer: \(error).")
        }
    }

    /// The current metrics configuration (for `GET /vm/config`).
    public var current: MetricsConfig? { path.map { MetricsConfig(metricsPath: $0) } }

    /// Builds one metrics line and writes it. Returns false when no path is configured or the
    /// write failed (the line is dropped, as Firecracker does with a full FIFO).
    @discardableResult
    public func flush(machine: MachineMetrics?) -> Bool {
        guard let line = makeLine(machine: machine) else { return false }
        return state.withLock { s in
            guard s.fd >= 0 else { return false }
            let ok = line.withUnsafeBytes { raw -> Bool in
                var done = 0
                while done < raw.count {
                    let n = Glibc.write(s.fd, raw.baseAddress! + done, raw.count - done)
                    if n < 0 && errno == EINTR { continue }
                    if n <= 0 { return false }
                    done += n
                }
                return true
            }
            if ok { s.linesWritten += 1 } else { s.linesDropped += 1 }
            return ok
        }
    }

    /// The JSON line (with trailing newline) for the counters now, advancing the delta base.
    func makeLine(machine: MachineMetrics?) -> Data? {
        if let m = machine {
            // Cumulative device counters: recorded as absolute, emitted as deltas.
            state.withLock { s in
                var vcpu: [String: UInt64] = s.counters["vcpu"] ?? [:]
                for (reason, n) in m.exits {
                    let key = "exit_" + reason.map { $0.isLetter || $0.isNumber ? String($0) : "_" }.joined()
                    vcpu[key] = n
                }
                vcpu["failures"] = (m.exits["internal-error"] ?? 0) + (m.exits["fail-entry"] ?? 0)
                s.counters["vcpu"] = vcpu
                s.counters["uart"] = ["write_count": m.serialTransmittedBytes, "missed_read_count": m.serialDroppedInputBytes]
                s.counters["vmm"] = ["unhandled_io": m.unhandledIO, "unhandled_mmio": m.unhandledMMIO]
                // Firecracker's `net` group (the sum over NICs) and one `net_<iface_id>` group per NIC.
                var total: [String: UInt64] = [:]
                for (id, c) in m.nics {
                    let values = Self.netMetrics(c)
                    s.counters["net_" + id] = values
                    for (k, v) in values { total[k, default: 0] += v }
                }
                if !m.nics.isEmpty { s.counters["net"] = total }
            }
        }
        var object: [String: MetricValue] = [:]
        let timestampMs = UInt64(Date().timeIntervalSince1970 * 1000)
        state.withLock { s in
            for (group, values) in s.counters {
                var out: [String: UInt64] = [:]
                for (k, v) in values { out[k] = v &- (s.last[group]?[k] ?? 0) }
                object[group] = .counters(out)
            }
            s.last = s.counters
        }
        var api: [String: UInt64] = [:]
        if case .counters(let c) = object["api_server"] { api = c }
        api["process_startup_time_us"] = startupWallUs.load(ordering: .relaxed)
        api["process_startup_time_cpu_us"] = startupCPUUs.load(ordering: .relaxed)
        object["api_server"] = .counters(api)
        if let m = machine {
            object["vcpu_time_us"] = .counters(Dictionary(uniqueKeysWithValues: m.vcpuTimeUs.map { (String($0.key), $0.value) }))
        }
        object["utc_timestamp_ms"] = .number(timestampMs)
        if emitID.load(ordering: .relaxed) { object["id"] = .text(instanceID) }
        let props = properties.withLock { $0 }
        if !props.isEmpty { object["properties"] = .texts(props) }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        guard var data = try? encoder.encode(object) else { return nil }
        data.append(0x0a)
        return data
    }

    /// A NIC's counters under Firecracker's `NetDeviceMetrics` names.
    static func netMetrics(_ c: NetCounters) -> [String: UInt64] {
        ["rx_bytes_count": c.rxBytes, "rx_packets_count": c.rxPackets, "rx_fails": c.rxFails,
         "rx_count": c.rxPackets, "tx_bytes_count": c.txBytes, "tx_packets_count": c.txPackets,
         "tx_count": c.txPackets, "tx_fails": c.txFails, "tx_malformed_frames": c.txMalformedFrames,
         "rx_rate_limiter_throttled": c.rxRateLimiterThrottled, "tx_rate_limiter_throttled": c.txRateLimiterThrottled,
         "no_rx_avail_buffer": c.noRxAvailBuffer, "rx_filtered_frames": c.rxFiltered,
         "rx_malformed_chains": c.rxMalformedChains, "rx_event_count": c.rxInterrupts, "tx_event_count": c.txInterrupts]
    }

    /// Stops the periodic flush and closes the destination.
    public func close() {
        timerLock.withLock { _ in
            timer?.cancel()
            timer = nil
        }
        state.withLock { s in
            if s.fd >= 0 { Glibc.close(s.fd) }
            s.fd = -1
        }
    }
}

/// One top-level value of a metrics line.
enum MetricValue: Encodable, Equatable {
    case counters([String: UInt64])
    case number(UInt64)
    case text(String)
    case texts([String: String])

    func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .counters(let v): try c.encode(v)
        case .number(let v): try c.encode(v)
        case .text(let v): try c.encode(v)
        case .texts(let v): try c.encode(v)
        }
    }
}
