import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// A `swiftkvm daemon` started by a test on its own state dir, driven with `swiftkvm vm --socket`.
final class MCDaemon {
    let dir: MCTempDir
    let child: MCChild
    var socket: String { dir.path + "/daemon.sock" }

    init() throws {
        dir = MCTempDir(prefix: "skc")
        let exe = try #require(MCSupport.swiftkvm, "swiftkvm executable not found (build it, or set SWIFTKVM_BIN)")
        child = try MCChild(exe, ["daemon", "--state-dir", dir.path])
        let ready = MCSupport.wait(seconds: 30) {
            FileManager.default.fileExists(atPath: socket) && (try? vm(["list"]).status) == 0
        }
        if !ready {
            stop()
            throw MCChild.SpawnError(description: "the daemon did not come up: \(child.stderr.text)")
        }
    }

    /// Runs `swiftkvm vm --socket SOCKET args…`.
    @discardableResult
    func vm(_ args: [String], input: String? = nil, timeout: Double = 120) throws -> MCChild.Result {
        try MCChild.run(try #require(MCSupport.swiftkvm), ["vm", "--socket", socket] + args, input: input, timeout: timeout)
    }

    /// Writes a ticker definition named `name` and returns its path.
    func tickerDefinition(_ name: String, extra: String = "") throws -> String {
        let kernel = try #require(MCSupport.ticker)
        return dir.file("\(name).def.json", """
            {"name": "\(name)", "shutdown_timeout_s": 20\(extra),
             "boot-source": {"kernel_image_path": "\(kernel)", "boot_args": "\(MCSupport.tickerArgs(ticks: 0))"},
             "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}
            """)
    }

    /// The VM processes this daemon started (from run/*/state.json, checked against /proc).
    func vmmPIDs() -> [pid_t] {
        let run = dir.path + "/run"
        let names = (try? FileManager.default.contentsOfDirectory(atPath: run)) ?? []
        return names.compactMap { name -> pid_t? in
            guard let data = FileManager.default.contents(atPath: "\(run)/\(name)/state.json"),
                  let obj = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
                  let pid = (obj["pid"] as? NSNumber)?.int32Value, pid > 1,
                  let cmd = try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8),
                  cmd.contains(dir.path) else { return nil }
            return pid
        }
    }

    /// Destroys every VM, stops the daemon (SIGTERM), kills any VM process of ours left, removes the dir.
    func stop() {
        if child.poll() == nil {
            if let r = try? vm(["list"], timeout: 20), r.status == 0 {
                for line in r.stdout.split(separator: "\n").dropFirst(2) {
                    let cols = line.split(separator: " ", omittingEmptySubsequences: true)
                    if cols.count >= 2 { _ = try? vm(["destroy", String(cols[1])], timeout: 30) }
                }
            }
        }
        let leftovers = vmmPIDs()
        child.stop(grace: 10)
        for pid in leftovers { kill(pid, SIGKILL) }
        dir.remove()
    }
}

/// The `vm` rows of `swiftkvm vm list` output: name → (id, state).
func parseList(_ text: String) -> [String: (id: String, state: String)] {
    var rows: [String: (String, String)] = [:]
    for line in text.split(separator: "\n").dropFirst(2) {
        let cols = line.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
        guard cols.count >= 3 else { continue }
        rows[cols[1]] = (cols[0], cols[2...].joined(separator: " "))
    }
    return rows
}

@Suite("swiftkvm vm through swiftkvm daemon, with ticker guests (/dev/kvm)", .serialized,
       .enabled(if: MCSupport.canRunGuests, "needs /dev/kvm, the swiftkvm executable and the guest programs"))
struct ManagerCLITests {
    @Test("define → start → list shows running → console shows ticks → pause/resume → shutdown → list --all shows shut off → undefine")
    func lifecycle() throws {
        let d = try MCDaemon()
        defer { d.stop() }
        let def = try d.tickerDefinition("t1")
        var r = try d.vm(["define", def])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("VM 't1' defined"), "\(r.stdout)")
        r = try d.vm(["list", "--all"])
        #expect(parseList(r.stdout)["t1"]?.state == "shut off", "\(r.stdout)")
        #expect(r.stdout.hasPrefix(" Id"), "virsh-like header: \(r.stdout)")
        r = try d.vm(["list"])
        #expect(parseList(r.stdout)["t1"] == nil, "list without --all shows active VMs only: \(r.stdout)")

