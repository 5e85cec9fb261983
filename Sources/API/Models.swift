// Request and response bodies of Firecracker's API (src/firecracker/swagger/firecracker.yaml),
// as Codable DTOs. Decoding is strict: unknown fields, missing required fields and wrong types
// are errors naming the field. Semantic checks (ranges, ids, files) are in `validate()`.
import FoundationEssentials
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// A token bucket of a rate limiter (`TokenBucket`): `size` tokens refilled in `refill_time` ms,
/// plus `one_time_burst` once. Enforced for drives, network interfaces and the entropy device; `PUT /serial`'s bucket
/// is accepted and echoed, not enforced.
public struct TokenBucket: Codable, Sendable, Equatable {
    public var size: Int64
    public var oneTimeBurst: Int64?
    public var refillTime: Int64

    enum CodingKeys: String, CodingKey, CaseIterable {
        case size, oneTimeBurst = "one_time_burst", refillTime = "refill_time"
    }
    public init(size: Int64, oneTimeBurst: Int64? = nil, refillTime: Int64) {
        self.size = size; self.oneTimeBurst = oneTimeBurst; self.refillTime = refillTime
    }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        size = try c.decodeInteger(Int64.self, forKey: .size)
        oneTimeBurst = try c.decodeIntegerIfPresent(Int64.self, forKey: .oneTimeBurst)
        refillTime = try c.decodeInteger(Int64.self, forKey: .refillTime)
    }
    func validate(_ field: String) throws(APIError) {
        guard size >= 0, refillTime >= 0, (oneTimeBurst ?? 0) >= 0 else {
            throw .badRequest("Invalid \(field): size, one_time_burst and refill_time must not be negative.")
        }
    }
}

/// A rate limiter (`RateLimiter`): bandwidth (bytes) and ops buckets.
public struct RateLimiter: Codable, Sendable, Equatable {
    public var bandwidth: TokenBucket?
    public var ops: TokenBucket?
    enum CodingKeys: String, CodingKey, CaseIterable { case bandwidth, ops }
    public init(bandwidth: TokenBucket? = nil, ops: TokenBucket? = nil) { self.bandwidth = bandwidth; self.ops = ops }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        bandwidth = try c.decodeIfPresent(TokenBucket.self, forKey: .bandwidth)
        ops = try c.decodeIfPresent(TokenBucket.self, forKey: .ops)
    }
    func validate(_ field: String) throws(APIError) {
        try bandwidth?.validate(field + ".bandwidth")
        try ops?.validate(field + ".ops")
    }
}

/// `PUT /boot-source` (`BootSource`).
public struct BootSourceConfig: Codable, Sendable, Equatable {
    public var kernelImagePath: String
    public var initrdPath: String?
    public var bootArgs: String?
    enum CodingKeys: String, CodingKey, CaseIterable {
        case kernelImagePath = "kernel_image_path", initrdPath = "initrd_path", bootArgs = "boot_args"
    }
    public init(kernelImagePath: String, initrdPath: String? = nil, bootArgs: String? = nil) {
        self.kernelImagePath = kernelImagePath; self.initrdPath = initrdPath; self.bootArgs = bootArgs
    }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        kernelImagePath = try c.decode(String.self, forKey: .kernelImagePath)
        initrdPath = try c.decodeIfPresent(String.self, forKey: .initrdPath)
        bootArgs = try c.decodeIfPresent(String.self, forKey: .bootArgs)
    }
    /// The files must be readable regular files (as Firecracker opens them when configured).
    func validate() throws(APIError) {
        try FileCheck.readableFile(kernelImagePath, what: "kernel file", field: "kernel_image_path")
        if let initrdPath { try FileCheck.readableFile(initrdPath, what: "initrd file", field: "initrd_path") }
        if let bootArgs, bootArgs.utf8.count > 4095 {
            throw .badRequest("Invalid boot_args: \(bootArgs.utf8.count) bytes, the limit is 4095.")
        }
    }
}

/// `PUT /machine-config` and `GET /machine-config` (`MachineConfiguration`).
public struct MachineConfig: Codable, Sendable, Equatable {
    public var vcpuCount: Int
    public var memSizeMib: Int
    public var smt: Bool
    public var cpuTemplate: String?
    public var trackDirtyPages: Bool
    public var hugePages: String

    /// Largest vCPU count (Firecracker's limit).
    public static let maxVCPUs = 32
    /// Firecracker's defaults: 1 vCPU, 128 MiB.
    public static let `default` = MachineConfig(vcpuCount: 1, memSizeMib: 128)

