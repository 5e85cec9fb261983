import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Testing

// Flat test programs assembled by hand in the tests (ring-0 code is emulated on PVM hosts, so
// each is a handful of instructions), run through the built `swiftkvm run --flat …` binary.

private let kvmAvailable = FileManager.default.fileExists(atPath: "/dev/kvm")
private let binaryAvailable = ProcessRunner.swiftkvmPath != nil

/// Machine code for the programs, byte by byte.
enum FlatPrograms {
    /// `mov dx, 0x3f8` (with a 0x66 prefix outside 16-bit code).
    static func movDXCOM1(bits16: Bool) -> [UInt8] { (bits16 ? [] : [0x66]) + [0xba, 0xf8, 0x03] }
    /// `mov al, c ; out dx, al` for every byte of `text`.
    static func print(_ text: String) -> [UInt8] { text.utf8.flatMap { [0xb0, $0, 0xee] } }
    /// `mov al, v ; out 0xf4, al ; hlt`.
    static func debugExit(_ v: UInt8) -> [UInt8] { [0xb0, v, 0xe6, 0xf4, 0xf4] }

    /// Prints `text` on COM1 and exits through the debug-exit port with value `v`.
    static func printAndExit(_ text: String, value: UInt8, bits16: Bool) -> [UInt8] {
        movDXCOM1(bits16: bits16) + print(text) + debugExit(value)
    }
}

@Suite("Flat programs under swiftkvm run", .enabled(if: kvmAvailable && binaryAvailable, "needs /dev/kvm and the swiftkvm executable"), .serialized)
struct FlatProgramTests {
    func run(_ program: [UInt8], _ arguments: [String], timeout: TimeInterval = 60,
             afterStart: ((Process) -> Void)? = nil) throws -> ProcessRunner.Result {
        let path = try ProcessRunner.temporaryFile(program, name: "flat.bin")
        defer { ProcessRunner.removeTemporary(path) }
        return try ProcessRunner.runSwiftKVM(["run", "--flat", path] + arguments, timeout: timeout, afterStart: afterStart)
    }

    @Test("a real-mode program prints over the serial port and exits through the debug-exit port")
    func realMode() throws {
        let r = try run(FlatPrograms.printAndExit("Hi real\n", value: 5, bits16: true),
                        ["--load-address", "0x1000", "--mode", "real"])
        #expect(r.status == 11, "stderr: \(r.stderr)")
        #expect(r.stdout == "Hi real\n")
        #expect(!r.timedOut)
    }

    @Test("a protected-mode program prints and exits with the debug-exit status")
    func protectedMode() throws {
        let r = try run(FlatPrograms.printAndExit("Hi protected\n", value: 0x10, bits16: false),
                        ["--load-address", "0x100000", "--mode", "protected"])
        #expect(r.status == 33, "stderr: \(r.stderr)")
        #expect(r.stdout == "Hi protected\n")
    }

    @Test("a long-mode program prints and exits with the debug-exit status")
    func longMode() throws {
        let r = try run(FlatPrograms.printAndExit("Hi long\n", value: 0x10, bits16: false),
                        ["--load-address", "0x200000", "--entry", "0x200000", "--mode", "long", "--memory", "16M"])
        #expect(r.status == 33, "stderr: \(r.stderr)")
        #expect(r.stdout == "Hi long\n")
    }

    @Test("a custom debug-exit port is honoured")
    func customDebugPort() throws {
        // mov al, 2 ; out 0x99, al ; hlt
        let r = try run([0xb0, 0x02, 0xe6, 0x99, 0xf4], ["--load-address", "0x1000", "--mode", "real", "--debug-exit-port", "0x99"])
        #expect(r.status == 5, "stderr: \(r.stderr)")
    }

    @Test("HLT with interrupts off ends a flat program with status 0, and --show-regs prints the registers")
    func showRegs() throws {
        // mov bx, 0x1234 ; cli ; hlt
        let r = try run([0xbb, 0x34, 0x12, 0xfa, 0xf4], ["--load-address", "0x1000", "--mode", "real", "--show-regs"])
        #expect(r.status == 0, "stderr: \(r.stderr)")
        #expect(r.stdout.contains("RBX=0000000000001234"))
        #expect(r.stdout.contains("RIP=0000000000001005"))
        #expect(r.stdout.contains("CR0="))
    }

