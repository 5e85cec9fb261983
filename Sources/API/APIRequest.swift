/// One parsed API request: the action the controller carries out (Firecracker's `VmmAction`).
///
/// `APIRequest.parse` maps method, path and body to an action, or to an `APIError` with
/// Firecracker's status and message: an unknown path or method is 400 "Invalid request method
/// and/or path: METHOD /path.", a PUT/PATCH without a body 400 "Empty PUT request.", a GET with a
/// body 400 "GET request cannot have a body.", a bad body 400 naming the field.
public enum APIRequest: Sendable, Equatable {
    case getInstanceInfo
    case getVersion
    case getMachineConfig
    case getFullConfig
    case putBootSource(BootSourceConfig)
    case putMachineConfig(MachineConfig)
    case patchMachineConfig(MachineConfigUpdate)
    case putDrive(DriveConfig)
    case patchDrive(DriveUpdate)
    case putNetworkInterface(NetworkInterfaceConfig)
    case putVsock(VsockConfig)
    case putSnapshotCreate(SnapshotCreateParams)
    case putSnapshotLoad(SnapshotLoadParams)
    case putMigrate(MigrateParams)
    case putBalloon(BalloonConfig)
    case patchBalloon(BalloonUpdate)
    case getBalloon
    case getBalloonStatistics
    case patchBalloonStatistics(BalloonStatsUpdate)
    case patchNetworkInterface(NetworkInterfaceUpdate)
    case action(InstanceActionInfo.ActionType)
    case patchVM(VMStateRequest.State)
    case putLogger(LoggerConfig)
    case putMetrics(MetricsConfig)
    case putEntropy(EntropyDeviceConfig)
    case putCPUConfig(CPUConfig)
    case putSerial(SerialDeviceConfig)

    /// A short name for logs and metrics, e.g. "PUT /boot-source".
    public var name: String {
        switch self {
        case .getInstanceInfo: return "GET /"
        case .getVersion: return "GET /version"
        case .getMachineConfig: return "GET /machine-config"
        case .getFullConfig: return "GET /vm/config"
        case .putBootSource: return "PUT /boot-source"
        case .putMachineConfig: return "PUT /machine-config"
        case .patchMachineConfig: return "PATCH /machine-config"
        case .putDrive: return "PUT /drives"
        case .patchDrive: return "PATCH /drives"
        case .putNetworkInterface: return "PUT /network-interfaces"
        case .patchNetworkInterface: return "PATCH /network-interfaces"
        case .action(let a): return "PUT /actions \(a.rawValue)"
        case .patchVM(let s): return "PATCH /vm \(s.rawValue)"
        case .putLogger: return "PUT /logger"
        case .putMetrics: return "PUT /metrics"
        case .putEntropy: return "PUT /entropy"
        case .putCPUConfig: return "PUT /cpu-config"
        case .putSerial: return "PUT /serial"
        case .putVsock: return "PUT /vsock"
        case .putSnapshotCreate: return "PUT /snapshot/create"
        case .putSnapshotLoad: return "PUT /snapshot/load"
        case .putMigrate: return "PUT /migrate"
        case .putBalloon: return "PUT /balloon"
        case .patchBalloon: return "PATCH /balloon"
        case .getBalloon: return "GET /balloon"
        case .getBalloonStatistics: return "GET /balloon/statistics"
        case .patchBalloonStatistics: return "PATCH /balloon/statistics"
        }
    }

    /// Firecracker endpoints SwiftKVM does not implement yet (first path segment).
    static let unsupportedResources: [String: String] = [
        "mmds": "The microVM metadata service (MMDS)",
        "hotplug": "Memory hotplug",
        "pmem": "The pmem device",
    ]