    enum CodingKeys: String, CodingKey, CaseIterable {
        case vcpuCount = "vcpu_count", memSizeMib = "mem_size_mib", smt, cpuTemplate = "cpu_template"
        case trackDirtyPages = "track_dirty_pages", hugePages = "huge_pages"
    }
    public init(vcpuCount: Int, memSizeMib: Int, smt: Bool = false, cpuTemplate: String? = nil,
                trackDirtyPages: Bool = false, hugePages: String = "None") {
        self.vcpuCount = vcpuCount; self.memSizeMib = memSizeMib; self.smt = smt
        self.cpuTemplate = cpuTemplate; self.trackDirtyPages = trackDirtyPages; self.hugePages = hugePages
    }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        vcpuCount = try c.decodeInteger(Int.self, forKey: .vcpuCount)
        memSizeMib = try c.decodeInteger(Int.self, forKey: .memSizeMib)
        smt = try c.decodeIfPresent(Bool.self, forKey: .smt) ?? false
        cpuTemplate = try c.decodeEnum(.cpuTemplate, allowed: Self.cpuTemplates)
        trackDirtyPages = try c.decodeIfPresent(Bool.self, forKey: .trackDirtyPages) ?? false
        hugePages = try c.decodeEnum(.hugePages, allowed: ["None", "Transparent", "2M"]) ?? "None"
    }
    static let cpuTemplates = ["C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"]

    /// Range checks and the features SwiftKVM does not have.
    func validate() throws(APIError) {
        guard vcpuCount >= 1, vcpuCount <= Self.maxVCPUs, !(smt && vcpuCount > 1 && vcpuCount % 2 == 1) else {
            throw .badRequest("Invalid vcpu_count \(vcpuCount): the number of vCPUs must be greater than 0, at most \(Self.maxVCPUs) and must be 1 or an even number if SMT is enabled.")
        }
        guard memSizeMib >= 2, memSizeMib <= 1 << 26 else {
            throw .badRequest("Invalid mem_size_mib \(memSizeMib): the memory size (MiB) must be between 2 and \(1 << 26).")
        }
        if smt { throw .notSupportedYet("machine-config smt = true (SMT topology)") }
        if let t = cpuTemplate, t != "None" { throw .notSupportedYet("machine-config cpu_template \(t)") }
    }
}

/// `PATCH /machine-config`: every field optional, at least one present.
public struct MachineConfigUpdate: Codable, Sendable, Equatable {
    public var vcpuCount: Int?
    public var memSizeMib: Int?
    public var smt: Bool?
    public var cpuTemplate: String?
    public var trackDirtyPages: Bool?
    public var hugePages: String?
    typealias CodingKeys = MachineConfig.CodingKeys
    public init(vcpuCount: Int? = nil, memSizeMib: Int? = nil) { self.vcpuCount = vcpuCount; self.memSizeMib = memSizeMib }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        vcpuCount = try c.decodeIntegerIfPresent(Int.self, forKey: .vcpuCount)
        memSizeMib = try c.decodeIntegerIfPresent(Int.self, forKey: .memSizeMib)
        smt = try c.decodeIfPresent(Bool.self, forKey: .smt)
        cpuTemplate = try c.decodeEnum(.cpuTemplate, allowed: MachineConfig.cpuTemplates)
        trackDirtyPages = try c.decodeIfPresent(Bool.self, forKey: .trackDirtyPages)
        hugePages = try c.decodeEnum(.hugePages, allowed: ["None", "Transparent", "2M"])
    }
    var isEmpty: Bool {
        vcpuCount == nil && memSizeMib == nil && smt == nil && cpuTemplate == nil && trackDirtyPages == nil && hugePages == nil
    }
    /// `base` with the present fields replaced.
    func applied(to base: MachineConfig) -> MachineConfig {
        var m = base
        if let vcpuCount { m.vcpuCount = vcpuCount }
        if let memSizeMib { m.memSizeMib = memSizeMib }
        if let smt { m.smt = smt }
        if let cpuTemplate { m.cpuTemplate = cpuTemplate }
        if let trackDirtyPages { m.trackDirtyPages = trackDirtyPages }
        if let hugePages { m.hugePages = hugePages }
        return m
    }
}

/// `PUT /drives/{drive_id}` (`Drive`).
public struct DriveConfig: Codable, Sendable, Equatable {
    public var driveId: String
    public var pathOnHost: String?
    public var isRootDevice: Bool
    public var isReadOnly: Bool?
    public var partuuid: String?
    public var cacheType: String?
    public var ioEngine: String?
    public var rateLimiter: RateLimiter?
    public var socket: String?
    enum CodingKeys: String, CodingKey, CaseIterable {
        case driveId = "drive_id", pathOnHost = "path_on_host", isRootDevice = "is_root_device"
        case isReadOnly = "is_read_only", partuuid, cacheType = "cache_type", ioEngine = "io_engine"
        case rateLimiter = "rate_limiter", socket
    }
    public init(driveId: String, pathOnHost: String?, isRootDevice: Bool, isReadOnly: Bool? = nil) {
        self.driveId = driveId; self.pathOnHost = pathOnHost; self.isRootDevice = isRootDevice; self.isReadOnly = isReadOnly
    }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        driveId = try c.decode(String.self, forKey: .driveId)
        pathOnHost = try c.decodeIfPresent(String.self, forKey: .pathOnHost)
        isRootDevice = try c.decode(Bool.self, forKey: .isRootDevice)
        isReadOnly = try c.decodeIfPresent(Bool.self, forKey: .isReadOnly)
        partuuid = try c.decodeIfPresent(String.self, forKey: .partuuid)
        cacheType = try c.decodeEnum(.cacheType, allowed: ["Unsafe", "Writeback"])
        ioEngine = try c.decodeEnum(.ioEngine, allowed: ["Sync", "Async"])
        rateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .rateLimiter)
        socket = try c.decodeIfPresent(String.self, forKey: .socket)
    }
    func validate() throws(APIError) {
        try ResourceID.check(driveId, field: "drive_id")
        if socket != nil { throw .notSupportedYet("vhost-user block devices (drive field socket)") }
        guard let pathOnHost else {
            throw .badRequest("Invalid drive \(driveId): path_on_host is required for a virtio-block drive.")
        }
        try FileCheck.readableFile(pathOnHost, what: "drive backing file", field: "path_on_host")
        try rateLimiter?.validate("rate_limiter")
    }
}

