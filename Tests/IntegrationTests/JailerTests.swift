import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// `swiftkvm jailer` (Firecracker's jailer) running a real `swiftkvm vmm`: the jailed process's root, ids,
/// capabilities, seccomp, cgroup, rlimits and namespaces seen from outside in /proc; a guest booted through
/// the API socket in the jail; bad options refused with exit 2 and nothing left behind.
/// What the jailer tests need, outside the suite (its traits cannot refer to the suite's own members).
enum JailerTestEnvironment {
    /// Why the tests cannot run here (nil: they can).
    static let unavailableReason: String? = {
        if getuid() != 0 { return "the jailer needs root" }
        if !MCSupport.canRunGuests { return "needs /dev/kvm, swiftkvm and the ticker" }
        if !FileManager.default.fileExists(atPath: pidsHierarchy + "/cgroup.procs") { return "no cgroup v1 pids hierarchy at \(pidsHierarchy)" }
        return nil
    }()

    /// This host mounts the controllers as cgroup v1 hierarchies (and a cgroup2 one with only hugetlb,
    /// at /sys/fs/cgroup/unified), so the tests use v1's pids controller.
    static let pidsHierarchy = "/sys/fs/cgroup/pids"
}

@Suite("jailer (root, /dev/kvm, cgroup v1 pids)", .serialized,
       .enabled(if: JailerTestEnvironment.unavailableReason == nil,
                "needs root, /dev/kvm, the swiftkvm executable, the guest programs and the cgroup v1 pids hierarchy"))
struct JailerGuestTests {
    static let pidsHierarchy = JailerTestEnvironment.pidsHierarchy
    static let parentCgroup = "swiftkvm-jailer-test"
    static let uid: UInt32 = 64123, gid: UInt32 = 64124

    /// One jail: a base directory, an id, the exec file (a `firecracker` symlink to swiftkvm, so the jailed
    /// copy is `/firecracker` and runs as `swiftkvm vmm`), and its clean-up.
    final class TestJail {
        let base: MCTempDir
        let id: String
        let execFile: String
        var jailDir: String { base.path + "/jails/firecracker/" + id }
        var root: String { jailDir + "/root" }
        var cgroup: String { JailerGuestTests.pidsHierarchy + "/" + JailerGuestTests.parentCgroup + "/" + id }
        var socket: String { root + "/run/firecracker.socket" }