    /// Parses a request. `uri` may carry a query string (ignored); `body` is nil when the
    /// request had none (an empty body counts as none, as in Firecracker).
    public static func parse(method: String, uri: String, body: [UInt8]?) throws(APIError) -> APIRequest {
        var path = Substring(uri)
        if let q = path.firstIndex(where: { $0 == "?" || $0 == "#" }) { path = path[..<q] }
        let tokens = path.split(separator: "/", omittingEmptySubsequences: true).map(String.init)
        let body = (body?.isEmpty ?? true) ? nil : body
        let invalid = APIError.badRequest("Invalid request method and/or path: \(method) \(path.isEmpty ? "/" : String(path)).")
        let first = tokens.first ?? ""

        switch method {
        case "GET", "PUT", "PATCH":
            break
        case "DELETE" where ["drives", "network-interfaces", "pmem"].contains(first):
            throw .notSupportedYet("Hot-unplugging devices (DELETE /\(first))")
        default:
            throw invalid
        }
        if let what = unsupportedResources[first] {
            throw .notSupportedYet("\(what) (\(method) \(path))")
        }
        if method == "GET" {
            guard body == nil else { throw .badRequest("GET request cannot have a body.") }
            switch tokens {
            case []: return .getInstanceInfo
            case ["version"]: return .getVersion
            case ["machine-config"]: return .getMachineConfig
            case ["vm", "config"]: return .getFullConfig
            case ["balloon"]: return .getBalloon
            case ["balloon", "statistics"]: return .getBalloonStatistics
            default: throw invalid
            }
        }
        // PUT and PATCH need a body on every known path.
        let known: Set<String> = method == "PUT"
            ? ["actions", "boot-source", "drives", "logger", "serial", "machine-config", "metrics", "network-interfaces", "entropy", "vsock", "snapshot", "migrate", "balloon", "cpu-config"]
            : ["drives", "machine-config", "network-interfaces", "vm", "balloon"]
        guard known.contains(first) else { throw invalid }
        guard let body else { throw .badRequest("Empty \(method) request.") }

        func id(_ field: String) throws(APIError) -> String {
            guard tokens.count == 2 else {
                if tokens.count < 2 { throw APIError.badRequest("The ID cannot be empty: \(method) /\(first)/{\(field)} needs one.") }
                throw invalid
            }
            try ResourceID.check(tokens[1], field: field)
            return tokens[1]
        }
        func single() throws(APIError) { guard tokens.count == 1 else { throw invalid } }
        func mismatch(_ field: String) -> APIError {
            .badRequest("The id from the path does not match the id from the body (\(field))!")
        }

        switch (method, first) {
        case ("PUT", "actions"):
            try single()
            return .action(try StrictJSON.decode(InstanceActionInfo.self, from: body).actionType)
        case ("PUT", "boot-source"):
            try single()
            return .putBootSource(try StrictJSON.decode(BootSourceConfig.self, from: body))
        case ("PUT", "machine-config"):
            try single()
            return .putMachineConfig(try StrictJSON.decode(MachineConfig.self, from: body))
        case ("PATCH", "machine-config"):
            try single()
            let update = try StrictJSON.decode(MachineConfigUpdate.self, from: body)
            guard !update.isEmpty else { throw .badRequest("Empty PATCH request: give at least one machine-config field.") }
            return .patchMachineConfig(update)
        case ("PUT", "drives"):
            let pathID = try id("drive_id")
            let drive = try StrictJSON.decode(DriveConfig.self, from: body)
            guard drive.driveId == pathID else { throw mismatch("drive_id") }
            return .putDrive(drive)
        case ("PATCH", "drives"):
            let pathID = try id("drive_id")
            let update = try StrictJSON.decode(DriveUpdate.self, from: body)
            guard update.driveId == pathID else { throw mismatch("drive_id") }
            return .patchDrive(update)
        case ("PUT", "network-interfaces"):
            let pathID = try id("iface_id")
            let iface = try StrictJSON.decode(NetworkInterfaceConfig.self, from: body)
            guard iface.ifaceId == pathID else { throw mismatch("iface_id") }
            return .putNetworkInterface(iface)
        case ("PATCH", "network-interfaces"):
            let pathID = try id("iface_id")
            let update = try StrictJSON.decode(NetworkInterfaceUpdate.self, from: body)
            guard update.ifaceId == pathID else { throw mismatch("iface_id") }
            return .patchNetworkInterface(update)
        case ("PATCH", "vm"):
            try single()
            return .patchVM(try StrictJSON.decode(VMStateRequest.self, from: body).state)
        case ("PUT", "logger"):
            try single()
            return .putLogger(try StrictJSON.decode(LoggerConfig.self, from: body))
        case ("PUT", "metrics"):
            try single()
            return .putMetrics(try StrictJSON.decode(MetricsConfig.self, from: body))
        case ("PUT", "entropy"):
            try single()
            return .putEntropy(try StrictJSON.decode(EntropyDeviceConfig.self, from: body))
        case ("PUT", "cpu-config"):
            try single()
            return .putCPUConfig(try StrictJSON.decode(CPUConfig.self, from: body))
        case ("PUT", "vsock"):
            try single()
            return .putVsock(try StrictJSON.decode(VsockConfig.self, from: body))
        case ("PUT", "snapshot"):
            switch tokens {
            case ["snapshot", "create"]: return .putSnapshotCreate(try StrictJSON.decode(SnapshotCreateParams.self, from: body))
            case ["snapshot", "load"]: return .putSnapshotLoad(try StrictJSON.decode(SnapshotLoadParams.self, from: body))
            default: throw invalid
            }
        case ("PUT", "serial"):
            try single()
            return .putSerial(try StrictJSON.decode(SerialDeviceConfig.self, from: body))
        case ("PUT", "balloon"):
            try single()
            return .putBalloon(try StrictJSON.decode(BalloonConfig.self, from: body))
        case ("PATCH", "balloon"):
            switch tokens {
            case ["balloon"]: return .patchBalloon(try StrictJSON.decode(BalloonUpdate.self, from: body))
            case ["balloon", "statistics"]: return .patchBalloonStatistics(try StrictJSON.decode(BalloonStatsUpdate.self, from: body))
            default: throw invalid
            }
        case ("PUT", "migrate"):
            try single()
            return .putMigrate(try StrictJSON.decode(MigrateParams.self, from: body))
        default:
            throw invalid
        }
    }
}