/// `PATCH /drives/{drive_id}` (`PartialDrive`).
public struct DriveUpdate: Codable, Sendable, Equatable {
    public var driveId: String
    public var pathOnHost: String?
    public var rateLimiter: RateLimiter?
    enum CodingKeys: String, CodingKey, CaseIterable {
        case driveId = "drive_id", pathOnHost = "path_on_host", rateLimiter = "rate_limiter"
    }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        driveId = try c.decode(String.self, forKey: .driveId)
        pathOnHost = try c.decodeIfPresent(String.self, forKey: .pathOnHost)
        rateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .rateLimiter)
    }
}

/// `PUT /network-interfaces/{iface_id}` (`NetworkInterface`): a virtio-net NIC on the existing TAP
/// `host_dev_name` (opened at InstanceStart), with `guest_mac` (else a MAC derived from the VM id
/// and `iface_id`) and per-direction rate limiters (enforced; changed at run time by PATCH).
public struct NetworkInterfaceConfig: Codable, Sendable, Equatable {
    public var ifaceId: String
    public var hostDevName: String
    public var guestMac: String?
    public var mtu: Int?
    public var rxRateLimiter: RateLimiter?
    public var txRateLimiter: RateLimiter?
    enum CodingKeys: String, CodingKey, CaseIterable {
        case ifaceId = "iface_id", hostDevName = "host_dev_name", guestMac = "guest_mac", mtu
        case rxRateLimiter = "rx_rate_limiter", txRateLimiter = "tx_rate_limiter"
    }
    public init(ifaceId: String, hostDevName: String, guestMac: String? = nil) {
        self.ifaceId = ifaceId; self.hostDevName = hostDevName; self.guestMac = guestMac
    }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        ifaceId = try c.decode(String.self, forKey: .ifaceId)
        hostDevName = try c.decode(String.self, forKey: .hostDevName)
        guestMac = try c.decodeIfPresent(String.self, forKey: .guestMac)
        mtu = try c.decodeIntegerIfPresent(Int.self, forKey: .mtu)
        rxRateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .rxRateLimiter)
        txRateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .txRateLimiter)
    }
    func validate() throws(APIError) {
        try ResourceID.check(ifaceId, field: "iface_id")
        guard !hostDevName.isEmpty, hostDevName.utf8.count < 16, !hostDevName.contains("/"), !hostDevName.contains(" ") else {
            throw .badRequest("Invalid host_dev_name '\(hostDevName)': a tap device name of 1 to 15 characters without '/' or spaces is expected.")
        }
        if let guestMac, !Self.isMAC(guestMac) {
            throw .badRequest("Invalid guest_mac '\(guestMac)': expected six hex octets separated by ':', e.g. 06:00:AC:10:00:02.")
        }
        if let mtu, mtu < 68 || mtu > 65535 {
            throw .badRequest("Invalid mtu \(mtu): must be between 68 and 65535.")
        }
        try rxRateLimiter?.validate("rx_rate_limiter")
        try txRateLimiter?.validate("tx_rate_limiter")
    }
    static func isMAC(_ s: String) -> Bool {
        let parts = s.split(separator: ":", omittingEmptySubsequences: false)
        return parts.count == 6 && parts.allSatisfy { $0.count == 2 && UInt8($0, radix: 16) != nil }
    }
}

/// `PATCH /network-interfaces/{iface_id}` (`PartialNetworkInterface`).
public struct NetworkInterfaceUpdate: Codable, Sendable, Equatable {
    public var ifaceId: String
    public var rxRateLimiter: RateLimiter?
    public var txRateLimiter: RateLimiter?
    enum CodingKeys: String, CodingKey, CaseIterable {
        case ifaceId = "iface_id", rxRateLimiter = "rx_rate_limiter", txRateLimiter = "tx_rate_limiter"
    }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        ifaceId = try c.decode(String.self, forKey: .ifaceId)
        rxRateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .rxRateLimiter)
        txRateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .txRateLimiter)
    }
}

/// `PUT /actions` (`InstanceActionInfo`).
public struct InstanceActionInfo: Codable, Sendable, Equatable {
    /// The action.
    public enum ActionType: String, Codable, Sendable, CaseIterable {
        case flushMetrics = "FlushMetrics", instanceStart = "InstanceStart", sendCtrlAltDel = "SendCtrlAltDel"
    }
    public var actionType: ActionType
    enum CodingKeys: String, CodingKey, CaseIterable { case actionType = "action_type" }
    public init(actionType: ActionType) { self.actionType = actionType }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        guard let name = try c.decodeEnum(.actionType, allowed: ActionType.allCases.map(\.rawValue)),
              let type = ActionType(rawValue: name) else {
            throw DecodingError.keyNotFound(CodingKeys.actionType, .init(codingPath: c.codingPath, debugDescription: "missing"))
        }
        actionType = type
    }
}

