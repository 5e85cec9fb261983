import Foundation
import SwiftKVMTestSupport
import Testing
@testable import API
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// Paths and helpers for tests that run real guests.
enum GuestSupport {
    static let packageRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static let hasKVM = FileManager.default.fileExists(atPath: "/dev/kvm")

    /// guest/build/NAME.elf, built with `make -C guest`; nil when it cannot be built.
    static func guestProgram(_ name: String) -> String? {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/make")
        p.arguments = ["-s", "-C", packageRoot.appendingPathComponent("guest").path, "build/\(name).elf"]
        p.standardOutput = FileHandle.nullDevice
        try? p.run()
        p.waitUntilExit()
        let path = packageRoot.appendingPathComponent("guest/build/\(name).elf").path
        return FileManager.default.fileExists(atPath: path) ? path : nil
    }

    /// guest/build/ticker.elf, built once; nil when it cannot be built.
    static let ticker: String? = guestProgram("ticker")

    /// The swiftkvm executable next to the test bundle (same scratch path), or $SWIFTKVM_BIN.
    static let swiftkvm: String? = {
        let fm = FileManager.default
        if let env = ProcessInfo.processInfo.environment["SWIFTKVM_BIN"], fm.isExecutableFile(atPath: env) { return env }
        guard let exe = try? fm.destinationOfSymbolicLink(atPath: "/proc/self/exe") else { return nil }
        var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
        for _ in 0..<4 {
            let c = dir.appendingPathComponent("swiftkvm").path
            if fm.isExecutableFile(atPath: c) { return c }
            dir = dir.deletingLastPathComponent()
        }
        return nil
    }()

    static let tscKHz = TimeDilation.hostTSCkHz()

    /// Boot arguments for the ticker.
    static func tickerArgs(ticks: Int) -> String { "tsc_khz=\(tscKHz) period_ms=10 ticks=\(ticks)" }

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
}

@Suite("Lifecycle with a real guest over the API (/dev/kvm)", .serialized,
       .enabled(if: GuestSupport.hasKVM && GuestSupport.ticker != nil, "needs /dev/kvm and guest/build/ticker.elf"))
struct LifecycleTests {
    /// A server whose controller builds real Machines; the serial console goes to a file.
    final class Fixture: @unchecked Sendable {
        let dir = TempDir()
        let socket = "/tmp/swk-lc-\(String(UInt32.random(in: 0...UInt32.max), radix: 36)).sock"
        let serialPath: String
        let controller: VMController
        let server: APIServer
        let client: UnixHTTPClient
        let exits = Locked<[MachineExit]>([])

        /// `transport`: where the virtio devices go (virtio-mmio, the vmm's default, or PCI as with `--enable-pci`).
        init(transport: VirtioTransportKind = .mmio) throws {
            serialPath = dir.path + "/serial.out"
            var options = VMController.Options()
            options.instanceID = "lifecycle"
            options.metricsInterval = 0
            options.virtioTransport = transport
            options.defaultSerial = .file(serialPath)
            let exits = self.exits
            options.onExit = { e in exits.withLock { $0.append(e) } }
            controller = VMController(options: options)
            server = APIServer(socketPath: socket, controller: controller)
            try server.start()
            client = UnixHTTPClient(path: socket)
        }
        func send(_ m: String, _ p: String, _ b: String? = nil) throws -> UnixHTTPClient.Reply { try client.send(m, p, b) }
        var ticks: Int { GuestSupport.ticks(in: serialPath) }
        var exit: MachineExit? { exits.withLock { $0.first } }

        func startTicker(ticks: Int, vcpus: Int = 1) throws {
            let kernel = try #require(GuestSupport.ticker)
            #expect(try send("PUT", "/boot-source", #"{"kernel_image_path": "\#(kernel)", "boot_args": "\#(GuestSupport.tickerArgs(ticks: ticks))"}"#).status == 204)
            #expect(try send("PUT", "/machine-config", #"{"vcpu_count": \#(vcpus), "mem_size_mib": 64}"#).status == 204)
            let r = try send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#)
            #expect(r.status == 204, "InstanceStart: \(r.body)")
        }

