import Foundation
import Testing
@testable import API

@Suite("Request parsing (no socket)")
struct ParsingTests {
    func parse(_ method: String, _ uri: String, _ body: String? = nil) -> Result<APIRequest, APIError> {
        do throws(APIError) {
            return .success(try APIRequest.parse(method: method, uri: uri, body: body.map { Array($0.utf8) }))
        } catch {
            return .failure(error)
        }
    }
    func fault(_ method: String, _ uri: String, _ body: String? = nil) -> APIError? {
        if case .failure(let e) = parse(method, uri, body) { return e }
        return nil
    }

    @Test("GET paths map to their actions and ignore a query string")
    func getPaths() throws {
        #expect(try parse("GET", "/").get() == .getInstanceInfo)
        #expect(try parse("GET", "/version").get() == .getVersion)
        #expect(try parse("GET", "/machine-config?x=1").get() == .getMachineConfig)
        #expect(try parse("GET", "/vm/config").get() == .getFullConfig)
    }

    @Test("an unknown path or method is Firecracker's 400 'Invalid request method and/or path'")
    func invalidPath() {
        #expect(fault("GET", "/nope")?.message == "Invalid request method and/or path: GET /nope.")
        #expect(fault("POST", "/actions", "{}")?.message == "Invalid request method and/or path: POST /actions.")
        #expect(fault("PUT", "/boot-source/extra", "{}")?.status == 400)
        #expect(fault("PATCH", "/boot-source", "{}")?.message.hasPrefix("Invalid request method and/or path") == true)
    }

    @Test("a PUT or PATCH without a body and a GET with one are refused as in Firecracker")
    func bodies() {
        #expect(fault("PUT", "/boot-source")?.message == "Empty PUT request.")
        #expect(fault("PATCH", "/vm", "")?.message == "Empty PATCH request.")
        #expect(fault("GET", "/", "{}")?.message == "GET request cannot have a body.")
    }

