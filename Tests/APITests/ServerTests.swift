import Foundation
import Testing
@testable import API
import VMM

@Suite("API server over its Unix socket (fake guest)")
struct ServerTests {
    @Test("GET / and GET /version answer with Firecracker's shapes")
    func info() throws {
        let f = try FakeServerFixture()
        defer { f.shutdown() }
        let r = try f.send("GET", "/")
        #expect(r.status == 200)
        #expect(r.json?["state"] as? String == "Not started")
        #expect(r.json?["id"] as? String == "test-vm")
        #expect(r.headers["content-type"] == "application/json")
        let v = try f.send("GET", "/version")
        #expect(v.status == 200)
        #expect(v.json?["firecracker_version"] is String)
    }

    @Test("pre-boot configuration is stored and reported by GET /vm/config and GET /machine-config")
    func preBootConfig() throws {
        let f = try FakeServerFixture()
        defer { f.shutdown() }
        let disk = f.dir.file("disk.img", contents: "x")
        #expect(try f.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(f.kernel)", "boot_args": "console=ttyS0"}"#).status == 204)
        #expect(try f.send("PUT", "/machine-config", #"{"vcpu_count": 2, "mem_size_mib": 256}"#).status == 204)
        #expect(try f.send("PATCH", "/machine-config", #"{"mem_size_mib": 300}"#).status == 204)
        #expect(try f.send("PUT", "/drives/rootfs", #"{"drive_id": "rootfs", "path_on_host": "\#(disk)", "is_root_device": true, "is_read_only": false}"#).status == 204)
        #expect(try f.send("PUT", "/network-interfaces/eth0", #"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02"}"#).status == 204)
        #expect(try f.send("PUT", "/entropy", #"{"rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}"#).status == 204)
        #expect(try f.send("PUT", "/serial", #"{"serial_out_path": "\#(f.dir.path)/serial.out"}"#).status == 204)
        let mc = try f.send("GET", "/machine-config")
        #expect(mc.json?["vcpu_count"] as? Int == 2)
        #expect(mc.json?["mem_size_mib"] as? Int == 300)
        let full = try #require(try f.send("GET", "/vm/config").json)
        #expect((full["boot-source"] as? [String: Any])?["boot_args"] as? String == "console=ttyS0")
        #expect((full["drives"] as? [[String: Any]])?.first?["drive_id"] as? String == "rootfs")
        #expect((full["network-interfaces"] as? [[String: Any]])?.first?["host_dev_name"] as? String == "tap0")
        #expect(full.keys.contains("balloon") && full["balloon"] is NSNull)
    }

