import Foundation
import Jailer
import Testing

/// The jailer's logic without root: option validation, the jail's path layout and argv, the cgroup plan
/// from a mount table, and the cgroup file writes against directories standing in for cgroup file systems.
@Suite("jailer")
struct JailerTests {
    /// A temporary directory, removed at the end of the test.
    final class Temp {
        let path: String
        init() {
            path = NSTemporaryDirectory() + "jailer-tests-\(getpid())-\(UUID().uuidString.prefix(8))"
            try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        }
        func file(_ name: String, _ text: String = "", mode: Int = 0o644) -> String {
            let p = path + "/" + name
            try! FileManager.default.createDirectory(atPath: (p as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            FileManager.default.createFile(atPath: p, contents: Data(text.utf8), attributes: [.posixPermissions: mode])
            return p
        }
        deinit { try? FileManager.default.removeItem(atPath: path) }
    }

    static func arguments(_ exec: String) -> JailerArguments {
        var a = JailerArguments()
        a.id = "vm-1"
        a.execFile = exec
        a.uid = "1234"
        a.gid = "5678"
        return a
    }

    @Test("a complete command line validates with Firecracker's defaults: /srv/jailer, cgroup v1, parent = exec name, no-file=2048")
    func defaults() throws {
        let t = Temp()
        let exec = t.file("bin/firecracker", "#!/bin/sh\n", mode: 0o755)
        let c = try JailerConfiguration.validate(Self.arguments(exec))
        #expect(c.chrootBaseDir == "/srv/jailer")
        #expect(c.cgroupVersion == 1)
        #expect(c.parentCgroup == "firecracker")
        #expect(c.resourceLimits == [ResourceLimit(resource: .noFile, value: 2048)])
        #expect((c.uid, c.gid) == (1234, 5678))
    }

    @Test("the layout: <base>/<exec name>/<id>/root, the exec copy at its root, the cgroup <parent>/<id>, argv with --id last")
    func layout() throws {
        let t = Temp()
        let exec = t.file("bin/swiftkvm", "x", mode: 0o755)
        var a = Self.arguments(exec)
        a.chrootBaseDir = "/tmp//jails/"
        a.parentCgroup = "all/uvms/"
        a.execArguments = ["vmm", "--api-sock", "/run/api.sock"]
        let c = try JailerConfiguration.validate(a)
        #expect(c.jailDir == "/tmp/jails/swiftkvm/vm-1")
        #expect(c.chrootDir == "/tmp/jails/swiftkvm/vm-1/root")
        #expect(c.execCopyPath == "/tmp/jails/swiftkvm/vm-1/root/swiftkvm")
        #expect(c.cgroupRelativePath == "all/uvms/vm-1")
        #expect(c.execArgv(startTimeUs: 5, startCPUTimeUs: 6) ==
                ["/swiftkvm", "vmm", "--api-sock", "/run/api.sock", "--id=vm-1", "--start-time-us=5", "--start-time-cpu-us=6"])
        a.chrootBaseDir = "/"
        #expect(try JailerConfiguration.validate(a).chrootDir == "/swiftkvm/vm-1/root")
    }

    @Test("ids: letters, digits and hyphens, 1 to 64 characters")
    func ids() {
        #expect(JailerConfiguration.isValidID("551e7604-e35c-42b3-b825-416853441234"))
        #expect(JailerConfiguration.isValidID(String(repeating: "a", count: 64)))
        for bad in ["", String(repeating: "a", count: 65), "a_b", "a/b", "..", "a b", "é"] {
            #expect(!JailerConfiguration.isValidID(bad), "\(bad)")
        }
    }

    /// (the option that must be named, the field changed, its value; nil removes it)
    static let badCases: [(String, String, String?)] = [
        ("--id", "id", "bad/id"), ("--id", "id", nil),
        ("--exec-file", "execFile", "/nonexistent/firecracker"), ("--exec-file", "execFile", "/tmp"),
        ("--uid", "uid", "root"), ("--uid", "uid", "-1"), ("--gid", "gid", "1.5"),
        ("--chroot-base-dir", "chrootBaseDir", "relative/dir"), ("--chroot-base-dir", "chrootBaseDir", "/srv/../etc"),
        ("--netns", "netns", "/var/run/netns/does-not-exist-jailer"),
        ("--cgroup-version", "cgroupVersion", "3"),
        ("--cgroup", "cgroups", "pids.max"), ("--cgroup", "cgroups", "max=10"), ("--cgroup", "cgroups", "../x.y=1"),
        ("--parent-cgroup", "parentCgroup", "/abs"), ("--parent-cgroup", "parentCgroup", "a/../../b"),
        ("--resource-limit", "resourceLimits", "stack=10"), ("--resource-limit", "resourceLimits", "fsize=lots"),
        ("--resource-limit", "resourceLimits", "fsize"),
    ]