/// `PATCH /vm` (`Vm`).
public struct VMStateRequest: Codable, Sendable, Equatable {
    public enum State: String, Codable, Sendable, CaseIterable { case paused = "Paused", resumed = "Resumed" }
    public var state: State
    enum CodingKeys: String, CodingKey, CaseIterable { case state }
    public init(state: State) { self.state = state }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        guard let name = try c.decodeEnum(.state, allowed: State.allCases.map(\.rawValue)), let s = State(rawValue: name) else {
            throw DecodingError.keyNotFound(CodingKeys.state, .init(codingPath: c.codingPath, debugDescription: "missing"))
        }
        state = s
    }
}

/// `PUT /logger` (`Logger`).
public struct LoggerConfig: Codable, Sendable, Equatable {
    public var logPath: String?
    public var level: String?
    public var showLevel: Bool?
    public var showLogOrigin: Bool?
    public var module: String?
    static let levels = ["Error", "Warning", "Info", "Debug", "Trace", "Off"]
    enum CodingKeys: String, CodingKey, CaseIterable {
        case logPath = "log_path", level, showLevel = "show_level", showLogOrigin = "show_log_origin", module
    }
    public init(logPath: String? = nil, level: String? = nil, showLevel: Bool? = nil, showLogOrigin: Bool? = nil) {
        self.logPath = logPath; self.level = level; self.showLevel = showLevel; self.showLogOrigin = showLogOrigin
    }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        logPath = try c.decodeIfPresent(String.self, forKey: .logPath)
        level = try c.decodeEnum(.level, allowed: Self.levels, caseInsensitive: true)
        showLevel = try c.decodeIfPresent(Bool.self, forKey: .showLevel)
        showLogOrigin = try c.decodeIfPresent(Bool.self, forKey: .showLogOrigin)
        module = try c.decodeIfPresent(String.self, forKey: .module)
    }
}

/// `PUT /metrics` (`Metrics`).
public struct MetricsConfig: Codable, Sendable, Equatable {
    public var metricsPath: String
    public var emitId: Bool?
    public var properties: [String: String]?
    enum CodingKeys: String, CodingKey, CaseIterable { case metricsPath = "metrics_path", emitId = "emit_id", properties }
    public init(metricsPath: String) { self.metricsPath = metricsPath }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        metricsPath = try c.decode(String.self, forKey: .metricsPath)
        emitId = try c.decodeIfPresent(Bool.self, forKey: .emitId)
        properties = try c.decodeIfPresent([String: String].self, forKey: .properties)
    }
}

/// `PUT /entropy` (`EntropyDevice`). Stored; no virtio-rng device yet.
public struct EntropyDeviceConfig: Codable, Sendable, Equatable {
    public var rateLimiter: RateLimiter?
    enum CodingKeys: String, CodingKey, CaseIterable { case rateLimiter = "rate_limiter" }
    public init(rateLimiter: RateLimiter? = nil) { self.rateLimiter = rateLimiter }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        rateLimiter = try c.decodeIfPresent(RateLimiter.self, forKey: .rateLimiter)
    }
}

/// `PUT /cpu-config` (`CpuConfig`, x86): Firecracker's custom CPU template. `cpuid_modifiers` change CPUID registers
/// (`leaf`, `subleaf` as "0x…" strings or numbers, `flags`, `modifiers` of `register` and `bitmap`), `msr_modifiers` MSRs
/// (`addr`, `bitmap`); a bitmap is `0b` then 0, 1 or x per bit, most significant first (`CPUTemplate.Bits`).
/// `kvm_capabilities` lists `KVM_CAP_*` numbers the host must have ("N"), or that need not be checked ("!N").
/// `vcpu_features` and `reg_modifiers` are aarch64's and refused.
public struct CPUConfig: Codable, Sendable, Equatable {
    public struct RegisterModifier: Codable, Sendable, Equatable {
        public var register: String
        public var bitmap: String
        enum CodingKeys: String, CodingKey, CaseIterable { case register, bitmap }
        public init(register: String, bitmap: String) { self.register = register; self.bitmap = bitmap }
        public init(from decoder: any Decoder) throws {
            let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
            register = try c.decode(String.self, forKey: .register)
            bitmap = try c.decode(String.self, forKey: .bitmap)
        }
    }
    public struct CPUIDModifier: Codable, Sendable, Equatable {
        public var leaf: String
        public var subleaf: String
        public var flags: Int64
        public var modifiers: [RegisterModifier]
        enum CodingKeys: String, CodingKey, CaseIterable { case leaf, subleaf, flags, modifiers }
        public init(leaf: String, subleaf: String, flags: Int64 = 0, modifiers: [RegisterModifier]) {
            self.leaf = leaf; self.subleaf = subleaf; self.flags = flags; self.modifiers = modifiers
        }
        public init(from decoder: any Decoder) throws {
            let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
            leaf = try CPUConfig.numberText(c, .leaf)
            subleaf = try CPUConfig.numberText(c, .subleaf)
            flags = try c.decodeIntegerIfPresent(Int64.self, forKey: .flags) ?? 0
            modifiers = try c.decode([RegisterModifier].self, forKey: .modifiers)
        }
    }
    public struct MSRModifier: Codable, Sendable, Equatable {
        public var addr: String
        public var bitmap: String
        enum CodingKeys: String, CodingKey, CaseIterable { case addr, bitmap }
        public init(addr: String, bitmap: String) { self.addr = addr; self.bitmap = bitmap }
        public init(from decoder: any Decoder) throws {
            let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
            addr = try CPUConfig.numberText(c, .addr)
            bitmap = try c.decode(String.self, forKey: .bitmap)
        }
    }

