import Foundation
import SwiftKVMTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import Manager

@Suite("Daemon with real VMs (ticker guests, /dev/kvm)", .serialized, .enabled(if: ManagerSupport.canRunGuests, "needs /dev/kvm, the swiftkvm executable and guest/build/ticker.elf"))
struct DaemonGuestTests {
    @Test("define, start, running with a pid, ticks in the serial log, pause stops them, resume, shutdown resets to shut off")
    func lifecycle() throws {
        let f = try DaemonFixture()
        defer { f.cleanup() }
        #expect(try f.call("POST", "/vms", ManagerSupport.tickerDefinition("t1")).status == 201)
        let started = try f.action("t1", "start")
        #expect(started.status == 200, "\(started.text)")
        let running = try f.client.json("GET", "/vms", as: [VMInfo].self)
        #expect(running.map(\.name) == ["t1"])
        let info = try #require(running.first)
        #expect(info.state == .running)
        let pid = try #require(info.pid)
        #expect(ProcessTools.isAlive(Int32(pid)))
        #expect(ProcessTools.commandLine(of: Int32(pid)).contains(info.apiSocket))
        #expect(FileManager.default.fileExists(atPath: info.consoleSocket))
        #expect(FileManager.default.fileExists(atPath: f.dir.path + "/run/t1/state.json"))
        #expect(FileManager.default.fileExists(atPath: f.dir.path + "/run/t1/config.json"))
        #expect(ManagerSupport.wait(seconds: 30) { ManagerSupport.ticks(in: info.serialLog) >= 5 }, "the serial log should fill with ticks")

        #expect(try f.action("t1", "pause").status == 200)
        #expect(try f.info("t1").state == .paused)
        let atPause = ManagerSupport.ticks(in: info.serialLog)
        usleep(500_000)
        #expect(ManagerSupport.ticks(in: info.serialLog) <= atPause + 1, "no tick while paused (one may be in flight)")
        #expect(try f.action("t1", "pause").status == 409)
        #expect(try f.action("t1", "resume").status == 200)
        #expect(ManagerSupport.wait(seconds: 30) { ManagerSupport.ticks(in: info.serialLog) >= atPause + 5 }, "ticks resume")

        let r = try f.action("t1", "shutdown")
        #expect(r.status == 200, "\(r.text)")
        let after = try JSONDecoder().decode(VMInfo.self, from: Data(r.body))
        #expect(after.state == .shutOff)
        #expect(after.pid == nil)
        #expect(after.lastExit?.reason == "reset")
        #expect(after.lastExit?.status == 8)
        #expect((try? String(contentsOfFile: info.serialLog, encoding: .utf8))?.contains("CTRL-ALT-DEL") == true)
        #expect(!FileManager.default.fileExists(atPath: info.apiSocket))
        #expect(!FileManager.default.fileExists(atPath: f.dir.path + "/run/t1/state.json"))
        #expect(ManagerSupport.wait(seconds: 5) { !ProcessTools.isAlive(Int32(pid)) })
        let events = f.daemon.manager?.events.events(since: 0).map(\.event) ?? []
        #expect(events == ["defined", "starting", "started", "paused", "resumed", "shutting-down", "stopped"])
    }

