import API
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// An IPv4 address as a 32-bit number (host order), parsed from and printed as dotted quads.
public struct IPv4Address: Sendable, Hashable, Comparable, CustomStringConvertible {
    public var value: UInt32

    public init(_ value: UInt32) { self.value = value }

    /// Parses `a.b.c.d` (four decimal octets, no leading `+`, no empty parts); nil otherwise.
    public init?(_ text: some StringProtocol) {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var v: UInt32 = 0
        for p in parts {
            guard (1...3).contains(p.count), p.allSatisfy({ $0.isASCII && $0.isNumber }), let o = UInt32(p), o <= 255 else { return nil }
            v = v << 8 | o
        }
        value = v
    }

    public var description: String {
        "\(value >> 24).\(value >> 16 & 0xff).\(value >> 8 & 0xff).\(value & 0xff)"
    }

    public static func < (a: IPv4Address, b: IPv4Address) -> Bool { a.value < b.value }
}

/// An IPv4 prefix (`address/length`): a route's destination or a network's subnet.
public struct IPv4Prefix: Sendable, Hashable, CustomStringConvertible {
    /// The address as written (for a subnet: the host's address on it).
    public var address: IPv4Address
    /// The prefix length, 0–32.
    public var length: Int

    public init(address: IPv4Address, length: Int) {
        self.address = address
        self.length = length
    }

    /// Parses `a.b.c.d/len`, or `a.b.c.d` as a /32 when `allowBare`; `default` is 0.0.0.0/0.
    public init?(_ text: some StringProtocol, allowBare: Bool = false) {
        if text == "default" {
            self.init(address: IPv4Address(0), length: 0)
            return
        }
        let halves = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        guard let a = IPv4Address(halves[0]) else { return nil }
        if halves.count == 1 {
            guard allowBare else { return nil }
            self.init(address: a, length: 32)
            return
        }
        guard (1...2).contains(halves[1].count), halves[1].allSatisfy({ $0.isASCII && $0.isNumber }),
              let n = Int(halves[1]), (0...32).contains(n) else { return nil }
        self.init(address: a, length: n)
    }

    /// The netmask as a number (0 for /0).
    public var mask: UInt32 { length == 0 ? 0 : UInt32.max << UInt32(32 - length) }
    /// The first address of the prefix.
    public var network: IPv4Address { IPv4Address(address.value & mask) }
    /// The last address of the prefix.
    public var broadcast: IPv4Address { IPv4Address(address.value | ~mask) }
    /// The netmask as a dotted quad.
    public var netmask: IPv4Address { IPv4Address(mask) }

    public func contains(_ a: IPv4Address) -> Bool { a.value & mask == address.value & mask }

    /// Whether the two prefixes share an address (one contains the other).
    public func overlaps(_ other: IPv4Prefix) -> Bool {
        let m = length < other.length ? mask : other.mask
        return address.value & m == other.address.value & m
    }

    /// `network/length` (the subnet, without host bits).
    public var subnetText: String { "\(network)/\(length)" }
    public var description: String { "\(address)/\(length)" }
}

/// How a network connects its guests (libvirt's forward modes).
public enum NetworkMode: String, Codable, Sendable, CaseIterable {
    /// A new bridge with the host's address, IP forwarding and nftables masquerade; dnsmasq for DHCP/DNS.
    case nat
    /// A new bridge with IP forwarding and no NAT (the rest of the network routes to the subnet).
    case routed
    /// A new bridge without forwarding: guests reach each other and the host only.
    case isolated
    /// An existing host bridge; nothing is created.
    case bridge
}

/// A route of the host's main table (`ip -j -4 route`): destination and device.
public struct HostRoute: Sendable, Equatable {
    public var destination: IPv4Prefix
    public var device: String?
    public var text: String

    public init(destination: IPv4Prefix, device: String?, text: String) {
        self.destination = destination
        self.device = device
        self.text = text
    }
}