    public var kvmCapabilities: [String]?
    public var cpuidModifiers: [CPUIDModifier]?
    public var msrModifiers: [MSRModifier]?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case kvmCapabilities = "kvm_capabilities", cpuidModifiers = "cpuid_modifiers", msrModifiers = "msr_modifiers"
        case vcpuFeatures = "vcpu_features", regModifiers = "reg_modifiers"
    }
    public init(kvmCapabilities: [String]? = nil, cpuidModifiers: [CPUIDModifier]? = nil, msrModifiers: [MSRModifier]? = nil) {
        self.kvmCapabilities = kvmCapabilities; self.cpuidModifiers = cpuidModifiers; self.msrModifiers = msrModifiers
    }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        for key in [CodingKeys.vcpuFeatures, .regModifiers] where c.contains(key) {
            throw DecodingError.dataCorruptedError(forKey: key, in: c, debugDescription: "`\(key.stringValue)` is for aarch64 hosts; this is x86")
        }
        kvmCapabilities = try c.decodeIfPresent([String].self, forKey: .kvmCapabilities)
        cpuidModifiers = try c.decodeIfPresent([CPUIDModifier].self, forKey: .cpuidModifiers)
        msrModifiers = try c.decodeIfPresent([MSRModifier].self, forKey: .msrModifiers)
    }
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encodeIfPresent(kvmCapabilities, forKey: .kvmCapabilities)
        try c.encodeIfPresent(cpuidModifiers, forKey: .cpuidModifiers)
        try c.encodeIfPresent(msrModifiers, forKey: .msrModifiers)
    }

    /// A leaf, subleaf or address given as a string ("0x1", "1") or a JSON number, as text.
    static func numberText<K: CodingKey>(_ c: KeyedDecodingContainer<K>, _ key: K) throws -> String {
        if let s = try? c.decode(String.self, forKey: key) { return s }
        return String(try c.decodeInteger(UInt64.self, forKey: key))
    }

    /// The VMM's template; each problem is a 400 naming the field and value.
    public func template() throws(APIError) -> CPUTemplate {
        func number(_ text: String, _ field: String, max: UInt64) throws(APIError) -> UInt64 {
            let t = text.lowercased().filter { $0 != "_" }
            let v = t.hasPrefix("0x") ? UInt64(t.dropFirst(2), radix: 16) : t.hasPrefix("0b") ? UInt64(t.dropFirst(2), radix: 2) : UInt64(t)
            guard let v, v <= max else { throw .badRequest("Invalid \(field) '\(text)': expected a number up to 0x\(String(max, radix: 16)) (decimal, 0x hex or 0b binary).") }
            return v
        }
        func bits(_ bitmap: String, width: Int, field: String) throws(APIError) -> CPUTemplate.Bits {
            do { return try CPUTemplate.Bits(bitmap: bitmap, width: width, what: field) } catch {
                throw .badRequest("Invalid \(field) '\(bitmap)': a bitmap is 0b and up to \(width) digits 0, 1 or x.")
            }
        }
        var t = CPUTemplate()
        for m in cpuidModifiers ?? [] {
            let leaf = UInt32(try number(m.leaf, "cpuid_modifiers leaf", max: UInt64(UInt32.max)))
            let subleaf = UInt32(try number(m.subleaf, "cpuid_modifiers subleaf", max: UInt64(UInt32.max)))
            // KVM_CPUID_FLAG_SIGNIFCANT_INDEX, _STATEFUL_FUNC, _STATE_READ_NEXT: the entry KVM reports keeps its own.
            guard (0...7).contains(m.flags) else {
                throw .badRequest("Invalid cpuid_modifiers flags \(m.flags) of leaf \(m.leaf): expected a combination of 1, 2 and 4 (KVM_CPUID_FLAG_*).")
            }
            for r in m.modifiers {
                guard let reg = CPUIDMask.Register(rawValue: r.register.lowercased()) else {
                    throw .badRequest("Invalid cpuid_modifiers register '\(r.register)' of leaf \(m.leaf): expected eax, ebx, ecx or edx.")
                }
                t.cpuid.append(.init(leaf: leaf, subleaf: subleaf, register: reg,
                                     bits: try bits(r.bitmap, width: 32, field: "cpuid_modifiers bitmap")))
            }
        }
        for m in msrModifiers ?? [] {
            let addr = UInt32(try number(m.addr, "msr_modifiers addr", max: UInt64(UInt32.max)))
            t.msrs.append(.init(address: addr, bits: try bits(m.bitmap, width: 64, field: "msr_modifiers bitmap")))
        }
        for cap in kvmCapabilities ?? [] {
            let negated = cap.hasPrefix("!")
            guard let n = UInt32(negated ? String(cap.dropFirst()) : cap) else {
                throw .badRequest("Invalid kvm_capabilities entry '\(cap)': expected a KVM_CAP_* number, or !number.")
            }
            if !negated { t.requiredCapabilities.append(n) }
        }
        return t
    }
}

