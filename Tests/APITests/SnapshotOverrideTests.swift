import Foundation
import Testing
@testable import API
@testable import VMM

/// `network_overrides` and `vsock_override` of `PUT /snapshot/load` (Firecracker's), judged on the
/// machine configuration the controller builds (fake guests: no /dev/kvm).
@Suite("snapshot/load overrides: other TAPs and vsock socket for a restored copy")
struct SnapshotOverrideTests {
    /// Writes a snapshot file whose machine has two TAP NICs (eth0 with a MAC, eth1 with a derived one)
    /// and, with `vsock`, a vsock device; returns its path.
    func writeSnapshot(_ f: FakeServerFixture, vsock: Bool = true) throws -> String {
        var config = VMConfiguration(payload: .kernel(path: f.kernel, initrd: nil, cmdline: "", modules: []))
        config.name = "source"
        config.memorySize = 64 << 20
        config.nets = [NetSpec(backend: .tap(name: "tapA"), mac: [2, 0, 0, 0, 0, 1], id: "eth0"),
                       NetSpec(backend: .tap(name: "tapB"), mac: nil, id: "eth1")]
        if vsock { config.vsock = VsockSpec(guestCID: 3, udsPath: f.dir.path + "/v.sock") }
        let empty = Data()
        let snapshot = MachineSnapshot(config: config, memorySize: 64 << 20, vcpus: [],
                                       vm: VMKernelState(picMaster: empty, picSlave: empty, ioapic: empty, pit: empty, clock: empty),
                                       devices: [], quirks: [:])
        let path = f.dir.path + (vsock ? "/vm.snap" : "/novsock.snap")
        try Data(try SnapshotFile.encode(snapshot)).write(to: URL(fileURLWithPath: path))
        _ = f.dir.file("vm.mem")
        return path
    }

    func load(_ f: FakeServerFixture, _ snap: String, _ extra: String) throws -> UnixHTTPClient.Reply {
        try f.send("PUT", "/snapshot/load", #"{"snapshot_path": "\#(snap)", "mem_backend": {"backend_type": "File", "backend_path": "\#(f.dir.path)/vm.mem"}\#(extra)}"#)
    }

    @Test("the overridden NIC uses the new TAP with the MAC its guest had (derived from the source's name); the other NIC is unchanged; the vsock device gets the new socket")
    func applied() throws {
        let f = try FakeServerFixture()
        defer { f.shutdown() }
        let snap = try writeSnapshot(f)
        let r = try load(f, snap, #", "network_overrides": [{"iface_id": "eth1", "host_dev_name": "tapC"}], "vsock_override": {"uds_path": "\#(f.dir.path)/w.sock"}"#)
        #expect(r.status == 204, "\(r.body)")
        let config = try #require(f.built.withLock { $0.last?.config })
        #expect(config.nets.map(\.backend) == [.tap(name: "tapA"), .tap(name: "tapC")])
        #expect(config.nicMAC(0) == [2, 0, 0, 0, 0, 1])
        #expect(config.nets[1].mac == NetSpec.derivedMAC(vmName: "source", id: "eth1"), "the guest's MAC, kept")
        #expect(config.vsock?.udsPath == f.dir.path + "/w.sock")
    }

    @Test("bad overrides are 400s naming the problem, and nothing is built",
          arguments: [
            (#", "network_overrides": [{"iface_id": "eth9", "host_dev_name": "tapC"}]"#, "no network interface 'eth9' (it has eth0, eth1)"),
            (#", "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tapC"}, {"iface_id": "eth0", "host_dev_name": "tapD"}]"#, "given twice"),
            (#", "network_overrides": [{"iface_id": "eth0", "host_dev_name": "a/b"}]"#, "host_dev_name 'a/b'"),
            (#", "network_overrides": [{"iface_id": "eth0", "host_dev_name": "much-too-long-name"}]"#, "not an interface name"),
            (#", "network_overrides": [{"iface_id": "eth0"}]"#, "host_dev_name"),
            (#", "network_overrides": [{"iface_id": "eth0", "host_dev_name": "t", "mac": "x"}]"#, "mac"),
            (#", "vsock_override": {"uds_path": ""}"#, "uds_path"),
            (#", "vsock_override": {"path": "/x"}"#, "path"),
          ])
    func refused(extra: String, mentions: String) throws {
        let f = try FakeServerFixture()
        defer { f.shutdown() }
        let snap = try writeSnapshot(f)
        let r = try load(f, snap, extra)
        #expect(r.status == 400 && r.fault?.contains(mentions) == true, "\(r.status) \(r.body)")
        #expect(f.built.withLock { $0.isEmpty })
        #expect(try f.send("GET", "/").json?["state"] as? String == "Not started")
    }

    @Test("a vsock_override for a snapshot without a vsock device is a 400")
    func noVsock() throws {
        let f = try FakeServerFixture()
        defer { f.shutdown() }
        let snap = try writeSnapshot(f, vsock: false)
        let r = try load(f, snap, #", "vsock_override": {"uds_path": "/tmp/x.sock"}"#)
        #expect(r.status == 400 && r.fault?.contains("no vsock device") == true, "\(r.body)")
        #expect(f.built.withLock { $0.isEmpty })
    }
}