    @Test("missing, ill-typed and unknown fields are named in the fault message")
    func fieldErrors() {
        let missing = fault("PUT", "/machine-config", #"{"vcpu_count": 1}"#)
        #expect(missing?.message.contains("missing field `mem_size_mib`") == true)
        let typed = fault("PUT", "/machine-config", #"{"vcpu_count": "two", "mem_size_mib": 128}"#)
        #expect(typed?.message.contains("field `vcpu_count`") == true)
        let unknown = fault("PUT", "/boot-source", #"{"kernel_image_path": "/k", "cmdline": "x"}"#)
        #expect(unknown?.message.contains("unknown field `cmdline`") == true)
        let nested = fault("PUT", "/drives/rootfs",
                           #"{"drive_id": "rootfs", "path_on_host": "/x", "is_root_device": true, "rate_limiter": {"bandwidth": {"size": 1}}}"#)
        #expect(nested?.message.contains("missing field `rate_limiter.bandwidth.refill_time`") == true)
        let float = fault("PUT", "/machine-config", #"{"vcpu_count": 1.5, "mem_size_mib": 128}"#)
        #expect(float?.message.contains("vcpu_count") == true)
        // Integers written as 2.0 or 2e0 are refused as serde refuses them, naming the field and the literal.
        for literal in ["2.0", "2e0", "20E-1"] {
            let f = fault("PUT", "/machine-config", #"{"vcpu_count": \#(literal), "mem_size_mib": 128}"#)
            #expect(f?.message.contains("field `vcpu_count`") == true && f?.message.contains("got \(literal)") == true, "\(f?.message ?? "accepted")")
        }
        let nestedFloat = fault("PUT", "/drives/d", #"{"drive_id": "d", "path_on_host": "/x", "is_root_device": false, "rate_limiter": {"ops": {"size": 10.0, "refill_time": 100}}}"#)
        #expect(nestedFloat?.message.contains("rate_limiter.ops.size") == true, "\(nestedFloat?.message ?? "accepted")")
        #expect(fault("PUT", "/machine-config", #"{"vcpu_count": 2, "mem_size_mib": 128, "smt": false}"#) == nil)
        #expect(StrictJSON.scanFractionalNumbers(Array(#"{"a": [1, 2.5, {"b": "x:1.0", "c": -3e2}], "d": {"e": 0}}"#.utf8)) == ["a.#1": "2.5", "a.#2.c": "-3e2"])
        // Integers are exact up to the type's limits (a Double path rounded 2^63 - 1 up and refused it).
        let limit = #"{"drive_id": "d", "path_on_host": "/x", "is_root_device": false, "rate_limiter": {"bandwidth": {"size": 9223372036854775807, "refill_time": 9223372036854775807}}}"#
        #expect(fault("PUT", "/drives/d", limit) == nil, "Int64.max is a valid bucket size")
        let over = fault("PUT", "/drives/d", limit.replacingOccurrences(of: "\"size\": 9223372036854775807", with: "\"size\": 9223372036854775808"))
        #expect(over?.message.contains("rate_limiter.bandwidth.size") == true && over?.message.contains("expected an integer") == true, "\(over?.message ?? "accepted")")
        let malformed = fault("PUT", "/actions", #"{"action_type": "#)
        #expect(malformed?.message.contains("malformed JSON") == true)
        let array = fault("PUT", "/actions", "[1, 2]")
        #expect(array?.message.contains("expected an object") == true)
    }

    @Test("enum fields accept only Firecracker's variants")
    func enums() throws {
        #expect(try parse("PUT", "/actions", #"{"action_type": "SendCtrlAltDel"}"#).get() == .action(.sendCtrlAltDel))
        #expect(fault("PUT", "/actions", #"{"action_type": "Reboot"}"#)?.message.contains("unknown variant `Reboot`") == true)
        #expect(try parse("PATCH", "/vm", #"{"state": "Paused"}"#).get() == .patchVM(.paused))
        #expect(fault("PATCH", "/vm", #"{"state": "paused"}"#)?.message.contains("field `state`") == true)
        if case .putLogger(let l) = try parse("PUT", "/logger", #"{"level": "debug"}"#).get() {
            #expect(l.level == "Debug")
        } else {
            Issue.record("PUT /logger did not parse")
        }
    }

    @Test("ids in the path must match the body and be alphanumeric")
    func ids() {
        #expect(fault("PUT", "/drives/a", #"{"drive_id": "b", "path_on_host": "/x", "is_root_device": false}"#)?
            .message.contains("does not match") == true)
        #expect(fault("PUT", "/drives/a-b", #"{"drive_id": "a-b", "path_on_host": "/x", "is_root_device": false}"#)?
            .message.contains("alphanumeric") == true)
        #expect(fault("PUT", "/drives", #"{"drive_id": "a", "is_root_device": false}"#)?.message.contains("ID cannot be empty") == true)
        #expect(fault("PATCH", "/network-interfaces/eth0", #"{"iface_id": "eth1"}"#)?.message.contains("does not match") == true)
    }

    @Test("snapshot requests are parsed strictly: required fields, unknown fields and paths are 400s naming them")
    func snapshot() {
        #expect(fault("PUT", "/snapshot/create", "{}")?.message.contains("snapshot_path") == true)
        #expect(fault("PUT", "/snapshot/create", #"{"snapshot_path": "/s", "mem_file_path": "/m", "version": "1.0"}"#)?
            .message.contains("version") == true)
        #expect(fault("PUT", "/snapshot/load", #"{"mem_backend": {"backend_type": "File", "backend_path": "/m"}}"#)?
            .message.contains("snapshot_path") == true)
        #expect(fault("PUT", "/snapshot/load", #"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File"}}"#)?
            .message.contains("backend_path") == true)
        #expect(fault("PUT", "/snapshot/other", #"{"snapshot_path": "/s"}"#)?.status == 400)
        #expect(fault("PUT", "/snapshot", #"{"snapshot_path": "/s"}"#)?.status == 400)
        if case .putSnapshotLoad(let p)? = try? APIRequest.parse(method: "PUT", uri: "/snapshot/load", body: Array(
            #"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"}, "resume_vm": true}"#.utf8)) {
            #expect(p.snapshotPath == "/s" && p.memBackend?.backendPath == "/m" && p.resumeVM == true)
        } else {
            Issue.record("PUT /snapshot/load did not parse")
        }
    }

    @Test("unimplemented endpoints say 'not supported yet'")
    func unsupported() {
        for (m, p) in [("PUT", "/mmds"), ("PUT", "/hotplug/memory"), ("PUT", "/pmem/x")] {
            let e = fault(m, p, m == "GET" ? nil : "{}")
            #expect(e?.status == 400)
            #expect(e?.message.contains("not supported yet") == true, "\(m) \(p): \(String(describing: e))")
        }
    }

    @Test("the balloon endpoints parse strictly: PUT needs amount_mib and deflate_on_oom, PATCH amount_mib, PATCH statistics its interval; unknown fields and paths are 400s")
    func balloon() {
        if case .putBalloon(let b)? = try? APIRequest.parse(method: "PUT", uri: "/balloon", body: Array(#"{"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#.utf8)) {
            #expect(b.amountMib == 64 && b.deflateOnOom && b.statsPollingIntervalS == 1 && !b.freePageReporting)
        } else { Issue.record("PUT /balloon did not parse") }
        #expect(fault("PUT", "/balloon", #"{"amount_mib": 64}"#)?.status == 400)
        #expect(fault("PUT", "/balloon", #"{"amount_mib": 64, "deflate_on_oom": false, "bogus": 1}"#)?.message.contains("bogus") == true)
        if case .patchBalloon(let u)? = try? APIRequest.parse(method: "PATCH", uri: "/balloon", body: Array(#"{"amount_mib": 8}"#.utf8)) {
            #expect(u.amountMib == 8)
        } else { Issue.record("PATCH /balloon did not parse") }
        if case .patchBalloonStatistics(let u)? = try? APIRequest.parse(method: "PATCH", uri: "/balloon/statistics", body: Array(#"{"stats_polling_interval_s": 5}"#.utf8)) {
            #expect(u.statsPollingIntervalS == 5)
        } else { Issue.record("PATCH /balloon/statistics did not parse") }
        #expect((try? APIRequest.parse(method: "GET", uri: "/balloon", body: nil)) == .getBalloon)
        #expect((try? APIRequest.parse(method: "GET", uri: "/balloon/statistics", body: nil)) == .getBalloonStatistics)
        #expect(fault("PATCH", "/balloon/other", #"{"amount_mib": 8}"#)?.status == 400)
    }

    @Test("PUT /vsock: parsed strictly; a reserved CID or a path that is not a socket is a 400 naming the field")
    func vsock() {
        #expect(fault("PUT", "/vsock", #"{"guest_cid": 3}"#)?.status == 400)
        #expect(fault("PUT", "/vsock/x", #"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#)?.status == 400)
        if case .putVsock(let v)? = try? APIRequest.parse(method: "PUT", uri: "/vsock", body: Array(#"{"guest_cid": 7, "uds_path": "/tmp/v.sock"}"#.utf8)) {
            #expect(v.guestCid == 7 && v.udsPath == "/tmp/v.sock")
        } else {
            Issue.record("PUT /vsock did not parse")
        }
    }

    @Test("the config file format decodes every section and refuses unsupported ones")
    func fullConfig() throws {
        let json = #"""
        {"boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0"},
         "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
         "drives": [], "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
         "logger": {"log_path": "/tmp/x.log", "level": "Info"}, "metrics": {"metrics_path": "/tmp/m"},
         "entropy": {}, "balloon": null}
        """#
        let c = try JSONDecoder().decode(FullVMConfiguration.self, from: Data(json.utf8))
        #expect(c.machineConfig?.vcpuCount == 2)
        #expect(c.networkInterfaces.first?.hostDevName == "tap0")
        // vsock: guest_cid and uds_path are required, unknown fields refused.
        #expect(throws: DecodingError.self) {
            try JSONDecoder().decode(FullVMConfiguration.self, from: Data(#"{"vsock": {"guest_cid": 3}}"#.utf8))
        }
        #expect(throws: DecodingError.self) {
            try JSONDecoder().decode(FullVMConfiguration.self, from: Data(#"{"vsock": {"guest_cid": 3, "uds_path": "/v", "x": 1}}"#.utf8))
        }
        let v = try JSONDecoder().decode(FullVMConfiguration.self, from: Data(#"{"vsock": {"vsock_id": "v", "guest_cid": 3, "uds_path": "/tmp/v.sock"}}"#.utf8))
        #expect(v.vsock == VsockConfig(guestCid: 3, udsPath: "/tmp/v.sock").with(id: "v"))
        #expect(throws: DecodingError.self) {
            try JSONDecoder().decode(FullVMConfiguration.self, from: Data(#"{"boot_source": {}}"#.utf8))
        }
    }
}