    @Test("rep outsb output of 1024 bytes reaches stdout completely before the exit")
    func noLostOutput() throws {
        // mov si, 0x1020 ; mov cx, 1024 ; mov dx, 0x3f8 ; rep outsb ; mov al, 0 ; out 0xf4, al ; hlt
        var program: [UInt8] = [0xbe, 0x20, 0x10, 0xb9, 0x00, 0x04, 0xba, 0xf8, 0x03, 0xf3, 0x6e] + FlatPrograms.debugExit(0)
        program += [UInt8](repeating: 0x90, count: 0x20 - program.count)
        let text = (0..<1024).map { UInt8(ascii: "a") + UInt8($0 % 26) }
        program += text
        let r = try run(program, ["--load-address", "0x1000", "--mode", "real"])
        #expect(r.status == 1, "stderr: \(r.stderr)")
        #expect(r.stdout == String(decoding: text, as: UTF8.self))
    }

    @Test("a triple fault ends the run with the reset status 8, which no debug-exit value is")
    func tripleFault() throws {
        // ud2 with an empty IDT: #UD → #GP → #DF → triple fault.
        let r = try run([0x0f, 0x0b], ["--load-address", "0x100000", "--mode", "long", "--memory", "8M"])
        #expect(r.status == 8, "stderr: \(r.stderr)")
    }

    @Test("an instruction the PVM host cannot emulate ends the run with status 4, logging RIP and bytes",
          .enabled(if: FileManager.default.fileExists(atPath: "/sys/module/kvm_pvm"), "needs a PVM host (the instruction it feeds is emulated correctly by hardware KVM)"))
    func internalError() throws {
        // popcnt eax, eax in ring 0: rejected by the PVM host's emulator.
        let r = try run([0xf3, 0x0f, 0xb8, 0xc0, 0xf4], ["--load-address", "0x100000", "--mode", "long", "--memory", "8M"])
        #expect(r.status == 4, "stderr: \(r.stderr)")
        #expect(r.stderr.contains("RIP 0x100000"))
        #expect(r.stderr.contains("f3 0f b8 c0"))
        #expect(r.stderrLines.count == 1, "stderr: \(r.stderr)")
    }

    @Test("--on-reboot restart boots the guest again after a reset")
    func restart() throws {
        let r = try run(FlatPrograms.movDXCOM1(bits16: false) + FlatPrograms.print("B") + [0x0f, 0x0b],
                        ["--load-address", "0x100000", "--mode", "long", "--memory", "8M", "--on-reboot", "restart"],
                        afterStart: { p in
                            Thread.sleep(forTimeInterval: 1.5)
                            kill(p.processIdentifier, SIGTERM)
                        })
        #expect(r.status == 143, "stderr: \(r.stderr)")
        #expect(r.stdout.hasPrefix("BB"), "the guest printed \(r.stdout.count) times")
    }

    @Test("SIGTERM and SIGINT stop a spinning guest cleanly with 143 and 130")
    func signals() throws {
        for (sig, status) in [(SIGTERM, Int32(143)), (SIGINT, Int32(130))] {
            // Print "S" then spin: jmp $.
            let r = try run(FlatPrograms.movDXCOM1(bits16: true) + FlatPrograms.print("S") + [0xeb, 0xfe],
                            ["--load-address", "0x1000", "--mode", "real"], timeout: 30,
                            afterStart: { p in
                                Thread.sleep(forTimeInterval: 0.7)
                                kill(p.processIdentifier, sig)
                            })
            #expect(r.status == status, "signal \(sig): stderr: \(r.stderr)")
            #expect(r.stdout == "S")
            #expect(!r.timedOut)
        }
    }
}

@Suite("swiftkvm run rejects bad input with status 2 and one line", .enabled(if: binaryAvailable, "needs the swiftkvm executable (swift build)"))
struct RunBadInputTests {
    /// A one-byte flat program (HLT), created per test instance and removed in deinit.
    final class FlatFile {
        let path: String
        init() { path = (try? ProcessRunner.temporaryFile([0xf4], name: "hlt.bin")) ?? "/nonexistent" }
        deinit { ProcessRunner.removeTemporary(path) }
    }
    let file = FlatFile()
    var flatFile: String { file.path }

    /// Runs swiftkvm and checks: status 2, exactly one stderr line, naming `expected`.
    func expectUsageError(_ arguments: [String], mentions expected: String,
                          sourceLocation: SourceLocation = #_sourceLocation) throws {
        let r = try ProcessRunner.runSwiftKVM(arguments, timeout: 30)
        #expect(r.status == 2, "\(arguments): status \(r.status), stderr \(r.stderr)", sourceLocation: sourceLocation)
        #expect(r.stderrLines.count == 1, "\(arguments): stderr \(r.stderr)", sourceLocation: sourceLocation)
        #expect(r.stderr.hasPrefix("swiftkvm: error: "), sourceLocation: sourceLocation)
        #expect(r.stderr.contains(expected), "\(arguments): stderr \(r.stderr)", sourceLocation: sourceLocation)
        #expect(r.stdout.isEmpty, sourceLocation: sourceLocation)
    }

    var flat: [String] { ["run", "--flat", flatFile, "--load-address", "0x1000", "--mode", "real"] }

