import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A `swiftkvm daemon` running inside its own network namespace (`ip netns exec NS swiftkvm
/// daemon`), on its own state directory, driven with `swiftkvm net|vm --socket` from outside
/// (the socket is a path, not bound to a namespace). Everything the daemon creates (bridges, nft
/// tables, sysctls, TAPs, dnsmasq) lives in the namespace; `stop()` stops its networks, the
/// daemon, any dnsmasq it left (by PID) and removes the namespace and the directory.
final class NetDaemon {
    let ns: NetworkNamespace
    let dir: MCTempDir
    private(set) var child: MCChild?
    var socket: String { dir.path + "/daemon.sock" }
    static let nft = "/usr/sbin/nft", dnsmasq = "/usr/sbin/dnsmasq"

    /// Why these tests cannot run here, or nil.
    static let unavailableReason: String? = {
        if let r = NetworkNamespace.unavailableReason { return r }
        if MCSupport.swiftkvm == nil { return "the swiftkvm executable was not found (build it, or set SWIFTKVM_BIN)" }
        if !FileManager.default.isExecutableFile(atPath: nft) { return "nft is missing: run scripts/install-deps (package nftables)" }
        if !FileManager.default.isExecutableFile(atPath: dnsmasq) { return "dnsmasq is missing: run scripts/install-deps (package dnsmasq-base)" }
        return nil
    }()

    init(tag: String, environment: [String: String] = [:]) throws {
        ns = try NetworkNamespace(tag: tag)
        dir = MCTempDir(prefix: "skn")
        do {
            try startDaemon(environment: environment)
        } catch {
            ns.remove()
            dir.remove()
            throw error
        }
    }

    /// Starts (or restarts) the daemon on the same state directory.
    func startDaemon(environment: [String: String] = [:]) throws {
        let exe = try #require(MCSupport.swiftkvm)
        let env = environment.map { "\($0.key)=\($0.value)" }.sorted()
        child = try MCChild(NetworkNamespace.ip, ["netns", "exec", ns.name, "/usr/bin/env"] + env + [exe, "daemon", "--state-dir", dir.path])
        let ready = MCSupport.wait(seconds: 30) { (try? net(["list"]).status) == 0 }
        if !ready { throw MCChild.SpawnError(description: "the daemon did not come up: \(child?.stderr.text ?? "")") }
    }

    /// Kills the daemon with `signal` (networks and VMs stay).
    func killDaemon(_ signal: Int32 = SIGKILL) {
        child?.signal(signal)
        _ = child?.wait(timeout: 10)
    }

