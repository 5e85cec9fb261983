import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Seccomp confinement (docs/SECCOMP.md) of `swiftkvm run` and `swiftkvm vmm`, seen from outside: every thread of a
/// running VM is in filter mode, a forbidden syscall kills the process with SIGSYS and a report, `--no-seccomp` turns
/// it off, and `--seccomp-filter` files are loaded or refused.
@Suite("seccomp filters (/dev/kvm)", .serialized,
       .enabled(if: MCSupport.canRunGuests, "needs /dev/kvm, the swiftkvm executable and the guest programs"))
struct SeccompTests {
    /// Each thread of `pid`: its name, `Seccomp:` mode and `Seccomp_filters:` count.
    static func threads(of pid: Int32) -> [(name: String, mode: Int, filters: Int)] {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        return tasks.sorted().compactMap { tid in
            guard let status = try? String(contentsOfFile: "/proc/\(pid)/task/\(tid)/status", encoding: .utf8) else { return nil }
            func field(_ name: String) -> String? {
                status.split(separator: "\n").first { $0.hasPrefix(name + ":") }
                    .map { $0.dropFirst(name.count + 1).trimmingCharacters(in: .whitespaces) }
            }
            return (field("Name") ?? "?", Int(field("Seccomp") ?? "") ?? -1, Int(field("Seccomp_filters") ?? "") ?? -1)
        }
    }

    static var helper: String? {
        guard let swiftkvm = MCSupport.swiftkvm else { return nil }
        let path = URL(fileURLWithPath: swiftkvm).deletingLastPathComponent().appendingPathComponent("swiftkvm-test-helper").path
        return FileManager.default.isExecutableFile(atPath: path) ? path : nil
    }

    /// `swiftkvm run` of the ticker with a virtio disk (an event loop and I/O workers) and the stdin console.
    func startRun(_ dir: MCTempDir, extra: [String] = []) throws -> MCChild {
        let disk = dir.path + "/d0.img"
        FileManager.default.createFile(atPath: disk, contents: Data(count: 1 << 20))
        return try MCChild(try #require(MCSupport.swiftkvm),
                           ["run", "--kernel", try #require(MCSupport.ticker), "--cmdline", MCSupport.tickerArgs(ticks: 0),
                            "--serial", "stdio", "--disk", "path=\(disk)"] + extra, stdinPipe: true)
    }

    @Test("swiftkvm run: every thread of a running VM with a virtio disk has Seccomp 2 and a filter; --no-seccomp gives 0")
    func runThreadsConfined() throws {
        for confined in [true, false] {
            let dir = MCTempDir()
            defer { dir.remove() }
            let vm = try startRun(dir, extra: confined ? [] : ["--no-seccomp"])
            defer { vm.stop() }
            #expect(vm.stdout.waitFor("TICKER-START", timeout: 60), "the guest started: \(vm.stderr.text)")
            // The ticker runs; wait for some ticks so that every thread is past its start.
            #expect(MCSupport.wait(seconds: 30) { MCSupport.ticks(in: vm.stdout.text) >= 20 })
            let threads = Self.threads(of: vm.pid)
            let names = Set(threads.map(\.name))
            for needed in ["vcpu 0", "virtio-blk0", "virtio-blk-io", "console", "rtc"] {
                #expect(names.contains(needed), "thread \(needed) among \(names.sorted())")
            }
            for t in threads {
                if confined {
                    #expect(t.mode == 2 && t.filters >= 1, "thread \(t.name): Seccomp \(t.mode), \(t.filters) filters")
                } else {
                    #expect(t.mode == 0, "thread \(t.name): Seccomp \(t.mode) with --no-seccomp")
                }
            }
            vm.stop()
            #expect(vm.poll() == 143, "SIGTERM ends the VM with 143 (no SIGSYS on the way out): \(vm.stderr.text)")
            #expect(!vm.stderr.text.contains("seccomp"), "\(vm.stderr.text)")
        }
    }