        r = try d.vm(["start", "t1"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("VM 't1' started"), "stdout: \(r.stdout) stderr: \(r.stderr) timedOut: \(r.timedOut)")
        r = try d.vm(["list"])
        let row = parseList(r.stdout)["t1"]
        #expect(row?.state == "running", "\(r.stdout)")
        #expect(Int(row?.id ?? "") != nil, "Id is the pid: \(r.stdout)")

        r = try d.vm(["info", "t1"])
        #expect(r.status == 0)
        #expect(r.stdout.contains("State:") && r.stdout.contains("running"), "\(r.stdout)")
        #expect(r.stdout.split(separator: "\n").contains { $0.hasPrefix("Name:") && $0.hasSuffix("t1") }, "\(r.stdout)")

        // The console with pipes: stdin ends at once, output flows for the drain time. A loaded host (CI) may tick
        // slowly: attach again until three ticks were seen in all.
        var ticksSeen = 0, consoleOut = ""
        for _ in 0..<5 where ticksSeen < 3 {
            r = try d.vm(["console", "t1"], input: "", timeout: 30)
            #expect(r.status == 0, "\(r.stderr)")
            ticksSeen += MCSupport.ticks(in: r.stdout)
            consoleOut += r.stdout
        }
        #expect(ticksSeen >= 3, "console output: \(consoleOut.prefix(300))")

        r = try d.vm(["pause", "t1"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(parseList(try d.vm(["list"]).stdout)["t1"]?.state == "paused")
        r = try d.vm(["resume", "t1"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(parseList(try d.vm(["list"]).stdout)["t1"]?.state == "running")

        r = try d.vm(["start", "t1"])
        #expect(r.status == 1, "starting a running VM is refused")
        #expect(r.stderr.hasPrefix("swiftkvm: error: ") && r.stderr.contains("t1"), "\(r.stderr)")

        r = try d.vm(["shutdown", "t1", "--timeout", "20"], timeout: 60)
        #expect(r.status == 0, "\(r.stderr)")
        r = try d.vm(["list", "--all"])
        #expect(parseList(r.stdout)["t1"]?.state == "shut off", "\(r.stdout)")
        r = try d.vm(["info", "t1"])
        #expect(r.stdout.contains("Last exit:"), "\(r.stdout)")
        let serialLog = d.dir.path + "/logs/t1.serial.log"
        #expect(MCSupport.ticks(in: (try? String(contentsOfFile: serialLog, encoding: .utf8)) ?? "") > 0,
                "the serial log keeps the output")

        r = try d.vm(["undefine", "t1"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(parseList(try d.vm(["list", "--all"]).stdout)["t1"] == nil)
    }

    @Test("vm setmem: the balloon of a running VM takes the memory size minus MIB (the vmm's GET /balloon shows it); no balloon, a bad size or a shut-off VM: exit 1 naming why")
    func setMemory() throws {
        let d = try MCDaemon()
        defer { d.stop() }
        let withBalloon = try d.tickerDefinition("b1", extra: #", "balloon": {"amount_mib": 0, "deflate_on_oom": true}"#)
        #expect(try d.vm(["define", withBalloon]).status == 0)
        #expect(try d.vm(["define", try d.tickerDefinition("b2")]).status == 0)
        var r = try d.vm(["setmem", "b1", "48"])
        #expect(r.status == 1 && r.stderr.contains("not running"), "\(r.stderr)")
        #expect(try d.vm(["start", "b1"]).status == 0)
        #expect(try d.vm(["start", "b2"]).status == 0)
        r = try d.vm(["setmem", "b1", "48"])
        #expect(r.status == 0 && r.stdout.contains("48 MiB"), "\(r.stdout) \(r.stderr)")
        let body = MCSupport.apiGet(d.dir.path + "/run/b1/api.sock", "/balloon") ?? ""
        let json = (try? JSONSerialization.jsonObject(with: Data(body.utf8))) as? [String: Any]
        #expect(json?["amount_mib"] as? Int == 16, "64 MiB guest keeping 48: the balloon takes 16 (\(body))")
        r = try d.vm(["setmem", "b1", "65"])
        #expect(r.status == 1 && r.stderr.contains("between 1 and its 64 MiB"), "\(r.stderr)")
        r = try d.vm(["setmem", "b2", "32"])
        #expect(r.status == 1 && r.stderr.contains("no balloon device"), "\(r.stderr)")
        r = try d.vm(["setmem", "nosuch", "32"])
        #expect(r.status == 1 && r.stderr.contains("nosuch"), "\(r.stderr)")
    }

    @Test("vm clone: a running copy appears in vm list with its own pid and ticks; a taken name or a shut-off source exit 1 naming why")
    func cloneVerb() throws {
        let d = try MCDaemon()
        defer { d.stop() }
        #expect(try d.vm(["define", try d.tickerDefinition("src")]).status == 0)
        var r = try d.vm(["clone", "src", "copy"])
        #expect(r.status == 1 && r.stderr.contains("not running"), "\(r.stderr)")
        #expect(try d.vm(["start", "src"]).status == 0)
        #expect(MCSupport.wait(seconds: 30) { MCSupport.ticks(in: (try? String(contentsOfFile: d.dir.path + "/logs/src.serial.log", encoding: .utf8)) ?? "") >= 5 })
        r = try d.vm(["clone", "src", "copy"])
        #expect(r.status == 0 && r.stdout.contains("VM 'copy' cloned from 'src'"), "\(r.stdout) \(r.stderr)")
        let list = try d.vm(["list"]).stdout
        #expect(list.contains("copy") && list.contains("src"), "\(list)")
        #expect(MCSupport.wait(seconds: 30) { MCSupport.ticks(in: (try? String(contentsOfFile: d.dir.path + "/logs/copy.serial.log", encoding: .utf8)) ?? "") >= 5 },
                "the clone ticks")
        r = try d.vm(["clone", "src", "copy"])
        #expect(r.status == 1 && r.stderr.contains("already exists"), "\(r.stderr)")
        #expect(try d.vm(["destroy", "copy"]).status == 0)
        #expect(try d.vm(["destroy", "src"]).status == 0)
    }

    @Test("vm console with pipes: typed lines reach the guest's UART, and the console ends by itself when the VM stops")
    func consoleInput() throws {
        let d = try MCDaemon()
        defer { d.stop() }
        let serial = try #require(MCSupport.serial)
        let def = d.dir.file("ser.def.json", """
            {"name": "ser", "boot-source": {"kernel_image_path": "\(serial)", "boot_args": "timeout=60000"}}
            """)
        #expect(try d.vm(["define", def]).status == 0)
        #expect(try d.vm(["start", "ser"]).status == 0)
        // Type only once the program waits for input (it drops earlier bytes): the serial log shows when.
        let log = d.dir.path + "/logs/ser.serial.log"
        #expect(MCSupport.wait(seconds: 60) {
            ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").contains("SERIAL-READY-POLL")
        }, "the serial program should start")
        let console = try MCChild(try #require(MCSupport.swiftkvm), ["vm", "--socket", d.socket, "console", "ser"], stdinPipe: true)
        defer { console.stop() }
        usleep(200_000)
        console.writeInput("typed-in-cli\n")
        #expect(console.stdout.waitFor("echo-poll: typed-in-cli", timeout: 60), "\(console.stdout.text) \(console.stderr.text)")
        #expect(console.stdout.waitFor("SERIAL-READY-IRQ", timeout: 60))
        console.writeInput("second-line\n")
        #expect(console.stdout.waitFor("echo-irq: second-line", timeout: 60), "\(console.stdout.text)")
        // The program ends, the VM stops, the console socket closes: `vm console` exits without EOF on stdin.
        #expect(console.wait(timeout: 60) == 0, "\(console.stderr.text)")
        #expect(MCSupport.wait(seconds: 30) { parseList((try? d.vm(["list", "--all"]).stdout) ?? "")["ser"]?.state == "shut off" })
    }

    @Test("vm console on a terminal: raw mode, the output shows, Ctrl-] detaches and the terminal is restored")
    func consoleTerminal() throws {
        let d = try MCDaemon()
        defer { d.stop() }
        #expect(try d.vm(["define", try d.tickerDefinition("tty")]).status == 0)
        #expect(try d.vm(["start", "tty"]).status == 0)
        let pty = try MCPty()
        defer { pty.close() }
        let before = try #require(pty.localFlags())
        #expect(before & tcflag_t(ICANON | ECHO) == tcflag_t(ICANON | ECHO), "a new pty starts in canonical mode")
        let console = try MCChild(try #require(MCSupport.swiftkvm), ["vm", "--socket", d.socket, "console", "tty"],
                                  terminal: pty.slavePath)
        defer { console.stop() }
        #expect(pty.reader.waitFor("escape character is ^]", timeout: 30), "\(pty.reader.text)")
        #expect(MCSupport.wait(seconds: 30) { MCSupport.ticks(in: pty.reader.text) >= 3 }, "\(pty.reader.text.prefix(300))")
        #expect(pty.localFlags().map { $0 & tcflag_t(ICANON | ECHO) } == 0, "raw mode while attached")
        pty.type([0x1d])
        #expect(console.wait(timeout: 30) == 0, "Ctrl-] ends vm console with status 0")
        #expect(pty.localFlags() == before, "the terminal settings are restored")
        #expect(parseList(try d.vm(["list"]).stdout)["tty"]?.state == "running", "detaching leaves the VM running")
    }

    @Test("vm events prints the events as JSON lines: --since replays, --count stops, a live stream sees started and stopped")
    func events() throws {
        let d = try MCDaemon()
        defer { d.stop() }
        #expect(try d.vm(["define", try d.tickerDefinition("ev")]).status == 0)
        // Where the stream is now: the last stored event's seq.
        var r = try d.vm(["events", "--since", "0", "--timeout", "2"], timeout: 30)
        #expect(r.status == 0, "\(r.stderr)")
        let seqs = r.stdout.split(separator: "\n").compactMap { line -> Int? in
            guard let obj = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any] else { return nil }
            return (obj["seq"] as? NSNumber)?.intValue
        }
        #expect(r.stdout.contains(#""event":"defined""#), "\(r.stdout)")
        let last = seqs.max() ?? 0
        // A live stream from there: start and destroy produce (at least) starting, started, stopped.
        let exe = try #require(MCSupport.swiftkvm)
        let live = try MCChild(exe, ["vm", "--socket", d.socket, "events", "--since", String(last), "--count", "3", "--timeout", "60"])
        defer { live.stop() }
        #expect(try d.vm(["start", "ev"]).status == 0)
        #expect(try d.vm(["destroy", "ev"]).status == 0)
        let status = live.wait(timeout: 60)
        live.stdout.waitForEnd(timeout: 5)
        #expect(status == 0, "\(live.stderr.text)")
        let lines = live.stdout.text.split(separator: "\n")
        #expect(lines.count == 3, "--count 3 prints exactly 3 lines: \(live.stdout.text)")
        #expect(live.stdout.text.contains(#""event":"started""#), "\(live.stdout.text)")
        r = try d.vm(["events", "--since", String(last), "--timeout", "2"], timeout: 30)
        #expect(r.stdout.contains(#""event":"stopped""#), "\(r.stdout)")
        #expect(r.stdout.contains(#""vm":"ev""#))
    }

    @Test("two VMs run at once, each with its own process and console")
    func twoVMs() throws {
        let d = try MCDaemon()
        defer { d.stop() }
        for name in ["a1", "b2"] {
            #expect(try d.vm(["define", try d.tickerDefinition(name)]).status == 0)
            let r = try d.vm(["start", name])
            #expect(r.status == 0, "\(r.stderr)")
        }
        let rows = parseList(try d.vm(["list"]).stdout)
        #expect(rows["a1"]?.state == "running" && rows["b2"]?.state == "running", "\(rows)")
        #expect(rows["a1"]?.id != rows["b2"]?.id, "separate processes")
        for name in ["a1", "b2"] {
            let r = try d.vm(["console", name], input: "", timeout: 30)
            #expect(MCSupport.ticks(in: r.stdout) >= 3, "\(name): \(r.stdout.prefix(200)) \(r.stderr)")
        }
        #expect(try d.vm(["destroy", "a1"]).status == 0)
        let after = parseList(try d.vm(["list"]).stdout)
        #expect(after["a1"] == nil && after["b2"]?.state == "running", "destroying one leaves the other: \(after)")
        #expect(try d.vm(["destroy", "b2"]).status == 0)
        #expect(parseList(try d.vm(["list"]).stdout).isEmpty)
    }

    @Test("bad definition files and unknown VMs get exit status 1 and a message naming the problem")
    func badInput() throws {
        let d = try MCDaemon()
        defer { d.stop() }
        let kernel = try #require(MCSupport.ticker)
        let malformed = d.dir.file("bad1.json", #"{"name": "x", "boot-source": {"#)
        var r = try d.vm(["define", malformed])
        #expect(r.status == 1)
        #expect(r.stderr.hasPrefix("swiftkvm: error: ") && r.stderr.lowercased().contains("json"), "\(r.stderr)")

        let unknownKey = d.dir.file("bad2.json", #"{"name": "x", "bogus_key": 1, "boot-source": {"kernel_image_path": "\#(kernel)"}}"#)
        r = try d.vm(["define", unknownKey])
        #expect(r.status == 1)
        #expect(r.stderr.contains("bogus_key"), "\(r.stderr)")

        let missing = d.dir.path + "/no-such-kernel.elf"
        let missingKernel = d.dir.file("bad3.json", #"{"name": "x", "boot-source": {"kernel_image_path": "\#(missing)"}}"#)
        r = try d.vm(["define", missingKernel])
        #expect(r.status == 1)
        #expect(r.stderr.contains(missing), "the message names the missing file: \(r.stderr)")

        r = try d.vm(["define", d.dir.path + "/does-not-exist.json"])
        #expect(r.status == 1)
        #expect(r.stderr.contains("cannot read the definition file"), "\(r.stderr)")
        #expect(parseList(try d.vm(["list", "--all"]).stdout).isEmpty, "nothing got defined")

        for verb in ["start", "info", "destroy", "console", "undefine"] {
            r = try d.vm([verb, "nosuchvm"], input: "")
            #expect(r.status == 1, "\(verb)")
            #expect(r.stderr.hasPrefix("swiftkvm: error: ") && r.stderr.contains("nosuchvm"), "\(verb): \(r.stderr)")
        }
    }
}

@Suite("swiftkvm vm without a daemon (no /dev/kvm needed)", .enabled(if: MCSupport.swiftkvm != nil, "needs the swiftkvm executable (swift build)"))
struct ManagerCLIOfflineTests {
    @Test("no daemon: a clear error naming the socket and how to start the daemon, exit status 1")
    func noDaemon() throws {
        let dir = MCTempDir()
        defer { dir.remove() }
        let sock = dir.path + "/daemon.sock"
        let r = try MCChild.run(try #require(MCSupport.swiftkvm), ["vm", "--socket", sock, "list"])
        #expect(r.status == 1)
        #expect(r.stderr.contains("cannot connect to the swiftkvm daemon at \(sock)"), "\(r.stderr)")
        #expect(r.stderr.contains("swiftkvm daemon"), "\(r.stderr)")
    }

    @Test("the socket comes from $SWIFTKVM_SOCKET, else $SWIFTKVM_STATE_DIR/daemon.sock")
    func socketFromEnvironment() throws {
        let exe = try #require(MCSupport.swiftkvm)
        var r = try MCChild.run(exe, ["vm", "list"], environment: ["SWIFTKVM_SOCKET": "/tmp/skc-none/x.sock"])
        #expect(r.status == 1 && r.stderr.contains("/tmp/skc-none/x.sock"), "\(r.stderr)")
        r = try MCChild.run(exe, ["vm", "list"], environment: ["SWIFTKVM_SOCKET": "", "SWIFTKVM_STATE_DIR": "/tmp/skc-state-none"])
        #expect(r.status == 1 && r.stderr.contains("/tmp/skc-state-none/daemon.sock"), "\(r.stderr)")
    }

    @Test("usage errors exit with status 2")
    func usage() throws {
        let exe = try #require(MCSupport.swiftkvm)
        for args in [["vm", "frobnicate"], ["vm", "events", "--count", "0"], ["vm", "shutdown", "x", "--timeout", "-1"], ["vm", "start"]] {
            let r = try MCChild.run(exe, args)
            #expect(r.status == 2, "\(args): \(r.status) \(r.stderr)")
            #expect(!r.stderr.isEmpty)
        }
    }
}