/// A network definition (`swiftkvm net define FILE`, `POST /networks`), stored as
/// `networks/NAME.json`:
///
/// ```json
/// {"name": "default", "mode": "nat", "bridge": "swk-default", "address": "192.168.100.1/24",
///  "dhcp_range": {"start": "192.168.100.2", "end": "192.168.100.254"}, "autostart": true}
/// ```
///
/// Parsing is strict (unknown keys and wrong types are errors naming the key) and checks
/// everything that does not depend on the host: names, the CIDR, the DHCP range inside the subnet.
/// `checkHost` then refuses a subnet that overlaps a host route and a missing bridge for `bridge`.
public struct NetworkDefinition: Sendable, Equatable {
    /// A DHCP range (inclusive).
    public struct DHCPRange: Sendable, Equatable {
        public var start: IPv4Address
        public var end: IPv4Address
        public init(start: IPv4Address, end: IPv4Address) { self.start = start; self.end = end }
    }

    /// `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`, as VM names.
    public var name: String
    public var mode: NetworkMode
    /// The bridge: generated (`swk-NAME`) for nat/routed/isolated unless given; required for `bridge`.
    public var bridge: String
    /// The host's address on the bridge and the subnet's prefix (nil only for mode `bridge`).
    public var address: IPv4Prefix?
    /// The addresses dnsmasq hands out (nil: no DHCP, DNS only).
    public var dhcpRange: DHCPRange?
    /// Start the network when the daemon starts.
    public var autostart: Bool

    public static let keys = ["name", "mode", "bridge", "address", "dhcp_range", "autostart"]
    public static let maxSize = 64 << 10

    public init(name: String, mode: NetworkMode, bridge: String, address: IPv4Prefix?, dhcpRange: DHCPRange?, autostart: Bool = false) {
        self.name = name
        self.mode = mode
        self.bridge = bridge
        self.address = address
        self.dhcpRange = dhcpRange
        self.autostart = autostart
    }

    /// The nftables table of the network (`ip` family).
    public var nftTable: String { "swiftkvm-\(name)" }
    /// Whether the daemon creates (and removes) the bridge.
    public var ownsBridge: Bool { mode != .bridge }
    /// Whether the network needs `net.ipv4.ip_forward = 1`.
    public var needsForwarding: Bool { mode == .nat || mode == .routed }

