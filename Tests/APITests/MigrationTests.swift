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
        #expect(GuestSupport.wait(seconds: 10) { FileManager.default.fileExists(atPath: sock) }, "\(name) API socket")
        return VMM(process: p, socket: sock, out: out)
    }

    /// A running ticker source.
    static func source(_ dir: TempDir) throws -> VMM {
        let s = try launch(dir, "source")
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
