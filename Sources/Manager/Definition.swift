import API
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import VMM

/// A VM definition (`swiftkvm vm define FILE`, `POST /vms`): a Firecracker config file plus the
/// manager's keys `name`, `autostart` and `shutdown_timeout_s`.
///
/// Parsing is strict: unknown keys and wrong types are errors naming the key; the Firecracker
/// part is decoded with the API module's `FullVMConfiguration`, so its errors read like the
/// vmm's. Paths must be absolute and the files must exist. `logger`, `metrics` and `serial` are
/// refused: the manager owns those paths.
public struct VMDefinition: Sendable, Equatable {
    /// The VM's name: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`.
    public var name: String
    /// Start the VM when the daemon starts.
    public var autostart: Bool
    /// Seconds `shutdown` waits for the guest before destroying it (nil: 30).
    public var shutdownTimeout: Double?
    /// The Firecracker part.
    public var config: FullVMConfiguration
    /// NICs on swiftkvm networks or host bridges (key `nics`); the daemon creates their TAPs.
    public var nics: [VMNIC]

    /// The manager's own keys.
    public static let managerKeys = ["name", "autostart", "shutdown_timeout_s", "nics"]
    /// Keys refused in definitions because the manager sets them.
    public static let refusedKeys = ["logger", "metrics", "serial"]
    /// Default shutdown timeout in seconds.
    public static let defaultShutdownTimeout = 30.0
    /// The largest definition accepted.
    public static let maxSize = 1 << 20

    public init(name: String, autostart: Bool = false, shutdownTimeout: Double? = nil, config: FullVMConfiguration, nics: [VMNIC] = []) {
        self.nics = nics
        self.name = name
        self.autostart = autostart
        self.shutdownTimeout = shutdownTimeout
        self.config = config
    }