    /// Whether `name` is an interface name the daemon accepts: 1–15 bytes of `A-Z a-z 0-9 . _ -`, not
    /// `.`/`..` (stricter than the kernel, so that a name is safe inside nftables rules and file names).
    public static func isValidInterfaceName(_ name: String) -> Bool {
        let b = Array(name.utf8)
        guard (1...15).contains(b.count), name != ".", name != ".." else { return false }
        return b.allSatisfy {
            ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x41 && $0 <= 0x5a) || ($0 >= 0x61 && $0 <= 0x7a)
                || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "_") || $0 == UInt8(ascii: "-")
        }
    }

    /// FNV-1a (32 bits) of `text`: short stable ids for generated interface names.
    static func shortHash(_ text: String) -> UInt32 {
        var h: UInt32 = 0x811c_9dc5
        for b in text.utf8 {
            h ^= UInt32(b)
            h = h &* 0x0100_0193
        }
        return h
    }

    static func hex(_ v: UInt32, digits: Int) -> String {
        let s = String(v, radix: 16)
        return String(repeating: "0", count: max(0, digits - s.count)) + s
    }

    /// The generated bridge name: `swk-NAME` when it fits 15 bytes, else `swk-` + the first 7
    /// characters + 4 hex digits of a hash of the name.
    public static func generatedBridgeName(_ name: String) -> String {
        let plain = "swk-" + name
        if plain.utf8.count <= 15 { return plain }
        return "swk-" + String(name.prefix(7)) + hex(shortHash(name) & 0xffff, digits: 4)
    }

    /// Parses a definition; `source` (a file name or "the request body") starts every error.
    public static func parse(_ bytes: [UInt8], source: String) throws(ManagerError) -> NetworkDefinition {
        func bad(_ text: String) -> ManagerError { ManagerError(.invalid, "invalid network definition (\(source)): \(text)") }
        let object = try JSONValue.definitionObject(bytes, maxSize: maxSize, bad: bad)
        for k in object.keys.sorted() where !keys.contains(k) {
            throw bad("unknown key `\(k)`, expected one of \(keys.map { "`\($0)`" }.joined(separator: ", "))")
        }
        func string(_ key: String, in o: [String: JSONValue], prefix: String = "") throws(ManagerError) -> String? {
            guard let v = o[key], !v.isNull else { return nil }
            guard let s = v.stringValue else { throw bad("key `\(prefix)\(key)` must be a string") }
            return s
        }
        guard let name = try string("name", in: object) else { throw bad("missing key `name`") }
        guard VMDefinition.isValidName(name) else {
            throw bad("key `name`: '\(name)' is not a valid network name (1 to 64 of A-Z a-z 0-9 . _ -, starting with a letter or digit)")
        }
        guard let modeText = try string("mode", in: object) else { throw bad("missing key `mode` (one of nat, routed, isolated, bridge)") }
        guard let mode = NetworkMode(rawValue: modeText) else {
            throw bad("key `mode`: unknown mode '\(modeText)', expected one of nat, routed, isolated, bridge")
        }
        var autostart = false
        if let v = object["autostart"], !v.isNull {
            guard case .bool(let b) = v else { throw bad("key `autostart` must be true or false") }
            autostart = b
        }
        let bridgeText = try string("bridge", in: object)
        if let bridgeText, !isValidInterfaceName(bridgeText) {
            throw bad("key `bridge`: '\(bridgeText)' is not a valid interface name (1 to 15 of A-Z a-z 0-9 . _ -)")
        }
        let addressText = try string("address", in: object)
        var rangeObject: [String: JSONValue]?
        if let v = object["dhcp_range"], !v.isNull {
            guard let o = v.objectValue else { throw bad("key `dhcp_range` must be an object {\"start\": ADDRESS, \"end\": ADDRESS}") }
            for k in o.keys.sorted() where !["start", "end"].contains(k) {
                throw bad("unknown key `dhcp_range.\(k)`, expected `start` and `end`")
            }
            rangeObject = o
        }

        if mode == .bridge {
            guard let bridgeText else { throw bad("mode bridge needs key `bridge`: the name of an existing host bridge") }
            if addressText != nil { throw bad("key `address` is not allowed in mode bridge: the host bridge's own addresses are used") }
            if rangeObject != nil { throw bad("key `dhcp_range` is not allowed in mode bridge: the bridge's LAN provides DHCP") }
            return NetworkDefinition(name: name, mode: mode, bridge: bridgeText, address: nil, dhcpRange: nil, autostart: autostart)
        }

        guard let addressText else {
            throw bad("missing key `address`: the host's address on the bridge with its prefix, e.g. \"192.168.100.1/24\"")
        }
        guard let address = IPv4Prefix(addressText) else {
            throw bad("key `address`: '\(addressText)' is not an IPv4 address with a prefix length (a.b.c.d/N)")
        }
        guard (8...30).contains(address.length) else {
            throw bad("key `address`: the prefix length of \(addressText) must be from 8 to 30")
        }
        guard address.address != address.network, address.address != address.broadcast else {
            throw bad("key `address`: \(address.address) is the \(address.address == address.network ? "network" : "broadcast") address of \(address.subnetText), not a host address")
        }
        var range: DHCPRange?
        if let o = rangeObject {
            func endpoint(_ key: String) throws(ManagerError) -> IPv4Address {
                guard let text = try string(key, in: o, prefix: "dhcp_range.") else { throw bad("missing key `dhcp_range.\(key)`") }
                guard let a = IPv4Address(text) else { throw bad("key `dhcp_range.\(key)`: '\(text)' is not an IPv4 address") }
                guard address.contains(a), a != address.network, a != address.broadcast else {
                    throw bad("key `dhcp_range.\(key)`: \(a) is not a host address of the subnet \(address.subnetText)")
                }
                return a
            }
            let start = try endpoint("start"), end = try endpoint("end")
            guard start <= end else { throw bad("key `dhcp_range`: the start \(start) is after the end \(end)") }
            if (start...end).contains(address.address) {
                throw bad("key `dhcp_range`: the range \(start)-\(end) contains the host's address \(address.address)")
            }
            range = DHCPRange(start: start, end: end)
        }
        return NetworkDefinition(name: name, mode: mode, bridge: bridgeText ?? generatedBridgeName(name),
                                 address: address, dhcpRange: range, autostart: autostart)
    }

    /// The host checks: the subnet must not overlap a route of the host (ignoring the default
    /// route and routes on `ownBridges`, the bridges of running networks being redefined), and a
    /// `bridge` network's bridge must exist. Errors name the overlapping route.
    public func checkHost(routes: [HostRoute], bridgeExists: (String) -> Bool, ignoringDevices ownBridges: Set<String> = [],
                          source: String) throws(ManagerError) {
        func bad(_ text: String) -> ManagerError { ManagerError(.invalid, "invalid network definition (\(source)): \(text)") }
        if mode == .bridge {
            guard bridgeExists(bridge) else {
                throw bad("key `bridge`: the bridge '\(bridge)' does not exist on the host (mode bridge attaches guests to an existing bridge; create it first)")
            }
            return
        }
        guard let address else { return }
        for r in routes where r.destination.length > 0 {
            if let dev = r.device, ownBridges.contains(dev) { continue }
            if r.destination.overlaps(address) {
                throw bad("key `address`: the subnet \(address.subnetText) overlaps the host's route '\(r.text)'; choose another subnet")
            }
        }
    }

    /// The definition as normalized JSON (sorted keys, pretty), as stored in `networks/NAME.json`.
    public func normalizedJSON() -> [UInt8] {
        var object: [String: JSONValue] = ["name": .string(name), "mode": .string(mode.rawValue), "bridge": .string(bridge),
                                           "autostart": .bool(autostart)]
        if let address { object["address"] = .string(address.description) }
        if let dhcpRange {
            object["dhcp_range"] = .object(["start": .string(dhcpRange.start.description), "end": .string(dhcpRange.end.description)])
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes]
        return Array((try? encoder.encode(object)) ?? Data()) + [UInt8(ascii: "\n")]
    }
}