/// `PUT /vsock` (`Vsock`): a virtio-vsock device with CID `guest_cid` whose host side is the Unix
/// socket `uds_path` (Firecracker's muxer: `CONNECT <port>` from the host, `<uds_path>_<port>` for
/// connections from the guest). `vsock_id` is accepted and ignored, as Firecracker deprecated it.
public struct VsockConfig: Codable, Sendable, Equatable {
    public var vsockId: String?
    public var guestCid: Int64
    public var udsPath: String
    enum CodingKeys: String, CodingKey, CaseIterable {
        case vsockId = "vsock_id", guestCid = "guest_cid", udsPath = "uds_path"
    }
    public init(guestCid: Int64, udsPath: String) { self.guestCid = guestCid; self.udsPath = udsPath }
    /// The same with `vsock_id` set.
    public func with(id: String?) -> VsockConfig { var c = self; c.vsockId = id; return c }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        vsockId = try c.decodeIfPresent(String.self, forKey: .vsockId)
        guestCid = try c.decodeInteger(Int64.self, forKey: .guestCid)
        udsPath = try c.decode(String.self, forKey: .udsPath)
    }
}

/// `PUT /serial` (`SerialDevice`): where the guest's serial output goes (default: stdout).
public struct SerialDeviceConfig: Codable, Sendable, Equatable {
    public var serialOutPath: String?
    public var rateLimiter: TokenBucket?
    enum CodingKeys: String, CodingKey, CaseIterable { case serialOutPath = "serial_out_path", rateLimiter = "rate_limiter" }
    public init(serialOutPath: String?) { self.serialOutPath = serialOutPath }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        serialOutPath = try c.decodeIfPresent(String.self, forKey: .serialOutPath)
        rateLimiter = try c.decodeIfPresent(TokenBucket.self, forKey: .rateLimiter)
    }
}

/// `GET /` (`InstanceInfo`).
public struct InstanceInfo: Codable, Sendable, Equatable {
    public var appName: String
    public var id: String
    /// "Not started", "Running" or "Paused".
    public var state: String
    public var vmmVersion: String
    enum CodingKeys: String, CodingKey { case appName = "app_name", id, state, vmmVersion = "vmm_version" }
}

/// `GET /version`.
public struct VersionInfo: Codable, Sendable, Equatable {
    public var firecrackerVersion: String
    enum CodingKeys: String, CodingKey { case firecrackerVersion = "firecracker_version" }
}

/// The whole configuration: `GET /vm/config` and the `--config-file` format (`FullVmConfiguration`).
public struct FullVMConfiguration: Codable, Sendable, Equatable {
    public var bootSource: BootSourceConfig?
    public var machineConfig: MachineConfig?
    public var drives: [DriveConfig]
    public var networkInterfaces: [NetworkInterfaceConfig]
    public var logger: LoggerConfig?
    public var metrics: MetricsConfig?
    public var entropy: EntropyDeviceConfig?
    public var serial: SerialDeviceConfig?
    public var vsock: VsockConfig?
    public var balloon: BalloonConfig?
    /// The custom CPU template (`GET /vm/config` reports it as an object).
    public var cpuConfig: CPUConfig?
    /// In a `--config-file`, Firecracker's `cpu-config` is the path of the template's JSON file.
    public var cpuConfigPath: String?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case bootSource = "boot-source", machineConfig = "machine-config", drives
        case networkInterfaces = "network-interfaces", logger, metrics, entropy, serial
        // Known to Firecracker; refused with "not supported yet" when present and not null.
        case balloon, vsock, mmdsConfig = "mmds-config", cpuConfig = "cpu-config", pmem
        case memoryHotplug = "memory-hotplug"
    }
    static let unsupported: [CodingKeys] = [.mmdsConfig, .pmem, .memoryHotplug]

    public init() { drives = []; networkInterfaces = [] }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        for key in Self.unsupported where c.contains(key) {
            if try c.decodeNil(forKey: key) { continue }
            if key == .pmem, let list = try? c.decode([AnyJSON].self, forKey: key), list.isEmpty { continue }
            throw DecodingError.dataCorruptedError(forKey: key, in: c,
                debugDescription: "`\(key.stringValue)` is not supported yet by SwiftKVM")
        }
        bootSource = try c.decodeIfPresent(BootSourceConfig.self, forKey: .bootSource)
        machineConfig = try c.decodeIfPresent(MachineConfig.self, forKey: .machineConfig)
        drives = try c.decodeIfPresent([DriveConfig].self, forKey: .drives) ?? []
        networkInterfaces = try c.decodeIfPresent([NetworkInterfaceConfig].self, forKey: .networkInterfaces) ?? []
        logger = try c.decodeIfPresent(LoggerConfig.self, forKey: .logger)
        metrics = try c.decodeIfPresent(MetricsConfig.self, forKey: .metrics)
        entropy = try c.decodeIfPresent(EntropyDeviceConfig.self, forKey: .entropy)
        serial = try c.decodeIfPresent(SerialDeviceConfig.self, forKey: .serial)
        vsock = try c.decodeIfPresent(VsockConfig.self, forKey: .vsock)
        balloon = try c.decodeIfPresent(BalloonConfig.self, forKey: .balloon)
        if let path = try? c.decodeIfPresent(String.self, forKey: .cpuConfig) {
            cpuConfigPath = path
        } else {
            cpuConfig = try c.decodeIfPresent(CPUConfig.self, forKey: .cpuConfig)
        }
    }

    /// Encodes as Firecracker does: every section present, absent ones as null.
    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(balloon, forKey: .balloon)
        try c.encode(drives, forKey: .drives)
        try c.encode(bootSource, forKey: .bootSource)
        try c.encode(cpuConfig, forKey: .cpuConfig)
        try c.encode(logger, forKey: .logger)
        try c.encode(machineConfig, forKey: .machineConfig)
        try c.encode(metrics, forKey: .metrics)
        try c.encodeNil(forKey: .mmdsConfig)
        try c.encode(networkInterfaces, forKey: .networkInterfaces)
        try c.encode(vsock, forKey: .vsock)
        try c.encode(entropy, forKey: .entropy)
        try c.encode(serial, forKey: .serial)
    }
}