    /// Whether `name` is a valid VM name.
    public static func isValidName(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        guard (1...64).contains(bytes.count) else { return false }
        func alnum(_ b: UInt8) -> Bool {
            (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5a) || (b >= 0x61 && b <= 0x7a)
        }
        return alnum(bytes[0]) && bytes.dropFirst().allSatisfy { alnum($0) || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: "-") }
    }

    /// Parses a definition; `source` (a file name or "the request body") starts every error.
    public static func parse(_ bytes: [UInt8], source: String) throws(ManagerError) -> VMDefinition {
        func bad(_ text: String) -> ManagerError { ManagerError(.invalid, "invalid definition (\(source)): \(text)") }
        let object = try JSONValue.definitionObject(bytes, maxSize: maxSize, bad: bad)
        struct Keys: Decodable {
            var name: String?
            var autostart: Bool?
            var shutdown_timeout_s: Double?
        }
        let keys: Keys
        do {
            keys = try JSONDecoder().decode(Keys.self, from: Data(bytes))
        } catch let e as DecodingError {
            throw bad(StrictJSON.describe(e).replacing("field `", with: "key `"))
        } catch {
            throw bad("\(error)")
        }
        guard let name = keys.name else { throw bad("missing key `name`") }
        guard isValidName(name) else {
            throw bad("key `name`: '\(name)' is not a valid VM name (1 to 64 of A-Z a-z 0-9 . _ -, starting with a letter or digit)")
        }
        let autostart = keys.autostart ?? false
        let timeout = keys.shutdown_timeout_s
        if let timeout, !(0...86_400).contains(timeout) {
            throw bad("key `shutdown_timeout_s` must be a number of seconds from 0 to 86400, not \(timeout)")
        }
        for key in refusedKeys where object[key] != nil {
            throw bad("key `\(key)` is not allowed in a definition: the manager sets the VM's \(key) itself (see logs/\(name).*)")
        }
        var rest = object
        for key in managerKeys { rest.removeValue(forKey: key) }
        try checkPaths(rest, bad: bad)
        let config: FullVMConfiguration
        do {
            let data = try JSONEncoder().encode(rest)
            config = try JSONDecoder().decode(FullVMConfiguration.self, from: data)
        } catch let e as DecodingError {
            throw bad(StrictJSON.describe(e))
        } catch let e as APIError {
            throw bad(e.message)
        } catch {
            throw bad("\(error)")
        }
        var nics: [VMNIC] = []
        if let list = object["nics"], !list.isNull {
            nics = try VMNIC.parseList(list, taken: Set(config.networkInterfaces.map(\.ifaceId)), bad: bad)
        }
        return VMDefinition(name: name, autostart: autostart, shutdownTimeout: timeout, config: config, nics: nics)
    }

    /// Paths must be absolute and exist (before decoding, so the error names the key and path).
    static func checkPaths(_ object: [String: JSONValue], bad: (String) -> ManagerError) throws(ManagerError) {
        func check(_ value: JSONValue?, key: String) throws(ManagerError) {
            guard let path = value?.stringValue else { return } // a type error comes from the decoder
            guard path.hasPrefix("/") else { throw bad("key `\(key)`: the path '\(path)' must be absolute") }
            guard access(path, F_OK) == 0 else {
                throw bad("key `\(key)`: \(path) does not exist (\(ManagerError.errnoText()))")
            }
        }
        if let boot = object["boot-source"]?.objectValue {
            try check(boot["kernel_image_path"], key: "boot-source.kernel_image_path")
            try check(boot["initrd_path"], key: "boot-source.initrd_path")
        }
        if let drives = object["drives"]?.arrayValue {
            for (i, d) in drives.enumerated() {
                if let d = d.objectValue { try check(d["path_on_host"], key: "drives[\(i)].path_on_host") }
            }
        }
    }

    /// The definition as normalized JSON (sorted keys, pretty), as stored in `vms/NAME.json`.
    public func normalizedJSON() -> [UInt8] {
        var object: [String: JSONValue] = ["name": .string(name), "autostart": .bool(autostart)]
        if let shutdownTimeout { object["shutdown_timeout_s"] = .double(shutdownTimeout) }
        if !nics.isEmpty { object["nics"] = .array(nics.map(\.json)) }
        if let data = try? JSONEncoder().encode(config), let fc = JSONValue.object(from: Array(data)) {
            for (k, v) in fc where !v.isNull && !Self.refusedKeys.contains(k) {
                if let list = v.arrayValue, list.isEmpty { continue }
                object[k] = v
            }
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes]
        let data = (try? encoder.encode(object)) ?? Data()
        return Array(data) + [UInt8(ascii: "\n")]
    }

    /// The vCPU count and memory size the VM gets (Firecracker's defaults when not set).
    public var vcpus: Int { config.machineConfig?.vcpuCount ?? MachineConfig.default.vcpuCount }
    public var memMib: Int { config.machineConfig?.memSizeMib ?? MachineConfig.default.memSizeMib }

    /// The Firecracker config file the VM is started with: the definition's part, with the
    /// default guest (`assets`) as boot source when it has none.
    public func vmmConfig(assetsDirectory: String?) throws(ManagerError) -> FullVMConfiguration {
        var c = config
        if c.bootSource == nil {
            guard let dir = assetsDirectory else {
                throw ManagerError(.invalid, "vm '\(name)' has no boot-source and the default guest's assets folder was not found (set SWIFTKVM_ASSETS)")
            }
            let kernel = dir + "/" + DefaultGuest.kernelName, initrd = dir + "/" + DefaultGuest.initrdName
            guard access(kernel, R_OK) == 0 else {
                throw ManagerError(.invalid, "vm '\(name)' has no boot-source and the default kernel \(kernel) is missing")
            }
            let virtio = !c.drives.isEmpty || c.entropy != nil
            c.bootSource = BootSourceConfig(kernelImagePath: kernel,
                                            initrdPath: access(initrd, R_OK) == 0 ? initrd : nil,
                                            bootArgs: DefaultGuest.cmdline(withVirtioDevices: virtio))
        }
        c.logger = nil
        c.metrics = nil
        c.serial = nil
        return c
    }
}
