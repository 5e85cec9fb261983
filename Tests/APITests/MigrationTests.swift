import Foundation
import Testing
@testable import API
@testable import VMM
#if canImport(Glibc)
import Glibc
#endif

/// Live migration between two `swiftkvm vmm` processes: the source gets `PUT /migrate`, the target
/// runs with `--incoming`.
@Suite("Live migration between vmm processes (/dev/kvm)", .serialized,
       .enabled(if: GuestSupport.hasKVM && GuestSupport.ticker != nil && GuestSupport.swiftkvm != nil,
                "needs /dev/kvm, guest/build/ticker.elf and the swiftkvm executable"))
struct MigrationTests {
    /// A vmm process with its API socket and stdout (the serial console) in `dir`.
    struct VMM {
        let process: Process
        let socket: String
        let out: String
        var client: UnixHTTPClient { UnixHTTPClient(path: socket) }
        func send(_ m: String, _ p: String, _ b: String? = nil) throws -> UnixHTTPClient.Reply { try client.send(m, p, b) }
        var ticks: [Int] { SnapshotTests.tickNumbers(out) }
        var text: String { (try? String(contentsOfFile: out, encoding: .utf8)) ?? "" }
        func stop() {
            if process.isRunning { kill(process.processIdentifier, SIGTERM) }
            _ = VMMProcessTests.finish(process, seconds: 10)
        }
    }

    static func launch(_ dir: TempDir, _ name: String, extra: [String] = []) throws -> VMM {
        let sock = "/tmp/swk-mig-\(getpid())-\(name).sock", out = dir.path + "/\(name).out"
        unlink(sock)
        let p = try VMMProcessTests.launch(["vmm", "--api-sock", sock, "--id", name] + extra, stdout: out)
        // The socket file appears at bind(), a moment before listen(): wait until the API answers.
        #expect(GuestSupport.wait(seconds: 10) { (try? UnixHTTPClient(path: sock).send("GET", "/"))?.status == 200 }, "\(name) API socket")
        waitForIncoming(extra)
        return VMM(process: p, socket: sock, out: out)
    }

    /// With `--incoming unix:PATH` in `args`: waits for PATH (the listener comes up after the API socket).
    static func waitForIncoming(_ args: [String]) {
        guard let i = args.firstIndex(of: "--incoming"), i + 1 < args.count, args[i + 1].hasPrefix("unix:") else { return }
        let path = String(args[i + 1].dropFirst(5))
        #expect(GuestSupport.wait(seconds: 10) { FileManager.default.fileExists(atPath: path) }, "the incoming socket \(path)")
    }

    /// A running ticker source.
    static func source(_ dir: TempDir) throws -> VMM {
        let s = try launch(dir, "source")
        do { return try configureTicker(s) } catch {
            s.stop() // the caller has no handle yet to stop it
            throw error
        }
    }

    static func configureTicker(_ s: VMM) throws -> VMM {
        let kernel = try #require(GuestSupport.ticker)
        let args = GuestSupport.tickerArgs(ticks: 0)
        #expect(try s.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(kernel)", "boot_args": "\#(args)"}"#).status == 204)
        #expect(try s.send("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 128}"#).status == 204)
        #expect(try s.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
        #expect(GuestSupport.wait(seconds: 30) { s.ticks.count >= 5 }, "the source ticks")
        return s
    }