        func shutdown() {
            controller.stopGuest(.userQuit)
            GuestSupport.wait(seconds: 10) { exit != nil || controller.phase == .notStarted }
            server.stop()
            dir.cleanup()
        }
    }

    @Test("InstanceStart runs the guest; Pause really stops the vCPUs (no tick for 500 ms); Resume continues; with 4 vCPUs the 3 APs the ticker never starts stay parked in KVM_RUN and still pause, resume and stop",
          arguments: [1, 4])
    func pauseResume(vcpus: Int) throws {
        let f = try Fixture()
        defer { f.shutdown() }
        try f.startTicker(ticks: 0, vcpus: vcpus)
        #expect(GuestSupport.wait(seconds: 30) { f.ticks >= 5 }, "the ticker should print ticks")
        #expect(try f.send("PATCH", "/vm", #"{"state": "Paused"}"#).status == 204)
        #expect(try f.send("GET", "/").json?["state"] as? String == "Paused")
        let atPause = f.ticks
        usleep(500_000)
        #expect(f.ticks == atPause, "no tick may appear while paused")
        #expect(try f.send("PATCH", "/vm", #"{"state": "Resumed"}"#).status == 204)
        #expect(try f.send("GET", "/").json?["state"] as? String == "Running")
        #expect(GuestSupport.wait(seconds: 30) { f.ticks >= atPause + 5 }, "ticks resume")
        // Pausing twice is fine; configuration requests are still refused while paused.
        #expect(try f.send("PATCH", "/vm", #"{"state": "Paused"}"#).status == 204)
        #expect(try f.send("PATCH", "/vm", #"{"state": "Paused"}"#).status == 204)
        #expect(try f.send("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 64}"#).status == 400)
        #expect(try f.send("PATCH", "/vm", #"{"state": "Resumed"}"#).status == 204)
        #expect(f.exit == nil)
        // A stop while paused ends every vCPU thread (the parked ones and the APs that never ran).
        #expect(try f.send("PATCH", "/vm", #"{"state": "Paused"}"#).status == 204)
        f.controller.stopGuest(.userQuit)
        #expect(GuestSupport.wait(seconds: 10) { f.exit != nil }, "the VM did not stop while paused with \(vcpus) vCPUs")
        #expect(f.exit == .userQuit)
    }

    @Test("machine-config huge_pages: Transparent runs the guest; 2M without reserved huge pages is a 400 naming them, and the VM stays configurable")
    func hugePages() throws {
        let f = try Fixture()
        defer { f.shutdown() }
        let kernel = try #require(GuestSupport.ticker)
        #expect(try f.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(kernel)", "boot_args": "\#(GuestSupport.tickerArgs(ticks: 0))"}"#).status == 204)
        let reserved = Int(FileHandle(forReadingAtPath: "/proc/sys/vm/nr_hugepages").map {
            String(decoding: $0.readDataToEndOfFile(), as: UTF8.self) }?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "0") ?? 0
        if reserved < 32 {
            #expect(try f.send("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "2M"}"#).status == 204)
            let r = try f.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#)
            #expect(r.status == 400 && r.fault?.contains("huge pages") == true, "\(r.body)")
            #expect(try f.send("GET", "/").json?["state"] as? String == "Not started")
        }
        #expect(try f.send("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "Transparent"}"#).status == 204)
        let r = try f.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#)
        #expect(r.status == 204, "\(r.body)")
        #expect(GuestSupport.wait(seconds: 30) { f.ticks >= 3 })
    }

    @Test("InstanceStart with a kernel that does not load is a 400 and the VM stays configurable")
    func badKernel() throws {
        let f = try Fixture()
        defer { f.shutdown() }
        let junk = f.dir.file("junk.bin", contents: String(repeating: "junk", count: 100))
        #expect(try f.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(junk)"}"#).status == 204)
        let r = try f.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#)
        #expect(r.status == 400)
        #expect(r.fault?.hasPrefix("Failed to start the microVM:") == true, "\(r.body)")
        #expect(try f.send("GET", "/").json?["state"] as? String == "Not started")
        #expect(try f.send("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 32}"#).status == 204)
    }