    @Test("each bad option is a usage error naming it (exit 2)", arguments: 0..<badCases.count)
    func badOptions(index: Int) {
        let (option, field, value) = Self.badCases[index]
        let t = Temp()
        var a = Self.arguments(t.file("firecracker", "x", mode: 0o755))
        switch field {
        case "id": a.id = value
        case "execFile": a.execFile = value
        case "uid": a.uid = value
        case "gid": a.gid = value
        case "chrootBaseDir": a.chrootBaseDir = value ?? ""
        case "netns": a.netns = value
        case "cgroupVersion": a.cgroupVersion = value ?? ""
        case "cgroups": a.cgroups = [value ?? ""]
        case "parentCgroup": a.parentCgroup = value
        case "resourceLimits": a.resourceLimits = [value ?? ""]
        default: Issue.record("unknown field \(field)")
        }
        do {
            _ = try JailerConfiguration.validate(a)
            Issue.record("accepted a bad \(option)")
        } catch let e as JailerError {
            guard case let .usage(named, message) = e else { Issue.record("\(e)"); return }
            #expect(named == option, "\(message)")
            #expect(e.exitCode == 2)
            #expect(!message.isEmpty)
        } catch {
            Issue.record("\(error)")
        }
    }

    @Test("resource limits: the last of a resource wins; values up to UInt64")
    func resourceLimits() throws {
        let t = Temp()
        var a = Self.arguments(t.file("firecracker", "x", mode: 0o755))
        a.resourceLimits = ["no-file=10", "fsize=250000000", "no-file=20"]
        let c = try JailerConfiguration.validate(a)
        #expect(c.resourceLimits == [ResourceLimit(resource: .fsize, value: 250_000_000), ResourceLimit(resource: .noFile, value: 20)])
    }

    static let mounts = """
    tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
    cgroup /X/pids cgroup rw,relatime,pids 0 0
    cgroup /X/cpu\\040acct cgroup rw,relatime,cpu,cpuacct 0 0
    cgroup2 /X/unified cgroup2 rw,relatime 0 0
    proc /proc proc rw 0 0
    """

