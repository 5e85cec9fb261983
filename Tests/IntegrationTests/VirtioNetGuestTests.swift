import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Testing
import VMM

// The freestanding virtio-net driver (guest/programs/virtio_net.c) against swiftkvm's virtio-net
// on a TAP inside a test namespace (NetworkNamespace): the namespace's own kernel answers ARP and
// ping at 10.0.2.1, pings the guest, and guest/tools/netinject.py injects and counts raw frames.
// Every run of swiftkvm happens inside the namespace (`ip netns exec`), so no packet leaves it.

@Suite("virtio-net: the freestanding driver on a TAP in a test namespace", .serialized,
       .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"),
       .enabled(if: NetworkNamespace.available, "\(NetworkNamespace.unavailableReason ?? "")"))
struct VirtioNetGuestTests {
    static var netinject: String { GuestTestEnvironment.repoRoot.appendingPathComponent("guest/tools/netinject.py").path }

    /// A namespace with tap0 at 10.0.2.1/24.
    func namespace(_ tag: String) throws -> NetworkNamespace {
        let ns = try NetworkNamespace(tag: tag)
        try ns.addTap("tap0", address: "10.0.2.1/24")
        return ns
    }

    /// Runs virtio_net with `cmdline` on tap0 inside `ns`; `interact` drives the host side meanwhile.
    func run(_ ns: NetworkNamespace, cmdline: String, extra: [String] = [], timeout: TimeInterval = 120,
             interact: ((NetChild) -> Void)? = nil) throws -> GuestReport {
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath, "swiftkvm executable not found")
        if let error = GuestTestEnvironment.guestBuildError { Issue.record("\(error)") }
        let child = try ns.spawn([swiftkvm, "run"] + programArguments("virtio_net", cmdline: cmdline)
                                 + ["--memory", "64M", "--net", "tap=tap0"] + extra)
        interact?(child)
        let status = child.waitForExit(timeout: timeout)
        let report = GuestReport(status: status, output: child.output, command: child.commandLine)
        if status == nil { Issue.record("timed out after \(Int(timeout)) s: \(report.command)\n\(report.output)") }
        return report
    }

    @Test("ARP and ICMP echo to the namespace's address, with default, merged (256-byte buffers) and chained (no MRG_RXBUF) receive buffers")
    func ping() throws {
        let ns = try namespace("ping")
        defer { ns.remove() }
        let r = try run(ns, cmdline: "count=4")
        expectPass(r, checks: ["net-setup", "net-config", "net-msix", "arp", "icmp", "net-rx-headers"])
        let merged = try run(ns, cmdline: "count=3 size=1472 rxbuf=256")
        expectPass(merged, checks: ["net-config", "arp", "icmp", "rx-merge", "net-rx-headers"])
        let chained = try run(ns, cmdline: "count=3 size=1472 rxbuf=256 nomrg noevent")
        expectPass(chained, checks: ["net-config", "arp", "icmp", "net-rx-headers"])
        // The host kernel counted the guest's frames on tap0 (ARP and 10 echo requests at least).
        let rx = ns.statistic("tap0", "rx_packets")
        #expect((rx ?? 0) >= 13, "tap0 rx_packets: \(String(describing: rx))")
    }

    @Test("the MAC address: given with mac=, else derived from the VM name and NIC id, stable across runs")
    func macAddress() throws {
        let ns = try namespace("mac")
        defer { ns.remove() }
        let first = try run(ns, cmdline: "count=1", extra: ["--name", "vm-a"]).output
        // `--net tap=tap0` from `run` is the first NIC; the MAC is derived from vm-a/net0.
        let derived = NetSpec.formatMAC(NetSpec.derivedMAC(vmName: "vm-a", id: "net0"))
        #expect(first.contains("# mac=\(derived)"), "\(first)")
        let again = try run(ns, cmdline: "count=1", extra: ["--name", "vm-a"]).output
        #expect(again.contains("# mac=\(derived)"), "\(again)")
        let other = NetSpec.formatMAC(NetSpec.derivedMAC(vmName: "vm-b", id: "net0"))
        #expect(other != derived)
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath)
        let child = try ns.spawn([swiftkvm, "run"] + programArguments("virtio_net", cmdline: "count=1")
                                 + ["--memory", "64M", "--net", "tap=tap0,mac=52:54:00:aa:bb:01"])
        _ = child.waitForExit(timeout: 120)
        #expect(child.output.contains("# mac=52:54:00:aa:bb:01"), "\(child.output)")
    }

    @Test("host → guest: the namespace pings the guest (also 1472-byte and flood pings), then a STOP frame ends it")
    func serve() throws {
        let ns = try namespace("serve")
        defer { ns.remove() }
        var pings: [String] = []
        let r = try run(ns, cmdline: "mode=serve rxbuf=256") { child in
            guard child.waitFor("NET-READY", timeout: 60) else { return }
            pings.append((try? ns.exec(["ping", "-c", "3", "-W", "5", "10.0.2.15"], timeout: 60)) ?? "ping failed")
            pings.append((try? ns.exec(["ping", "-c", "3", "-W", "5", "-s", "1472", "10.0.2.15"], timeout: 60)) ?? "ping -s failed")
            pings.append((try? ns.exec(["ping", "-f", "-c", "500", "-W", "5", "10.0.2.15"], timeout: 60)) ?? "ping -f failed")
            _ = try? ns.exec(["/usr/bin/python3", Self.netinject, "stop", "tap0", "--repeat", "3"])
        }
        expectPass(r, checks: ["net-config", "serve"])
        #expect(pings.count == 3, "\(r.output)")
        for p in pings { #expect(p.contains(" 0% packet loss"), "\(p)") }
        #expect(r.output.contains("echoes=506"), "\(r.output)")
    }

    @Test("host → guest: 3000 injected frames of mixed lengths arrive in order and intact; any loss is the host TAP queue's, counted there")
    func receive() throws {
        let ns = try namespace("rx")
        defer { ns.remove() }
        try ns.exec(["ip", "link", "set", "tap0", "txqueuelen", "10000"])
        func dropped() -> Int { ns.statistic("tap0", "tx_dropped") ?? -1 }
        let before = dropped()
        var sent = ""
        let r = try run(ns, cmdline: "mode=rx n=3000 rxbuf=512") { child in
            guard child.waitFor("NET-READY", timeout: 60) else { return }
            sent = (try? ns.exec(["/usr/bin/python3", Self.netinject, "rx", "tap0", "3000", "--pps", "10000"], timeout: 60)) ?? "netinject failed"
        }
        expectPass(r, checks: ["net-config", "rx"])
        #expect(sent.contains("SENT frames=3000"), "\(sent)")
        // Every frame the TAP queued for the guest arrived, intact and in order. On a loaded host the TAP's own
        // queue may overflow before the VMM reads it; those frames are counted by the host as tx_dropped.
        let line = r.lines.first { $0.hasPrefix("ok rx:") } ?? ""
        let lost = Int(line.split(separator: " ").first { $0.hasPrefix("lost=") }?.dropFirst(5) ?? "") ?? -1
        #expect(line.contains("0 bad payloads, 0 out of order"), "\(r.output)")
        // (tx_dropped also counts the STOP frames and the host's own IPv6 chatter sent after the guest ended.)
        #expect(lost >= 0 && lost <= dropped() - before, "lost \(lost) frames, the TAP dropped only \(dropped() - before)\n\(r.output)")
        #expect(lost < 2000, "most frames lost: \(r.output)")
    }

    @Test("guest → host: TSO frames of 64 KiB pass through the TAP with their offload header intact")
    func transmitTSO() throws {
        let ns = try namespace("tso")
        defer { ns.remove() }
        let counter = try ns.spawn(["/usr/bin/python3", Self.netinject, "count", "tap0", "60", "--idle", "3"])
        #expect(counter.waitFor("COUNT-READY", timeout: 20), "\(counter.output)")
        let r = try run(ns, cmdline: "bench=tx tso=1 n=200")
        #expect(r.status == 33, "\(r.command)\n\(r.output)")
        #expect(r.output.contains("BENCH tx done frames=200"), "\(r.output)")
        _ = counter.waitForExit(timeout: 90)
        #expect(counter.output.contains("COUNT"), "\(counter.output)")
        // Every frame arrived as one GSO frame with a pseudo-header checksum (CHECKSUM_PARTIAL).
        #expect(counter.output.contains(" gso=200 ") && counter.output.contains(" pseudo_ok=200 ")
                && counter.output.contains(" gso_bad=0 "), "\(counter.output)")
    }

    @Test("two VMs on one bridge with no uplink (an isolated network) reach each other: one answers, the other pings it")
    func twoVMsOnABridge() throws {
        let ns = try NetworkNamespace(tag: "iso")
        defer { ns.remove() }
        try ns.addBridge("br0")
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath)
        let server = try ns.spawn([swiftkvm, "run"] + programArguments("virtio_net", cmdline: "mode=serve ip=10.9.0.20 timeout=60000")
                                  + ["--memory", "64M", "--net", "bridge=br0", "--name", "vm-a", "--log-level", "info"])
        defer { server.kill() }
        #expect(server.waitFor("NET-READY", timeout: 60), "\(server.output)")
        let client = try ns.spawn([swiftkvm, "run"] + programArguments("virtio_net", cmdline: "ip=10.9.0.21 peer=10.9.0.20 count=5")
                                  + ["--memory", "64M", "--net", "bridge=br0", "--name", "vm-b"])
        let status = client.waitForExit(timeout: 120)
        let r = GuestReport(status: status, output: client.output, command: client.commandLine)
        expectPass(r, checks: ["net-config", "arp", "icmp"])
        // The peer's MAC in the ARP answer is the server VM's derived MAC.
        let serverMAC = NetSpec.formatMAC(NetSpec.derivedMAC(vmName: "vm-a", id: "net0"))
        #expect(r.output.contains("10.9.0.20 is at \(serverMAC)"), "\(r.output)")
        _ = try? ns.exec(["/usr/bin/python3", Self.netinject, "stop", "br0", "--repeat", "3"])
        #expect(server.waitForExit(timeout: 30) == 33, "\(server.output)")
        #expect(server.output.contains("echoes=5"), "\(server.output)")
    }

    @Test("user-mode networking (--net user): passt answers ARP and relays ICMP echoes to a host in the next namespace",
          .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/passt"), "passt is not installed: run scripts/install-deps"))
    func userMode() throws {
        // The VM's namespace has a default route to 'outside' (passt needs one) and lets passt's
        // unprivileged user open ping sockets.
        let inside = try NetworkNamespace(tag: "user")
        let outside = try NetworkNamespace(tag: "out")
        defer { inside.remove(); outside.remove() }
        try inside.link(to: outside, local: "a0", localAddress: "192.168.80.2/24", remote: "b0", remoteAddress: "192.168.80.1/24")
        try inside.exec(["ip", "route", "add", "default", "via", "192.168.80.1"])
        try inside.exec(["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"])
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath)
        let vm = try inside.spawn([swiftkvm, "run"] + programArguments("virtio_net", cmdline: "ip=192.168.80.2 peer=192.168.80.1 count=3")
                                  + ["--memory", "64M", "--net", "user", "--log-level", "info"])
        let status = vm.waitForExit(timeout: 120)
        let r = GuestReport(status: status, output: vm.output, command: vm.commandLine)
        expectPass(r, checks: ["net-config", "arp", "icmp"])
        #expect(r.output.contains("on passt (pid "), "\(r.output)")
        // The echoes reached 'outside' (its kernel answered them) and passt is gone with the VM.
        let rx = outside.statistic("b0", "rx_packets")
        #expect((rx ?? 0) >= 3, "b0 rx_packets: \(String(describing: rx))")
        // passt (its pid from the VMM's log) ended with the VM.
        if let at = r.output.range(of: "on passt (pid "), let pid = Int32(r.output[at.upperBound...].prefix { $0.isNumber }) {
            let comm = (try? String(contentsOfFile: "/proc/\(pid)/comm", encoding: .utf8)) ?? ""
            #expect(!comm.hasPrefix("passt"), "passt (pid \(pid)) still runs after the VM ended")
        }
    }

    @Test("Firecracker's config file: network-interfaces (host_dev_name, guest_mac) give the guest its NIC (on virtio-mmio, the vmm's default, and with --enable-pci on PCI), and the metrics count its frames",
          arguments: [false, true])
    func firecrackerConfig(enablePCI: Bool) throws {
        let ns = try namespace(enablePCI ? "fcp" : "fcm")
        defer { ns.remove() }
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("swk-fc-net-\(getpid())-\(enablePCI)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = """
            {"boot-source": {"kernel_image_path": "\(GuestTestEnvironment.guestImage("virtio_net"))", "boot_args": "\(enablePCI ? "" : "mmio ")count=3"},
             "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
             "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}]}
            """
        try config.write(toFile: dir + "/config.json", atomically: true, encoding: .utf8)
        let vmm = try ns.spawn([swiftkvm, "vmm"] + (enablePCI ? ["--enable-pci"] : []) + ["--no-api", "--config-file", dir + "/config.json",
                                "--metrics-path", dir + "/metrics.ndjson", "--serial-log", dir + "/serial.log"])
        let status = vmm.waitForExit(timeout: 120)
        let serial = (try? String(contentsOfFile: dir + "/serial.log", encoding: .utf8)) ?? ""
        let r = GuestReport(status: status, output: serial, command: vmm.commandLine)
        #expect(serial.contains("# mac=06:00:ac:10:00:02"), "\(serial)\n\(vmm.output)")
        #expect(r.okNames.isSuperset(of: ["net-config", "arp", "icmp"]), "\(serial)\n\(vmm.output)")
        #expect(r.failLines.isEmpty, "\(serial)")
        let metrics = (try? String(contentsOfFile: dir + "/metrics.ndjson", encoding: .utf8)) ?? ""
        // The last line's deltas, summed over the file, count the ARP request and three echo requests.
        var txPackets: UInt64 = 0
        for line in metrics.split(separator: "\n") {
            guard let obj = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
                  let net = obj["net_eth0"] as? [String: Any], let n = net["tx_packets_count"] as? NSNumber else { continue }
            txPackets += n.uint64Value
        }
        #expect(txPackets >= 4, "metrics: \(metrics)")
    }

    @Test("bad --net input: a missing TAP, a busy TAP, a missing bridge, a bad MAC, a duplicate id: exit 2, the error names it, nothing is created")
    func badInput() throws {
        let ns = try namespace("bad")
        defer { ns.remove() }
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath)
        func fails(_ args: [String], mentioning text: String) throws {
            let r = try MCChild.run(NetworkNamespace.ip, ["netns", "exec", ns.name, swiftkvm, "run"]
                                          + programArguments("virtio_net") + ["--memory", "64M"] + args, timeout: 60)
            #expect(r.status == 2, "\(args): status \(r.status)\n\(r.stdout)\(r.stderr)")
            #expect(r.stderr.contains(text), "\(args): \(r.stderr)")
        }
        try fails(["--net", "tap=nosuchtap"], mentioning: "TAP 'nosuchtap' does not exist")
        try fails(["--net", "bridge=nosuchbr"], mentioning: "bridge 'nosuchbr' does not exist")
        try fails(["--net", "tap=tap0,mac=52:54:00:zz:00:01"], mentioning: "mac=52:54:00:zz:00:01")
        try fails(["--net", "tap=tap0,mac=01:00:5e:00:00:01"], mentioning: "multicast")
        try fails(["--net", "tap=tap0,id=a", "--net", "bridge=br9,id=a"], mentioning: "two NICs have this id")
        try fails(["--net", "tap=tap0,colour=red"], mentioning: "unknown key 'colour'")
        try fails(["--net", "tap=lo"], mentioning: "'lo' is not a TAP")
        try fails(["--net", "user,hostfwd=tcp::99999-:80"], mentioning: "hostfwd=tcp::99999-:80")
        try fails(["--net", "user", "--net", "user"], mentioning: "only one user-mode NIC")
        // Busy: a running VM holds tap0.
        let first = try ns.spawn([swiftkvm, "run"] + programArguments("virtio_net", cmdline: "mode=serve timeout=60000")
                                 + ["--memory", "64M", "--net", "tap=tap0"])
        defer { first.kill() }
        #expect(first.waitFor("NET-READY", timeout: 60), "\(first.output)")
        try fails(["--net", "tap=tap0"], mentioning: "TAP 'tap0' is busy")
        _ = try? ns.exec(["/usr/bin/python3", Self.netinject, "stop", "tap0", "--repeat", "3"])
        #expect(first.waitForExit(timeout: 30) == 33, "\(first.output)")
        // Nothing was left behind: only lo and tap0 exist.
        let links = try ns.exec(["ip", "-o", "link", "show"])
        #expect(links.split(separator: "\n").count == 2, "\(links)")
    }
}