    @discardableResult
    func net(_ args: [String], timeout: Double = 60) throws -> MCChild.Result {
        try MCChild.run(try #require(MCSupport.swiftkvm), ["net", "--socket", socket] + args, timeout: timeout)
    }

    @discardableResult
    func vm(_ args: [String], timeout: Double = 120) throws -> MCChild.Result {
        try MCChild.run(try #require(MCSupport.swiftkvm), ["vm", "--socket", socket] + args, timeout: timeout)
    }

    /// Writes a definition file and returns its path.
    func file(_ name: String, _ json: String) -> String { dir.file(name, json) }

    /// `ip -o link` names inside the namespace.
    func links() -> [String] {
        ((try? ns.exec(["ip", "-o", "link", "show"])) ?? "").split(separator: "\n").compactMap { line in
            line.split(separator: ":", maxSplits: 2).dropFirst().first.map { String($0.trimmingCharacters(in: .whitespaces).split(separator: "@")[0]) }
        }
    }

    func nftTables() -> String { (try? ns.exec([Self.nft, "list", "tables"])) ?? "" }
    func ipForward() -> String { ((try? ns.exec(["cat", "/proc/sys/net/ipv4/ip_forward"])) ?? "").trimmingCharacters(in: .whitespacesAndNewlines) }

    /// The dnsmasq processes started for this state directory (pid → command line).
    func dnsmasqProcesses() -> [pid_t: String] {
        var out: [pid_t: String] = [:]
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = pid_t(entry), let data = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { continue }
            let cmd = String(decoding: data.map { $0 == 0 ? 0x20 : $0 }, as: UTF8.self)
            if cmd.hasPrefix(Self.dnsmasq) && cmd.contains(dir.path + "/") { out[pid] = cmd }
        }
        return out
    }

    /// The `Key: value` lines of `net info NAME`.
    func info(_ name: String) throws -> [String: String] {
        var out: [String: String] = [:]
        for line in try net(["info", name]).stdout.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            out[String(line[..<colon])] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        return out
    }

    func stop() {
        if child?.poll() == nil {
            if let r = try? vm(["list"], timeout: 20) {
                for line in r.stdout.split(separator: "\n").dropFirst(2) {
                    let cols = line.split(separator: " ")
                    if cols.count >= 2 { _ = try? vm(["destroy", String(cols[1])], timeout: 30) }
                }
            }
            if let r = try? net(["list"], timeout: 20) {
                for line in r.stdout.split(separator: "\n").dropFirst(2) {
                    if let name = line.split(separator: " ").first { _ = try? net(["stop", String(name)], timeout: 30) }
                }
            }
            child?.stop(grace: 10)
        }
        // A dnsmasq the daemon left (e.g. after it was killed): ours, by PID.
        for pid in dnsmasqProcesses().keys { kill(pid, SIGKILL) }
        ns.remove()
        dir.remove()
    }
}

@Suite("swiftkvm net: networks made by the daemon inside a test network namespace", .serialized,
       .enabled(if: NetDaemon.unavailableReason == nil, "\(NetDaemon.unavailableReason ?? "")"))
struct NetManagerTests {
    static let natDefinition = #"{"name": "lab", "mode": "nat", "address": "10.77.0.1/24", "dhcp_range": {"start": "10.77.0.10", "end": "10.77.0.99"}}"#