    @Test("/proc/mounts: cgroup v1 hierarchies with their controllers, the v2 one, escapes decoded")
    func mountTable() {
        let m = CgroupMount.parse(mounts: Self.mounts)
        #expect(m == [CgroupMount(path: "/X/pids", version: 1, options: ["rw", "relatime", "pids"]),
                      CgroupMount(path: "/X/cpu acct", version: 1, options: ["rw", "relatime", "cpu", "cpuacct"]),
                      CgroupMount(path: "/X/unified", version: 2, options: [])])
    }

    /// A configuration whose cgroup mounts are directories under `t`.
    static func config(_ t: Temp, version: Int, cgroups: [String]) throws -> (JailerConfiguration, [CgroupMount]) {
        var a = arguments(t.file("firecracker", "x", mode: 0o755))
        a.cgroupVersion = String(version)
        a.cgroups = cgroups
        a.parentCgroup = "fc/uvms"
        let mounts = CgroupMount.parse(mounts: mountsText(t))
        return (try JailerConfiguration.validate(a), mounts)
    }

    static func mountsText(_ t: Temp) -> String {
        "cgroup \(t.path)/pids cgroup rw,pids 0 0\ncgroup \(t.path)/mem cgroup rw,memory 0 0\ncgroup2 \(t.path)/v2 cgroup2 rw 0 0\n"
    }

    @Test("v1: one group per hierarchy; the settings and then the pid are written; the created directories are reported")
    func cgroupV1Writes() throws {
        let t = Temp()
        let (c, mounts) = try Self.config(t, version: 1, cgroups: ["pids.max=64", "memory.limit_in_bytes=1048576"])
        // Stand-ins for the files the kernel would create in the new group.
        for f in ["pids/fc/uvms/vm-1/pids.max", "pids/fc/uvms/vm-1/cgroup.procs",
                  "mem/fc/uvms/vm-1/memory.limit_in_bytes", "mem/fc/uvms/vm-1/cgroup.procs"] { _ = t.file(f) }
        let plan = try CgroupPlan.make(c, mounts: mounts)
        #expect(plan.groups.map(\.directory) == [t.path + "/pids/fc/uvms/vm-1", t.path + "/mem/fc/uvms/vm-1"])
        try plan.apply(pid: 4242)
        func read(_ f: String) -> String? { try? String(contentsOfFile: t.path + "/" + f, encoding: .utf8) }
        #expect(read("pids/fc/uvms/vm-1/pids.max") == "64")
        #expect(read("pids/fc/uvms/vm-1/cgroup.procs") == "4242")
        #expect(read("mem/fc/uvms/vm-1/memory.limit_in_bytes") == "1048576")
        #expect(read("mem/fc/uvms/vm-1/cgroup.procs") == "4242")
    }

    @Test("v1: a controller that is not mounted is a --cgroup usage error listing the mounted ones")
    func cgroupV1Unmounted() throws {
        let t = Temp()
        let (c, mounts) = try Self.config(t, version: 1, cgroups: ["cpuset.cpus=0"])
        #expect(throws: JailerError.self) { try CgroupPlan.make(c, mounts: mounts) }
        do { _ = try CgroupPlan.make(c, mounts: mounts) } catch let JailerError.usage(option, message) {
            #expect(option == "--cgroup")
            #expect(message.contains("cpuset") && message.contains("pids") && message.contains("memory"), "\(message)")
        }
    }

    @Test("a file the controller does not have: --cgroup usage error, and the directories made for it are removed")
    func cgroupMissingFileRollsBack() throws {
        let t = Temp()
        try FileManager.default.createDirectory(atPath: t.path + "/pids", withIntermediateDirectories: true)
        let (c, mounts) = try Self.config(t, version: 1, cgroups: ["pids.nonsense=1"])
        let plan = try CgroupPlan.make(c, mounts: mounts)
        do {
            try plan.apply(pid: 1)
            Issue.record("wrote a file that does not exist")
        } catch let JailerError.usage(option, message) {
            #expect(option == "--cgroup" && message.contains("pids.nonsense"), "\(message)")
        }
        #expect(!FileManager.default.fileExists(atPath: t.path + "/pids/fc"), "the created fc/uvms/vm-1 are gone")
        #expect(FileManager.default.fileExists(atPath: t.path + "/pids"))
    }

    @Test("v2: the controller must be in cgroup.controllers; it is enabled in each ancestor's subtree_control; core cgroup.* files need none")
    func cgroupV2() throws {
        let t = Temp()
        _ = t.file("v2/cgroup.controllers", "cpu memory pids\n")
        _ = t.file("v2/cgroup.subtree_control", "")
        let (bad, mounts) = try Self.config(t, version: 2, cgroups: ["hugetlb.2MB.max=0"])
        do { _ = try CgroupPlan.make(bad, mounts: mounts); Issue.record("accepted hugetlb") } catch let JailerError.usage(option, message) {
            #expect(option == "--cgroup" && message.contains("cpu memory pids"), "\(message)")
        }
        let (c, _) = try Self.config(t, version: 2, cgroups: ["pids.max=7", "cgroup.max.descendants=0"])
        // The ancestors exist with their subtree_control files (as the kernel would have them).
        _ = t.file("v2/fc/cgroup.subtree_control", "")
        _ = t.file("v2/fc/uvms/cgroup.subtree_control", "pids\n")
        for f in ["pids.max", "cgroup.max.descendants", "cgroup.procs"] { _ = t.file("v2/fc/uvms/vm-1/" + f) }
        let plan = try CgroupPlan.make(c, mounts: mounts)
        #expect(plan.groups.count == 1 && plan.groups[0].enable == ["pids"])
        let created = try plan.apply(pid: 99)
        #expect(created.isEmpty, "all existed")
        func read(_ f: String) -> String? { try? String(contentsOfFile: t.path + "/v2/" + f, encoding: .utf8) }
        #expect(read("cgroup.subtree_control") == "+pids")
        #expect(read("fc/cgroup.subtree_control") == "+pids")
        #expect(read("fc/uvms/cgroup.subtree_control") == "pids\n", "already enabled: not written")
        #expect(read("fc/uvms/vm-1/pids.max") == "7")
        #expect(read("fc/uvms/vm-1/cgroup.max.descendants") == "0")
        #expect(read("fc/uvms/vm-1/cgroup.procs") == "99")
    }

    @Test("v2 without a cgroup2 mount: a --cgroup-version usage error; no --cgroup: no groups at all")
    func cgroupV2Unmounted() throws {
        let t = Temp()
        let (c, _) = try Self.config(t, version: 2, cgroups: ["pids.max=1"])
        do { _ = try CgroupPlan.make(c, mounts: []); Issue.record("no mount") } catch let JailerError.usage(option, _) {
            #expect(option == "--cgroup-version")
        }
        let (none, mounts) = try Self.config(t, version: 1, cgroups: [])
        #expect(try CgroupPlan.make(none, mounts: mounts).groups.isEmpty)
    }

    @Test("removeTree removes a tree without following symbolic links")
    func removeTreeKeepsLinkTargets() throws {
        let t = Temp()
        let outside = t.file("outside/keep", "k")
        _ = t.file("tree/a/b/c", "x")
        try FileManager.default.createSymbolicLink(atPath: t.path + "/tree/link", withDestinationPath: t.path + "/outside")
        removeTree(t.path + "/tree")
        #expect(!FileManager.default.fileExists(atPath: t.path + "/tree"))
        #expect(FileManager.default.fileExists(atPath: outside))
    }
}