    @Test("SendCtrlAltDel reaches the guest's keyboard; the guest resets and the VM ends as a reset")
    func ctrlAltDel() throws {
        let f = try Fixture()
        defer { f.shutdown() }
        try f.startTicker(ticks: 0)
        #expect(GuestSupport.wait(seconds: 30) { f.ticks >= 3 })
        #expect(try f.send("PUT", "/actions", #"{"action_type": "SendCtrlAltDel"}"#).status == 204)
        #expect(GuestSupport.wait(seconds: 30) { f.exit != nil })
        #expect(f.exit == .reset)
        let text = (try? String(contentsOfFile: f.serialPath, encoding: .utf8)) ?? ""
        #expect(text.contains("CTRL-ALT-DEL"))
    }

    @Test("the guest powering off ends the VM with exit code 0; metrics count its exits")
    func powerOff() throws {
        let f = try Fixture()
        defer { f.shutdown() }
        let metricsPath = f.dir.path + "/metrics"
        #expect(try f.send("PUT", "/metrics", #"{"metrics_path": "\#(metricsPath)"}"#).status == 204)
        try f.startTicker(ticks: 20)
        #expect(GuestSupport.wait(seconds: 60) { f.exit != nil })
        #expect(f.exit == .powerOff)
        #expect(f.exit?.exitCode == 0)
        #expect(f.ticks == 20)
        // The controller flushes metrics when the guest stops.
        let line = try #require(try String(contentsOfFile: metricsPath, encoding: .utf8).split(separator: "\n").last)
        let obj = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        let vcpu = try #require(obj["vcpu"] as? [String: Any])
        #expect((vcpu["exit_io"] as? Int ?? 0) > 20, "each tick is several port writes")
        #expect((obj["uart"] as? [String: Any])?["write_count"] as? Int ?? 0 > 100)
    }
}

