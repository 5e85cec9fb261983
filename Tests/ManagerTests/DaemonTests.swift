import API
import Foundation
import SwiftKVMTestSupport
import Testing
#if canImport(Glibc)
import Glibc
#endif
import VMM
@testable import Manager

/// Paths and helpers for the daemon tests.
enum ManagerSupport {
    static let packageRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static let hasKVM = FileManager.default.fileExists(atPath: "/dev/kvm")

    /// guest/build/ticker.elf, built with `make -C guest` (posix_spawn, no pipes); nil if missing.
    static let ticker: String? = {
        let dir = try? makeShortTempDir()
        if let dir, let pid = try? ProcessTools.spawn("/usr/bin/make", ["-s", "-C", packageRoot.appendingPathComponent("guest").path, "build/ticker.elf"], logPath: dir + "/make.log") {
            _ = ProcessTools.waitChild(pid)
            try? FileManager.default.removeItem(atPath: dir)
        }
        let path = packageRoot.appendingPathComponent("guest/build/ticker.elf").path
        return FileManager.default.fileExists(atPath: path) ? path : nil
    }()

    /// The swiftkvm executable: $SWIFTKVM_BIN, or next to the test bundle (same scratch path).
    static let swiftkvm: String? = {
        let fm = FileManager.default
        if let env = ProcessInfo.processInfo.environment["SWIFTKVM_BIN"], fm.isExecutableFile(atPath: env) { return env }
        guard let exe = try? fm.destinationOfSymbolicLink(atPath: "/proc/self/exe") else { return nil }
        var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
        for _ in 0..<5 {
            let c = dir.appendingPathComponent("swiftkvm").path
            if fm.isExecutableFile(atPath: c) { return c }
            dir = dir.deletingLastPathComponent()
        }
        return nil
    }()

    static let canRunGuests = hasKVM && ticker != nil && swiftkvm != nil

    /// A ticker definition printing a tick every 10 ms forever.
    static func tickerDefinition(_ name: String, autostart: Bool = false, extra: String = "") -> String {
        let args = "tsc_khz=\(TimeDilation.hostTSCkHz()) period_ms=10 ticks=0"
        return """
        {"name": "\(name)", "autostart": \(autostart), "shutdown_timeout_s": 20\(extra),
         "boot-source": {"kernel_image_path": "\(ticker ?? "/missing")", "boot_args": "\(args)"},
         "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}
        """
    }

    /// Number of "tick N" lines in `path`.
    static func ticks(in path: String) -> Int {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return 0 }
        return text.split(separator: "\n").filter { $0.hasPrefix("tick ") }.count
    }

    /// Polls `condition` every 10 ms for at most `seconds`.
    @discardableResult
    static func wait(seconds: Double, _ condition: () -> Bool) -> Bool {
        let end = Date().addingTimeInterval(seconds)
        while Date() < end {
            if condition() { return true }
            usleep(10_000)
        }
        return condition()
    }

    /// Kills `pid` with SIGKILL if it is still the process that started at `startTime`.
    static func kill9(_ pid: Int32) {
        if ProcessTools.isAlive(pid) { kill(pid, SIGKILL) }
    }
}

/// A daemon running in the test process on a temporary state directory, with a client.
final class DaemonFixture: @unchecked Sendable {
    let dir: TempDir
    let daemon: Daemon
    let client: UnixHTTPClient

    init(vmm: String? = ManagerSupport.swiftkvm, limits: APIConnectionLimits? = nil) throws {
        dir = try TempDir()
        var options = Daemon.Options(stateDirectory: dir.path)
        if let limits { options.limits = limits }
        options.manager.vmmExecutable = vmm ?? "/bin/false"
        daemon = Daemon(options: options)
        try daemon.start()
        client = UnixHTTPClient(socketPath: daemon.socketPath, timeout: 60)
    }

    /// One request; the body as text.
    func call(_ method: String, _ path: String, _ body: String? = nil) throws -> HTTPResponse {
        try client.request(method, path, body: body.map { Array($0.utf8) })
    }