/// The network definitions in `STATE/networks/NAME.json`.
public struct NetworkStore: Sendable {
    public let directory: String

    public init(directory: String) { self.directory = directory }

    public func path(of name: String) -> String { "\(directory)/\(name).json" }

    /// Stores `definition` atomically.
    public func save(_ definition: NetworkDefinition) throws(ManagerError) {
        try AtomicFile.makeDirectory(directory)
        try AtomicFile.write(definition.normalizedJSON(), to: path(of: definition.name))
    }

    public func remove(_ name: String) throws(ManagerError) {
        guard unlink(path(of: name)) == 0 || errno == ENOENT else {
            throw ManagerError(.host, "cannot remove \(path(of: name)): \(ManagerError.errnoText())")
        }
    }

    /// Loads every `*.json` definition; bad files are returned in `errors` (naming the file) and skipped.
    public func loadAll() -> (definitions: [NetworkDefinition], errors: [ManagerError]) {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: directory) else { return ([], []) }
        var defs: [NetworkDefinition] = [], errors: [ManagerError] = []
        for file in names.sorted() where file.hasSuffix(".json") && !file.hasPrefix(".") {
            let full = "\(directory)/\(file)"
            do throws(ManagerError) {
                let def = try NetworkDefinition.parse(try AtomicFile.read(full), source: full)
                guard "\(def.name).json" == file else {
                    throw ManagerError(.invalid, "invalid network definition (\(full)): its name '\(def.name)' does not match the file name")
                }
                defs.append(def)
            } catch {
                errors.append(error)
            }
        }
        return (defs, errors)
    }
}