    @Test("swiftkvm vmm: the main, API, console-socket, controller, vCPU and device threads of a started VM all have Seccomp 2")
    func vmmThreadsConfined() throws {
        let dir = MCTempDir()
        defer { dir.remove() }
        let disk = dir.path + "/d0.img"
        FileManager.default.createFile(atPath: disk, contents: Data(count: 1 << 20))
        let api = dir.path + "/api.sock", sock = dir.path + "/con.sock", metrics = dir.path + "/metrics.json"
        let vmm = try MCChild(try #require(MCSupport.swiftkvm),
                              ["vmm", "--api-sock", api, "--console-sock", sock, "--metrics-path", metrics,
                               "--metrics-interval", "1"])
        defer { vmm.stop() }
        #expect(MCSupport.wait(seconds: 20) { FileManager.default.fileExists(atPath: api) }, "API socket: \(vmm.stderr.text)")
        // Configure and start through the API (the controller thread builds the machine, then confines itself).
        func call(_ method: String, _ path: String, _ body: String) -> String { MCSupport.apiCall(api, method, path, body) }
        let ticker = try #require(MCSupport.ticker)
        #expect(call("PUT", "/boot-source", #"{"kernel_image_path": "\#(ticker)", "boot_args": "\#(MCSupport.tickerArgs(ticks: 0))"}"#) == "204")
        #expect(call("PUT", "/drives/d0", #"{"drive_id": "d0", "path_on_host": "\#(disk)", "is_root_device": false, "is_read_only": false}"#) == "204")
        #expect(call("PUT", "/actions", #"{"action_type": "InstanceStart"}"#) == "204", "\(vmm.stderr.text)")
        let client = try MCConsoleClient(path: sock)
        defer { client.close() }
        #expect(MCSupport.wait(seconds: 60) { MCSupport.ticks(in: client.reader!.text) >= 20 }, "ticks on the console socket: \(vmm.stderr.text)")
        // A runtime request on the confined API and controller threads, and a metrics flush on its thread.
        #expect(call("PATCH", "/vm", #"{"state": "Paused"}"#) == "204", "\(vmm.stderr.text)")
        #expect(call("PATCH", "/vm", #"{"state": "Resumed"}"#) == "204", "\(vmm.stderr.text)")
        // Swapping the disk's image for a qcow2 one and back (opened and locked on the confined controller thread).
        let qcow2 = dir.path + "/d1.qcow2"
        let made = try MCChild.run(try #require(MCSupport.swiftkvm), ["img", "create", "-f", "qcow2", qcow2, "1M"], timeout: 30)
        #expect(made.status == 0, "\(made.stderr)")
        #expect(call("PATCH", "/drives/d0", #"{"drive_id": "d0", "path_on_host": "\#(qcow2)"}"#) == "204", "\(vmm.stderr.text)")
        #expect(call("PATCH", "/drives/d0", #"{"drive_id": "d0", "path_on_host": "\#(disk)"}"#) == "204", "\(vmm.stderr.text)")
        #expect(MCSupport.wait(seconds: 10) { ((try? String(contentsOfFile: metrics, encoding: .utf8)) ?? "").contains("utc_timestamp_ms") })
        let threads = Self.threads(of: vmm.pid)
        let names = Set(threads.map(\.name))
        for needed in ["vcpu 0", "virtio-blk0", "console-sock", "api-vmm", "vmm", "metrics"] {
            #expect(names.contains(needed), "thread \(needed) among \(names.sorted())")
        }
        for t in threads {
            #expect(t.mode == 2 && t.filters >= 1, "thread \(t.name): Seccomp \(t.mode), \(t.filters) filters")
        }
        #expect(vmm.poll() == nil, "the VMM keeps running: \(vmm.stderr.text)")
        vmm.stop()
        #expect(vmm.poll() == 143, "SIGTERM ends the VMM with 143: \(vmm.stderr.text)")
        #expect(!vmm.stderr.text.contains("forbidden syscall"), "\(vmm.stderr.text)")
    }

    @Test("a forbidden syscall on a thread of each kind kills the process with SIGSYS and a report naming the syscall and the kind",
          arguments: ["vmm", "api", "vcpu", "device", "console"])
    func violationKills(kind: String) throws {
        let helper = try #require(Self.helper, "swiftkvm-test-helper is built next to swiftkvm (swift build)")
        let r = try MCChild.run(helper, ["seccomp-violation", kind], timeout: 30)
        #expect(r.status == 128 + SIGSYS, "status \(r.status): \(r.stderr)")
        #expect(r.stderr.contains("forbidden syscall 41 (socket)"), "\(r.stderr)")
        #expect(r.stderr.contains("on a '\(kind)' thread"), "\(r.stderr)")
        #expect(!r.stdout.contains("socket returned"), "the call never ran")
    }

    @Test("a confined thread of each kind whose malloc arena shrinks (2 MiB allocated and freed) keeps running: glibc's one-time read of /proc/sys/vm/overcommit_memory happened before confinement",
          arguments: ["vmm", "api", "vcpu", "device", "console"])
    func mallocTrimSurvives(kind: String) throws {
        let helper = try #require(Self.helper, "swiftkvm-test-helper is built next to swiftkvm (swift build)")
        let r = try MCChild.run(helper, ["seccomp-malloc-trim", kind], timeout: 30)
        #expect(r.status == 0 && r.stdout.contains("freed"), "status \(r.status): \(r.stderr)")
        #expect(!r.stderr.contains("forbidden syscall"), "\(r.stderr)")
    }

    @Test("the same after glibc raised its trim threshold (an 8 MiB block freed before confinement, so the start-up priming trims nothing): the confined thread's own probe gets EACCES, not SIGSYS (the vsock bench in CI)",
          arguments: ["vmm", "api", "vcpu", "device", "console"])
    func mallocTrimRaisedThreshold(kind: String) throws {
        let helper = try #require(Self.helper, "swiftkvm-test-helper is built next to swiftkvm (swift build)")
        let r = try MCChild.run(helper, ["seccomp-malloc-trim", kind, "--raised-threshold"], timeout: 30)
        #expect(r.status == 0 && r.stdout.contains("freed"), "status \(r.status): \(r.stderr)")
        #expect(!r.stderr.contains("forbidden syscall"), "\(r.stderr)")
    }

    @Test("--seccomp-filter: the built-in filters as a file run the guest; a file whose vcpu filter lacks ioctl kills it with SIGSYS naming ioctl")
    func filterFile() throws {
        let helper = try #require(Self.helper, "swiftkvm-test-helper is built next to swiftkvm (swift build)")
        let dir = MCTempDir()
        defer { dir.remove() }
        let full = try MCChild.run(helper, ["seccomp-export"], timeout: 30)
        let good = dir.file("good.json", full.stdout)
        let vm = try startRun(dir, extra: ["--seccomp-filter", good])
        #expect(vm.stdout.waitFor("TICKER-START", timeout: 60), "the guest started: \(vm.stderr.text)")
        #expect(Self.threads(of: vm.pid).allSatisfy { $0.mode == 2 })
        vm.stop()
        #expect(vm.poll() == 143, "\(vm.stderr.text)")

        let partial = try MCChild.run(helper, ["seccomp-export", "--without", "ioctl@vcpu"], timeout: 30)
        let bad = dir.file("no-ioctl.json", partial.stdout)
        let dir2 = MCTempDir()
        defer { dir2.remove() }
        let dying = try startRun(dir2, extra: ["--seccomp-filter", bad])
        let status = dying.wait(timeout: 60)
        #expect(status == 128 + SIGSYS, "status \(String(describing: status)): \(dying.stderr.text)")
        #expect(dying.stderr.text.contains("forbidden syscall 16 (ioctl)") && dying.stderr.text.contains("'vcpu' thread"), "\(dying.stderr.text)")
    }

    @Test("a bad --seccomp-filter file exits 2 naming the file and the problem, for run and vmm",
          arguments: [("missing", ""), ("notjson", "{"), ("unknown-syscall", "SYSCALL"), ("missing-kind", "KIND"), ("bad-op", "OP")])
    func badFilterFile(name: String, contents: String) throws {
        let helper = try #require(Self.helper)
        let dir = MCTempDir()
        defer { dir.remove() }
        let exported = try MCChild.run(helper, ["seccomp-export"], timeout: 30).stdout
        var path = dir.path + "/\(name).json"
        var expected: String
        switch contents {
        case "": path = dir.path + "/absent.json"; expected = "No such file"
        case "SYSCALL":
            path = dir.file("\(name).json", exported.replacingOccurrences(of: #""syscall": "read"}"#, with: #""syscall": "no_such_call"}"#))
            expected = "unknown syscall 'no_such_call'"
        case "KIND":
            path = dir.file("\(name).json", #"{"vmm": {"default_action": "trap", "filter_action": "allow", "filter": []}}"#)
            expected = "no filter for thread kind"
        case "OP":
            path = dir.file("\(name).json", exported.replacingOccurrences(of: #""op": "eq""#, with: #""op": "equals""#))
            expected = "unknown operator `equals`"
        default:
            path = dir.file("\(name).json", contents)
            expected = "is invalid"
        }
        let swiftkvm = try #require(MCSupport.swiftkvm)
        for command in [["run", "--kernel", try #require(MCSupport.ticker)], ["vmm", "--api-sock", dir.path + "/api.sock"]] {
            let r = try MCChild.run(swiftkvm, command + ["--seccomp-filter", path], timeout: 30)
            #expect(r.status == 2, "\(command[0]): status \(r.status): \(r.stderr)")
            #expect(r.stderr.contains(path) && r.stderr.contains(expected), "\(command[0]): \(r.stderr)")
        }
    }
}