    @Test("PUT /vsock is stored and reported; a reserved CID or a path that is not a socket is a 400 naming the field")
    func vsock() throws {
        let f = try FakeServerFixture()
        defer { f.shutdown() }
        let notSocket = f.dir.file("plain", contents: "x")
        let two = try f.send("PUT", "/vsock", #"{"guest_cid": 2, "uds_path": "\#(f.dir.path)/v.sock"}"#)
        #expect(two.status == 400 && two.body.contains("guest_cid"), "\(two.body)")
        let file = try f.send("PUT", "/vsock", #"{"guest_cid": 3, "uds_path": "\#(notSocket)"}"#)
        #expect(file.status == 400 && file.body.contains("uds_path") && file.body.contains("not a socket"), "\(file.body)")
        #expect(try f.send("PUT", "/vsock", #"{"guest_cid": 3, "uds_path": "\#(f.dir.path)/v.sock"}"#).status == 204)
        let full = try #require(try f.send("GET", "/vm/config").json)
        #expect((full["vsock"] as? [String: Any])?["guest_cid"] as? Int == 3)
    }

    @Test("bad requests get 400 with a fault_message naming the field, and change nothing")
    func badRequestsChangeNothing() throws {
        let f = try FakeServerFixture()
        defer { f.shutdown() }
        #expect(try f.send("PUT", "/machine-config", #"{"vcpu_count": 2, "mem_size_mib": 256}"#).status == 204)
        let before = try f.send("GET", "/vm/config").body
        let cases: [(String, String, String?, String)] = [
            ("PUT", "/machine-config", #"{"vcpu_count": 0, "mem_size_mib": 128}"#, "vcpu_count"),
            ("PUT", "/machine-config", #"{"vcpu_count": 33, "mem_size_mib": 128}"#, "vcpu_count"),
            ("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 0}"#, "mem_size_mib"),
            ("PUT", "/machine-config", #"{"vcpu_count": 1}"#, "mem_size_mib"),
            ("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 64, "smt": "yes"}"#, "smt"),
            ("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 64, "color": "red"}"#, "color"),
            ("PATCH", "/machine-config", #"{"vcpu_count": -1}"#, "vcpu_count"),
            ("PATCH", "/machine-config", "{}", "machine-config"),
            ("PUT", "/boot-source", #"{"kernel_image_path": "/nonexistent/vmlinux"}"#, "kernel_image_path"),
            ("PUT", "/boot-source", #"{"kernel_image_path": "\#(f.kernel)", "initrd_path": 3}"#, "initrd_path"),
            ("PUT", "/boot-source", #"{"initrd_path": "/x"}"#, "kernel_image_path"),
            ("PUT", "/drives/d1", #"{"drive_id": "d1", "is_root_device": false, "path_on_host": "/nonexistent"}"#, "path_on_host"),
            ("PUT", "/drives/d1", #"{"drive_id": "d1", "path_on_host": "\#(f.kernel)"}"#, "is_root_device"),
            ("PUT", "/drives/d1", #"{"drive_id": "d1", "is_root_device": false, "path_on_host": "\#(f.kernel)\u0000.x"}"#, "NUL byte"),
            ("PUT", "/boot-source", #"{"kernel_image_path": "\#(f.kernel)\u0000"}"#, "NUL byte"),
            ("PUT", "/drives/d1", #"{"drive_id": "d1", "path_on_host": "\#(f.kernel)", "is_root_device": false, "cache_type": "Fast"}"#, "cache_type"),
            ("PUT", "/network-interfaces/eth0", #"{"iface_id": "eth0"}"#, "host_dev_name"),
            ("PUT", "/network-interfaces/eth0", #"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "zz"}"#, "guest_mac"),
            ("PUT", "/network-interfaces/eth0", #"{"iface_id": "eth0", "host_dev_name": "tap0", "mtu": 10}"#, "mtu"),
            ("PUT", "/logger", #"{"level": "Loud"}"#, "level"),
            ("PUT", "/logger", #"{"log_path": "/nonexistent-dir/x.log"}"#, "log_path"),
            ("PUT", "/metrics", "{}", "metrics_path"),
            ("PUT", "/metrics", #"{"metrics_path": "/nonexistent-dir/m"}"#, "metrics_path"),
            ("PUT", "/entropy", #"{"rate_limiter": {"ops": {"size": -1, "refill_time": 1}}}"#, "rate_limiter"),
            ("PUT", "/serial", #"{"serial_out_path": 1}"#, "serial_out_path"),
            ("PUT", "/actions", "{}", "action_type"),
            ("PATCH", "/vm", #"{"state": "Stopped"}"#, "state"),
        ]
        for (method, path, body, field) in cases {
            let r = try f.send(method, path, body)
            #expect(r.status == 400, "\(method) \(path) \(body ?? "")")
            #expect(r.fault?.contains(field) == true, "\(method) \(path): \(r.body)")
        }
        #expect(try f.send("GET", "/vm/config").body == before)
        #expect(try f.send("GET", "/").json?["state"] as? String == "Not started")
    }

    @Test("a second root drive and a reused tap device or MAC are refused")
    func conflicts() throws {
        let f = try FakeServerFixture()
        defer { f.shutdown() }
        let d = f.dir.file("d.img", contents: "x")
        #expect(try f.send("PUT", "/drives/a", #"{"drive_id": "a", "path_on_host": "\#(d)", "is_root_device": true}"#).status == 204)
        let r = try f.send("PUT", "/drives/b", #"{"drive_id": "b", "path_on_host": "\#(d)", "is_root_device": true}"#)
        #expect(r.status == 400 && r.fault?.contains("root block device") == true)
        #expect(try f.send("PUT", "/drives/a", #"{"drive_id": "a", "path_on_host": "\#(d)", "is_root_device": true, "is_read_only": true}"#).status == 204)
        #expect(try f.send("PUT", "/network-interfaces/n1", #"{"iface_id": "n1", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01"}"#).status == 204)
        #expect(try f.send("PUT", "/network-interfaces/n2", #"{"iface_id": "n2", "host_dev_name": "tap0"}"#).fault?.contains("host_dev_name") == true)
        #expect(try f.send("PUT", "/network-interfaces/n2", #"{"iface_id": "n2", "host_dev_name": "tap1", "guest_mac": "06:00:00:00:00:01"}"#).fault?.contains("guest_mac") == true)
    }

    @Test("HTTP-level errors: wrong method, unknown path, huge and malformed bodies, garbage requests")
    func httpErrors() throws {
        let f = try FakeServerFixture()
        defer { f.shutdown() }
        let wrong = try f.send("DELETE", "/machine-config")
        #expect(wrong.status == 400 && wrong.fault == "Invalid request method and/or path: DELETE /machine-config.")
        #expect(try f.send("POST", "/actions", #"{"action_type": "InstanceStart"}"#).status == 400)
        #expect(try f.send("GET", "/does/not/exist").fault?.contains("Invalid request method and/or path") == true)
        let huge = String(repeating: " ", count: APIServer.defaultMaxBodySize + 1)
        let big = try f.send("PUT", "/boot-source", huge)
        #expect(big.status == 413)
        #expect(big.fault?.contains("larger than the limit of 51200") == true)
        let bad = try f.send("PUT", "/boot-source", "{\"kernel_image_path\": ")
        #expect(bad.status == 400 && bad.fault?.contains("malformed JSON") == true)
        let notUTF8 = try f.client.parse(f.client.raw(Array("PUT /boot-source HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\n".utf8) + [0xff, 0xfe, 0x00]))
        #expect(notUTF8.first?.status == 400)
        // Not HTTP at all, an unknown method, a 100 KB URL, a negative or huge Content-Length: 400 with
        // Firecracker's fault_message naming the problem, then the connection closes.
        let cases: [(String, String)] = [
            ("\u{1}\u{2}hello\r\n\r\n", "Invalid HTTP request"),
            ("FOO / HTTP/1.1\r\nHost: x\r\n\r\n", "unknown method"),
            ("GET /" + String(repeating: "a", count: 100_000) + " HTTP/1.1\r\nHost: x\r\n\r\n", "too long"),
            ("PUT /actions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", "Content-Length"),
            ("PUT /actions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n", "Content-Length"),
        ]
        for (request, reason) in cases {
            let answer = String(decoding: try f.client.raw(Array(request.utf8)), as: UTF8.self)
            #expect(answer.hasPrefix("HTTP/1.1 400") && answer.contains(#"{"fault_message":"Invalid HTTP request: "#) && answer.contains(reason),
                    "\(request.prefix(40)): \(answer.prefix(300))")
        }
        // The server still answers afterwards.
        #expect(try f.send("GET", "/").status == 200)
    }

    @Test("a chunked body over the limit is refused with 413 too")
    func chunkedLimit() throws {
        let f = try FakeServerFixture(maxBodySize: 100)
        defer { f.shutdown() }
        let chunk = String(repeating: "a", count: 80)
        let req = "PUT /boot-source HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n50\r\n\(chunk)\r\n50\r\n\(chunk)\r\n0\r\n\r\n"
        let replies = try f.client.parse(f.client.raw(Array(req.utf8)))
        #expect(replies.first?.status == 413)
    }

    @Test("keep-alive connections carry several requests in order")
    func keepAlive() throws {
        let f = try FakeServerFixture()
        defer { f.shutdown() }
        let body = #"{"vcpu_count": 1, "mem_size_mib": 64}"#
        let req = "PUT /machine-config HTTP/1.1\r\nHost: x\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
            + "GET /machine-config HTTP/1.1\r\nHost: x\r\n\r\n"
            + "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        let replies = try f.client.parse(f.client.raw(Array(req.utf8)))
        #expect(replies.map(\.status) == [204, 200, 200])
        #expect(replies.count == 3 && replies[1].body.contains("\"mem_size_mib\":64"))
    }

    @Test("actions follow the pre-boot and runtime rules")
    func stateRules() throws {
        let f = try FakeServerFixture()
        defer { f.shutdown() }
        let before = "The requested operation is not supported before starting the microVM."
        #expect(try f.send("PATCH", "/vm", #"{"state": "Paused"}"#).fault == before)
        #expect(try f.send("PATCH", "/vm", #"{"state": "Resumed"}"#).fault == before)
        #expect(try f.send("PUT", "/actions", #"{"action_type": "SendCtrlAltDel"}"#).fault == before)
        #expect(try f.send("PUT", "/actions", #"{"action_type": "FlushMetrics"}"#).fault == before)
        #expect(try f.send("PATCH", "/drives/a", #"{"drive_id": "a"}"#).fault == before)
        #expect(try f.send("PATCH", "/network-interfaces/a", #"{"iface_id": "a"}"#).fault == before)
        let noKernel = try f.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#)
        #expect(noKernel.status == 400 && noKernel.fault?.contains("boot-source") == true)
        #expect(try f.send("GET", "/").json?["state"] as? String == "Not started")

        try f.start()
        #expect(try f.send("GET", "/").json?["state"] as? String == "Running")
        let after = "The requested operation is not supported after starting the microVM."
        for (m, p, b) in [("PUT", "/boot-source", #"{"kernel_image_path": "\#(f.kernel)"}"#),
                          ("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 64}"#),
                          ("PATCH", "/machine-config", #"{"vcpu_count": 1}"#),
                          ("PUT", "/logger", #"{"level": "Info"}"#),
                          ("PUT", "/metrics", #"{"metrics_path": "/tmp/x"}"#),
                          ("PUT", "/entropy", "{}"),
                          ("PUT", "/serial", "{}"),
                          ("PUT", "/network-interfaces/e", #"{"iface_id": "e", "host_dev_name": "tap9"}"#),
                          ("PUT", "/actions", #"{"action_type": "InstanceStart"}"#)] {
            #expect(try f.send(m, p, b).fault == after, "\(m) \(p)")
        }
        #expect(try f.send("PATCH", "/drives/nope", #"{"drive_id": "nope"}"#).fault?.contains("drive_id") == true)
        let vm = try #require(f.built.withLock { $0.first })
        #expect(try f.send("PATCH", "/vm", #"{"state": "Paused"}"#).status == 204)
        #expect(try f.send("GET", "/").json?["state"] as? String == "Paused")
        #expect(try f.send("PATCH", "/vm", #"{"state": "Paused"}"#).status == 204)
        #expect(try f.send("PATCH", "/vm", #"{"state": "Resumed"}"#).status == 204)
        #expect(try f.send("GET", "/").json?["state"] as? String == "Running")
        #expect(vm.counts.withLock { ($0.pauses, $0.resumes) } == (1, 1))
        #expect(try f.send("PUT", "/actions", #"{"action_type": "FlushMetrics"}"#).fault?.contains("PUT /metrics") == true)
        #expect(try f.send("PUT", "/actions", #"{"action_type": "SendCtrlAltDel"}"#).status == 204)
        #expect(vm.counts.withLock { $0.ctrlAltDel } == 1)
        // The fake guest resets on Ctrl+Alt+Del: onExit gets the reset.
        for _ in 0..<200 where f.exits.withLock({ $0.isEmpty }) { usleep(10_000) }
        #expect(f.exits.withLock { $0 } == [.reset])
        #expect(try f.send("PATCH", "/vm", #"{"state": "Paused"}"#).fault?.contains("stopped") == true)
    }

    @Test("InstanceStart builds the VM configuration from the pre-boot state")
    func configurationMapping() throws {
        let f = try FakeServerFixture()
        defer { f.shutdown() }
        let initrd = f.dir.file("initrd", contents: "x")
        #expect(try f.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(f.kernel)", "initrd_path": "\#(initrd)"}"#).status == 204)
        #expect(try f.send("PUT", "/machine-config", #"{"vcpu_count": 2, "mem_size_mib": 96}"#).status == 204)
        #expect(try f.send("PUT", "/serial", #"{"serial_out_path": "\#(f.dir.path)/console"}"#).status == 204)
        #expect(try f.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
        let config = try #require(f.built.withLock { $0.first }?.config)
        #expect(config.cpus == 2)
        #expect(config.memorySize == 96 << 20)
        #expect(config.serial == "file:\(f.dir.path)/console")
        #expect(config.payload == .kernel(path: f.kernel, initrd: initrd, cmdline: VMController.defaultBootArgs, modules: []))
        #expect(config.virtioTransport == .mmio, "virtio-mmio by default, as Firecracker")
    }

    @Test("without boot_args, the default boot arguments fit the transport: pci=off and nomodule only with virtio-mmio",
          arguments: [VirtioTransportKind.mmio, .pci])
    func defaultBootArgsFitTransport(transport: VirtioTransportKind) throws {
        let f = try FakeServerFixture(transport: transport)
        defer { f.shutdown() }
        let disk = f.dir.file("root.img", contents: "x")
        #expect(try f.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(f.kernel)"}"#).status == 204)
        #expect(try f.send("PUT", "/drives/rootfs", #"{"drive_id": "rootfs", "path_on_host": "\#(disk)", "is_root_device": true}"#).status == 204)
        #expect(try f.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
        let config = try #require(f.built.withLock { $0.first }?.config)
        #expect(config.virtioTransport == transport)
        guard case .kernel(_, _, let cmdline, _) = config.payload else { Issue.record("not a kernel payload"); return }
        let words = cmdline.split(separator: " ")
        #expect(words.contains("pci=off") == (transport == .mmio), "\(cmdline)")
        #expect(words.contains("nomodule") == (transport == .mmio), "\(cmdline)")
        #expect(words.contains("console=ttyS0") && words.contains("root=/dev/vda"))
    }

    @Test("drives become virtio-blk disks (root first, root= added) and entropy a virtio-rng device")
    func drivesMapped() throws {
        let f = try FakeServerFixture()
        defer { f.shutdown() }
        let data = f.dir.file("data.img", contents: "x"), root = f.dir.file("root.img", contents: "x")
        #expect(try f.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(f.kernel)", "boot_args": "console=ttyS0"}"#).status == 204)
        #expect(try f.send("PUT", "/drives/data", #"{"drive_id": "data", "path_on_host": "\#(data)", "is_root_device": false}"#).status == 204)
        #expect(try f.send("PUT", "/drives/rootfs", #"{"drive_id": "rootfs", "path_on_host": "\#(root)", "is_root_device": true, "is_read_only": true}"#).status == 204)
        #expect(try f.send("PUT", "/entropy", "{}").status == 204)
        #expect(try f.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
        let config = try #require(f.built.withLock { $0.first }?.config)
        #expect(config.disks.map(\.path) == [root, data])
        #expect(config.disks.map(\.readOnly) == [true, false])
        #expect(config.disks.first?.id == "rootfs")
        #expect(config.rng)
        guard case .kernel(_, _, let cmdline, _) = config.payload else { Issue.record("not a kernel payload"); return }
        #expect(cmdline == "console=ttyS0 root=/dev/vda ro")
        // At runtime the fake guest refuses a backing-file swap (the error names path_on_host); a real
        // guest's swap is covered in RateLimitAPITests. The rate limiter changes live.
        #expect(try f.send("PATCH", "/drives/data", #"{"drive_id": "data", "path_on_host": "\#(root)"}"#).fault?.contains("path_on_host") == true)
        #expect(try f.send("PATCH", "/drives/data", #"{"drive_id": "data", "rate_limiter": {"ops": {"size": 5, "refill_time": 10}}}"#).status == 204)
    }

    @Test("metrics: FlushMetrics writes Firecracker-style JSON lines with deltas")
    func metrics() throws {
        let f = try FakeServerFixture()
        defer { f.shutdown() }
        let path = f.dir.path + "/metrics.json"
        #expect(try f.send("PUT", "/metrics", #"{"metrics_path": "\#(path)"}"#).status == 204)
        #expect(try f.send("PUT", "/metrics", #"{"metrics_path": "\#(path)"}"#).fault?.contains("Reinitialization") == true)
        _ = try f.send("PUT", "/boot-source", #"{"kernel_image_path": 1}"#)
        try f.start()
        #expect(try f.send("PUT", "/actions", #"{"action_type": "FlushMetrics"}"#).status == 204)
        #expect(try f.send("PUT", "/actions", #"{"action_type": "FlushMetrics"}"#).status == 204)
        let lines = try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n")
        #expect(lines.count == 2)
        let first = try #require(try JSONSerialization.jsonObject(with: Data(lines[0].utf8)) as? [String: Any])
        #expect(first["utc_timestamp_ms"] is NSNumber)
        let put = try #require(first["put_api_requests"] as? [String: Any])
        #expect(put["boot_source_count"] as? Int == 2)
        #expect(put["boot_source_fails"] as? Int == 1)
        #expect((first["vcpu"] as? [String: Any])?["exit_io"] as? Int == 10)
        #expect((first["uart"] as? [String: Any])?["write_count"] as? Int == 7)
        #expect((first["vcpu_time_us"] as? [String: Any])?["0"] as? Int == 1234)
        let second = try #require(try JSONSerialization.jsonObject(with: Data(lines[1].utf8)) as? [String: Any])
        #expect((second["vcpu"] as? [String: Any])?["exit_io"] as? Int == 0, "counters are deltas")
        #expect((second["put_api_requests"] as? [String: Any])?["actions_count"] as? Int == 1)
    }

    @Test("metrics are also written periodically")
    func periodicMetrics() throws {
        let path = NSTemporaryDirectory() + "swk-periodic-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: path) }
        let recorder = MetricsRecorder(instanceID: "p")
        defer { recorder.close() }
        try recorder.configure(MetricsConfig(metricsPath: path), interval: 0.05) { nil }
        let lines = { ((try? String(contentsOfFile: path, encoding: .utf8)) ?? "").split(separator: "\n").count }
        var waited = 0
        while lines() < 2 && waited < 500 { usleep(10_000); waited += 1 }
        #expect(lines() >= 2)
    }

    @Test("the logger writes lines with level and origin to the configured file")
    func logger() throws {
        let f = try FakeServerFixture()
        defer { f.shutdown() }
        let path = f.dir.path + "/vmm.log"
        #expect(try f.send("PUT", "/logger", #"{"log_path": "\#(path)", "level": "Info", "show_level": true, "show_log_origin": true}"#).status == 204)
        _ = try f.send("GET", "/machine-config")
        let text = try String(contentsOfFile: path, encoding: .utf8)
        #expect(text.contains("[test-vm:"))
        #expect(text.contains(":INFO:VMController.swift:"))
        #expect(text.contains("GET /machine-config"))
        #expect(try f.send("PUT", "/logger", #"{"level": "Off"}"#).status == 204)
        let size = try String(contentsOfFile: path, encoding: .utf8).utf8.count
        _ = try f.send("GET", "/")
        #expect(try String(contentsOfFile: path, encoding: .utf8).utf8.count == size)
    }

    @Test("the socket path must not exist and is removed when the server stops")
    func socketLifecycle() throws {
        let f = try FakeServerFixture()
        #expect(FileManager.default.fileExists(atPath: f.socket))
        let second = APIServer(socketPath: f.socket, controller: f.controller)
        #expect(throws: APIError.self) { try second.start() }
        f.shutdown()
        #expect(!FileManager.default.fileExists(atPath: f.socket))
    }

    @Test("many concurrent clients get answers and the server stays up")
    func concurrency() async throws {
        let f = try FakeServerFixture()
        defer { f.shutdown() }
        let client = f.client
        let statuses = try await withThrowingTaskGroup(of: Int.self) { group in
            for i in 0..<40 {
                group.addTask {
                    try client.send(i % 2 == 0 ? "GET" : "PUT", i % 2 == 0 ? "/" : "/machine-config",
                                    i % 2 == 0 ? nil : #"{"vcpu_count": 1, "mem_size_mib": \#(64 + i)}"#).status
                }
            }
            return try await group.reduce(into: [Int]()) { $0.append($1) }
        }
        #expect(statuses.count == 40)
        #expect(statuses.allSatisfy { $0 == 200 || $0 == 204 })
    }
}