    @Test("net define/start creates the bridge with its address, the nft table and dnsmasq, and turns on forwarding; net stop removes all of it")
    func startStop() throws {
        let d = try NetDaemon(tag: "netss")
        defer { d.stop() }
        var r = try d.net(["define", d.file("lab.json", Self.natDefinition)])
        #expect(r.status == 0 && r.stdout.contains("Network 'lab' defined"), "\(r.stdout)\(r.stderr)")
        #expect(FileManager.default.fileExists(atPath: d.dir.path + "/networks/lab.json"))
        r = try d.net(["list"])
        #expect(!r.stdout.contains("lab"), "inactive networks are listed only with --all: \(r.stdout)")
        r = try d.net(["list", "--all"])
        #expect(r.stdout.contains("lab") && r.stdout.contains("inactive"), "\(r.stdout)")
        #expect(d.ipForward() == "0")

        r = try d.net(["start", "lab"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(d.links().contains("swk-lab"), "\(d.links())")
        let addr = try d.ns.exec(["ip", "-o", "-4", "addr", "show", "dev", "swk-lab"])
        #expect(addr.contains("10.77.0.1/24"), "\(addr)")
        #expect(FileManager.default.fileExists(atPath: "/sys/class/net/lo"))
        #expect(d.nftTables().contains("table ip swiftkvm-lab"), "\(d.nftTables())")
        let ruleset = try d.ns.exec([NetDaemon.nft, "list", "table", "ip", "swiftkvm-lab"])
        #expect(ruleset.contains("masquerade"), "\(ruleset)")
        #expect(d.ipForward() == "1")
        let info = try d.info("lab")
        #expect(info["Active"] == "yes" && info["Bridge"] == "swk-lab" && info["Mode"] == "nat", "\(info)")
        let pid = try #require(info["dnsmasq PID"].flatMap { pid_t($0) }, "\(info)")
        let procs = d.dnsmasqProcesses()
        #expect(procs.count == 1 && procs[pid]?.contains("--interface=swk-lab") == true, "\(procs)")
        r = try d.net(["list"])
        #expect(r.stdout.contains("lab") && r.stdout.contains("active") && r.stdout.contains("10.77.0.1/24"), "\(r.stdout)")
        r = try d.net(["start", "lab"])
        #expect(r.status == 1 && r.stderr.contains("network 'lab' is already active"), "\(r.stderr)")
        r = try d.net(["undefine", "lab"])
        #expect(r.status == 1 && r.stderr.contains("stop it before undefining it"), "\(r.stderr)")

        // A second network on an overlapping subnet: the running one's route refuses it.
        r = try d.net(["define", d.file("lab2.json", #"{"name": "lab2", "mode": "isolated", "address": "10.77.0.129/25"}"#)])
        #expect(r.status == 1 && r.stderr.contains("overlaps the host's route '10.77.0.0/24") && r.stderr.contains("swk-lab"), "\(r.stderr)")

        // Autostart and a redefinition while active (it takes effect at the next start).
        r = try d.net(["autostart", "lab"])
        #expect(r.status == 0 && r.stdout.contains("marked as autostarted"), "\(r.stdout)\(r.stderr)")
        #expect(try d.info("lab")["Autostart"] == "yes")
        #expect(try d.net(["autostart", "lab", "--disable"]).status == 0)
        #expect(try d.info("lab")["Autostart"] == "no")
        r = try d.net(["define", d.file("lab-b.json", Self.natDefinition.replacingOccurrences(of: "10.77.0.99", with: "10.77.0.50"))])
        #expect(r.status == 0 && r.stdout.contains("redefined (takes effect at its next start)"), "\(r.stdout)\(r.stderr)")
        #expect(try d.info("lab")["DHCP range"] == "10.77.0.10 - 10.77.0.99", "the running definition is shown")

        r = try d.net(["stop", "lab"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(try d.info("lab")["DHCP range"] == "10.77.0.10 - 10.77.0.50", "the new definition once stopped")
        #expect(!d.links().contains("swk-lab"), "\(d.links())")
        #expect(!d.nftTables().contains("swiftkvm-lab"), "\(d.nftTables())")
        #expect(MCSupport.wait(seconds: 5) { d.dnsmasqProcesses().isEmpty }, "dnsmasq still runs: \(d.dnsmasqProcesses())")
        #expect(kill(pid, 0) != 0)
        #expect(d.ipForward() == "0", "the daemon turned forwarding on, so it turns it off again")
        #expect(try d.info("lab")["Active"] == "no")
        r = try d.net(["stop", "lab"])
        #expect(r.status == 1 && r.stderr.contains("not active"), "\(r.stderr)")
        r = try d.net(["undefine", "lab"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(!(try d.net(["list", "--all"]).stdout.contains("lab")))
        // Network events join the daemon's event stream (`vm` empty, `network` set).
        let events = try d.vm(["events", "--since", "0", "--timeout", "2"]).stdout
        for e in ["defined", "started", "stopped", "undefined"] {
            #expect(events.contains(#""event":"\#(e)","network":"lab""#), "\(e): \(events)")
        }
    }

    @Test("forwarding that was on before stays on; isolated networks do not need it; routed ones get no masquerade")
    func forwardingAndModes() throws {
        let d = try NetDaemon(tag: "netfw")
        defer { d.stop() }
        _ = try d.net(["define", d.file("iso.json", #"{"name": "iso", "mode": "isolated", "address": "10.78.0.1/24"}"#)])
        _ = try d.net(["define", d.file("rt.json", #"{"name": "rt", "mode": "routed", "address": "10.79.0.1/24", "bridge": "rtbr"}"#)])
        #expect(try d.net(["start", "iso"]).status == 0)
        #expect(d.ipForward() == "0", "isolated networks leave forwarding off")
        let iso = try d.ns.exec([NetDaemon.nft, "list", "table", "ip", "swiftkvm-iso"])
        #expect(iso.contains("iifname \"swk-iso\" drop") && !iso.contains("masquerade"), "\(iso)")
        try d.ns.exec(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        #expect(try d.net(["start", "rt"]).status == 0)
        #expect(d.links().contains("rtbr"))
        let rt = try d.ns.exec([NetDaemon.nft, "list", "table", "ip", "swiftkvm-rt"])
        #expect(!rt.contains("masquerade") && rt.contains("oifname \"rtbr\" ip daddr 10.79.0.0/24 accept"), "\(rt)")
        #expect(try d.net(["stop", "rt"]).status == 0)
        #expect(d.ipForward() == "1", "forwarding was on before the daemon: it stays on")
        #expect(try d.net(["stop", "iso"]).status == 0)
        #expect(d.links().sorted() == ["lo"], "\(d.links())")
        #expect(!d.nftTables().contains("swiftkvm"), "\(d.nftTables())")
    }

    @Test("bad definitions give clear errors and change nothing: overlapping route, bad CIDR, unknown mode, missing bridge for mode bridge")
    func badDefinitions() throws {
        let d = try NetDaemon(tag: "netbad")
        defer { d.stop() }
        // A route the "host" (the namespace) already has.
        try d.ns.exec(["ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1"])
        try d.ns.exec(["ip", "addr", "add", "10.66.0.1/24", "dev", "up0"])
        try d.ns.exec(["ip", "link", "set", "up0", "up"])
        let linksBefore = d.links().sorted(), tablesBefore = d.nftTables()
        let cases: [(String, String, String)] = [
            ("overlap", #"{"name": "o", "mode": "nat", "address": "10.66.0.129/25"}"#,
             "the subnet 10.66.0.128/25 overlaps the host's route '10.66.0.0/24 dev up0'"),
            ("cidr", #"{"name": "c", "mode": "nat", "address": "10.67.0.1/40"}"#, "key `address`: '10.67.0.1/40' is not an IPv4 address with a prefix length"),
            ("mode", #"{"name": "m", "mode": "vxlan", "address": "10.67.0.1/24"}"#, "key `mode`: unknown mode 'vxlan'"),
            ("bridge", #"{"name": "b", "mode": "bridge", "bridge": "nobr0"}"#, "the bridge 'nobr0' does not exist on the host"),
            ("range", #"{"name": "r", "mode": "nat", "address": "10.67.0.1/24", "dhcp_range": {"start": "10.67.1.2", "end": "10.67.1.9"}}"#,
             "key `dhcp_range.start`: 10.67.1.2 is not a host address of the subnet 10.67.0.0/24"),
        ]
        for (tag, json, expected) in cases {
            let r = try d.net(["define", d.file("\(tag).json", json)])
            #expect(r.status == 1, "\(tag): \(r.stdout)")
            #expect(r.stderr.hasPrefix("swiftkvm: error: invalid network definition") && r.stderr.contains(expected), "\(tag): \(r.stderr)")
        }
        // The same checks in the daemon (a client that skips the CLI's own parse): 400 naming the key.
        let client = try MCChild.run("/usr/bin/curl", ["-s", "--unix-socket", d.socket, "-X", "POST", "http://localhost/networks",
                                                       "-d", #"{"name": "o", "mode": "nat", "address": "10.66.0.2/16"}"#])
        #expect(client.stdout.contains("overlaps the host's route '10.66.0.0/24 dev up0'"), "\(client.stdout)")
        #expect(try d.net(["list", "--all"]).stdout.split(separator: "\n").count == 2, "nothing was defined")
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: d.dir.path + "/networks")) ?? []).isEmpty)
        #expect(d.links().sorted() == linksBefore && d.nftTables() == tablesBefore)
        #expect(try d.net(["start", "nope"]).stderr.contains("network 'nope' is not defined"))
    }

    @Test("dnsmasq or nft missing: net start fails naming the Debian package and leaves nothing behind", arguments: [
        ("SWIFTKVM_DNSMASQ", "/nonexistent/dnsmasq", "install the Debian package dnsmasq-base"),
        ("SWIFTKVM_NFT", "/nonexistent/nft", "install the Debian package nftables"),
    ])
    func toolMissing(_ variable: String, _ path: String, _ expected: String) throws {
        let d = try NetDaemon(tag: "netmiss", environment: [variable: path])
        defer { d.stop() }
        #expect(try d.net(["define", d.file("lab.json", Self.natDefinition)]).status == 0)
        let r = try d.net(["start", "lab"])
        #expect(r.status == 1 && r.stderr.contains(path) && r.stderr.contains(expected), "\(r.stderr)")
        #expect(d.links().sorted() == ["lo"] && !d.nftTables().contains("swiftkvm") && d.ipForward() == "0")
        #expect(try d.dnsmasqProcesses().isEmpty && d.info("lab")["Active"] == "no")
    }

    @Test("a DHCP client on the network's bridge gets a lease that net dhcp-leases lists")
    func dhcpLease() throws {
        let d = try NetDaemon(tag: "netdhcp")
        defer { d.stop() }
        let client = try NetworkNamespace(tag: "dhcpcl")
        defer { client.remove() }
        _ = try d.net(["define", d.file("lab.json", Self.natDefinition)])
        #expect(try d.net(["start", "lab"]).status == 0)
        // A veth from the client's namespace plugged into the bridge, as a guest's TAP would be.
        try d.ns.exec(["ip", "link", "add", "port0", "type", "veth", "peer", "name", "eth0", "netns", client.name])
        try d.ns.exec(["ip", "link", "set", "port0", "master", "swk-lab"])
        try d.ns.exec(["ip", "link", "set", "port0", "up"])
        try client.exec(["ip", "link", "set", "eth0", "address", "52:54:00:77:00:42"])
        try client.exec(["ip", "link", "set", "eth0", "up"])
        let out = try client.exec(["/bin/sh", "-c", "/usr/bin/busybox udhcpc -i eth0 -n -q -t 10 -T 1 -s /bin/true -x hostname:labguest 2>&1"], timeout: 40)
        #expect(out.contains("lease of 10.77.0."), "\(out)")
        let r = try d.net(["dhcp-leases", "lab"])
        #expect(r.status == 0, "\(r.stderr)")
        let row = r.stdout.split(separator: "\n").first { $0.contains("52:54:00:77:00:42") }.map(String.init) ?? ""
        #expect(row.contains("ipv4") && row.contains("10.77.0.") && row.contains("/24") && row.contains("labguest"), "\(r.stdout)")
        #expect(r.stdout.hasPrefix(" Expiry Time"), "\(r.stdout)")
        try d.ns.exec(["ip", "link", "del", "port0"])
        #expect(try d.net(["stop", "lab"]).status == 0)
    }

    @Test("networks survive a daemon crash: the restarted daemon re-attaches (same dnsmasq), restarts a dnsmasq that died, and stops cleanly; autostart networks start with the daemon")
    func reattach() throws {
        let d = try NetDaemon(tag: "netre")
        defer { d.stop() }
        _ = try d.net(["define", d.file("lab.json", Self.natDefinition)])
        _ = try d.net(["define", d.file("auto.json", #"{"name": "auto", "mode": "isolated", "address": "10.80.0.1/24", "autostart": true}"#)])
        #expect(try d.net(["start", "lab"]).status == 0)
        let pid = try #require(try d.info("lab")["dnsmasq PID"].flatMap { pid_t($0) })
        d.killDaemon()
        #expect(kill(pid, 0) == 0, "dnsmasq outlives the daemon")
        try d.startDaemon()
        #expect(MCSupport.wait(seconds: 20) { (try? d.info("auto")["Active"]) == "yes" }, "the autostart network starts")
        #expect(try d.info("lab")["Active"] == "yes")
        #expect(try d.info("lab")["dnsmasq PID"] == String(pid), "re-attached to the same dnsmasq")
        // The supervisor starts a dnsmasq that dies again.
        kill(pid, SIGKILL)
        #expect(MCSupport.wait(seconds: 15) {
            guard let p = (try? d.info("lab"))?["dnsmasq PID"].flatMap({ pid_t($0) }) else { return false }
            return p != pid && kill(p, 0) == 0
        }, "dnsmasq restarted: \(d.dnsmasqProcesses())")
        #expect(try d.net(["stop", "lab"]).status == 0)
        #expect(try d.net(["stop", "auto"]).status == 0)
        #expect(MCSupport.wait(seconds: 5) { d.dnsmasqProcesses().isEmpty })
        #expect(d.links().sorted() == ["lo"] && !d.nftTables().contains("swiftkvm") && d.ipForward() == "0", "\(d.links()) \(d.nftTables())")
    }

    @Test("a VM NIC on a network gets a TAP on its bridge, passed to the vmm as host_dev_name and removed when the VM stops; a VM on an inactive network is refused",
          .enabled(if: MCSupport.canRunGuests, "needs /dev/kvm and the ticker guest"))
    func vmNIC() throws {
        let d = try NetDaemon(tag: "netvm")
        defer { d.stop() }
        _ = try d.net(["define", d.file("lab.json", Self.natDefinition)])
        let kernel = try #require(MCSupport.ticker)
        let def = d.file("web.json", """
            {"name": "web", "nics": [{"network": "lab"}, {"network": "lab", "mac": "52:54:00:00:00:07", "iface_id": "second"}],
             "boot-source": {"kernel_image_path": "\(kernel)", "boot_args": "\(MCSupport.tickerArgs(ticks: 0))"},
             "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}
            """)
        var r = try d.vm(["define", def])
        #expect(r.status == 0, "\(r.stderr)")
        r = try d.vm(["start", "web"])
        #expect(r.status == 1 && r.stderr.contains("network 'lab', which is not active (start it with `swiftkvm net start lab`)"), "\(r.stderr)")
        #expect(d.links().sorted() == ["lo"])

        #expect(try d.net(["start", "lab"]).status == 0)
        r = try d.vm(["start", "web"])
        #expect(r.status == 0, "\(r.stderr)")
        let taps = d.links().filter { $0.hasPrefix("swk") && $0 != "swk-lab" }.sorted()
        #expect(taps.count == 2 && taps.allSatisfy { $0.utf8.count <= 15 }, "\(d.links())")
        for tap in taps {
            let link = (try? d.ns.exec(["ip", "-o", "link", "show", "dev", tap])) ?? ""
            #expect(link.contains("master swk-lab") && link.contains("UP"), "\(link)")
        }
        let config = (try? String(contentsOfFile: d.dir.path + "/run/web/config.json", encoding: .utf8)) ?? ""
        for tap in taps { #expect(config.contains("\"host_dev_name\" : \"\(tap)\""), "\(config)") }
        #expect(config.contains("\"iface_id\" : \"net0\"") && config.contains("\"iface_id\" : \"second\"") && config.contains("52:54:00:00:00:07"), "\(config)")
        #expect(try d.info("lab")["VMs"] == "web")
        let vmInfo = try d.vm(["info", "web"]).stdout
        #expect(vmInfo.contains("NIC second:") && vmInfo.contains("52:54:00:00:00:07 on network lab (swk-lab), TAP \(taps[1])"), "\(vmInfo)")
        r = try d.net(["stop", "lab"])
        #expect(r.status == 1 && r.stderr.contains("network 'lab' is used by running vm 'web'"), "\(r.stderr)")

        r = try d.vm(["destroy", "web"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(MCSupport.wait(seconds: 5) { d.links().sorted() == ["lo", "swk-lab"] }, "the TAPs are removed with the VM: \(d.links())")
        #expect(try d.net(["stop", "lab"]).status == 0)
    }

    @Test("end to end: the freestanding virtio_net guest, a VM of the daemon on a nat network, pings the network's gateway through its TAP and the bridge",
          .enabled(if: MCSupport.canRunGuests && MCSupport.guestProgram("virtio_net") != nil, "needs /dev/kvm and guest/build/virtio_net.elf"))
    func guestPingsGateway() throws {
        let d = try NetDaemon(tag: "netping")
        defer { d.stop() }
        _ = try d.net(["define", d.file("lab.json", Self.natDefinition)])
        #expect(try d.net(["start", "lab"]).status == 0)
        let kernel = try #require(MCSupport.guestProgram("virtio_net"))
        let def = d.file("pinger.json", """
            {"name": "pinger", "nics": [{"network": "lab", "mac": "52:54:00:77:00:07"}],
             "boot-source": {"kernel_image_path": "\(kernel)", "boot_args": "count=3 ip=10.77.0.50 peer=10.77.0.1"},
             "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}
            """)
        #expect(try d.vm(["define", def]).status == 0)
        let r = try d.vm(["start", "pinger"])
        #expect(r.status == 0, "\(r.stderr)")
        let stopped = MCSupport.wait(seconds: 120) {
            parseList((try? d.vm(["list", "--all"]).stdout) ?? "")["pinger"]?.state == "shut off"
        }
        let serial = (try? String(contentsOfFile: d.dir.path + "/logs/pinger.serial.log", encoding: .utf8)) ?? ""
        let vmmLog = (try? String(contentsOfFile: d.dir.path + "/logs/pinger.vmm.log", encoding: .utf8)) ?? ""
        #expect(stopped, "the guest should finish its pings: \(serial)\n\(vmmLog)")
        let report = GuestReport(status: nil, output: serial, command: "vm start pinger")
        #expect(serial.contains("# mac=52:54:00:77:00:07"), "\(serial)")
        #expect(report.okNames.isSuperset(of: ["net-config", "arp", "icmp"]) && report.failLines.isEmpty, "\(serial)\n\(vmmLog)")
        // The bridge received the guest's ARP request and echo requests (its neighbour entry is
        // flushed when the last port goes, so count frames instead).
        let rx = d.ns.statistic("swk-lab", "rx_packets")
        #expect((rx ?? 0) >= 4, "swk-lab rx_packets: \(String(describing: rx))")
        #expect(MCSupport.wait(seconds: 5) { d.links().sorted() == ["lo", "swk-lab"] }, "the TAP goes with the VM: \(d.links())")
        #expect(try d.net(["stop", "lab"]).status == 0)
    }

    @Test("VM TAPs across daemon restarts: a VM that outlives the daemon keeps its TAP (removed by a later destroy); the TAP of a VM that died meanwhile is removed at restart",
          .enabled(if: MCSupport.canRunGuests, "needs /dev/kvm and the ticker guest"))
    func vmTapsAcrossRestart() throws {
        let d = try NetDaemon(tag: "netvmre")
        defer { d.stop() }
        _ = try d.net(["define", d.file("lab.json", Self.natDefinition)])
        #expect(try d.net(["start", "lab"]).status == 0)
        let kernel = try #require(MCSupport.ticker)
        for name in ["stays", "dies"] {
            let def = d.file("\(name).json", """
                {"name": "\(name)", "nics": [{"network": "lab"}],
                 "boot-source": {"kernel_image_path": "\(kernel)", "boot_args": "\(MCSupport.tickerArgs(ticks: 0))"},
                 "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}
                """)
            #expect(try d.vm(["define", def]).status == 0)
            let r = try d.vm(["start", name])
            #expect(r.status == 0, "\(r.stderr)")
        }
        let stays = "swk" + String(format: "%08x", fnv32("stays")) + "n0", dies = "swk" + String(format: "%08x", fnv32("dies")) + "n0"
        #expect(Set(d.links()).isSuperset(of: [stays, dies]), "\(d.links())")
        let state = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: d.dir.path + "/run/dies/state.json"))) as? [String: Any]
        let diesPID = try #require((state?["pid"] as? NSNumber)?.int32Value)
        d.killDaemon()
        kill(diesPID, SIGKILL) // our VM's vmm, by its PID
        #expect(MCSupport.wait(seconds: 10) { kill(diesPID, 0) != 0 })
        try d.startDaemon()
        #expect(!d.links().contains(dies), "the dead VM's TAP is removed: \(d.links())")
        #expect(d.links().contains(stays), "\(d.links())")
        #expect(try d.info("lab")["VMs"] == "stays")
        #expect(try d.net(["stop", "lab"]).stderr.contains("used by running vm 'stays'"))
        #expect(try d.vm(["destroy", "stays"]).status == 0)
        #expect(MCSupport.wait(seconds: 5) { !d.links().contains(stays) }, "\(d.links())")
        #expect(try d.net(["stop", "lab"]).status == 0)
    }
}

/// FNV-1a (32 bits), as the daemon names TAPs.
private func fnv32(_ text: String) -> UInt32 {
    var h: UInt32 = 0x811c_9dc5
    for b in text.utf8 { h ^= UInt32(b); h = h &* 0x0100_0193 }
    return h
}
