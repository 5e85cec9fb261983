// The client side of `swiftkvm net …`: one daemon request per verb, printed as virsh's net-* verbs print.
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// A client of the daemon's `/networks` API. Errors are `ManagerError`s ready to print (see `VMClient`).
public struct NetClient: Sendable {
    let client: VMClient

    public init(socketPath: String) { client = VMClient(socketPath: socketPath) }

    static func path(_ name: String) -> String { "/networks/\(VMClient.pathComponent(name))" }
    static func decodeNet(_ r: HTTPResponse) throws -> NetworkInfo { try JSONDecoder().decode(NetworkInfo.self, from: Data(r.body)) }

    /// `POST /networks`; returns the network and whether it replaced a definition.
    public func define(_ definition: [UInt8]) throws(ManagerError) -> (net: NetworkInfo, replaced: Bool) {
        try client.call("POST", "/networks", body: definition) { r in (try Self.decodeNet(r), r.status == 200) }
    }

    public func undefine(_ name: String) throws(ManagerError) {
        try client.call("DELETE", Self.path(name)) { _ in () }
    }

    public func list(all: Bool) throws(ManagerError) -> [NetworkInfo] {
        try client.call("GET", all ? "/networks?all=true" : "/networks") { r in try JSONDecoder().decode([NetworkInfo].self, from: Data(r.body)) }
    }

    public func info(_ name: String) throws(ManagerError) -> NetworkInfo {
        try client.call("GET", Self.path(name), decode: Self.decodeNet)
    }

    /// `PUT /networks/NAME/state` with `start` or `stop`.
    public func changeState(_ name: String, action: String) throws(ManagerError) -> NetworkInfo {
        try client.call("PUT", Self.path(name) + "/state", body: Array("{\"action\":\"\(action)\"}".utf8), timeout: 120, decode: Self.decodeNet)
    }

    public func setAutostart(_ name: String, _ on: Bool) throws(ManagerError) -> NetworkInfo {
        try client.call("PUT", Self.path(name) + "/autostart", body: Array("{\"autostart\":\(on)}".utf8), decode: Self.decodeNet)
    }

    public func leases(_ name: String) throws(ManagerError) -> [DHCPLease] {
        try client.call("GET", Self.path(name) + "/leases") { r in try JSONDecoder().decode([DHCPLease].self, from: Data(r.body)) }
    }
}

/// How `swiftkvm net` prints networks and leases (virsh's net-list, net-info, net-dhcp-leases).
public enum NetFormat {
    static func table(_ header: [String], _ rows: [[String]]) -> String {
        var widths = header.map(\.count)
        for r in rows { for (i, c) in r.enumerated() { widths[i] = max(widths[i], c.count) } }
        func line(_ cells: [String]) -> String {
            var s = ""
            for (i, c) in cells.enumerated() { s += " " + (i == cells.count - 1 ? c : VMFormat.pad(c, widths[i] + 2)) }
            return s
        }
        var out = line(header) + "\n"
        out += String(repeating: "-", count: widths.reduce(0, +) + 3 * widths.count + 1) + "\n"
        for r in rows { out += line(r) + "\n" }
        return out
    }

    /// `virsh net-list`: name, state, autostart, plus mode, bridge and address.
    public static func list(_ nets: [NetworkInfo]) -> String {
        table(["Name", "State", "Autostart", "Mode", "Bridge", "Address"],
              nets.map { [$0.name, $0.state.rawValue, $0.autostart ? "yes" : "no", $0.mode, $0.bridge, $0.address ?? "-"] })
    }

    /// `virsh net-info`: `Key:  value` lines.
    public static func info(_ n: NetworkInfo) -> String {
        var pairs: [(String, String)] = [
            ("Name", n.name), ("Active", n.state == .active ? "yes" : "no"), ("Autostart", n.autostart ? "yes" : "no"),
            ("Mode", n.mode), ("Bridge", n.bridge),
        ]
        if let a = n.address { pairs.append(("Address", a)) }
        if let r = n.dhcpRange { pairs.append(("DHCP range", "\(r.start) - \(r.end)")) }
        if let t = n.nftTable { pairs.append(("nft table", "ip \(t)")) }
        if let p = n.dnsmasqPid { pairs.append(("dnsmasq PID", String(p))) }
        if let f = n.leaseFile { pairs.append(("Lease file", f)) }
        if let f = n.dnsmasqLog { pairs.append(("dnsmasq log", f)) }
        if let c = n.ipForwardChangedByDaemon { pairs.append(("IP forwarding", c ? "on (turned on by the daemon)" : "on")) }
        pairs.append(("VMs", n.vms.isEmpty ? "-" : n.vms.joined(separator: ", ")))
        return pairs.map { VMFormat.pad($0.0 + ":", 16) + $0.1 }.joined(separator: "\n") + "\n"
    }

    /// The expiry as `YYYY-MM-DD HH:MM:SS` (UTC), `never` for 0.
    static func time(_ epoch: Int64) -> String {
        guard epoch > 0 else { return "never" }
        var t = time_t(epoch), tm = tm()
        gmtime_r(&t, &tm)
        func two(_ v: Int32) -> String { v < 10 ? "0\(v)" : "\(v)" }
        return "\(tm.tm_year + 1900)-\(two(tm.tm_mon + 1))-\(two(tm.tm_mday)) \(two(tm.tm_hour)):\(two(tm.tm_min)):\(two(tm.tm_sec))"
    }

    /// `virsh net-dhcp-leases`: expiry, MAC, protocol, IP/prefix, hostname, client id.
    public static func leases(_ leases: [DHCPLease], prefix: Int?) -> String {
        table(["Expiry Time (UTC)", "MAC address", "Protocol", "IP address", "Hostname", "Client ID or DUID"],
              leases.map { [time($0.expiry), $0.mac, "ipv4", $0.ip + (prefix.map { "/\($0)" } ?? ""), $0.hostname ?? "-", $0.clientId ?? "-"] })
    }
}
