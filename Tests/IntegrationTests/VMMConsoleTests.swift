import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// `swiftkvm vmm --console-sock PATH --serial-log PATH` and stdin as serial input, with real
/// guest programs through the built binary.
@Suite("swiftkvm vmm console socket and serial log (/dev/kvm)", .serialized,
       .enabled(if: MCSupport.canRunGuests, "needs /dev/kvm, the swiftkvm executable and the guest programs"))
struct VMMConsoleTests {
    /// Starts `swiftkvm vmm` with a config file booting `kernel` with `bootArgs`.
    func startVMM(_ dir: MCTempDir, kernel: String, bootArgs: String, extra: [String] = [],
                  stdinPipe: Bool = false) throws -> MCChild {
        let config = dir.file("vm.json", """
            {"boot-source": {"kernel_image_path": "\(kernel)", "boot_args": "\(bootArgs)"}}
            """)
        return try MCChild(try #require(MCSupport.swiftkvm),
                           ["vmm", "--api-sock", dir.path + "/api.sock", "--config-file", config] + extra,
                           stdinPipe: stdinPipe)
    }

    @Test("two console clients get the ticks, a client that never reads does not stop them, and --serial-log has them")
    func outputToClients() throws {
        let dir = MCTempDir()
        defer { dir.remove() }
        let sock = dir.path + "/con.sock", log = dir.path + "/serial.log"
        let vmm = try startVMM(dir, kernel: try #require(MCSupport.ticker), bootArgs: MCSupport.tickerArgs(ticks: 0),
                               extra: ["--console-sock", sock, "--serial-log", log])
        defer { vmm.stop() }
        #expect(MCSupport.wait(seconds: 20) { FileManager.default.fileExists(atPath: sock) }, "console socket \(vmm.stderr.text)")
        // A stuck client first, with a tiny receive buffer: it never reads.
        let stuck = try MCConsoleClient(path: sock, reading: false, receiveBuffer: 1024)
        defer { stuck.close() }
        let a = try MCConsoleClient(path: sock)
        defer { a.close() }
        let b = try MCConsoleClient(path: sock)
        defer { b.close() }
        let enough = MCSupport.wait(seconds: 60) {
            MCSupport.ticks(in: a.reader!.text) >= 300 && MCSupport.ticks(in: b.reader!.text) >= 300
        }
        #expect(enough, "both clients should see ticks: a=\(MCSupport.ticks(in: a.reader!.text)) b=\(MCSupport.ticks(in: b.reader!.text)); stderr: \(vmm.stderr.text)")
        // Lines arrive whole and in order: consecutive tick numbers in what a client received.
        let numbers = a.reader!.text.split(separator: "\n").dropLast().compactMap { l -> Int? in
            l.hasPrefix("tick ") ? Int(l.dropFirst(5)) : nil
        }
        #expect(!numbers.isEmpty && zip(numbers, numbers.dropFirst()).allSatisfy { $1 == $0 + 1 }, "ticks in order")
        // --serial-log has the output from the start; stdout has none of it.
        let logged = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        #expect(logged.contains("TICKER-START"), "serial log: \(logged.prefix(200))")
        #expect(MCSupport.ticks(in: logged) >= 300)
        #expect(MCSupport.ticks(in: vmm.stdout.text) == 0, "with --serial-log the output does not go to stdout")
        #expect(vmm.poll() == nil, "the VMM keeps running")
        vmm.stop()
        #expect(vmm.poll() == 143, "SIGTERM ends the VMM with 143: \(vmm.stderr.text)")
        #expect(!FileManager.default.fileExists(atPath: sock), "the console socket is removed at exit")
        #expect(a.reader!.waitForEnd(timeout: 5), "clients see EOF when the VMM exits")
    }

    @Test("bytes typed into the console socket reach the guest's UART (polled and IRQ-driven input)")
    func inputFromClient() throws {
        let dir = MCTempDir()
        defer { dir.remove() }
        let sock = dir.path + "/con.sock"
        let vmm = try startVMM(dir, kernel: try #require(MCSupport.serial), bootArgs: "timeout=60000",
                               extra: ["--console-sock", sock])
        defer { vmm.stop() }
        #expect(MCSupport.wait(seconds: 20) { FileManager.default.fileExists(atPath: sock) })
        let c = try MCConsoleClient(path: sock)
        defer { c.close() }
        // The program may have printed SERIAL-READY-POLL before we connected: stdout has everything.
        #expect(vmm.stdout.waitFor("SERIAL-READY-POLL", timeout: 60), "\(vmm.stdout.text)\(vmm.stderr.text)")
        c.send("from-socket\n")
        #expect(c.reader!.waitFor("echo-poll: from-socket", timeout: 60), "\(c.reader!.text)")
        #expect(c.reader!.waitFor("SERIAL-READY-IRQ", timeout: 60))
        c.send("irq-line\n")
        #expect(c.reader!.waitFor("echo-irq: irq-line", timeout: 60), "\(c.reader!.text)")
        #expect(vmm.wait(timeout: 60) != nil, "the program ends and so does the VMM")
        #expect(vmm.stdout.text.contains("echo-poll: from-socket"), "stdout still gets the output without --serial-log")
        #expect(!FileManager.default.fileExists(atPath: sock))
    }

    @Test("stdin feeds the serial input when it is a pipe, as Firecracker's")
    func inputFromStdin() throws {
        let dir = MCTempDir()
        defer { dir.remove() }
        let vmm = try startVMM(dir, kernel: try #require(MCSupport.serial), bootArgs: "timeout=60000", stdinPipe: true)
        defer { vmm.stop() }
        #expect(vmm.stdout.waitFor("SERIAL-READY-POLL", timeout: 60), "\(vmm.stderr.text)")
        vmm.writeInput("via-stdin\n")
        #expect(vmm.stdout.waitFor("echo-poll: via-stdin", timeout: 60), "\(vmm.stdout.text)")
        #expect(vmm.stdout.waitFor("SERIAL-READY-IRQ", timeout: 60))
        vmm.writeInput("second\n")
        vmm.closeInput()
        #expect(vmm.stdout.waitFor("echo-irq: second", timeout: 60), "\(vmm.stdout.text)")
        #expect(vmm.wait(timeout: 60) != nil)
    }

    @Test("an existing --console-sock path is refused with a clear error and exit status 1")
    func existingPath() throws {
        let dir = MCTempDir()
        defer { dir.remove() }
        let taken = dir.file("taken.sock", "")
        let vmm = try startVMM(dir, kernel: try #require(MCSupport.ticker), bootArgs: MCSupport.tickerArgs(ticks: 0),
                               extra: ["--console-sock", taken])
        defer { vmm.stop() }
        let status = vmm.wait(timeout: 30)
        vmm.stderr.waitForEnd(timeout: 5)
        #expect(status == 1, "\(vmm.stderr.text)")
        #expect(vmm.stderr.text.contains("the console socket path \(taken) already exists"), "\(vmm.stderr.text)")
        #expect(!FileManager.default.fileExists(atPath: dir.path + "/api.sock"), "no API socket left behind")
        #expect(FileManager.default.fileExists(atPath: taken), "the existing file is left alone")
    }
}
