import FoundationEssentials

/// What a running network consists of, derived from its definition without touching the host:
/// the nftables ruleset and dnsmasq's command line. `NetworkManager` applies it.
public enum NetworkPlan {
    /// The nftables script that (re)creates the network's table `ip swiftkvm-NAME` atomically
    /// (`nft -f`), or nil for mode `bridge`.
    ///
    /// - nat: forwarded traffic from the subnet out of the bridge is accepted, replies back in
    ///   (conntrack established/related), and the subnet is masqueraded towards other networks
    ///   (multicast and broadcast excepted, as libvirt does);
    /// - routed: the subnet is forwarded both ways, without NAT;
    /// - isolated: nothing is forwarded in or out of the bridge, even when the host forwards.
    ///
    /// Every mode drops other forwarded traffic in or out of the bridge, and accepts traffic between
    /// the bridge's own ports.
    public static func nftRuleset(_ d: NetworkDefinition) -> String? {
        guard d.mode != .bridge, let address = d.address else { return nil }
        let table = d.nftTable, br = "\"\(d.bridge)\"", net = address.subnetText
        var forward: [String] = ["iifname \(br) oifname \(br) accept"]
        switch d.mode {
        case .nat:
            forward += ["iifname \(br) ip saddr \(net) accept",
                        "oifname \(br) ip daddr \(net) ct state related,established accept"]
        case .routed:
            forward += ["iifname \(br) ip saddr \(net) accept",
                        "oifname \(br) ip daddr \(net) accept"]
        case .isolated, .bridge:
            break
        }
        forward += ["iifname \(br) drop", "oifname \(br) drop"]
        var text = """
        add table ip \(table)
        delete table ip \(table)
        table ip \(table) {
            chain forward {
                type filter hook forward priority filter; policy accept;

        """
        for r in forward { text += "        \(r)\n" }
        text += "    }\n"
        if d.mode == .nat {
            text += """
                chain postrouting {
                    type nat hook postrouting priority srcnat; policy accept;
                    ip saddr \(net) ip daddr 224.0.0.0/24 return
                    ip saddr \(net) ip daddr 255.255.255.255 return
                    ip saddr \(net) ip daddr != \(net) masquerade
                }

            """
        }
        text += "}\n"
        return text
    }

    /// dnsmasq's command line for the network, as libvirt runs it: no configuration file, in the
    /// foreground (supervised by the daemon), bound to the bridge only, its own pid and lease
    /// files; DHCP only with a range; no default route for isolated networks.
    public static func dnsmasqArguments(_ d: NetworkDefinition, pidFile: String, leaseFile: String) -> [String] {
        guard let address = d.address else { return [] }
        var args = ["--conf-file=/dev/null", "--keep-in-foreground", "--log-facility=-",
                    "--strict-order", "--bind-interfaces", "--except-interface=lo", "--interface=\(d.bridge)",
                    "--listen-address=\(address.address)", "--pid-file=\(pidFile)"]
        if let r = d.dhcpRange {
            let count = Int(r.end.value - r.start.value) + 1
            args += ["--dhcp-range=\(r.start),\(r.end),\(address.netmask)", "--dhcp-no-override", "--dhcp-authoritative",
                     "--dhcp-lease-max=\(count)", "--dhcp-leasefile=\(leaseFile)", "--log-dhcp"]
            if d.mode == .isolated { args.append("--dhcp-option=3") }
        }
        return args
    }
}

/// One DHCP lease from dnsmasq's lease file.
public struct DHCPLease: Codable, Sendable, Equatable {
    /// Seconds since the epoch when it expires (0: never).
    public var expiry: Int64
    public var mac: String
    public var ip: String
    /// nil when the client sent none (`*`).
    public var hostname: String?
    public var clientId: String?

    enum CodingKeys: String, CodingKey { case expiry, mac, ip, hostname, clientId = "client_id" }

    public init(expiry: Int64, mac: String, ip: String, hostname: String?, clientId: String?) {
        self.expiry = expiry; self.mac = mac; self.ip = ip; self.hostname = hostname; self.clientId = clientId
    }

    /// Parses dnsmasq's lease file: one `EXPIRY MAC IP HOSTNAME CLIENTID` line per IPv4 lease
    /// (`*` for none); the `duid` line and IPv6 leases are skipped, as are malformed lines.
    public static func parse(_ text: String) -> [DHCPLease] {
        text.split(whereSeparator: \.isNewline).compactMap { line -> DHCPLease? in
            let f = line.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
            guard f.count >= 4, let expiry = Int64(f[0]), IPv4Address(f[2]) != nil, VMNIC.isMAC(f[1]) || f[1].contains(":") else { return nil }
            return DHCPLease(expiry: expiry, mac: f[1], ip: f[2], hostname: f[3] == "*" ? nil : f[3],
                             clientId: f.count > 4 && f[4] != "*" ? f[4] : nil)
        }
    }
}
