import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Testing
import VMM

// One boot of the lean guest kernel on a NAT network built inside test namespaces, as libvirt
// builds its default network: namespace "lan" holds a bridge with the gateway address, dnsmasq
// (DHCP) and an nftables masquerade towards namespace "wan", which holds an HTTP server and has
// no route back to the guests' subnet (so only the masquerade lets replies return). The VMM runs
// inside "lan" with `--net bridge=br0`: it creates its own TAP on the bridge.
//
// Checked: the guest's init gets a DHCP lease and prints it; the MAC is the one derived from the
// VM name; the guest pings its gateway; wget through the masquerade fetches a file (its md5 is
// compared) and the server saw the request from the masquerading address; the namespace that
// owns the bridge pings the guest; a 1 MiB upload from the guest arrives byte-exact; dnsmasq's
// lease file lists the guest; the VMM's TAP disappears when the VM stops. A second NIC is user-mode
// (passt, `--net user,hostfwd=tcp::18080-:8080`): the guest gets passt's DHCP lease on eth1 (the
// address of lan's uplink, as passt copies the host's), and wget over eth1 to the gateway address
// reaches a server on lan's loopback (passt maps the gateway to the host); a client on lan's
// loopback reaches a server in the guest through the forwarded port.

@Suite("Linux: networking through virtio-net on a NAT network in test namespaces", .serialized,
       .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"),
       .enabled(if: !LinuxBoot.skipRequested, "SWIFTKVM_SKIP_LINUX=1"),
       .enabled(if: NetworkNamespace.available, "\(NetworkNamespace.unavailableReason ?? "")"))
struct LinuxNetworkTests {
    static let dnsmasq = "/usr/sbin/dnsmasq"
    static let nft = "/usr/sbin/nft"

    @Test("the lean guest gets a DHCP lease on a bridged NAT network, reaches an outside HTTP server through the masquerade, and is reachable from the bridge's namespace",
          .timeLimit(.minutes(20)))
    func natNetwork() throws {
        let root = GuestTestEnvironment.repoRoot
        let kernel = root.appendingPathComponent("assets/lean/vmlinux").path
        try #require(FileManager.default.fileExists(atPath: kernel), "assets/lean/vmlinux missing: run scripts/guest-kernel")
        try #require(FileManager.default.isExecutableFile(atPath: Self.dnsmasq), "dnsmasq missing: run scripts/install-deps (package dnsmasq-base)")
        try #require(FileManager.default.isExecutableFile(atPath: Self.nft), "nft missing: run scripts/install-deps (package nftables)")
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath, "swiftkvm executable not found")