        init(_ tag: String) throws {
            base = MCTempDir(prefix: "skjail")
            // The jailed process never walks the path above its root, but tests' tools do.
            chmod(base.path, 0o755)
            id = "jt-\(getpid())-\(tag)"
            execFile = base.path + "/bin/firecracker"
            try FileManager.default.createDirectory(atPath: base.path + "/bin", withIntermediateDirectories: true)
            try FileManager.default.createSymbolicLink(atPath: execFile, withDestinationPath: try #require(MCSupport.swiftkvm))
        }

        /// The root before the jailer runs (it keeps an existing one): swiftkvm links glibc and a few
        /// libraries dynamically (and a debug build the Swift runtime), so the loader and the libraries
        /// `ldd` lists are copied in; and the ticker guest as /ticker.elf.
        func prepareRoot() throws {
            let ldd = try MCChild.run("/usr/bin/ldd", [try #require(MCSupport.swiftkvm)])
            try #require(ldd.status == 0, "ldd: \(ldd.stderr)")
            let libraries = ldd.stdout.split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "\t" })
                .map(String.init).filter { $0.hasPrefix("/") }
            #expect(!libraries.isEmpty)
            for lib in libraries {
                let target = root + lib
                try FileManager.default.createDirectory(atPath: (target as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
                try FileManager.default.copyItem(atPath: URL(fileURLWithPath: lib).resolvingSymlinksInPath().path, toPath: target)
            }
            try FileManager.default.copyItem(atPath: try #require(MCSupport.ticker), toPath: root + "/ticker.elf")
        }

        /// `swiftkvm jailer` with this jail's id, exec file, uid/gid and base, then `extra`, `--` and `vmmArguments`.
        func jailerArguments(_ extra: [String], vmmArguments: [String] = ["--api-sock", "/run/firecracker.socket"]) -> [String] {
            ["jailer", "--id", id, "--exec-file", execFile, "--uid", "\(JailerGuestTests.uid)", "--gid", "\(JailerGuestTests.gid)",
             "--chroot-base-dir", base.path + "/jails"] + extra + ["--"] + vmmArguments
        }

        /// Removes the jail and its cgroup (after the process ended); true when both are gone.
        @discardableResult
        func remove() -> Bool {
            rmdir(cgroup)
            rmdir(JailerGuestTests.pidsHierarchy + "/" + JailerGuestTests.parentCgroup) // if no other jail uses it
            base.remove()
            return !FileManager.default.fileExists(atPath: cgroup) && !FileManager.default.fileExists(atPath: base.path)
        }
    }

    /// `Name: value` lines of /proc/PID/status.
    static func status(_ pid: Int32) -> [String: String] {
        let text = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
        var fields: [String: String] = [:]
        for line in text.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            fields[String(line[..<colon])] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        return fields
    }

    static func inode(_ path: String) -> (UInt64, UInt64)? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return (UInt64(st.st_dev), UInt64(st.st_ino))
    }

    /// Waits until `pid` is gone (or a zombie): for processes that are not the test's children.
    static func waitGone(_ pid: Int32, seconds: Double) -> Bool {
        MCSupport.wait(seconds: seconds) {
            guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8) else { return true }
            return stat.split(separator: ")").last?.split(separator: " ").first == "Z"
        }
    }

    @Test("a jailed swiftkvm vmm: chroot root, the given uid/gid, no capabilities, no_new_privs, seccomp, its cgroup and rlimits; boots the ticker over the jail's API socket; clean-up leaves nothing")
    func jailedVMM() throws {
        let jail = try TestJail("vm")
        defer { jail.remove() }
        try jail.prepareRoot()
        let swiftkvm = try #require(MCSupport.swiftkvm)
        let vmm = try MCChild(swiftkvm, jail.jailerArguments([
            "--cgroup", "pids.max=64", "--parent-cgroup", Self.parentCgroup,
            "--resource-limit", "no-file=512", "--resource-limit", "fsize=1073741824"]))
        defer { vmm.stop() }
        // A vmm that did not come up ends the test here (the checks below would read a gone process).
        try #require(MCSupport.wait(seconds: 20) { FileManager.default.fileExists(atPath: jail.socket) },
                     "the API socket appears at <root>/run/firecracker.socket: \(vmm.stderr.text)")
        let pid = vmm.pid // the jailer execs the vmm: same process

        // Root: the jail (the same directory, through the bind mount), in a mount namespace of its own.
        #expect(Self.inode("/proc/\(pid)/root/") != nil && Self.inode("/proc/\(pid)/root/")! == Self.inode(jail.root + "/")!)
        #expect(FileManager.default.fileExists(atPath: "/proc/\(pid)/root/firecracker"))
        let mnt = try #require(Self.inode("/proc/\(pid)/ns/mnt")), ours = try #require(Self.inode("/proc/self/ns/mnt"))
        #expect(mnt != ours)
        let cmdline = (try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8)) ?? ""
        #expect(cmdline.hasPrefix("/firecracker\0--api-sock\0/run/firecracker.socket\0--id=\(jail.id)\0"), "\(cmdline)")