    @Test("bad memory sizes: zero, 1K, beyond host RAM, garbage")
    func memory() throws {
        try expectUsageError(flat + ["--memory", "0"], mentions: "--memory")
        try expectUsageError(flat + ["--memory", "1K"], mentions: "at least")
        try expectUsageError(flat + ["--memory", "10T"], mentions: "host")
        try expectUsageError(flat + ["--memory", "lots"], mentions: "--memory")
    }

    @Test("bad option values and unknown options")
    func options() throws {
        try expectUsageError(["run", "--flat", flatFile, "--load-address", "0x1000", "--mode", "weird"], mentions: "--mode")
        try expectUsageError(flat + ["--serial", "tcp:1"], mentions: "--serial")
        try expectUsageError(flat + ["--cpus", "0"], mentions: "--cpus")
        try expectUsageError(flat + ["--debug-exit-port", "0x10000"], mentions: "--debug-exit-port")
        try expectUsageError(flat + ["--cpuid-mask", "1.exx=1"], mentions: "--cpuid-mask")
        try expectUsageError(flat + ["--on-reboot", "sometimes"], mentions: "--on-reboot")
        try expectUsageError(flat + ["--log-level", "loud"], mentions: "--log-level")
        try expectUsageError(flat + ["--no-such-option"], mentions: "no-such-option")
        try expectUsageError(["run", "--flat", flatFile], mentions: "--load-address")
        try expectUsageError(["run", "--flat", flatFile, "--load-address", "0x1000", "--kernel", "/k"], mentions: "--kernel")
    }

    @Test("missing, unreadable and non-kernel files")
    func files() throws {
        try expectUsageError(["run", "--flat", "/nonexistent/x.bin", "--load-address", "0x1000"], mentions: "/nonexistent/x.bin")
        try expectUsageError(["run", "--kernel", "/nonexistent/vmlinuz"], mentions: "/nonexistent/vmlinuz")
        try expectUsageError(["run", "--kernel", "/tmp"], mentions: "not a regular file")
        let text = try ProcessRunner.temporaryFile(Array("just some text\n".utf8), name: "notakernel")
        defer { ProcessRunner.removeTemporary(text) }
        try expectUsageError(["run", "--kernel", text], mentions: "not a kernel")
    }

    @Test("a truncated bzImage header is reported, not crashed on")
    func truncatedHeader() throws {
        var bytes = [UInt8](repeating: 0, count: 0x206)
        bytes[0x1fe] = 0x55; bytes[0x1ff] = 0xaa
        bytes[0x202...0x205] = [0x48, 0x64, 0x72, 0x53] // "HdrS", then the file ends
        let path = try ProcessRunner.temporaryFile(bytes, name: "truncated-bzImage")
        defer { ProcessRunner.removeTemporary(path) }
        let r = try ProcessRunner.runSwiftKVM(["run", "--kernel", path], timeout: 30)
        #expect(r.status == 2, "stderr: \(r.stderr)")
        #expect(r.stderrLines.count == 1)
        #expect(r.stderr.contains(path))
    }

    @Test("a flat image or kernel larger than guest RAM does not fit")
    func doesNotFit() throws {
        let big = try ProcessRunner.temporaryFile([UInt8](repeating: 0x90, count: 3 << 20), name: "big.bin")
        defer { ProcessRunner.removeTemporary(big) }
        try expectUsageError(["run", "--flat", big, "--load-address", "0x1000", "--memory", "2M"], mentions: "big.bin")
        try expectUsageError(["run", "--kernel", big, "--memory", "2M"], mentions: "big.bin")
        try expectUsageError(["run", "--flat", flatFile, "--load-address", "0x7fffffff", "--memory", "2M"], mentions: "0x7fffffff")
    }

    @Test("an initrd that is missing or too large for guest RAM", .enabled(if: FileManager.default.fileExists(
        atPath: ProcessRunner.packageRoot.appendingPathComponent("assets/vmlinuz").path), "needs assets/vmlinuz (scripts/guest-assets)"))
    func initrd() throws {
        let kernel = ProcessRunner.packageRoot.appendingPathComponent("assets/vmlinuz").path
        try expectUsageError(["run", "--kernel", kernel, "--initrd", "/nonexistent/initrd"], mentions: "/nonexistent/initrd")
        let big = try ProcessRunner.temporaryFile([UInt8](repeating: 0, count: 40 << 20), name: "big-initrd")
        defer { ProcessRunner.removeTemporary(big) }
        let r = try ProcessRunner.runSwiftKVM(["run", "--kernel", kernel, "--initrd", big, "--memory", "48M"], timeout: 60)
        #expect(r.status == 2, "stderr: \(r.stderr)")
        #expect(r.stderrLines.count == 1, "stderr: \(r.stderr)")
    }
}