        let work = FileManager.default.temporaryDirectory.appendingPathComponent("swiftkvm-net-\(getpid())").path
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: work) }
        // The file the guest fetches: 1 MiB of pseudo-random bytes (large enough for offloaded segments).
        var bytes = [UInt8](repeating: 0, count: 1 << 20)
        var x: UInt32 = 12345
        for i in 0..<bytes.count { x = x &* 1_103_515_245 &+ 12345; bytes[i] = UInt8(truncatingIfNeeded: x >> 16) }
        try Data(bytes).write(to: URL(fileURLWithPath: work + "/blob.bin"))
        try Data("hello through nat 4242\n".utf8).write(to: URL(fileURLWithPath: work + "/hello.txt"))
        let blobMD5 = try ProcessRunner.run("/usr/bin/md5sum", [work + "/blob.bin"]).stdout.prefix(32)

        let lan = try NetworkNamespace(tag: "lan")
        let wan = try NetworkNamespace(tag: "wan")
        defer { lan.remove(); wan.remove() }
        try lan.addBridge("br0", address: "10.0.2.1/24")
        try lan.link(to: wan, local: "uplink", localAddress: "192.168.77.1/24", remote: "wan0", remoteAddress: "192.168.77.2/24")
        try lan.exec(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        // passt needs a default route in the namespace it runs in.
        try lan.exec(["ip", "route", "add", "default", "via", "192.168.77.2"])
        try lan.exec([Self.nft, "add table ip swk-test; add chain ip swk-test post { type nat hook postrouting priority 100 ; }; add rule ip swk-test post ip saddr 10.0.2.0/24 oifname \"uplink\" masquerade"])
        let leases = work + "/dnsmasq.leases"
        let dhcp = try lan.spawn([Self.dnsmasq, "--keep-in-foreground", "--conf-file=/dev/null", "--user=root", "--port=0",
                                  "--interface=br0", "--bind-interfaces", "--except-interface=lo", "--dhcp-authoritative",
                                  "--dhcp-range=10.0.2.50,10.0.2.99,255.255.255.0,1h", "--dhcp-option=option:router,10.0.2.1",
                                  "--dhcp-leasefile=\(leases)", "--pid-file=\(work)/dnsmasq.pid", "--log-dhcp"])
        let http = try wan.spawn(["/usr/bin/python3", "-u", "-m", "http.server", "8080", "--bind", "192.168.77.2", "--directory", work])
        // The "host" side for the user-mode NIC: lan's loopback.
        let hostHTTP = try lan.spawn(["/usr/bin/python3", "-u", "-m", "http.server", "8081", "--bind", "127.0.0.1", "--directory", work])
        // Receives exactly 1 MiB on port 9000, then prints its md5 and closes.
        let upload = try wan.spawn(["/usr/bin/python3", "-u", "-c", """
            import hashlib, socket
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("192.168.77.2", 9000)); s.listen(1); print("UPLOAD-LISTENING", flush=True)
            c, a = s.accept(); h = hashlib.md5(); n = 0
            while n < 1048576:
                b = c.recv(65536)
                if not b: break
                h.update(b); n += len(b)
            print("UPLOAD", a[0], n, h.hexdigest(), flush=True); c.close()
            """])
        #expect(http.waitFor("Serving HTTP", timeout: 20), "http.server did not start: \(http.output)")
        #expect(upload.waitFor("UPLOAD-LISTENING", timeout: 20), "upload receiver did not start: \(upload.output)")

        let vm = try lan.spawn([swiftkvm, "run", "--guest", "lean", "--memory", "256M", "--serial", "stdio",
                                "--time-dilation", "10", "--name", "netvm", "--net", "bridge=br0",
                                "--net", "user,hostfwd=tcp::18080-:8080", "--log-level", "info"])
        let mac = NetSpec.formatMAC(NetSpec.derivedMAC(vmName: "netvm", id: "net0"))
        let ready = vm.waitFor(LinuxBoot.readyMarker, timeout: LinuxBoot.bootTimeout)
        let leaseLine = vm.lines.first { $0.hasPrefix("init: eth0 ") } ?? ""
        let guestIP = leaseLine.split(separator: " ").dropFirst(3).first.map { String($0.split(separator: "/")[0]) } ?? ""
        let tap = vm.lines.compactMap { l -> String? in
            guard let r = l.range(of: "on tap ") else { return nil }
            return l[r.upperBound...].split(separator: " ").first.map(String.init)
        }.first
        var answers: [String: Bool] = [:]
        var fromBridge = "", forwarded = "", hostfwd = ""
        let steps: [(command: String, expect: String)] = [
            ("ping -c 2 -W 10 10.0.2.1 >/dev/null && echo gw-ok-$((40+2))", "gw-ok-42"),
            ("wget -q -O - http://192.168.77.2:8080/hello.txt", "hello through nat 4242"),
            ("wget -q -O /tmp/blob http://192.168.77.2:8080/blob.bin && echo blob-$(md5sum /tmp/blob | cut -c1-32)", "blob-\(blobMD5)"),
            ("nc 192.168.77.2 9000 < /tmp/blob; echo upload-sent-$((1+1))", "upload-sent-2"),
            // The user-mode NIC, last: its subnet then takes over 192.168.77.0/24 in the guest.
            ("udhcpc -i eth1 -n -q -t 4 -T 1 -s /etc/udhcpc.script >/dev/null 2>&1; echo eth1-$(ip -4 -o addr show dev eth1 | sed -n 's/.* inet \\([^ ]*\\).*/\\1/p')",
             "eth1-192.168.77.1/24"),
            ("echo via-$(ip route get 192.168.77.2 | sed -n 's/.* dev \\([^ ]*\\).*/\\1/p'); wget -q -O - http://192.168.77.2:8081/hello.txt | sed 's/^/user-/'",
             "user-hello through nat 4242"),
        ]
        if ready {
            Thread.sleep(forTimeInterval: 2)
            for step in steps {
                vm.send(step.command + "\n")
                answers[step.expect] = vm.waitFor(step.expect, timeout: 240)
            }
            fromBridge = (try? lan.exec(["ping", "-c", "2", "-W", "10", guestIP], timeout: 60)) ?? "ping failed"
            forwarded = (try? lan.exec(["ss", "-Hltnp", "sport", "= :18080"])) ?? "ss failed"
            // The forwarded port: a one-shot server in the guest on 8080, a client on lan's loopback at 18080.
            vm.send("(printf 'HTTP/1.0 200 OK\\r\\n\\r\\nfrom-guest-%d\\n' 4243 | nc -l -p 8080 >/dev/null) & echo listening-$((2+3))\n")
            if vm.waitFor("listening-5", timeout: 60) {
                Thread.sleep(forTimeInterval: 3)
                // Retried: on a loaded host the guest's nc may not listen yet when the first connection arrives
                // (passt then closes it); the one-shot server answers the first connection it accepts.
                hostfwd = (try? lan.exec(["/usr/bin/python3", "-c", """
                    import socket, time
                    d = b""
                    for attempt in range(30):
                        try:
                            s = socket.create_connection(("127.0.0.1", 18080), timeout=20)
                            s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n"); d = b""
                            while True:
                                b = s.recv(4096)
                                if not b: break
                                d += b
                        except OSError as e:
                            d = str(e).encode()
                        if b"from-guest" in d: break
                        time.sleep(2)
                    print(d.decode(errors="replace"))
                    """], timeout: 150)) ?? "client failed"
            }
            vm.send("poweroff -f\n")
        }
        let status = vm.waitForExit(timeout: ready ? 180 : 1)
        let context = "\(vm.commandLine)\nexit status \(status.map(String.init) ?? "none (killed)")\n"
            + vm.lines.suffix(60).joined(separator: "\n") + "\ndnsmasq:\n" + dhcp.output.suffix(2000)

        #expect(ready, "no \(LinuxBoot.readyMarker)\n\(context)")
        #expect(leaseLine.contains(mac), "init's eth0 line has not the MAC derived from the VM name (\(mac)): \(leaseLine)\n\(context)")
        let octets = guestIP.split(separator: ".").compactMap { Int($0) }
        #expect(octets.count == 4 && octets[0...2] == [10, 0, 2] && (50...99).contains(octets[3]),
                "the guest's address \(guestIP) is not from the DHCP range\n\(context)")
        for step in steps {
            #expect(answers[step.expect] == true, "`\(step.command)` did not print \(step.expect)\n\(context)")
        }
        #expect(fromBridge.contains(" 0% packet loss"), "the bridge's namespace cannot ping the guest at \(guestIP): \(fromBridge)")
        #expect(forwarded.contains("passt"), "passt does not listen on the forwarded port 18080: \(forwarded)")
        #expect(hostfwd.contains("from-guest-4243"), "a connection to the forwarded port 18080 did not reach the guest's server on 8080: \(hostfwd)\n\(context)")
        #expect(hostHTTP.output.contains("127.0.0.1 - - ") && hostHTTP.output.contains("GET /hello.txt"),
                "the host-side server did not see the user-mode request: \(hostHTTP.output)")
        #expect(vm.output.contains("via-eth1"), "the last wget did not leave through the user-mode NIC\n\(context)")
        #expect(http.output.contains("192.168.77.1 - - ") && http.output.contains("GET /blob.bin"),
                "the HTTP server did not see the masqueraded request: \(http.output)")
        #expect(upload.waitFor("UPLOAD 192.168.77.1 1048576 \(blobMD5)", timeout: 30), "the upload did not arrive whole: \(upload.output)")
        let leaseFile = (try? String(contentsOfFile: leases, encoding: .utf8)) ?? ""
        #expect(leaseFile.contains(mac) && leaseFile.contains(guestIP), "dnsmasq's lease file does not list \(mac) \(guestIP): \(leaseFile)")
        #expect(status == 0, "exit status after poweroff\n\(context)")
        #expect(!vm.output.contains("Kernel panic"), "kernel panic\n\(context)")
        // The TAP the VMM created on the bridge is gone with the VM.
        if let tap {
            let links = (try? lan.exec(["ip", "-o", "link", "show"])) ?? ""
            #expect(!links.contains(" \(tap):") && !links.contains(" \(tap)@"), "TAP \(tap) survived the VM: \(links)")
        } else {
            Issue.record("the VMM did not log the TAP it created\n\(context)")
        }
    }
}