    /// The "tick N" numbers in `path`, in order.
    static func tickNumbers(_ path: String) -> [Int] {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return [] }
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        lines.removeLast()
        return lines.compactMap { $0.hasPrefix("tick ") ? Int($0.dropFirst(5)) : nil }
    }

    @Test("save writes the snapshot directory and stops the VM; restore starts it where it stopped (the next tick, no repeat); an undefined VM is defined from the saved definition; bad requests are clear errors")
    func saveRestore() throws {
        let f = try DaemonFixture()
        defer { f.cleanup() }
        let snap = f.dir.path + "/saved"
        #expect(try f.call("POST", "/vms", ManagerSupport.tickerDefinition("s1")).status == 201)
        // Save needs a running VM, an absolute path and a path only with save.
        #expect(try f.call("PUT", "/vms/s1/state", #"{"action": "save", "path": "\#(snap)"}"#).status == 409)
        #expect(try f.action("s1", "start").status == 200)
        let info = try f.info("s1")
        #expect(ManagerSupport.wait(seconds: 30) { ManagerSupport.ticks(in: info.serialLog) >= 5 })
        #expect(try f.call("PUT", "/vms/s1/state", #"{"action": "save", "path": "relative/dir"}"#).status == 400)
        #expect(try f.call("PUT", "/vms/s1/state", #"{"action": "save"}"#).status == 400)
        #expect(try f.call("PUT", "/vms/s1/state", #"{"action": "pause", "path": "\#(snap)"}"#).status == 400)

        let saved = try f.call("PUT", "/vms/s1/state", #"{"action": "save", "path": "\#(snap)"}"#)
        #expect(saved.status == 200, "\(saved.text)")
        #expect(try f.info("s1").state == .shutOff)
        for file in ["snapshot", "memory", "definition.json"] {
            #expect(FileManager.default.fileExists(atPath: snap + "/" + file), "\(file) in the snapshot directory")
        }
        let last = try #require(Self.tickNumbers(info.serialLog).last)

        // Undefine it: restore defines it again from the saved definition.
        #expect(try f.call("DELETE", "/vms/s1").status == 204)
        let restored = try f.call("POST", "/vms/restore", #"{"path": "\#(snap)"}"#)
        #expect(restored.status == 200, "\(restored.text)")
        #expect(try f.info("s1").state == .running)
        #expect(ManagerSupport.wait(seconds: 30) { Self.tickNumbers(info.serialLog).count(where: { $0 > last }) >= 5 }, "ticks continue after the restore")
        let ticks = Self.tickNumbers(info.serialLog)
        let after = ticks.drop { $0 <= last }
        #expect(after.first == last + 1, "the first tick after the restore is the next one: \(ticks.suffix(12))")
        #expect(Array(after) == Array((last + 1)...(last + after.count)), "no gap and no repeat")
        #expect(try f.call("POST", "/vms/restore", #"{"path": "\#(snap)"}"#).status == 409, "it is running")
        #expect(try f.action("s1", "destroy").status == 200)
        let events = f.daemon.manager?.events.events(since: 0).map(\.event) ?? []
        #expect(events.contains("saved") && events.contains("restoring"))

        // A damaged snapshot: clear errors, the VM stays shut off.
        let bad = try f.call("POST", "/vms/restore", #"{"path": "\#(f.dir.path)/nothing"}"#)
        #expect(bad.status == 400 || bad.status == 404, "\(bad.text)")
        try Data("garbage".utf8).write(to: URL(fileURLWithPath: snap + "/snapshot"))
        let corrupt = try f.call("POST", "/vms/restore", #"{"path": "\#(snap)"}"#)
        #expect(corrupt.status == 400 && corrupt.text.contains("SKVMSNAP"), "\(corrupt.text)")
        #expect(try f.info("s1").state == .shutOff)
    }

    @Test("clone: a running copy of a running VM from a snapshot: the clone's ticks go on from the source's, the source keeps ticking, the clone has its own disk copy (same bytes, sparse), vsock socket, vmm and definition; taken names, bad names, taken files and shut-off sources are clear errors that leave nothing behind")
    func clone() throws {
        let f = try DaemonFixture()
        defer { f.cleanup() }
        let disk = f.dir.path + "/s1.img", marker = Array("SWIFTKVM clone marker".utf8)
        #expect(FileManager.default.createFile(atPath: disk, contents: nil))
        #expect(truncate(disk, 16 << 20) == 0)
        let fd = open(disk, O_WRONLY)
        #expect(marker.withUnsafeBytes { pwrite(fd, $0.baseAddress, marker.count, 1 << 20) } == marker.count)
        close(fd)
        let extra = #", "drives": [{"drive_id": "data", "path_on_host": "\#(disk)", "is_root_device": false}], "vsock": {"guest_cid": 3, "uds_path": "\#(f.dir.path)/s1.vsock"}"#
        #expect(try f.call("POST", "/vms", ManagerSupport.tickerDefinition("s1", extra: extra)).status == 201)
        #expect(try f.call("POST", "/vms/s1/clone", #"{"name": "c1"}"#).status == 409, "a shut-off VM")
        #expect(try f.action("s1", "start").status == 200)
        let source = try f.info("s1")
        #expect(ManagerSupport.wait(seconds: 30) { ManagerSupport.ticks(in: source.serialLog) >= 5 })

        // Bad requests: nothing is made.
        #expect(try f.call("POST", "/vms/nope/clone", #"{"name": "c1"}"#).status == 404)
        for body in [#"{"name": "s1"}"#, #"{"name": "bad name"}"#, #"{}"#, #"{"name": "c1", "x": 1}"#] {
            let r = try f.call("POST", "/vms/s1/clone", body)
            #expect(r.status == 400, "\(body): \(r.status) \(r.text)")
        }
        let taken = f.dir.path + "/s1-c2.img"
        #expect(FileManager.default.createFile(atPath: taken, contents: Data("keep".utf8)))
        let refused = try f.call("POST", "/vms/s1/clone", #"{"name": "c2"}"#)
        #expect(refused.status == 409 && refused.text.contains(taken), "\(refused.text)")
        #expect(try f.call("GET", "/vms/c2").status == 404)
        #expect(try String(contentsOfFile: taken, encoding: .utf8) == "keep")
        #expect(try f.info("s1").state == .running)

        let r = try f.call("POST", "/vms/s1/clone", #"{"name": "c1"}"#)
        #expect(r.status == 201, "\(r.text)")
        let clone = try f.info("c1")
        #expect(clone.state == .running)
        let pid = try #require(clone.pid)
        #expect(pid != source.pid)
        #expect(ProcessTools.commandLine(of: Int32(pid)).contains("c1"))
        #expect(ManagerSupport.wait(seconds: 30) { Self.tickNumbers(clone.serialLog).count >= 5 }, "the clone ticks")
        let cloneTicks = Self.tickNumbers(clone.serialLog)
        let first = try #require(cloneTicks.first)
        #expect(first > 5, "the clone goes on from the source's ticks, it does not boot: \(cloneTicks.prefix(5))")
        #expect(Self.tickNumbers(source.serialLog).contains(first - 1), "the clone's first tick follows one the source printed")
        #expect(cloneTicks == Array(first..<(first + cloneTicks.count)), "no gap and no repeat in the clone")
        let sourceNow = ManagerSupport.ticks(in: source.serialLog)
        #expect(ManagerSupport.wait(seconds: 30) { ManagerSupport.ticks(in: source.serialLog) >= sourceNow + 5 }, "the source runs on")
        #expect(try f.info("s1").state == .running)

        // Its own disk (the same bytes, sparse), socket and definition; no snapshot left behind.
        let copy = f.dir.path + "/s1-c1.img"
        let a = try Data(contentsOf: URL(fileURLWithPath: disk)), b = try Data(contentsOf: URL(fileURLWithPath: copy))
        #expect(a == b && b.count == 16 << 20)
        var st = stat()
        #expect(stat(copy, &st) == 0 && Int(st.st_blocks) * 512 < 4 << 20, "the copy is sparse")
        #expect(FileManager.default.fileExists(atPath: f.dir.path + "/s1-c1.vsock"), "the clone's vmm listens on its own vsock socket")
        let stored = try String(contentsOfFile: f.dir.path + "/vms/c1.json", encoding: .utf8)
        #expect(stored.contains(copy) && stored.contains("s1-c1.vsock") && !stored.contains(disk + "\""), "\(stored)")
        #expect(!FileManager.default.fileExists(atPath: f.dir.path + "/run/c1/clone-snapshot"))
        #expect(try f.call("POST", "/vms/s1/clone", #"{"name": "c1"}"#).status == 409, "the name is taken")
        let events = f.daemon.manager?.events.events(since: 0).map(\.event) ?? []
        #expect(events.contains("cloning") && events.contains("cloned"))
        #expect(try f.action("c1", "destroy").status == 200)
        #expect(try f.action("s1", "destroy").status == 200)
    }

    @Test("migrate moves a running VM to a vmm --incoming: the report comes back, the VM is shut off here with reason migrated, and the guest ticks on at the target; a missing destination key is 400, a shut-off VM 409")
    func migrate() throws {
        let f = try DaemonFixture()
        defer { f.cleanup() }
        #expect(try f.call("POST", "/vms", ManagerSupport.tickerDefinition("m1")).status == 201)
        #expect(try f.call("PUT", "/vms/m1/state", #"{"action": "migrate", "destination": "unix:/tmp/x"}"#).status == 409)
        #expect(try f.action("m1", "start").status == 200)
        let info = try f.info("m1")
        #expect(ManagerSupport.wait(seconds: 30) { ManagerSupport.ticks(in: info.serialLog) >= 3 })
        #expect(try f.call("PUT", "/vms/m1/state", #"{"action": "migrate"}"#).status == 400)
        let inbound = "/tmp/skm-in-\(getpid()).sock", api = "/tmp/skm-target-\(getpid()).sock", out = f.dir.path + "/target.out"
        unlink(api)
        FileManager.default.createFile(atPath: out, contents: nil)
        let target = Process()
        target.executableURL = URL(fileURLWithPath: try #require(ManagerSupport.swiftkvm))
        target.arguments = ["vmm", "--api-sock", api, "--incoming", "unix:" + inbound]
        target.standardOutput = FileHandle(forWritingAtPath: out)
        target.standardError = FileHandle.nullDevice
        try target.run()
        defer { if target.isRunning { kill(target.processIdentifier, SIGTERM); target.waitUntilExit() } }
        #expect(ManagerSupport.wait(seconds: 10) { FileManager.default.fileExists(atPath: inbound) })
        let r = try f.call("PUT", "/vms/m1/state", #"{"action": "migrate", "destination": "unix:\#(inbound)"}"#)
        #expect(r.status == 200 && r.text.contains("downtime_ms"), "\(r.text)")
        let after = try f.info("m1")
        #expect(after.state == .shutOff && after.lastExit?.reason == "migrated", "\(after)")
        #expect(ManagerSupport.wait(seconds: 30) { ManagerSupport.ticks(in: out) >= 5 }, "the guest ticks at the target")
        let events = f.daemon.manager?.events.events(since: 0).map(\.event) ?? []
        #expect(events.contains("migrating") && events.contains("migrated"))
    }

    @Test("start twice is 409, destroy kills the vmm (destroyed), a running VM cannot be undefined")
    func destroy() throws {
        let f = try DaemonFixture()
        defer { f.cleanup() }
        _ = try f.call("POST", "/vms", ManagerSupport.tickerDefinition("d1"))
        #expect(try f.action("d1", "start").status == 200)
        let again = try f.action("d1", "start")
        #expect(again.status == 409)
        #expect(again.faultMessage == "vm 'd1' is already running")
        #expect(try f.action("d1", "resume").status == 409)
        #expect(try f.call("DELETE", "/vms/d1").status == 409)
        let pid = try #require(try f.info("d1").pid)
        let r = try f.action("d1", "destroy")
        #expect(r.status == 200)
        let info = try JSONDecoder().decode(VMInfo.self, from: Data(r.body))
        #expect(info.state == .shutOff)
        #expect(info.lastExit?.reason == "destroyed")
        #expect(!ProcessTools.isAlive(Int32(pid)))
        #expect(try f.action("d1", "destroy").status == 409)
        #expect(try f.call("DELETE", "/vms/d1").status == 204)
    }

    @Test("concurrent starts of one VM: exactly one succeeds, the others get 409; one vmm runs")
    func concurrentStart() throws {
        let f = try DaemonFixture()
        defer { f.cleanup() }
        _ = try f.call("POST", "/vms", ManagerSupport.tickerDefinition("c"))
        let statuses = Collected()
        let group = DispatchGroup()
        for _ in 0..<4 {
            group.enter()
            let client = f.client
            Thread {
                let r = try? client.request("PUT", "/vms/c/state", body: Array(#"{"action":"start"}"#.utf8))
                statuses.add(String(r?.status ?? 0))
                group.leave()
            }.start()
        }
        #expect(group.wait(timeout: .now() + 60) == .success)
        #expect(statuses.all.sorted() == ["200", "409", "409", "409"])
        let pid = try #require(try f.info("c").pid)
        let vmms = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap(Int32.init).filter {
            ProcessTools.commandLine(of: $0).contains(f.dir.path + "/run/c/api.sock")
        }
        #expect(vmms == [Int32(pid)])
        #expect(try f.action("c", "destroy").status == 200)
    }

    @Test("two VMs run at once, each with its own vmm and serial log")
    func twoVMs() throws {
        let f = try DaemonFixture()
        defer { f.cleanup() }
        for n in ["a", "b"] {
            _ = try f.call("POST", "/vms", ManagerSupport.tickerDefinition(n))
            #expect(try f.action(n, "start").status == 200)
        }
        let list = try f.client.json("GET", "/vms", as: [VMInfo].self)
        #expect(list.map(\.name) == ["a", "b"])
        #expect(Set(list.compactMap(\.pid)).count == 2)
        for vm in list {
            #expect(ManagerSupport.wait(seconds: 30) { ManagerSupport.ticks(in: vm.serialLog) >= 3 }, "\(vm.name) ticks")
        }
        #expect(try f.action("a", "destroy").status == 200)
        #expect(try f.info("b").state == .running, "destroying one VM leaves the other running")
        #expect(try f.action("b", "shutdown").status == 200)
    }

    @Test("a guest that powers off by itself leaves the VM shut off with reason poweroff, and it can start again")
    func poweroff() throws {
        let f = try DaemonFixture()
        defer { f.cleanup() }
        let def = ManagerSupport.tickerDefinition("po").replacingOccurrences(of: "ticks=0", with: "ticks=20")
        _ = try f.call("POST", "/vms", def)
        #expect(try f.action("po", "start").status == 200)
        #expect(ManagerSupport.wait(seconds: 60) { (try? f.info("po").state) == .shutOff })
        let info = try f.info("po")
        #expect(info.lastExit?.reason == "poweroff" && info.lastExit?.status == 0)
        #expect(ManagerSupport.ticks(in: info.serialLog) == 20)
        #expect(try f.action("po", "start").status == 200)
        #expect(ManagerSupport.wait(seconds: 60) { (try? f.info("po").state) == .shutOff })
        #expect(ManagerSupport.ticks(in: info.serialLog) == 40, "the serial log is appended across runs")
    }

    @Test("shutdown of a guest that ignores Ctrl+Alt+Del destroys it after the timeout")
    func shutdownTimeout() throws {
        let f = try DaemonFixture()
        defer { f.cleanup() }
        _ = try f.call("POST", "/vms", ManagerSupport.tickerDefinition("p"))
        #expect(try f.action("p", "start").status == 200)
        let paused = try f.action("p", "pause")
        #expect(paused.status == 200, "pause: \(paused.status) \(paused.text)") // a paused guest cannot react
        let r = try f.call("PUT", "/vms/p/state", #"{"action": "shutdown", "timeout_s": 1}"#)
        #expect(r.status == 200)
        let info = try JSONDecoder().decode(VMInfo.self, from: Data(r.body))
        #expect(info.state == .shutOff)
        #expect(info.lastExit?.reason == "destroyed")
    }

    /// `swiftkvm daemon` as a child process on `dir`; its output goes to dir/daemon.N.out.
    final class DaemonProcess {
        let pid: pid_t
        let socket: String
        init(binary: String, dir: String, run: Int) throws {
            socket = dir + "/daemon.sock"
            pid = try ProcessTools.spawn(binary, ["daemon", "--state-dir", dir], logPath: dir + "/daemon.\(run).out")
        }
        func waitReady() -> Bool {
            ManagerSupport.wait(seconds: 20) {
                (try? UnixHTTPClient(socketPath: socket, timeout: 1).request("GET", "/").status) == 200
            }
        }
    }

    @Test("a vmm that dies (SIGKILL from outside, as a crash) is reported stopped by signal 9, its runtime files go, and it starts again")
    func vmmKilled() throws {
        let f = try DaemonFixture()
        defer { f.cleanup() }
        #expect(try f.call("POST", "/vms", ManagerSupport.tickerDefinition("k1")).status == 201)
        #expect(try f.action("k1", "start").status == 200)
        let info = try f.info("k1")
        let pid = try #require(info.pid)
        kill(Int32(pid), SIGKILL)
        #expect(ManagerSupport.wait(seconds: 10) { (try? f.info("k1").state) == .shutOff }, "the manager did not notice the dead vmm")
        let after = try f.info("k1")
        #expect(after.pid == nil)
        #expect(after.lastExit?.reason == "signal" && after.lastExit?.status == 128 + 9, "\(String(describing: after.lastExit))")
        #expect(!FileManager.default.fileExists(atPath: info.apiSocket))
        #expect(!FileManager.default.fileExists(atPath: f.dir.path + "/run/k1/state.json"))
        let events = f.daemon.manager?.events.events(since: 0).map(\.event) ?? []
        #expect(events.suffix(1) == ["stopped"])
        #expect(try f.action("k1", "start").status == 200, "a crashed VM starts again")
        #expect(try f.info("k1").state == .running)
    }

    @Test("100 VM lifecycles (define, start, destroy, undefine) and 1,000 API requests through a daemon process leave its descriptor count flat and its RSS within 8 MiB of where it was after the first 10")
    func resourcesFlat() throws {
        let binary = try #require(ManagerSupport.swiftkvm)
        let dir = try TempDir()
        let daemon = try DaemonProcess(binary: binary, dir: dir.path, run: 1)
        defer {
            if ProcessTools.isAlive(daemon.pid) { kill(daemon.pid, SIGKILL); _ = ProcessTools.waitChild(daemon.pid) }
            dir.cleanup()
        }
        #expect(daemon.waitReady())
        let client = UnixHTTPClient(socketPath: daemon.socket, timeout: 60)
        var warm: (fds: Int, rssKB: Int) = (0, 0)
        for i in 0..<100 {
            let name = "life\(i)"
            #expect(try client.request("POST", "/vms", body: Array(ManagerSupport.tickerDefinition(name).utf8)).status == 201)
            #expect(try client.request("PUT", "/vms/\(name)/state", body: Array(#"{"action": "start"}"#.utf8)).status == 200)
            #expect(try client.request("PUT", "/vms/\(name)/state", body: Array(#"{"action": "destroy"}"#.utf8)).status == 200)
            #expect(try client.request("DELETE", "/vms/\(name)").status == 204)
            for _ in 0..<10 { _ = try client.request("GET", "/vms") }
            if i == 9 {
                // Settled: the last connection's close reaches the daemon asynchronously.
                usleep(500_000)
                warm = ProcessProbes.usage(daemon.pid)
            }
        }
        ManagerSupport.wait(seconds: 5) { ProcessProbes.usage(daemon.pid).fds <= warm.fds }
        let after = ProcessProbes.usage(daemon.pid)
        print("# daemon after 10 lifecycles: \(warm.fds) fds, \(warm.rssKB) KiB; after 100 (and 1,000 requests): \(after.fds) fds, \(after.rssKB) KiB")
        #expect(after.fds <= warm.fds, "descriptors \(warm.fds) → \(after.fds)")
        #expect(after.rssKB - warm.rssKB < 8 * 1024, "RSS \(warm.rssKB) → \(after.rssKB) KiB")
    }

    @Test("a restarted daemon neither re-attaches to nor signals a dead or reused vmm pid; it cleans the stale state")
    func staleRunState() throws {
        let binary = try #require(ManagerSupport.swiftkvm)
        let dir = try TempDir()
        var daemonPIDs: [pid_t] = []
        // A process that is not a vmm, standing in for a pid the kernel gave to something else.
        let bystander = try ProcessTools.spawn("/bin/sleep", ["60"], logPath: "/dev/null")
        defer {
            kill(bystander, SIGKILL); _ = ProcessTools.waitChild(bystander)
            for p in daemonPIDs where ProcessTools.isAlive(p) { kill(p, SIGKILL); _ = ProcessTools.waitChild(p) }
            dir.cleanup()
        }
        let first = try DaemonProcess(binary: binary, dir: dir.path, run: 1)
        daemonPIDs.append(first.pid)
        #expect(first.waitReady())
        let client = UnixHTTPClient(socketPath: first.socket, timeout: 60)
        for name in ["dead", "reused"] {
            #expect(try client.request("POST", "/vms", body: Array(ManagerSupport.tickerDefinition(name).utf8)).status == 201)
        }
        kill(first.pid, SIGKILL)
        _ = ProcessTools.waitChild(first.pid)
        // State files as a daemon leaves them for running VMs: one whose vmm has died (a pid no process has),
        // one whose pid now belongs to the bystander (its start time differs from the recorded one).
        for (name, pid) in [("dead", Int32(0x3fff_fff0)), ("reused", bystander)] {
            try FileManager.default.createDirectory(atPath: dir.path + "/run/\(name)", withIntermediateDirectories: true)
            let state = #"{"pid": \#(pid), "start_time": 1, "started_at": "2026-12-06T00:00:00Z"}"#
            try state.write(toFile: dir.path + "/run/\(name)/state.json", atomically: true, encoding: .utf8)
        }
        let second = try DaemonProcess(binary: binary, dir: dir.path, run: 2)
        daemonPIDs.append(second.pid)
        #expect(second.waitReady())
        for name in ["dead", "reused"] {
            let info = try client.json("GET", "/vms/\(name)", as: VMInfo.self)
            #expect(info.state == .shutOff && info.pid == nil, "\(name): \(info.state) pid \(String(describing: info.pid))")
            #expect(!FileManager.default.fileExists(atPath: dir.path + "/run/\(name)/state.json"), "\(name): stale state kept")
        }
        #expect(ProcessTools.isAlive(bystander), "the process that reused the pid was signalled")
        let events = (try? String(contentsOfFile: dir.path + "/events.log", encoding: .utf8)) ?? ""
        #expect(!events.contains("\"reattached\""))
        kill(second.pid, SIGTERM)
        #expect(ProcessTools.waitChild(second.pid) == ProcessTools.Exit(code: 0, signal: nil))
    }

    @Test("a daemon killed with SIGKILL and restarted re-attaches to its running VM; autostart; SIGTERM leaves VMs running")
    func restart() throws {
        let binary = try #require(ManagerSupport.swiftkvm)
        let dir = try TempDir()
        var vmPIDs: [Int32] = []
        var daemonPIDs: [pid_t] = []
        defer {
            for p in daemonPIDs where ProcessTools.isAlive(p) { kill(p, SIGKILL); _ = ProcessTools.waitChild(p) }
            for p in vmPIDs { ManagerSupport.kill9(p) }
            ManagerSupport.wait(seconds: 5) { vmPIDs.allSatisfy { !ProcessTools.isAlive($0) } }
            dir.cleanup()
        }
        let first = try DaemonProcess(binary: binary, dir: dir.path, run: 1)
        daemonPIDs.append(first.pid)
        #expect(first.waitReady(), "the daemon should answer")
        let client = UnixHTTPClient(socketPath: first.socket, timeout: 60)
        #expect(try client.request("POST", "/vms", body: Array(ManagerSupport.tickerDefinition("keep").utf8)).status == 201)
        #expect(try client.request("POST", "/vms", body: Array(ManagerSupport.tickerDefinition("auto", autostart: true).utf8)).status == 201)
        #expect(try client.request("PUT", "/vms/keep/state", body: Array(#"{"action":"start"}"#.utf8)).status == 200)
        let keep = try client.json("GET", "/vms/keep", as: VMInfo.self)
        let keepPID = try #require(keep.pid)
        vmPIDs.append(Int32(keepPID))

        // A second daemon on the same directory is refused.
        let rival = try ProcessTools.spawn(binary, ["daemon", "--state-dir", dir.path, "--socket", dir.path + "/rival.sock"], logPath: dir.path + "/rival.out")
        #expect(ProcessTools.waitChild(rival) == ProcessTools.Exit(code: 1, signal: nil))
        #expect((try? String(contentsOfFile: dir.path + "/rival.out", encoding: .utf8))?.contains("another swiftkvm daemon (pid \(first.pid)) uses \(dir.path)") == true)

        kill(first.pid, SIGKILL)
        _ = ProcessTools.waitChild(first.pid)
        #expect(ProcessTools.isAlive(Int32(keepPID)), "the VM outlives its daemon")
        let ticksBefore = ManagerSupport.ticks(in: keep.serialLog)
        #expect(ManagerSupport.wait(seconds: 30) { ManagerSupport.ticks(in: keep.serialLog) > ticksBefore }, "and keeps running")

        let second = try DaemonProcess(binary: binary, dir: dir.path, run: 2)
        daemonPIDs.append(second.pid)
        #expect(second.waitReady())
        let again = try client.json("GET", "/vms/keep", as: VMInfo.self)
        #expect(again.state == .running)
        #expect(again.pid == keepPID, "re-attached to the same vmm")
        // The autostart VM was started by the new daemon.
        #expect(ManagerSupport.wait(seconds: 20) { (try? client.json("GET", "/vms/auto", as: VMInfo.self).state) == .running })
        let auto = try client.json("GET", "/vms/auto", as: VMInfo.self)
        if let p = auto.pid { vmPIDs.append(Int32(p)) }
        #expect(auto.pid != nil)

        // SIGTERM: the daemon exits 0, removes its socket, the VMs keep running.
        kill(second.pid, SIGTERM)
        #expect(ProcessTools.waitChild(second.pid) == ProcessTools.Exit(code: 0, signal: nil))
        #expect(!FileManager.default.fileExists(atPath: second.socket))
        #expect(ProcessTools.isAlive(Int32(keepPID)))

        // A third daemon re-attaches and stops them: a re-attached VM's exit status is unknown.
        let third = try DaemonProcess(binary: binary, dir: dir.path, run: 3)
        daemonPIDs.append(third.pid)
        #expect(third.waitReady())
        let events = try String(contentsOfFile: dir.path + "/events.log", encoding: .utf8)
        #expect(events.contains("\"reattached\""))
        let stopped = try client.request("PUT", "/vms/keep/state", body: Array(#"{"action":"shutdown"}"#.utf8))
        #expect(stopped.status == 200, "\(stopped.text)")
        let info = try JSONDecoder().decode(VMInfo.self, from: Data(stopped.body))
        #expect(info.state == .shutOff && info.lastExit?.reason == "unknown")
        #expect(try client.request("PUT", "/vms/auto/state", body: Array(#"{"action":"destroy"}"#.utf8)).status == 200)
        #expect(ManagerSupport.wait(seconds: 5) { vmPIDs.allSatisfy { !ProcessTools.isAlive($0) } })
        let names = try client.json("GET", "/vms?all=true", as: [VMInfo].self).map(\.name)
        #expect(names == ["auto", "keep"], "definitions survive restarts")
        kill(third.pid, SIGTERM)
        #expect(ProcessTools.waitChild(third.pid) == ProcessTools.Exit(code: 0, signal: nil))
    }
}
