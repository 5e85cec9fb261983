import API
import Foundation
import Testing
import VMM
@testable import Manager

@Suite("vm clone: the clone's definition and machine")
struct ClonePlanTests {
    func definition(_ dir: TempDir, extra: String) throws -> VMDefinition {
        let kernel = try dir.file("k.elf")
        return try VMDefinition.parse(Array("""
        {"name": "web", "autostart": true, "shutdown_timeout_s": 12,
         "boot-source": {"kernel_image_path": "\(kernel)"},
         "machine-config": {"vcpu_count": 2, "mem_size_mib": 128}\(extra)}
        """.utf8), source: "web.json")
    }

    @Test("writable disks get copies beside them, read-only ones are shared; vsock socket, TAPs and MACs are the clone's; autostart is off")
    func plan() throws {
        let dir = try TempDir()
        defer { dir.cleanup() }
        let root = try dir.file("root.qcow2"), data = try dir.file("data"), iso = try dir.file("tools.iso")
        let source = try definition(dir, extra: """
        , "drives": [{"drive_id": "root", "path_on_host": "\(root)", "is_root_device": true},
                     {"drive_id": "data", "path_on_host": "\(data)", "is_root_device": false, "is_read_only": false},
                     {"drive_id": "iso", "path_on_host": "\(iso)", "is_root_device": false, "is_read_only": true}],
          "vsock": {"guest_cid": 3, "uds_path": "\(dir.path)/web.vsock"},
          "nics": [{"network": "lan", "mac": "02:00:00:00:00:01"}, {"bridge": "br0"}]
        """)
        let plan = try ClonePlan.make(source: source, newName: "web2")
        #expect(plan.diskCopies == [ClonePlan.Copy(from: root, to: dir.path + "/root-web2.qcow2"),
                                    ClonePlan.Copy(from: data, to: data + "-web2")])
        let c = plan.clone
        #expect(c.name == "web2" && !c.autostart && c.shutdownTimeout == 12)
        #expect(c.config.drives.map(\.pathOnHost) == [dir.path + "/root-web2.qcow2", data + "-web2", iso])
        #expect(c.config.vsock?.udsPath == dir.path + "/web-web2.vsock")
        #expect(plan.vsock == ClonePlan.Copy(from: dir.path + "/web.vsock", to: dir.path + "/web-web2.vsock"))
        #expect(c.config.machineConfig == source.config.machineConfig)
        #expect(c.nics.map(\.attachment) == [.network("lan"), .bridge("br0")])
        #expect(c.nics.allSatisfy { $0.mac == nil }, "explicit MACs are dropped")
        let macs = c.nics.map { $0.guestMAC(vmName: "web2") }
        #expect(macs != source.nics.map { $0.guestMAC(vmName: "web") })
        #expect(Set(macs).count == 2)
        #expect(plan.taps == [VMNIC.tapName(vmName: "web", index: 0): VMNIC.tapName(vmName: "web2", index: 0),
                              VMNIC.tapName(vmName: "web", index: 1): VMNIC.tapName(vmName: "web2", index: 1)])
        #expect(plan.taps.keys.allSatisfy { !plan.taps.values.contains($0) })
        // The clone's definition stores and parses back (the stored form), once its disks exist.
        for copy in plan.diskCopies { #expect(FileManager.default.createFile(atPath: copy.to, contents: nil)) }
        let stored = try VMDefinition.parse(c.normalizedJSON(), source: "web2.json")
        #expect(stored.name == "web2" && stored.config.drives == c.config.drives)
    }

    @Test("refused, nothing planned: host TAPs of network-interfaces, vhost-user drives, taken target files, bad or equal names")
    func refused() throws {
        let dir = try TempDir()
        defer { dir.cleanup() }
        let disk = try dir.file("d.img")
        let tap = try definition(dir, extra: #", "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap7"}]"#)
        #expect(throws: ManagerError.self) { try ClonePlan.make(source: tap, newName: "b") }
        do { _ = try ClonePlan.make(source: tap, newName: "b") } catch {
            #expect(error.kind == .invalid && error.message.contains("tap7") && error.message.contains("nics"), "\(error.message)")
        }
        let withDisk = try definition(dir, extra: #", "drives": [{"drive_id": "d", "path_on_host": "\#(disk)", "is_root_device": false}]"#)
        do { _ = try ClonePlan.make(source: withDisk, newName: "b", exists: { $0 == dir.path + "/d-b.img" }) } catch {
            #expect(error.kind == .conflict && error.message.contains(dir.path + "/d-b.img"), "\(error.message)")
        }
        for bad in ["web", "", "a b", "-x", String(repeating: "n", count: 65)] {
            do {
                _ = try ClonePlan.make(source: withDisk, newName: bad)
                Issue.record("'\(bad)' was accepted")
            } catch {
                #expect(error.kind == .invalid, "\(error.message)")
            }
        }
    }

    @Test("the snapshot's machine gets the copies, the clone's TAPs, socket and name; its NICs keep the MAC their guest uses; a disk or TAP the definition lacks is an error")
    func rewrite() throws {
        let dir = try TempDir()
        defer { dir.cleanup() }
        let disk = try dir.file("d.img"), iso = try dir.file("i.iso")
        let source = try definition(dir, extra: """
        , "drives": [{"drive_id": "d", "path_on_host": "\(disk)", "is_root_device": false},
                     {"drive_id": "i", "path_on_host": "\(iso)", "is_root_device": false, "is_read_only": true}],
          "vsock": {"guest_cid": 3, "uds_path": "\(dir.path)/v.sock"}, "nics": [{"network": "lan"}]
        """)
        let plan = try ClonePlan.make(source: source, newName: "web2")
        let oldTap = VMNIC.tapName(vmName: "web", index: 0)
        var machine = VMConfiguration(payload: .kernel(path: "/k", initrd: nil, cmdline: "", modules: []))
        machine.name = "web"
        machine.disks = [DiskSpec(path: disk), DiskSpec(path: iso, readOnly: true)]
        machine.nets = [NetSpec(backend: .tap(name: oldTap), mac: nil, id: "net0")]
        machine.vsock = VsockSpec(guestCID: 3, udsPath: dir.path + "/v.sock", id: nil)
        let guestMAC = machine.nicMAC(0)
        var changed = machine
        try plan.rewrite(&changed)
        #expect(changed.disks.map(\.path) == [dir.path + "/d-web2.img", iso])
        #expect(changed.nets[0].backend == .tap(name: VMNIC.tapName(vmName: "web2", index: 0)))
        #expect(changed.nicMAC(0) == guestMAC, "the running guest's MAC stays")
        #expect(changed.vsock?.udsPath == dir.path + "/v-web2.sock")
        #expect(changed.name == "web2")

        var unknownDisk = machine
        unknownDisk.disks.append(DiskSpec(path: "/elsewhere.img"))
        #expect(throws: ManagerError.self) { try plan.rewrite(&unknownDisk) }
        var unknownTap = machine
        unknownTap.nets[0].backend = .tap(name: "tap9")
        #expect(throws: ManagerError.self) { try plan.rewrite(&unknownTap) }
    }

    @Test("sibling paths: STEM-NAME.EXT, or NAME-SUFFIX without an extension; dots in directories and leading dots are not extensions")
    func sibling() {
        #expect(ClonePlan.siblingPath("/a/b.qcow2", suffix: "c") == "/a/b-c.qcow2")
        #expect(ClonePlan.siblingPath("/a/b.raw.img", suffix: "c") == "/a/b.raw-c.img")
        #expect(ClonePlan.siblingPath("/a.d/b", suffix: "c") == "/a.d/b-c")
        #expect(ClonePlan.siblingPath("/a/.hidden", suffix: "c") == "/a/.hidden-c")
    }
}