    func json(_ method: String, _ path: String, _ body: String? = nil) throws -> [String: Any] {
        let r = try call(method, path, body)
        return (try? JSONSerialization.jsonObject(with: Data(r.body)) as? [String: Any]) ?? [:]
    }

    func info(_ name: String) throws -> VMInfo {
        try client.json("GET", "/vms/\(name)", as: VMInfo.self)
    }

    func action(_ name: String, _ action: String) throws -> HTTPResponse {
        try call("PUT", "/vms/\(name)/state", #"{"action": "\#(action)"}"#)
    }

    /// Kills every VM process still running (by pid), stops the daemon, removes the directory.
    func cleanup() {
        let pids = daemon.manager?.list(all: true).compactMap(\.pid) ?? []
        for pid in pids { ManagerSupport.kill9(Int32(pid)) }
        if let m = daemon.manager {
            ManagerSupport.wait(seconds: 10) { m.list(all: false).isEmpty }
        }
        daemon.stop()
        dir.cleanup()
    }
}

@Suite("Daemon API without guests")
struct DaemonAPITests {
    @Test("GET / names the daemon, its pid and state dir")
    func root() throws {
        let f = try DaemonFixture()
        defer { f.cleanup() }
        let o = try f.json("GET", "/")
        #expect(o["name"] as? String == "swiftkvm-daemon")
        #expect(o["pid"] as? Int == Int(getpid()))
        #expect(o["state_dir"] as? String == f.dir.path)
    }