/// Any JSON value (only to look at a field's shape).
struct AnyJSON: Decodable {
    init(from decoder: any Decoder) throws {}
}

/// Resource ids in paths and bodies: alphanumeric characters and underscores (as Firecracker).
enum ResourceID {
    static func check(_ id: String, field: String) throws(APIError) {
        guard !id.isEmpty else { throw .badRequest("The ID cannot be empty (\(field)).") }
        guard id.utf8.count <= 64, id.unicodeScalars.allSatisfy({ $0.isASCII && ($0 == "_" || $0.properties.isAlphabetic || $0.properties.numericType != nil) }) else {
            throw .badRequest("Invalid \(field) '\(id)': API Resource IDs can only contain alphanumeric characters and underscores (at most 64).")
        }
    }
}

/// Host file checks for paths in requests.
enum FileCheck {
    static func readableFile(_ path: String, what: String, field: String) throws(APIError) {
        guard !path.isEmpty else { throw .badRequest("Invalid \(field): the path is empty.") }
        // A C path ends at the first NUL: the file opened would not be the one named.
        guard !path.utf8.contains(0) else { throw .badRequest("Invalid \(field): the path contains a NUL byte.") }
        var st = stat()
        guard stat(path, &st) == 0 else {
            throw .badRequest("Invalid \(field): the \(what) \(path) cannot be opened: \(String(cString: strerror(errno))).")
        }
        guard (st.st_mode & S_IFMT) == S_IFREG || (st.st_mode & S_IFMT) == S_IFBLK else {
            throw .badRequest("Invalid \(field): the \(what) \(path) is not a regular file.")
        }
        guard access(path, R_OK) == 0 else {
            throw .badRequest("Invalid \(field): the \(what) \(path) is not readable: \(String(cString: strerror(errno))).")
        }
    }
}

/// `PUT /snapshot/create` (`SnapshotCreateParams`): the VM must be paused.
public struct SnapshotCreateParams: Codable, Sendable, Equatable {
    public var snapshotType: String?
    public var snapshotPath: String
    public var memFilePath: String
    enum CodingKeys: String, CodingKey, CaseIterable {
        case snapshotType = "snapshot_type", snapshotPath = "snapshot_path", memFilePath = "mem_file_path"
    }
    public init(snapshotPath: String, memFilePath: String, snapshotType: String? = nil) {
        self.snapshotPath = snapshotPath; self.memFilePath = memFilePath; self.snapshotType = snapshotType
    }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        snapshotType = try c.decodeIfPresent(String.self, forKey: .snapshotType)
        snapshotPath = try c.decode(String.self, forKey: .snapshotPath)
        memFilePath = try c.decode(String.self, forKey: .memFilePath)
    }
}

/// `PUT /balloon` (Firecracker's `Balloon`): the balloon device, before InstanceStart.
public struct BalloonConfig: Codable, Sendable, Equatable {
    public var amountMib: Int
    public var deflateOnOom: Bool
    public var statsPollingIntervalS: Int
    public var freePageReporting: Bool
    enum CodingKeys: String, CodingKey, CaseIterable {
        case amountMib = "amount_mib", deflateOnOom = "deflate_on_oom", statsPollingIntervalS = "stats_polling_interval_s"
        case freePageReporting = "free_page_reporting"
    }
    public init(amountMib: Int, deflateOnOom: Bool, statsPollingIntervalS: Int = 0, freePageReporting: Bool = false) {
        self.amountMib = amountMib; self.deflateOnOom = deflateOnOom
        self.statsPollingIntervalS = statsPollingIntervalS; self.freePageReporting = freePageReporting
    }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        amountMib = try c.decode(Int.self, forKey: .amountMib)
        deflateOnOom = try c.decode(Bool.self, forKey: .deflateOnOom)
        statsPollingIntervalS = try c.decodeIfPresent(Int.self, forKey: .statsPollingIntervalS) ?? 0
        freePageReporting = try c.decodeIfPresent(Bool.self, forKey: .freePageReporting) ?? false
    }
}

/// `PATCH /balloon`: a new target size.
public struct BalloonUpdate: Codable, Sendable, Equatable {
    public var amountMib: Int
    enum CodingKeys: String, CodingKey, CaseIterable { case amountMib = "amount_mib" }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        amountMib = try c.decode(Int.self, forKey: .amountMib)
    }
}