@Suite("swiftkvm vmm process", .serialized, .enabled(if: GuestSupport.swiftkvm != nil, "needs the swiftkvm executable (swift build)"))
struct VMMProcessTests {
    /// Runs swiftkvm (optionally under another argv[0]) and returns the process.
    static func launch(_ args: [String], executable: String? = nil, stdout: String? = nil) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: executable ?? GuestSupport.swiftkvm!)
        p.arguments = args
        if let stdout {
            _ = FileManager.default.createFile(atPath: stdout, contents: nil)
            p.standardOutput = FileHandle(forWritingAtPath: stdout)
        } else {
            p.standardOutput = FileHandle.nullDevice
        }
        p.standardError = Pipe()
        try p.run()
        return p
    }

    /// Waits at most `seconds` for `p` to end; kills it (by pid) if it does not.
    static func finish(_ p: Process, seconds: Double = 60) -> Int32? {
        if GuestSupport.wait(seconds: seconds, { !p.isRunning }) { return p.terminationStatus }
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        return nil
    }

    static func stderr(_ p: Process) -> String {
        guard let pipe = p.standardError as? Pipe else { return "" }
        return String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    }

    @Test("bad options: --no-api without --config-file, a bad config file, an existing socket path")
    func badOptions() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let a = try Self.launch(["vmm", "--no-api"])
        #expect(Self.finish(a, seconds: 20) == 2)
        #expect(Self.stderr(a).contains("--no-api requires --config-file"))

        let bad = dir.file("vm.json", contents: #"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 1}}"#)
        let b = try Self.launch(["vmm", "--no-api", "--config-file", bad])
        #expect(Self.finish(b, seconds: 20) == 2)
        #expect(Self.stderr(b).contains("missing field `machine-config.mem_size_mib`"))

        let existing = dir.file("taken.sock")
        let c = try Self.launch(["vmm", "--api-sock", existing])
        #expect(Self.finish(c, seconds: 20) == 1)
        #expect(Self.stderr(c).contains("already exists"))
        #expect(FileManager.default.fileExists(atPath: existing), "an existing path is never removed")
    }

    @Test("the API socket is created 0600 (owner only) even under umask 0, or as --api-sock-mode says (660); a bad mode exits 2 naming it")
    func socketMode() throws {
        for (option, mode) in [("", 0o600), (" --api-sock-mode 660", 0o660)] as [(String, mode_t)] {
            let sock = "/tmp/swk-mode-\(String(UInt32.random(in: 0...UInt32.max), radix: 36)).sock"
            // umask 0 for the vmm alone (the test process's umask is shared with the other tests).
            let p = try Self.launch(["-c", #"umask 0; exec "$0" vmm --api-sock "$1""# + option, GuestSupport.swiftkvm!, sock], executable: "/bin/sh")
            defer { kill(p.processIdentifier, SIGTERM); _ = Self.finish(p, seconds: 20) }
            #expect(GuestSupport.wait(seconds: 20) { (try? UnixHTTPClient(path: sock).send("GET", "/"))?.status == 200 })
            var st = stat()
            #expect(stat(sock, &st) == 0 && st.st_mode & 0o777 == mode, "mode \(String(st.st_mode & 0o777, radix: 8))")
        }
        let sock = "/tmp/swk-mode-\(String(UInt32.random(in: 0...UInt32.max), radix: 36)).sock"
        for bad in ["999", "1777", "rw"] {
            let q = try Self.launch(["vmm", "--api-sock", sock + "x", "--api-sock-mode", bad])
            #expect(Self.finish(q, seconds: 20) == 2)
            #expect(Self.stderr(q).contains("invalid --api-sock-mode \(bad)"), "\(Self.stderr(q))")
        }
    }

    @Test("Firecracker's informational flags: --snapshot-version and --describe-snapshot print a format version and exit 0; a file that is no snapshot exits 2 naming it; --mmds-size-limit is accepted when positive")
    func informationalFlags() throws {
        func run(_ args: [String]) throws -> (Int32?, String) {
            let out = "/tmp/swk-info-\(String(UInt32.random(in: 0...UInt32.max), radix: 36)).out"
            defer { unlink(out) }
            let p = try Self.launch(["vmm"] + args, stdout: out)
            let status = Self.finish(p, seconds: 20)
            return (status, ((try? String(contentsOfFile: out, encoding: .utf8)) ?? "") + Self.stderr(p))
        }
        #expect(try run(["--snapshot-version"]) == (0, "v1.0.0\n"))
        let dir = TempDir()
        defer { dir.cleanup() }
        var header = SnapshotFile.magic + [1, 0, 0, 0] + [UInt8](repeating: 0, count: 20)
        #expect(FileManager.default.createFile(atPath: dir.path + "/vm.snap", contents: Data(header)))
        #expect(try run(["--describe-snapshot", dir.path + "/vm.snap"]) == (0, "v1.0.0\n"))
        header[0] = 0
        #expect(FileManager.default.createFile(atPath: dir.path + "/bad.snap", contents: Data(header)))
        let bad = try run(["--describe-snapshot", dir.path + "/bad.snap"])
        #expect(bad.0 == 2 && bad.1.contains("bad.snap") && bad.1.contains("not a SwiftKVM snapshot"), "\(bad)")
        let zero = try run(["--api-sock", dir.path + "/x.sock", "--mmds-size-limit", "0"])
        #expect(zero.0 == 2 && zero.1.contains("invalid --mmds-size-limit 0"), "\(zero)")
        let sock = dir.path + "/ok.sock"
        let p = try Self.launch(["vmm", "--api-sock", sock, "--mmds-size-limit", "51200"])
        defer { kill(p.processIdentifier, SIGTERM); _ = Self.finish(p, seconds: 20) }
        #expect(GuestSupport.wait(seconds: 20) { (try? UnixHTTPClient(path: sock).send("GET", "/"))?.status == 200 })
    }

    @Test("1,000 API requests (valid, refused and malformed) leave the vmm's descriptor count flat and its RSS within 8 MiB of where it was after the first 100")
    func requestsFlat() throws {
        let sock = "/tmp/swk-flat-\(String(UInt32.random(in: 0...UInt32.max), radix: 36)).sock"
        let p = try Self.launch(["vmm", "--api-sock", sock])
        defer { kill(p.processIdentifier, SIGTERM); _ = Self.finish(p, seconds: 20) }
        #expect(GuestSupport.wait(seconds: 20) { (try? UnixHTTPClient(path: sock).send("GET", "/"))?.status == 200 })
        func usage() -> (fds: Int, rssKB: Int) { ProcessProbes.usage(p.processIdentifier) }
        let c = UnixHTTPClient(path: sock)
        var warm: (fds: Int, rssKB: Int) = (0, 0)
        for i in 0..<1000 {
            switch i % 4 {
            case 0: _ = try c.send("GET", "/")
            case 1: _ = try c.send("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 64}"#)
            case 2: _ = try c.send("PUT", "/machine-config", #"{"vcpu_count": "x"}"#)
            default: _ = try c.raw(Array("GARBAGE\r\n\r\n".utf8))
            }
            if i == 99 { usleep(300_000); warm = usage() }
        }
        GuestSupport.wait(seconds: 5) { usage().fds <= warm.fds }
        let after = usage()
        print("# vmm after 100 requests: \(warm.fds) fds, \(warm.rssKB) KiB; after 1,000: \(after.fds) fds, \(after.rssKB) KiB")
        #expect(after.fds <= warm.fds && after.rssKB - warm.rssKB < 8 * 1024, "\(warm) → \(after)")
    }

    @Test("a flood of 400 idle connections keeps the API answering: at most --api-max-connections stay open (the idle longest are closed), and the rest go after --api-idle-timeout")
    func connectionFlood() throws {
        let sock = "/tmp/swk-flood-\(String(UInt32.random(in: 0...UInt32.max), radix: 36)).sock"
        let p = try Self.launch(["vmm", "--api-sock", sock, "--api-max-connections", "16", "--api-idle-timeout", "3"])
        defer { kill(p.processIdentifier, SIGTERM); _ = Self.finish(p, seconds: 20) }
        #expect(GuestSupport.wait(seconds: 20) { (try? UnixHTTPClient(path: sock).send("GET", "/"))?.status == 200 })
        func openFDs() -> Int { ProcessProbes.usage(p.processIdentifier).fds }
        let baseline = openFDs()
        let clients = (0..<400).map { _ in ProcessProbes.idleClient(sock) }.filter { $0 >= 0 }
        defer { for fd in clients { close(fd) } }
        #expect(clients.count == 400, "every connect succeeded (the backlog drains)")
        // New requests are answered at once while the flood holds its connections.
        for _ in 0..<5 {
            let r = try UnixHTTPClient(path: sock).send("GET", "/")
            #expect(r.status == 200)
        }
        #expect(GuestSupport.wait(seconds: 10) { openFDs() <= baseline + 16 }, "open descriptors \(openFDs()), \(baseline) before the flood")
        let closedEarly = clients.filter(ProcessProbes.closedByServer).count
        #expect(closedEarly >= 400 - 16, "\(closedEarly) of 400 closed to make room")
        // The survivors are closed once idle for 3 s.
        let survivors = clients.filter { !ProcessProbes.closedByServer($0) }
        #expect(GuestSupport.wait(seconds: 10) { survivors.allSatisfy(ProcessProbes.closedByServer) }, "idle connections time out")
        #expect(try UnixHTTPClient(path: sock).send("GET", "/").status == 200)
        let bad = try Self.launch(["vmm", "--api-sock", sock + "x", "--api-idle-timeout", "0"])
        #expect(Self.finish(bad, seconds: 20) == 2)
        #expect(Self.stderr(bad).contains("invalid --api-idle-timeout 0"), "\(Self.stderr(bad))")
    }

    @Test("SIGTERM before InstanceStart ends the process with 143 and removes the socket")
    func sigterm() throws {
        let sock = "/tmp/swk-sig-\(String(UInt32.random(in: 0...UInt32.max), radix: 36)).sock"
        let p = try Self.launch(["vmm", "--api-sock", sock])
        #expect(GuestSupport.wait(seconds: 20) { FileManager.default.fileExists(atPath: sock) })
        #expect(try UnixHTTPClient(path: sock).send("GET", "/").status == 200)
        kill(p.processIdentifier, SIGTERM)
        #expect(Self.finish(p, seconds: 20) == 143)
        #expect(!FileManager.default.fileExists(atPath: sock))
    }

    @Test("a binary named firecracker behaves as swiftkvm vmm; a full API lifecycle ends with the guest's power-off (status 0)",
          .enabled(if: GuestSupport.hasKVM && GuestSupport.ticker != nil, "needs /dev/kvm and guest/build/ticker.elf"))
    func firecrackerAlias() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let alias = dir.path + "/firecracker"
        try FileManager.default.createSymbolicLink(atPath: alias, withDestinationPath: GuestSupport.swiftkvm!)
        let sock = dir.path + "/api.sock"
        let out = dir.path + "/stdout"
        let p = try Self.launch(["--api-sock", sock, "--id", "fc1"], executable: alias, stdout: out)
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() } }
        #expect(GuestSupport.wait(seconds: 20) { FileManager.default.fileExists(atPath: sock) })
        let c = UnixHTTPClient(path: sock)
        #expect(try c.send("GET", "/").json?["id"] as? String == "fc1")
        #expect(try c.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(GuestSupport.ticker!)", "boot_args": "\#(GuestSupport.tickerArgs(ticks: 30))"}"#).status == 204)
        #expect(try c.send("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 64}"#).status == 204)
        // A drive: the Machine opens it as a virtio-blk disk (the ticker ignores it).
        let disk = dir.file("disk.raw", contents: String(repeating: "\0", count: 1 << 20))
        #expect(try c.send("PUT", "/drives/rootfs", #"{"drive_id": "rootfs", "path_on_host": "\#(disk)", "is_root_device": true}"#).status == 204)
        #expect(try c.send("PUT", "/entropy", "{}").status == 204)
        let start = try c.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#)
        #expect(start.status == 204, "\(start.body)")
        #expect(Self.finish(p, seconds: 60) == 0)
        #expect(GuestSupport.ticks(in: out) == 30)
        #expect(!FileManager.default.fileExists(atPath: sock), "the socket is removed at exit")
    }

    @Test("--config-file --no-api starts the guest at once; SendCtrlAltDel over the API ends it as a reset (status 8)",
          .enabled(if: GuestSupport.hasKVM && GuestSupport.ticker != nil, "needs /dev/kvm and guest/build/ticker.elf"))
    func configFile() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let serial = dir.path + "/serial"
        let metrics = dir.path + "/metrics"
        let json = #"""
        {"boot-source": {"kernel_image_path": "\#(GuestSupport.ticker!)", "boot_args": "\#(GuestSupport.tickerArgs(ticks: 15))"},
         "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
         "serial": {"serial_out_path": "\#(serial)"},
         "metrics": {"metrics_path": "\#(metrics)"}}
        """#
        let file = dir.file("vm.json", contents: json)
        let p = try Self.launch(["vmm", "--no-api", "--config-file", file])
        #expect(Self.finish(p, seconds: 60) == 0)
        #expect(GuestSupport.ticks(in: serial) == 15)
        #expect(((try? String(contentsOfFile: metrics, encoding: .utf8)) ?? "").contains("\"exit_io\""))

        let sock = dir.path + "/api.sock"
        let serial2 = dir.path + "/serial2"
        let forever = dir.file("forever.json", contents: json.replacingOccurrences(of: "ticks=15", with: "ticks=0")
            .replacingOccurrences(of: serial, with: serial2).replacingOccurrences(of: metrics, with: metrics + "2"))
        let q = try Self.launch(["vmm", "--api-sock", sock, "--config-file", forever])
        defer { if q.isRunning { kill(q.processIdentifier, SIGKILL); q.waitUntilExit() } }
        #expect(GuestSupport.wait(seconds: 30) { GuestSupport.ticks(in: serial2) >= 3 })
        let c = UnixHTTPClient(path: sock)
        #expect(try c.send("GET", "/").json?["state"] as? String == "Running")
        #expect(try c.send("PUT", "/boot-source", #"{"kernel_image_path": "/x"}"#).fault == "The requested operation is not supported after starting the microVM.")
        #expect(try c.send("PUT", "/actions", #"{"action_type": "SendCtrlAltDel"}"#).status == 204)
        #expect(Self.finish(q, seconds: 60) == 8)
    }

    @Test("cpu-config (a custom CPU template) from a --config-file path: the guest sees the CPUID bit cleared and the MSR bits set; over the API bad templates are 400s naming the field, a leaf KVM lacks fails InstanceStart naming it, and after start it is refused",
          .enabled(if: GuestSupport.hasKVM, "needs /dev/kvm"))
    func cpuConfig() throws {
        let program = try #require(GuestSupport.guestProgram("cpuid_msr"))
        let dir = TempDir()
        defer { dir.cleanup() }
        func run(template: String?) throws -> String {
            let serial = dir.path + "/serial-\(template == nil ? "plain" : "template")"
            var json = #"{"boot-source": {"kernel_image_path": "\#(program)"}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}, "serial": {"serial_out_path": "\#(serial)"}"#
            if let template { json += #", "cpu-config": "\#(dir.file("cpu.json", contents: template))""# }
            let p = try Self.launch(["vmm", "--no-api", "--config-file", dir.file("vm.json", contents: json + "}")])
            #expect(Self.finish(p, seconds: 60) == 33, "\(Self.stderr(p))")
            return (try? String(contentsOfFile: serial, encoding: .utf8)) ?? ""
        }
        func value(_ text: String, _ label: String) -> UInt64? {
            text.split(separator: "\n").first { $0.hasPrefix("# \(label) ") }.flatMap { UInt64($0.split(separator: " ").last ?? "", radix: 16) }
        }
        // KVM_FEATURE_CLOCKSOURCE2 (bit 3 of leaf 0x40000001 EAX) cleared; IA32_MISC_ENABLE bits 11 and 12 set.
        let template = #"""
        {"kvm_capabilities": ["!56"],
         "cpuid_modifiers": [{"leaf": "0x40000001", "subleaf": "0b0", "flags": 0, "modifiers": [{"register": "eax", "bitmap": "0b0_xxx"}]}],
         "msr_modifiers": [{"addr": "0x1a0", "bitmap": "0b11xxxxxxxxxxx"}]}
        """#
        let plain = try run(template: nil), templated = try run(template: template)
        let before = try #require(value(plain, "kvm features eax"), "\(plain)"), after = try #require(value(templated, "kvm features eax"), "\(templated)")
        #expect(before & 0x8 != 0 && after == before & ~0x8, "kvm features \(String(before, radix: 16)) → \(String(after, radix: 16))")
        let misc = try #require(value(templated, "misc_enable"), "\(templated)")
        #expect(misc & 0x1800 == 0x1800 && value(plain, "misc_enable").map { $0 & 0x1800 } == 0, "misc_enable \(String(misc, radix: 16))")

        // Over the API.
        let sock = dir.path + "/api.sock"
        let q = try Self.launch(["vmm", "--api-sock", sock], stdout: dir.path + "/q.out")
        defer { if q.isRunning { kill(q.processIdentifier, SIGKILL); q.waitUntilExit() } }
        #expect(GuestSupport.wait(seconds: 20) { FileManager.default.fileExists(atPath: sock) })
        let c = UnixHTTPClient(path: sock)
        for (body, message) in [
            (#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0", "modifiers": [{"register": "esi", "bitmap": "0b1"}]}]}"#, "register 'esi'"),
            (#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0", "modifiers": [{"register": "eax", "bitmap": "0b12"}]}]}"#, "bitmap '0b12'"),
            (#"{"msr_modifiers": [{"addr": "0x1a0", "bitmap": "0b\#(String(repeating: "1", count: 65))"}]}"#, "up to 64 digits"),
            (#"{"kvm_capabilities": ["x"]}"#, "kvm_capabilities entry 'x'"),
            (#"{"reg_modifiers": []}"#, "aarch64"),
        ] {
            let r = try c.send("PUT", "/cpu-config", body)
            #expect(r.status == 400 && r.fault?.contains(message) == true, "\(body): \(r.body)")
        }
        #expect(try c.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(program)"}"#).status == 204)
        #expect(try c.send("PUT", "/cpu-config", #"{"cpuid_modifiers": [{"leaf": "0x7fff0000", "subleaf": "0", "modifiers": [{"register": "eax", "bitmap": "0b1"}]}]}"#).status == 204)
        let start = try c.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#)
        #expect(start.status == 400 && start.fault?.contains("leaf 0x7fff0000") == true, "\(start.body)")
        #expect(try c.send("PUT", "/cpu-config", template).status == 204)
        #expect(try c.send("GET", "/vm/config").body.contains("0b11xxxxxxxxxxx"))
        #expect(try c.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
        #expect(try c.send("PUT", "/cpu-config", template).fault == "The requested operation is not supported after starting the microVM.")
        #expect(Self.finish(q, seconds: 60) == 33)
    }

    @Test("a Python client written from Firecracker's API spec (guest/tools/fcclient.py) drives the `firecracker` alias through describe, configure, start, pause, snapshot, resume, a bad request and stop",
          .enabled(if: GuestSupport.hasKVM && GuestSupport.ticker != nil, "needs /dev/kvm and guest/build/ticker.elf"),
          .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/python3"), "needs python3"))
    func pythonClient() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let firecracker = dir.path + "/firecracker"
        try FileManager.default.createSymbolicLink(atPath: firecracker, withDestinationPath: GuestSupport.swiftkvm!)
        let sock = dir.path + "/fc.sock"
        let vmm = try Self.launch(["--api-sock", sock], executable: firecracker, stdout: dir.path + "/serial")
        defer { if vmm.isRunning { kill(vmm.processIdentifier, SIGKILL); vmm.waitUntilExit() } }
        #expect(GuestSupport.wait(seconds: 20) { FileManager.default.fileExists(atPath: sock) })
        let client = GuestSupport.packageRoot.appendingPathComponent("guest/tools/fcclient.py").path
        let out = dir.path + "/client.out"
        let py = try Self.launch([client, sock, GuestSupport.ticker!, GuestSupport.tickerArgs(ticks: 0), dir.path],
                                 executable: "/usr/bin/python3", stdout: out)
        let status = Self.finish(py, seconds: 120)
        let text = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
        #expect(status == 0, "client: \(text)\(Self.stderr(py))")
        let steps = ["describe-instance", "version", "boot-source", "machine-config", "machine-config-get", "start", "running",
                     "pause", "paused", "snapshot-create", "snapshot-files", "resume", "config", "bad-request", "stop"]
        #expect(text.split(separator: "\n").map(String.init) == steps.map { "ok " + $0 }, "\(text)")
        #expect(Self.finish(vmm, seconds: 60) == 8, "the guest's reset ends the VMM")
        #expect(GuestSupport.ticks(in: dir.path + "/serial") >= 1)
    }

    @Test("SIGTERM while the guest is paused stops it: status 143, socket removed",
          .enabled(if: GuestSupport.hasKVM && GuestSupport.ticker != nil, "needs /dev/kvm and guest/build/ticker.elf"))
    func sigtermWhilePaused() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let serial = dir.path + "/serial", sock = dir.path + "/api.sock"
        let json = #"{"boot-source": {"kernel_image_path": "\#(GuestSupport.ticker!)", "boot_args": "\#(GuestSupport.tickerArgs(ticks: 0))"}, "serial": {"serial_out_path": "\#(serial)"}}"#
        let p = try Self.launch(["vmm", "--api-sock", sock, "--config-file", dir.file("vm.json", contents: json)])
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() } }
        #expect(GuestSupport.wait(seconds: 30) { GuestSupport.ticks(in: serial) >= 3 })
        #expect(try UnixHTTPClient(path: sock).send("PATCH", "/vm", #"{"state": "Paused"}"#).status == 204)
        kill(p.processIdentifier, SIGTERM)
        #expect(Self.finish(p, seconds: 30) == 143)
        #expect(!FileManager.default.fileExists(atPath: sock))
    }
}
