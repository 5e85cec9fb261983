import API
import Foundation
import Testing
@testable import Manager

/// Network definitions, their host checks, the nftables/dnsmasq plans, lease parsing and VM NICs:
/// all without root or the host's network.
@Suite("Network definitions")
struct NetworkDefinitionTests {
    func parse(_ text: String) throws(ManagerError) -> NetworkDefinition {
        try NetworkDefinition.parse(Array(text.utf8), source: "net.json")
    }

    /// The error message of parsing `text` (which must fail with `.invalid`).
    func error(_ text: String) -> String {
        do {
            _ = try parse(text)
            return "(no error)"
        } catch {
            #expect(error.kind == .invalid)
            #expect(error.message.hasPrefix("invalid network definition (net.json): "), "\(error.message)")
            return error.message
        }
    }

    @Test("a nat network parses; the bridge name is generated and the JSON round-trips")
    func nat() throws {
        let d = try parse(#"{"name": "default", "mode": "nat", "address": "192.168.100.1/24", "autostart": true, "dhcp_range": {"start": "192.168.100.10", "end": "192.168.100.200"}}"#)
        #expect(d.mode == .nat && d.autostart)
        #expect(d.bridge == "swk-default")
        #expect(d.address?.description == "192.168.100.1/24")
        #expect(d.address?.subnetText == "192.168.100.0/24")
        #expect(d.dhcpRange?.start.description == "192.168.100.10" && d.dhcpRange?.end.description == "192.168.100.200")
        #expect(d.nftTable == "swiftkvm-default")
        #expect(try NetworkDefinition.parse(d.normalizedJSON(), source: "again") == d)
    }

    @Test("generated bridge names fit in 15 bytes and stay distinct for long names")
    func bridgeNames() {
        #expect(NetworkDefinition.generatedBridgeName("lab") == "swk-lab")
        #expect(NetworkDefinition.generatedBridgeName("abcdefghijk") == "swk-abcdefghijk")
        let a = NetworkDefinition.generatedBridgeName("production-a"), b = NetworkDefinition.generatedBridgeName("production-b")
        #expect(a.utf8.count == 15 && b.utf8.count == 15 && a != b && a.hasPrefix("swk-product"))
    }

    @Test("routed, isolated (DNS only) and bridge networks parse")
    func otherModes() throws {
        #expect(try parse(#"{"name": "r", "mode": "routed", "address": "10.5.0.1/16", "bridge": "rbr0"}"#).bridge == "rbr0")
        let iso = try parse(#"{"name": "i", "mode": "isolated", "address": "10.6.0.254/24"}"#)
        #expect(iso.dhcpRange == nil && !iso.needsForwarding)
        let br = try parse(#"{"name": "lan", "mode": "bridge", "bridge": "br0"}"#)
        #expect(br.address == nil && !br.ownsBridge)
    }

    @Test("bad definitions are refused with errors that name the key", arguments: [
        (#"{"mode": "nat", "address": "10.0.0.1/24"}"#, "missing key `name`"),
        (#"{"name": "-x", "mode": "nat", "address": "10.0.0.1/24"}"#, "key `name`: '-x' is not a valid network name"),
        (#"{"name": "n", "mode": "vpn", "address": "10.0.0.1/24"}"#, "key `mode`: unknown mode 'vpn'"),
        (#"{"name": "n", "address": "10.0.0.1/24"}"#, "missing key `mode`"),
        (#"{"name": "n", "mode": "nat", "address": "10.0.0.1/24", "colour": "red"}"#, "unknown key `colour`"),
        (#"{"name": "n", "mode": "nat"}"#, "missing key `address`"),
        (#"{"name": "n", "mode": "nat", "address": "10.0.0.300/24"}"#, "key `address`: '10.0.0.300/24' is not an IPv4 address"),
        (#"{"name": "n", "mode": "nat", "address": "10.0.0.1"}"#, "key `address`: '10.0.0.1' is not an IPv4 address with a prefix"),
        (#"{"name": "n", "mode": "nat", "address": "10.0.0.1/33"}"#, "is not an IPv4 address with a prefix"),
        (#"{"name": "n", "mode": "nat", "address": "10.0.0.1/31"}"#, "prefix length of 10.0.0.1/31 must be from 8 to 30"),
        (#"{"name": "n", "mode": "nat", "address": "10.0.0.0/24"}"#, "10.0.0.0 is the network address of 10.0.0.0/24"),
        (#"{"name": "n", "mode": "nat", "address": "10.0.0.255/24"}"#, "is the broadcast address"),
        (#"{"name": "n", "mode": "nat", "address": 5}"#, "key `address` must be a string"),
        (#"{"name": "n", "mode": "nat", "address": "10.0.0.1/24", "autostart": "yes"}"#, "key `autostart` must be true or false"),
        (#"{"name": "n", "mode": "nat", "address": "10.0.0.1/24", "bridge": "a/b"}"#, "key `bridge`: 'a/b' is not a valid interface name"),
        (#"{"name": "n", "mode": "nat", "address": "10.0.0.1/24", "bridge": "abcdefghijklmnop"}"#, "is not a valid interface name"),
        (#"{"name": "n", "mode": "nat", "address": "10.0.0.1/24", "bridge": "br\"0"}"#, "is not a valid interface name"),
        (#"{"name": "n", "mode": "nat", "address": "10.0.0.1/24", "dhcp_range": {"start": "10.0.1.2", "end": "10.0.0.9"}}"#,
         "key `dhcp_range.start`: 10.0.1.2 is not a host address of the subnet 10.0.0.0/24"),
        (#"{"name": "n", "mode": "nat", "address": "10.0.0.1/24", "dhcp_range": {"start": "10.0.0.2", "end": "10.0.0.255"}}"#,
         "key `dhcp_range.end`: 10.0.0.255 is not a host address"),
        (#"{"name": "n", "mode": "nat", "address": "10.0.0.1/24", "dhcp_range": {"start": "10.0.0.9", "end": "10.0.0.2"}}"#,
         "the start 10.0.0.9 is after the end 10.0.0.2"),
        (#"{"name": "n", "mode": "nat", "address": "10.0.0.5/24", "dhcp_range": {"start": "10.0.0.2", "end": "10.0.0.9"}}"#,
         "contains the host's address 10.0.0.5"),
        (#"{"name": "n", "mode": "nat", "address": "10.0.0.1/24", "dhcp_range": {"start": "10.0.0.2"}}"#, "missing key `dhcp_range.end`"),
        (#"{"name": "n", "mode": "nat", "address": "10.0.0.1/24", "dhcp_range": {"start": "10.0.0.2", "end": "10.0.0.3", "lease": 1}}"#,
         "unknown key `dhcp_range.lease`"),
        (#"{"name": "n", "mode": "bridge"}"#, "mode bridge needs key `bridge`"),
        (#"{"name": "n", "mode": "bridge", "bridge": "br0", "address": "10.0.0.1/24"}"#, "key `address` is not allowed in mode bridge"),
        (#"[1]"#, "expected a JSON object"),
        (#"{"name": "n", "#, "malformed JSON"),
    ])
    func bad(_ text: String, _ expected: String) {
        let message = error(text)
        #expect(message.contains(expected), "\(message)")
    }

    @Test("IPv4 prefixes: containment and overlap")
    func prefixes() throws {
        let a = try #require(IPv4Prefix("10.1.0.0/16")), b = try #require(IPv4Prefix("10.1.2.0/24"))
        let c = try #require(IPv4Prefix("10.2.0.0/24")), host = try #require(IPv4Prefix("10.1.200.7", allowBare: true))
        #expect(a.overlaps(b) && b.overlaps(a) && !a.overlaps(c) && host.length == 32 && a.overlaps(host) && !b.overlaps(host))
        #expect(IPv4Prefix("default")?.length == 0)
        #expect(try #require(IPv4Prefix("192.168.1.77/20")).netmask.description == "255.255.240.0")
        #expect(IPv4Address("01.2.3.4") != nil && IPv4Address("1.2.3") == nil && IPv4Address("1.2.3.4.5") == nil && IPv4Address("a.b.c.d") == nil)
    }

    @Test("a subnet overlapping a host route is refused, naming the route; the default route and own bridges are ignored")
    func routeOverlap() throws {
        let routes = try HostTools.parseRoutes("""
        [{"dst":"default","gateway":"10.0.0.1","dev":"eth0","flags":[]},
         {"dst":"10.0.0.0/24","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"10.0.0.5","flags":[]},
         {"dst":"172.16.9.9","gateway":"10.0.0.1","dev":"eth0","flags":[]},
         {"dst":"192.168.50.0/24","dev":"swk-old","flags":["linkdown"]}]
        """)
        #expect(routes.count == 4)
        func check(_ address: String, ignoring: Set<String> = []) -> String? {
            let d = try! parse(#"{"name": "n", "mode": "nat", "address": "\#(address)"}"#)
            do {
                try d.checkHost(routes: routes, bridgeExists: { _ in false }, ignoringDevices: ignoring, source: "n.json")
                return nil
            } catch {
                return error.message
            }
        }
        #expect(check("10.0.0.77/25")?.contains("the subnet 10.0.0.0/25 overlaps the host's route '10.0.0.0/24 dev eth0'") == true)
        #expect(check("10.0.0.1/8")?.contains("overlaps the host's route '10.0.0.0/24 dev eth0'") == true)
        #expect(check("172.16.0.1/16")?.contains("'172.16.9.9 via 10.0.0.1 dev eth0'") == true)
        #expect(check("192.168.122.1/24") == nil)
        #expect(check("192.168.50.1/24") != nil)
        #expect(check("192.168.50.1/24", ignoring: ["swk-old"]) == nil)
    }

    @Test("mode bridge needs an existing bridge")
    func bridgeMustExist() throws {
        let d = try parse(#"{"name": "lan", "mode": "bridge", "bridge": "br9"}"#)
        #expect(throws: ManagerError.self) { try d.checkHost(routes: [], bridgeExists: { _ in false }, source: "lan.json") }
        do {
            try d.checkHost(routes: [], bridgeExists: { _ in false }, source: "lan.json")
        } catch {
            #expect(error.message.contains("the bridge 'br9' does not exist on the host"))
        }
        try d.checkHost(routes: [], bridgeExists: { $0 == "br9" }, source: "lan.json")
    }

    @Test("nftables: masquerade only for nat, forwarding rules per mode, nothing for bridge")
    func nftRules() throws {
        let nat = try #require(NetworkPlan.nftRuleset(try parse(#"{"name": "a", "mode": "nat", "address": "10.9.0.1/24"}"#)))
        #expect(nat.hasPrefix("add table ip swiftkvm-a\ndelete table ip swiftkvm-a\n"))
        #expect(nat.contains("ip saddr 10.9.0.0/24 ip daddr != 10.9.0.0/24 masquerade"))
        #expect(nat.contains("oifname \"swk-a\" ip daddr 10.9.0.0/24 ct state related,established accept"))
        let routed = try #require(NetworkPlan.nftRuleset(try parse(#"{"name": "b", "mode": "routed", "address": "10.9.0.1/24"}"#)))
        #expect(!routed.contains("masquerade") && routed.contains("oifname \"swk-b\" ip daddr 10.9.0.0/24 accept"))
        let iso = try #require(NetworkPlan.nftRuleset(try parse(#"{"name": "c", "mode": "isolated", "address": "10.9.0.1/24"}"#)))
        #expect(!iso.contains("masquerade") && !iso.contains("saddr") && iso.contains("iifname \"swk-c\" drop") && iso.contains("oifname \"swk-c\" drop"))
        #expect(NetworkPlan.nftRuleset(try parse(#"{"name": "d", "mode": "bridge", "bridge": "br0"}"#)) == nil)
    }

    @Test("dnsmasq runs as libvirt runs it: no config file, foreground, bound to the bridge, its own lease file")
    func dnsmasqArgs() throws {
        let d = try parse(#"{"name": "a", "mode": "isolated", "address": "10.9.0.1/24", "dhcp_range": {"start": "10.9.0.10", "end": "10.9.0.19"}}"#)
        let args = NetworkPlan.dnsmasqArguments(d, pidFile: "/s/a.pid", leaseFile: "/s/a.leases")
        for a in ["--conf-file=/dev/null", "--keep-in-foreground", "--bind-interfaces", "--interface=swk-a", "--except-interface=lo",
                  "--dhcp-range=10.9.0.10,10.9.0.19,255.255.255.0", "--dhcp-leasefile=/s/a.leases", "--pid-file=/s/a.pid",
                  "--dhcp-lease-max=10", "--dhcp-option=3"] {
            #expect(args.contains(a), "\(a) missing from \(args)")
        }
        let dnsOnly = NetworkPlan.dnsmasqArguments(try parse(#"{"name": "b", "mode": "nat", "address": "10.9.0.1/24"}"#), pidFile: "p", leaseFile: "l")
        #expect(!dnsOnly.contains { $0.hasPrefix("--dhcp") })
    }

    @Test("dnsmasq lease files parse; the duid line and malformed lines are skipped")
    func leases() {
        let text = """
        1765000000 52:54:00:12:34:56 10.9.0.12 guest1 01:52:54:00:12:34:56
        0 02:aa:bb:cc:dd:ee 10.9.0.13 * *
        duid 00:01:00:01:2c:aa:bb:cc:dd:ee:ff:00
        garbage line
        """
        let l = DHCPLease.parse(text)
        #expect(l.count == 2)
        #expect(l[0] == DHCPLease(expiry: 1_765_000_000, mac: "52:54:00:12:34:56", ip: "10.9.0.12", hostname: "guest1", clientId: "01:52:54:00:12:34:56"))
        #expect(l[1].hostname == nil && l[1].clientId == nil && l[1].expiry == 0)
        let table = NetFormat.leases(l, prefix: 24)
        #expect(table.contains("10.9.0.12/24") && table.contains("never") && table.contains("2025-12-06 05:46:40"))
    }
}

@Suite("VM NICs")
struct VMNICTests {
    func parse(_ nics: String, extra: String = "") throws(ManagerError) -> VMDefinition {
        try VMDefinition.parse(Array(#"{"name": "web", "nics": \#(nics)\#(extra)}"#.utf8), source: "vm.json")
    }

    func error(_ nics: String, extra: String = "") -> String {
        do {
            _ = try parse(nics, extra: extra)
            return "(no error)"
        } catch {
            return error.message
        }
    }

    @Test("nics parse with default iface ids, derived MACs and TAP names within IFNAMSIZ; normalized JSON keeps them")
    func good() throws {
        let d = try parse(#"[{"network": "default"}, {"bridge": "br0", "mac": "52:54:00:AA:00:01", "iface_id": "lan"}]"#)
        #expect(d.nics == [VMNIC(attachment: .network("default"), ifaceId: "net0"),
                           VMNIC(attachment: .bridge("br0"), mac: "52:54:00:AA:00:01", ifaceId: "lan")])
        #expect(d.nics[1].guestMAC(vmName: "web") == "52:54:00:aa:00:01")
        let derived = d.nics[0].guestMAC(vmName: "web")
        #expect(derived == d.nics[0].guestMAC(vmName: "web") && derived != d.nics[0].guestMAC(vmName: "db") && VMNIC.isMAC(derived))
        let tap = VMNIC.tapName(vmName: "a-very-long-vm-name-indeed", index: 15)
        #expect(tap.utf8.count <= 15 && tap.hasPrefix("swk") && tap.hasSuffix("n15"))
        #expect(VMNIC.tapName(vmName: "a", index: 0) != VMNIC.tapName(vmName: "b", index: 0))
        #expect(try VMDefinition.parse(d.normalizedJSON(), source: "again") == d)
    }

    @Test("bad NICs are refused naming the key", arguments: [
        (#"[{}]"#, "key `nics[0]` needs `network`"),
        (#"[{"network": "a", "bridge": "b"}]"#, "give either `network` or `bridge`, not both"),
        (#"[{"network": "a", "model": "e1000"}]"#, "unknown key `nics[0].model`"),
        (#"[{"network": "a", "mac": "52:54:00:zz:00:01"}]"#, "key `nics[0].mac`"),
        (#"[{"network": "a", "mac": "01:00:5e:00:00:01"}]"#, "is not a unicast MAC address"),
        (#"[{"network": "a"}, {"network": "a", "iface_id": "net0"}]"#, "key `nics[1].iface_id`: the interface id 'net0' is used twice"),
        (#"[{"network": "a", "iface_id": "eth-0"}]"#, "key `nics[0].iface_id`"),
        (#"[{"bridge": "has space"}]"#, "key `nics[0].bridge`"),
        (#"{"network": "a"}"#, "key `nics` must be an array"),
    ])
    func bad(_ nics: String, _ expected: String) {
        let m = error(nics)
        #expect(m.hasPrefix("invalid definition (vm.json): ") && m.contains(expected), "\(m)")
    }

    @Test("a NIC's iface id may not repeat one of the definition's network-interfaces")
    func clashesWithFirecrackerInterfaces() {
        let m = error(#"[{"network": "a", "iface_id": "eth0"}]"#, extra: #", "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}]"#)
        #expect(m.contains("the interface id 'eth0' is used twice"), "\(m)")
    }
}

/// The daemon's `/networks` API through an in-process daemon, on paths that change nothing on the
/// host (no network is started here: NetManagerTests does that inside network namespaces).
@Suite("Daemon networks API without a host network")
struct DaemonNetworkAPITests {
    @Test("empty lists; bad definitions get 400 naming the key; unknown networks 404; bad actions 400; wrong methods 405; nothing is stored")
    func errors() throws {
        let f = try DaemonFixture()
        defer { f.cleanup() }
        #expect(try f.client.json("GET", "/networks?all=true", as: [NetworkInfo].self).isEmpty)
        let cases: [(String, String)] = [
            (#"{"name": "n", "mode": "nat", "address": "10.0.0.1/24", "colour": 1}"#, "unknown key `colour`"),
            (#"{"name": "n", "mode": "nat", "address": "10.0.0.1/99"}"#, "key `address`"),
            (#"{"name": "n", "mode": "mesh", "address": "10.0.0.1/24"}"#, "key `mode`: unknown mode 'mesh'"),
            (#"{"name": "n", "mode": "bridge", "bridge": "swkt-nobr"}"#, "the bridge 'swkt-nobr' does not exist on the host"),
            ("{", "malformed JSON"),
        ]
        for (body, expected) in cases {
            let r = try f.call("POST", "/networks", body)
            #expect(r.status == 400 && r.faultMessage?.contains(expected) == true, "\(body): \(r.text)")
        }
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: f.dir.path + "/networks")) ?? []).isEmpty)
        let missing = try f.call("GET", "/networks/nope")
        #expect(missing.status == 404 && missing.faultMessage == "network 'nope' is not defined")
        #expect(try f.call("PUT", "/networks/nope/state", #"{"action": "start"}"#).status == 404)
        #expect(try f.call("GET", "/networks/nope/leases").status == 404)
        #expect(try f.call("DELETE", "/networks/nope").status == 404)
        let bad = try f.call("PUT", "/networks/nope/state", #"{"action": "reboot"}"#)
        #expect(bad.status == 400 && bad.faultMessage?.contains("`reboot`") == true, "\(bad.text)")
        #expect(try f.call("PATCH", "/networks").status == 405)
        #expect(try f.call("GET", "/networks/a/b/c").status == 404)
    }

    @Test("a VM whose NIC names an undefined network is refused at start (400) before anything is created, and stays shut off")
    func vmOnUndefinedNetwork() throws {
        let f = try DaemonFixture()
        defer { f.cleanup() }
        let kernel = f.dir.path + "/kernel.elf"
        FileManager.default.createFile(atPath: kernel, contents: Data([0x7f]))
        let def = #"{"name": "a", "nics": [{"network": "nope"}], "boot-source": {"kernel_image_path": "\#(kernel)"}}"#
        #expect(try f.call("POST", "/vms", def).status == 201)
        let r = try f.action("a", "start")
        #expect(r.status == 400 && r.faultMessage?.contains("vm 'a': nics[0] uses network 'nope', which is not defined") == true, "\(r.text)")
        #expect(try f.info("a").state == .shutOff)
        #expect(!FileManager.default.fileExists(atPath: f.dir.path + "/run/a/state.json"))
    }
}