        // Identity and privileges.
        let s = Self.status(pid)
        #expect(s["Uid"] == "\(Self.uid)\t\(Self.uid)\t\(Self.uid)\t\(Self.uid)", "\(s["Uid"] ?? "-")")
        #expect(s["Gid"] == "\(Self.gid)\t\(Self.gid)\t\(Self.gid)\t\(Self.gid)", "\(s["Gid"] ?? "-")")
        #expect(s["Groups"] == "", "no supplementary groups: \(s["Groups"] ?? "-")")
        for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            #expect(s[cap] == "0000000000000000", "\(cap) \(s[cap] ?? "-")")
        }
        #expect(s["NoNewPrivs"] == "1")
        // The main thread confines itself just after the API thread binds the socket: under load the
        // socket can appear first (seen in CI: Seccomp 0 at the first read).
        #expect(MCSupport.wait(seconds: 20) { Self.status(pid)["Seccomp"] == "2" },
                "Seccomp \(Self.status(pid)["Seccomp"] ?? "-") 20 s after the API socket appeared")

        // Cgroup: the process is in <pids>/<parent>/<id>, whose pids.max is what --cgroup wrote.
        let cgroups = (try? String(contentsOfFile: "/proc/\(pid)/cgroup", encoding: .utf8)) ?? ""
        #expect(cgroups.split(separator: "\n").contains { $0.hasSuffix(":pids:/\(Self.parentCgroup)/\(jail.id)") }, "\(cgroups)")
        #expect((try? String(contentsOfFile: jail.cgroup + "/pids.max", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) == "64")
        let procs = (try? String(contentsOfFile: jail.cgroup + "/cgroup.procs", encoding: .utf8)) ?? ""
        #expect(procs.split(separator: "\n").contains("\(pid)"))

        // Resource limits, soft and hard.
        let limits = (try? String(contentsOfFile: "/proc/\(pid)/limits", encoding: .utf8)) ?? ""
        func limit(_ name: String) -> [Substring] {
            limits.split(separator: "\n").first { $0.hasPrefix(name) }.map { $0.dropFirst(name.count).split(separator: " ") } ?? []
        }
        #expect(limit("Max open files").prefix(2) == ["512", "512"], "\(limits)")
        #expect(limit("Max file size").prefix(2) == ["1073741824", "1073741824"], "\(limits)")

        // The device nodes, owned by the uid/gid, with the host's numbers.
        for dev in ["/dev/kvm", "/dev/net/tun", "/dev/urandom"] {
            var host = stat(), inJail = stat()
            #expect(stat(dev, &host) == 0 && stat(jail.root + dev, &inJail) == 0)
            #expect(inJail.st_rdev == host.st_rdev && (inJail.st_mode & S_IFMT) == S_IFCHR, "\(dev)")
            #expect(inJail.st_uid == Self.uid && inJail.st_gid == Self.gid, "\(dev)")
        }

        // Boot the ticker through the socket, with paths inside the jail.
        #expect(MCSupport.apiCall(jail.socket, "PUT", "/boot-source",
                                  #"{"kernel_image_path": "/ticker.elf", "boot_args": "\#(MCSupport.tickerArgs(ticks: 0))"}"#) == "204")
        #expect(MCSupport.apiCall(jail.socket, "PUT", "/actions", #"{"action_type": "InstanceStart"}"#) == "204", "\(vmm.stderr.text)")
        #expect(MCSupport.wait(seconds: 60) { MCSupport.ticks(in: vmm.stdout.text) >= 20 }, "ticks: \(vmm.stderr.text)")
        #expect(Self.status(pid)["Seccomp"] == "2")
        #expect(vmm.poll() == nil, "still running: \(vmm.stderr.text)")

        vmm.stop()
        #expect(vmm.poll() == 143, "SIGTERM ends the jailed VMM with 143: \(vmm.stderr.text)")
        #expect(!vmm.stderr.text.contains("forbidden syscall"), "\(vmm.stderr.text)")
        #expect(jail.remove(), "the jail directory and the cgroup are removed")
    }

    @Test("--netns, --new-pid-ns and --daemonize: the vmm is in the test's network namespace, PID 1 of a new PID namespace (its PID in <root>/firecracker.pid), in its own session; the jailer returns 0")
    func namespaces() throws {
        if let reason = NetworkNamespace.unavailableReason {
            Issue.record("network namespaces unavailable: \(reason)")
            return
        }
        let ns = try NetworkNamespace(tag: "jail")
        defer { ns.remove() }
        let nsPath = ["/run/netns/", "/var/run/netns/"].map { $0 + ns.name }.first { FileManager.default.fileExists(atPath: $0) }
        let handle = try #require(nsPath, "ip netns add made a handle")
        let jail = try TestJail("ns")
        defer { jail.remove() }
        try jail.prepareRoot()
        let jailer = try MCChild.run(try #require(MCSupport.swiftkvm),
                                     jail.jailerArguments(["--netns", handle, "--new-pid-ns", "--daemonize"]), timeout: 30)
        #expect(jailer.status == 0, "the jailer's parent ends after the fork: \(jailer.stderr)")
        var pid: Int32 = 0
        #expect(MCSupport.wait(seconds: 10) {
            pid = Int32(((try? String(contentsOfFile: jail.root + "/firecracker.pid", encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
            return pid > 0
        }, "<root>/firecracker.pid")
        try #require(pid > 0)
        defer {
            kill(pid, SIGKILL)
            _ = Self.waitGone(pid, seconds: 10)
        }
        #expect(MCSupport.wait(seconds: 20) { FileManager.default.fileExists(atPath: jail.socket) }, "API socket")
        #expect(Self.inode("/proc/\(pid)/ns/net")! == Self.inode(handle)!, "in the namespace made by the test")
        #expect(Self.inode("/proc/\(pid)/ns/net")! != Self.inode("/proc/self/ns/net")!)
        #expect(Self.inode("/proc/\(pid)/ns/pid")! != Self.inode("/proc/self/ns/pid")!)
        let s = Self.status(pid)
        #expect(s["NSpid"]?.split(separator: "\t").last == "1", "PID 1 inside: \(s["NSpid"] ?? "-")")
        #expect(s["Uid"]?.hasPrefix("\(Self.uid)\t") == true && s["CapEff"] == "0000000000000000")
        // As in the jailed-vmm test: the main thread confines itself just after the API socket appears.
        #expect(MCSupport.wait(seconds: 20) { Self.status(pid)["Seccomp"] == "2" },
                "Seccomp \(Self.status(pid)["Seccomp"] ?? "-") 20 s after the API socket appeared")
        let stat = (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)) ?? ""
        let fields = stat.split(separator: ")").last?.split(separator: " ") ?? []
        #expect(fields.count > 4 && fields[3] == "\(pid)", "its own session (setsid): \(stat)")
        // The API answers from outside.
        #expect(MCSupport.apiCall(jail.socket, "GET", "/", "") == "200")
        kill(pid, SIGTERM)
        #expect(Self.waitGone(pid, seconds: 10), "SIGTERM from outside ends PID 1 of the namespace")
        #expect(jail.remove())
    }

    @Test("bad options: exit 2 naming the option, and no jail directory or cgroup is created")
    func badOptions() throws {
        let swiftkvm = try #require(MCSupport.swiftkvm)
        var cases: [(option: String, change: [String])] = [
            ("--id", ["--id", "bad_id!"]),
            ("--id", ["--id", String(repeating: "a", count: 65)]),
            ("--exec-file", ["--exec-file", "/nonexistent/firecracker"]),
            ("--uid", ["--uid", "nobody"]),
            ("--gid", ["--gid", "-5"]),
            ("--cgroup", ["--cgroup", "pids.nonsense=1", "--parent-cgroup", Self.parentCgroup]),
            ("--cgroup", ["--cgroup", "nosuchcontroller.max=1"]),
            ("--cgroup", ["--cgroup", "pids.max"]),
            ("--cgroup-version", ["--cgroup-version", "3"]),
            ("--parent-cgroup", ["--parent-cgroup", "../escape", "--cgroup", "pids.max=5"]),
            ("--resource-limit", ["--resource-limit", "stack=1"]),
            ("--resource-limit", ["--resource-limit", "no-file=many"]),
            ("--netns", ["--netns", "/nonexistent/netns"]),
            ("--chroot-base-dir", ["--chroot-base-dir", "relative"]),
        ]
        // The cgroup2 hierarchy here offers only hugetlb: pids there is refused, naming what is available.
        let v2 = (try? String(contentsOfFile: "/sys/fs/cgroup/unified/cgroup.controllers", encoding: .utf8)) ?? ""
        if FileManager.default.fileExists(atPath: "/sys/fs/cgroup/unified/cgroup.procs") && !v2.split(separator: " ").contains("pids") {
            cases.append(("--cgroup", ["--cgroup-version", "2", "--cgroup", "pids.max=5"]))
        }
        for c in cases {
            let jail = try TestJail("bad")
            defer { jail.remove() }
            var args = jail.jailerArguments([])
            // Replace the option when the jail's arguments already have it, else add it.
            var i = 0
            while i < c.change.count {
                if let at = args.firstIndex(of: c.change[i]), c.change[i] != "--cgroup", i + 1 < c.change.count {
                    args[at + 1] = c.change[i + 1]
                } else {
                    args.insert(contentsOf: c.change[i..<min(i + 2, c.change.count)], at: 1)
                }
                i += 2
            }
            let r = try MCChild.run(swiftkvm, args, timeout: 30)
            #expect(r.status == 2, "\(c.change): status \(r.status): \(r.stderr)")
            #expect(r.stderr.contains(c.option), "\(c.change): \(r.stderr)")
            #expect(!FileManager.default.fileExists(atPath: jail.base.path + "/jails"), "\(c.change): no jail directory")
            #expect(!FileManager.default.fileExists(atPath: jail.cgroup), "\(c.change): no cgroup")
            #expect(!FileManager.default.fileExists(atPath: Self.pidsHierarchy + "/" + Self.parentCgroup), "\(c.change): no parent cgroup")
        }
        // A binary or symlink named `jailer` is `swiftkvm jailer`.
        let jail = try TestJail("name")
        defer { jail.remove() }
        let link = jail.base.path + "/bin/jailer"
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: swiftkvm)
        let r = try MCChild.run(link, Array(jail.jailerArguments(["--uid", "x"]).dropFirst()), timeout: 30)
        #expect(r.status == 2 && r.stderr.hasPrefix("jailer: error: --uid"), "\(r.status): \(r.stderr)")
    }
}