    @Test("define answers 201, a redefinition 200; list, info, autostart and undefine work; the file is stored")
    func defineUndefine() throws {
        let f = try DaemonFixture()
        defer { f.cleanup() }
        let r = try f.call("POST", "/vms", #"{"name": "a", "machine-config": {"vcpu_count": 2, "mem_size_mib": 64}}"#)
        #expect(r.status == 201, "\(r.text)")
        let info = try JSONDecoder().decode(VMInfo.self, from: Data(r.body))
        #expect(info.state == .shutOff && info.vcpus == 2 && info.memMib == 64 && info.pid == nil)
        #expect(info.apiSocket == f.dir.path + "/run/a/api.sock")
        #expect(info.serialLog == f.dir.path + "/logs/a.serial.log")
        #expect(FileManager.default.fileExists(atPath: f.dir.path + "/vms/a.json"))
        #expect(try f.call("POST", "/vms", #"{"name": "a"}"#).status == 200)
        #expect(try f.info("a").vcpus == 1)
        #expect(try f.client.json("GET", "/vms", as: [VMInfo].self).isEmpty, "only running VMs without all=true")
        #expect(try f.client.json("GET", "/vms?all=true", as: [VMInfo].self).map(\.name) == ["a"])
        let auto = try f.call("PUT", "/vms/a/autostart", #"{"autostart": true}"#)
        #expect(auto.status == 200)
        #expect(try f.info("a").autostart)
        #expect(try VMDefinition.parse(AtomicFile.read(f.dir.path + "/vms/a.json"), source: "file").autostart)
        #expect(try f.call("DELETE", "/vms/a").status == 204)
        #expect(try f.call("GET", "/vms/a").status == 404)
        #expect(!FileManager.default.fileExists(atPath: f.dir.path + "/vms/a.json"))
    }

    @Test("a bad definition gets 400 naming the key; unknown VMs 404; bad actions 400; wrong methods 405")
    func errors() throws {
        let f = try DaemonFixture()
        defer { f.cleanup() }
        let cases: [(String, String)] = [
            (#"{"name": "a", "colour": 1}"#, "`colour`"),
            (#"{"name": "a", "logger": {"log_path": "/tmp/x"}}"#, "`logger`"),
            (#"{"name": "a", "boot-source": {"kernel_image_path": "rel"}}"#, "boot-source.kernel_image_path"),
            (#"{"name": "a b"}"#, "`name`"),
            ("{", "malformed JSON"),
        ]
        for (body, key) in cases {
            let r = try f.call("POST", "/vms", body)
            #expect(r.status == 400)
            #expect(r.faultMessage?.contains(key) == true, "\(body): \(r.text)")
        }
        #expect(try f.call("GET", "/vms/nope").faultMessage == "vm 'nope' is not defined")
        #expect(try f.action("nope", "start").status == 404)
        _ = try f.call("POST", "/vms", #"{"name": "a"}"#)
        let bad = try f.action("a", "jump")
        #expect(bad.status == 400 && bad.faultMessage?.contains("`jump`") == true)
        let extra = try f.call("PUT", "/vms/a/state", #"{"action": "start", "force": true}"#)
        #expect(extra.status == 400 && extra.faultMessage?.contains("`force`") == true)
        #expect(try f.call("PUT", "/vms/a/autostart", #"{"autostart": "yes"}"#).faultMessage?.contains("`autostart`") == true)
        #expect(try f.call("PATCH", "/vms").status == 405)
        #expect(try f.call("GET", "/nothing/here").status == 404)
    }

    @Test("a body over 1 MiB gets 413 and the daemon keeps serving")
    func hugeBody() throws {
        let f = try DaemonFixture()
        defer { f.cleanup() }
        let big = "{\"name\": \"a\", \"pad\": \"" + String(repeating: "x", count: DaemonServer.maxBodySize) + "\"}"
        let r = try f.call("POST", "/vms", big)
        #expect(r.status == 413)
        #expect(r.faultMessage?.contains("larger than the limit") == true)
        #expect(try f.call("GET", "/").status == 200)
        #expect(try f.client.json("GET", "/vms?all=true", as: [VMInfo].self).isEmpty)
    }

    @Test("actions that do not fit a shut-off VM get 409")
    func conflicts() throws {
        let f = try DaemonFixture()
        defer { f.cleanup() }
        _ = try f.call("POST", "/vms", #"{"name": "a"}"#)
        for action in ["shutdown", "destroy", "pause", "resume"] {
            let r = try f.action("a", action)
            #expect(r.status == 409, "\(action)")
            #expect(r.faultMessage?.contains("vm 'a' is not running") == true, "\(r.text)")
        }
    }

    @Test("a vmm that fails at once gives start 500 with its log, start-failed, and the VM stays shut off")
    func startFailure() throws {
        let f = try DaemonFixture(vmm: "/bin/false")
        defer { f.cleanup() }
        let dir = try TempDir()
        defer { dir.cleanup() }
        let kernel = try dir.file("k.elf")
        _ = try f.call("POST", "/vms", #"{"name": "a", "boot-source": {"kernel_image_path": "\#(kernel)"}}"#)
        let r = try f.action("a", "start")
        #expect(r.status == 500)
        #expect(r.faultMessage?.contains("exited during start-up") == true, "\(r.text)")
        #expect(try f.info("a").state == .shutOff)
        #expect(f.daemon.manager?.events.events(since: 0).contains { $0.event == "start-failed" } == true)
    }

    @Test("a flood of 300 idle connections keeps the daemon answering: at most --max-connections stay open (the idle longest are closed), an event stream survives the flood, and silent connections go after --idle-timeout")
    func connectionFlood() throws {
        let f = try DaemonFixture(limits: APIConnectionLimits(maxConnections: 16, idleTimeout: .seconds(2)))
        defer { f.cleanup() }
        // An event stream first: busy, so it outlives both the flood and the idle timeout.
        let lines = Collected()
        let client = f.client
        Thread {
            _ = try? client.streamLines("GET", "/events?since=0", duration: 20) { line in
                lines.add(line)
                return lines.all.count < 2
            }
        }.start()
        _ = try f.call("POST", "/vms", #"{"name": "a"}"#)
        #expect(ManagerSupport.wait(seconds: 10) { lines.all.count >= 1 })
        let flood = (0..<300).map { _ in ProcessProbes.idleClient(f.daemon.socketPath) }
        defer { for fd in flood where fd >= 0 { close(fd) } }
        #expect(flood.allSatisfy { $0 >= 0 })
        // The test's client connects without waiting (EAGAIN while the flood fills the listen backlog); the daemon
        // drains the backlog as it accepts and evicts, so a request gets through once there is room.
        #expect(ManagerSupport.wait(seconds: 10) { (try? f.call("GET", "/").status) == 200 }, "the daemon answers during the flood")
        #expect(flood.filter(ProcessProbes.closedByServer).count >= 300 - 16, "all but the newest were closed to make room")
        #expect(ManagerSupport.wait(seconds: 10) { flood.allSatisfy(ProcessProbes.closedByServer) }, "silent connections time out")
        // The stream outlived both: a new event still reaches it.
        _ = try f.call("POST", "/vms", #"{"name": "b"}"#)
        #expect(ManagerSupport.wait(seconds: 10) { lines.all.count >= 2 }, "the event stream was kept: \(lines.all)")
    }

    @Test("GET /events streams new events and replays stored ones after ?since=")
    func events() throws {
        let f = try DaemonFixture()
        defer { f.cleanup() }
        _ = try f.call("POST", "/vms", #"{"name": "a"}"#)
        let lines = Collected()
        let done = DispatchSemaphore(value: 0)
        let client = f.client
        Thread {
            _ = try? client.streamLines("GET", "/events?since=0", duration: 20) { line in
                lines.add(line)
                return lines.all.count < 3
            }
            done.signal()
        }.start()
        #expect(ManagerSupport.wait(seconds: 10) { lines.all.count >= 1 })
        _ = try f.call("POST", "/vms", #"{"name": "b"}"#)
        _ = try f.call("DELETE", "/vms/b")
        #expect(done.wait(timeout: .now() + 15) == .success)
        let events = try lines.all.map { try JSONDecoder().decode(VMEvent.self, from: Data($0.utf8)) }
        #expect(events.map(\.event) == ["defined", "defined", "undefined"])
        #expect(events.map(\.vm) == ["a", "b", "b"])
        #expect(events.map(\.seq) == [1, 2, 3])
        #expect(try f.call("GET", "/events?since=x").status == 400)
    }

    @Test("a second daemon on the same state directory is refused naming the first one's pid")
    func lock() throws {
        let f = try DaemonFixture()
        defer { f.cleanup() }
        let second = Daemon(options: Daemon.Options(stateDirectory: f.dir.path))
        let e = #expect(throws: ManagerError.self) { try second.start() }
        #expect(e?.message == "another swiftkvm daemon (pid \(getpid())) uses \(f.dir.path)")
    }

    @Test("a socket path over 107 bytes or a non-socket file at the path is refused, and the lock is released")
    func badSocket() throws {
        let dir = try TempDir()
        defer { dir.cleanup() }
        var options = Daemon.Options(stateDirectory: dir.path)
        options.socketPath = dir.path + "/" + String(repeating: "s", count: 110)
        let e = #expect(throws: ManagerError.self) { try Daemon(options: options).start() }
        #expect(e?.message.contains("too long") == true)
        options.socketPath = try dir.file("plain")
        let p = #expect(throws: ManagerError.self) { try Daemon(options: options).start() }
        #expect(p?.message.contains("is not a socket") == true)
        #expect(FileManager.default.fileExists(atPath: dir.path + "/plain"), "the file is not removed")
        options.socketPath = nil
        let ok = Daemon(options: options)
        try ok.start()
        ok.stop()
    }

    @Test("definitions survive a daemon restart; a bad file is skipped")
    func persistence() throws {
        let dir = try TempDir()
        defer { dir.cleanup() }
        var options = Daemon.Options(stateDirectory: dir.path)
        options.manager.vmmExecutable = "/bin/false"
        let first = Daemon(options: options)
        try first.start()
        let client = UnixHTTPClient(socketPath: first.socketPath, timeout: 10)
        #expect(try client.request("POST", "/vms", body: Array(#"{"name": "kept", "autostart": false}"#.utf8)).status == 201)
        first.stop()
        #expect(!FileManager.default.fileExists(atPath: first.socketPath))
        _ = try dir.file("vms/broken.json", "{")
        let second = Daemon(options: options)
        try second.start()
        defer { second.stop() }
        let all = try client.json("GET", "/vms?all=true", as: [VMInfo].self)
        #expect(all.map(\.name) == ["kept"])
    }
}