    /// Migrates `source` to a new `--incoming` vmm at `address`; checks the report, the source's exit and
    /// the guest's tick sequence across both outputs.
    func migrate(to address: String) throws -> MigrationReport {
        let dir = TempDir()
        defer { dir.cleanup() }
        let s = try Self.source(dir)
        defer { s.stop() }
        let t = try Self.launch(dir, "target", extra: ["--incoming", address])
        defer { t.stop() }
        let r = try s.send("PUT", "/migrate", #"{"destination": "\#(address)", "max_downtime_ms": 300}"#)
        #expect(r.status == 200, "migrate: \(r.body)")
        let report = try JSONDecoder().decode(MigrationReport.self, from: Data(r.body.utf8))
        #expect(GuestSupport.wait(seconds: 10) { !s.process.isRunning }, "the source exits once the target runs")
        #expect(s.process.terminationStatus == 0)
        let before = s.text
        #expect(GuestSupport.wait(seconds: 30) { SnapshotTests.tickNumbers(t.out).count >= 10 }, "the target ticks: \(t.text.suffix(300))")
        // The guest's serial output continues across the two processes: no gap, no repeat.
        let all = SnapshotTests.tickNumbers(path: nil, text: before + t.text)
        #expect(!all.isEmpty && all == Array(1...all.count), "ticks \(all.suffix(12))")
        #expect(try t.send("GET", "/").json?["state"] as? String == "Running")
        return report
    }

    @Test("a running ticker moves to a vmm --incoming over a Unix socket and continues there with the next tick; the source exits 0")
    func unixSocket() throws {
        let report = try migrate(to: "unix:/tmp/swk-mig-\(getpid()).in")
        #expect(report.passes >= 2 && report.bytesSent > 0 && report.downtimeMs > 0, "\(report)")
    }

    @Test("over TCP on loopback: the same, with the report's passes, bytes and downtime")
    func tcpLoopback() throws {
        // A port the kernel just handed out (bound to 0, read back, released).
        let probe = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(probe, $0, len) } }
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(probe, $0, &len) } }
        close(probe)
        let port = Int(UInt16(bigEndian: addr.sin_port))
        let report = try migrate(to: "tcp:127.0.0.1:\(port)")
        #expect(report.passes >= 2 && report.bytesSent > 0 && report.downtimeMs > 0 && report.totalMs >= report.downtimeMs, "\(report)")
    }

    /// A source running the virtio_blk guest program in stream mode on the raw disk `disk`.
    static func streamingSource(_ dir: TempDir, disk: String) throws -> VMM {
        let s = try launch(dir, "source")
        do { return try configureStream(s, disk: disk) } catch {
            s.stop() // the caller has no handle yet to stop it
            throw error
        }
    }

    static func configureStream(_ s: VMM, disk: String) throws -> VMM {
        let program = try #require(GuestSupport.guestProgram("virtio_blk"))
        #expect(try s.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(program)", "boot_args": "stream mmio tsc_khz=\#(GuestSupport.tscKHz)"}"#).status == 204)
        #expect(try s.send("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 64}"#).status == 204)
        #expect(try s.send("PUT", "/drives/d0", #"{"drive_id": "d0", "path_on_host": "\#(disk)", "is_root_device": false, "is_read_only": false}"#).status == 204)
        #expect(try s.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
        #expect(GuestSupport.wait(seconds: 60) { SnapshotTests.streamRounds(s.out).count >= 3 }, "the source streams: \(s.text.suffix(300))")
        return s
    }

    @Test("a virtio-blk guest streaming to its disk moves to a target on the same storage and streams on there: the source closes and unlocks the image, the target checks and locks it, and every round across both processes reads back what it wrote")
    func withDisk() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let disk = dir.path + "/disk.raw"
        #expect(FileManager.default.createFile(atPath: disk, contents: Data(count: 1 << 20)))
        let s = try Self.streamingSource(dir, disk: disk)
        defer { s.stop() }
        let address = "unix:/tmp/swk-mig-disk-\(getpid()).in"
        let t = try Self.launch(dir, "target", extra: ["--incoming", address])
        defer { t.stop() }
        let r = try s.send("PUT", "/migrate", #"{"destination": "\#(address)"}"#)
        #expect(r.status == 200, "migrate: \(r.body)")
        #expect(GuestSupport.wait(seconds: 10) { !s.process.isRunning }, "the source exits once the target runs")
        let before = s.text
        let last = SnapshotTests.streamRounds(text: before).last ?? 0
        #expect(GuestSupport.wait(seconds: 60) { SnapshotTests.streamRounds(text: before + t.text).count >= last + 4 },
                "the target streams on: \(t.text.suffix(300))")
        let all = before + t.text
        #expect(!all.contains("FAIL"), "\(all.suffix(800))")
        let rounds = SnapshotTests.streamRounds(text: all)
        #expect(rounds == Array(1...max(1, rounds.count)), "every round in order across both: \(rounds.suffix(8)) (last at the source \(last))")
        #expect(try t.send("GET", "/").json?["state"] as? String == "Running")
    }

    @Test("a target whose file at the disk's path is another file (no shared storage: a bind mount in its own mount namespace) refuses the VM naming the disk; the source opens its disk again and streams on")
    func diskNotShared() throws {
        let unshare = "/usr/bin/unshare"
        try #require(FileManager.default.isExecutableFile(atPath: unshare) && getuid() == 0, "needs root and util-linux's unshare for a private mount namespace")
        let dir = TempDir()
        defer { dir.cleanup() }
        let disk = dir.path + "/disk.raw", other = dir.path + "/other.raw"
        #expect(FileManager.default.createFile(atPath: disk, contents: Data(count: 1 << 20)))
        #expect(FileManager.default.createFile(atPath: other, contents: Data(repeating: 0x5a, count: 1 << 20)))
        let s = try Self.streamingSource(dir, disk: disk)
        defer { s.stop() }
        let address = "unix:/tmp/swk-mig-other-\(getpid()).in"
        let sock = "/tmp/swk-mig-\(getpid())-other.sock", out = dir.path + "/other.out"
        unlink(sock)
        let target = try VMMProcessTests.launch(
            ["-m", "--propagation", "private", "sh", "-c", #"mount --bind "$1" "$2" && shift 2 && exec "$@""#, "sh", other, disk,
             try #require(GuestSupport.swiftkvm), "vmm", "--api-sock", sock, "--incoming", address],
            executable: unshare, stdout: out)
        defer { if target.isRunning { kill(target.processIdentifier, SIGTERM) }; _ = VMMProcessTests.finish(target, seconds: 10) }
        #expect(GuestSupport.wait(seconds: 10) { FileManager.default.fileExists(atPath: sock) }, "the target's API socket")
        Self.waitForIncoming(["--incoming", address])
        let before = SnapshotTests.streamRounds(s.out).count
        let r = try s.send("PUT", "/migrate", #"{"destination": "\#(address)"}"#)
        #expect(r.status == 400 && r.fault?.contains("disk \(disk)") == true && r.fault?.contains("shared storage") == true, "\(r.body)")
        #expect(try s.send("GET", "/").json?["state"] as? String == "Running")
        #expect(GuestSupport.wait(seconds: 60) { SnapshotTests.streamRounds(s.out).count >= before + 3 }, "the source streams on with its disk opened again")
        #expect(!s.text.contains("FAIL"), "\(s.text.suffix(800))")
        #expect(GuestSupport.wait(seconds: 10) { !target.isRunning }, "the target gave up")
        let otherBytes = try Data(contentsOf: URL(fileURLWithPath: other))
        #expect(otherBytes == Data(repeating: 0x5a, count: 1 << 20), "the target's file was not written")
    }

    @Test("a destination that does not answer, a bad address and a target that hangs up mid-stream are 400s naming the problem, and the source keeps running")
    func failures() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let s = try Self.source(dir)
        defer { s.stop() }
        var r = try s.send("PUT", "/migrate", #"{"destination": "unix:/tmp/swk-nobody-\#(getpid()).sock"}"#)
        #expect(r.status == 400 && r.fault?.contains("cannot connect") == true, "\(r.body)")
        r = try s.send("PUT", "/migrate", #"{"destination": "ftp:somewhere"}"#)
        #expect(r.status == 400 && r.fault?.contains("unix:PATH or tcp:HOST:PORT") == true, "\(r.body)")
        r = try s.send("PUT", "/migrate", #"{"destination": "unix:/tmp/x", "max_downtime_ms": 0}"#)
        #expect(r.status == 400, "\(r.body)")

        // A listener that reads 64 KiB of the stream (of about 1 MiB for this guest), then closes.
        let path = "/tmp/swk-mig-hangup-\(getpid()).sock"
        unlink(path)
        let listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { for (i, b) in path.utf8.enumerated() { $0[i] = b } }
        let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        #expect(bound == 0 && listen(listener, 1) == 0)
        defer { close(listener); unlink(path) }
        let hangup = Thread {
            let c = accept(listener, nil, nil)
            var buf = [UInt8](repeating: 0, count: 65536), total = 0
            while total < 64 << 10 { let n = read(c, &buf, 4096); if n <= 0 { break }; total += n }
            close(c)
        }
        hangup.start()
        let before = s.ticks.count
        r = try s.send("PUT", "/migrate", #"{"destination": "unix:\#(path)"}"#)
        #expect(r.status == 400 && r.fault?.contains("migration stream") == true, "\(r.body)")
        #expect(try s.send("GET", "/").json?["state"] as? String == "Running")
        #expect(GuestSupport.wait(seconds: 30) { s.ticks.count >= before + 5 }, "the source keeps ticking")
        #expect(s.process.isRunning)
    }
}