/// `PATCH /balloon/statistics`: a new polling interval.
public struct BalloonStatsUpdate: Codable, Sendable, Equatable {
    public var statsPollingIntervalS: Int
    enum CodingKeys: String, CodingKey, CaseIterable { case statsPollingIntervalS = "stats_polling_interval_s" }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        statsPollingIntervalS = try c.decode(Int.self, forKey: .statsPollingIntervalS)
    }
}

/// `PUT /migrate` (a SwiftKVM extension): live-migrate the running VM to a `swiftkvm vmm --incoming`
/// at `destination` (`unix:PATH` or `tcp:HOST:PORT`), with at most `max_downtime_ms` (default 300) of
/// pause for the last pass.
public struct MigrateParams: Codable, Sendable, Equatable {
    public var destination: String
    public var maxDowntimeMs: Int?
    enum CodingKeys: String, CodingKey, CaseIterable { case destination, maxDowntimeMs = "max_downtime_ms" }
    public init(destination: String, maxDowntimeMs: Int? = nil) { self.destination = destination; self.maxDowntimeMs = maxDowntimeMs }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        destination = try c.decode(String.self, forKey: .destination)
        maxDowntimeMs = try c.decodeIfPresent(Int.self, forKey: .maxDowntimeMs)
    }
}

/// `mem_backend` of `PUT /snapshot/load`: where guest memory comes from.
public struct SnapshotMemoryBackend: Codable, Sendable, Equatable {
    public var backendType: String
    public var backendPath: String
    enum CodingKeys: String, CodingKey, CaseIterable { case backendType = "backend_type", backendPath = "backend_path" }
    public init(backendType: String, backendPath: String) { self.backendType = backendType; self.backendPath = backendPath }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        backendType = try c.decode(String.self, forKey: .backendType)
        backendPath = try c.decode(String.self, forKey: .backendPath)
    }
}

/// An entry of `network_overrides` in `PUT /snapshot/load`: the host TAP a NIC of the snapshot uses
/// from now on (a restored copy cannot share its source's TAP).
public struct NetworkOverride: Codable, Sendable, Equatable {
    public var ifaceId: String
    public var hostDevName: String
    enum CodingKeys: String, CodingKey, CaseIterable { case ifaceId = "iface_id", hostDevName = "host_dev_name" }
    public init(ifaceId: String, hostDevName: String) { self.ifaceId = ifaceId; self.hostDevName = hostDevName }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        ifaceId = try c.decode(String.self, forKey: .ifaceId)
        hostDevName = try c.decode(String.self, forKey: .hostDevName)
    }
}

/// `vsock_override` in `PUT /snapshot/load`: the Unix socket the restored vsock device listens on.
public struct VsockOverride: Codable, Sendable, Equatable {
    public var udsPath: String
    enum CodingKeys: String, CodingKey, CaseIterable { case udsPath = "uds_path" }
    public init(udsPath: String) { self.udsPath = udsPath }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        udsPath = try c.decode(String.self, forKey: .udsPath)
    }
}

/// `PUT /snapshot/load` (`SnapshotLoadParams`): only before anything was configured.
public struct SnapshotLoadParams: Codable, Sendable, Equatable {
    public var snapshotPath: String
    /// Deprecated in Firecracker in favour of `mem_backend`; exactly one of the two is given.
    public var memFilePath: String?
    public var memBackend: SnapshotMemoryBackend?
    public var enableDiffSnapshots: Bool?
    public var trackDirtyPages: Bool?
    public var resumeVM: Bool?
    /// Other host TAPs for the snapshot's NICs, by `iface_id`.
    public var networkOverrides: [NetworkOverride]?
    /// Another Unix socket for the snapshot's vsock device.
    public var vsockOverride: VsockOverride?
    enum CodingKeys: String, CodingKey, CaseIterable {
        case snapshotPath = "snapshot_path", memFilePath = "mem_file_path", memBackend = "mem_backend"
        case enableDiffSnapshots = "enable_diff_snapshots", trackDirtyPages = "track_dirty_pages", resumeVM = "resume_vm"
        case networkOverrides = "network_overrides", vsockOverride = "vsock_override"
    }
    public init(snapshotPath: String, memBackend: SnapshotMemoryBackend?, resumeVM: Bool? = nil) {
        self.snapshotPath = snapshotPath; self.memBackend = memBackend; self.resumeVM = resumeVM
    }
    public init(from decoder: any Decoder) throws {
        let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
        snapshotPath = try c.decode(String.self, forKey: .snapshotPath)
        memFilePath = try c.decodeIfPresent(String.self, forKey: .memFilePath)
        memBackend = try c.decodeIfPresent(SnapshotMemoryBackend.self, forKey: .memBackend)
        enableDiffSnapshots = try c.decodeIfPresent(Bool.self, forKey: .enableDiffSnapshots)
        trackDirtyPages = try c.decodeIfPresent(Bool.self, forKey: .trackDirtyPages)
        resumeVM = try c.decodeIfPresent(Bool.self, forKey: .resumeVM)
        networkOverrides = try c.decodeIfPresent([NetworkOverride].self, forKey: .networkOverrides)
        vsockOverride = try c.decodeIfPresent(VsockOverride.self, forKey: .vsockOverride)
    }
}
