import Foundation
import Synchronization
import Testing
@testable import DiskImage

/// A temporary directory removed when the value is deinitialized.
final class TempDir {
    let path: String
    init() throws {
        let p = NSTemporaryDirectory() + "diskimage-tests-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: p, withIntermediateDirectories: true)
        path = p
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
    func file(_ name: String) -> String { path + "/" + name }
}

/// Result of running an external tool.
struct ToolResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// External tools the interop tests use as judges.
enum Tools {
    static func find(_ name: String) -> String? {
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
            let p = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return nil
    }

    static var qemuImg: String? { find("qemu-img") }
    static var qemuIO: String? { find("qemu-io") }

    /// True when qemu-img and qemu-io exist, or when running in CI (where their absence must fail the tests).
    static var interopEnabled: Bool {
        (qemuImg != nil && qemuIO != nil) || ProcessInfo.processInfo.environment["CI"] != nil
    }

    /// The swiftkvm executable built next to the test bundle.
    static var swiftkvm: String? { builtExecutable("swiftkvm") }
    /// The test helper executable (crash writer) built next to the test bundle.
    static var testHelper: String? { builtExecutable("swiftkvm-test-helper") }

    static func builtExecutable(_ name: String) -> String? {
        var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for _ in 0..<3 {
            let p = dir.appendingPathComponent(name).path
            if FileManager.default.isExecutableFile(atPath: p) { return p }
            dir = dir.deletingLastPathComponent()
        }
        return nil
    }

    /// Runs `exe` with `args`. A run still going after `timeout` seconds is killed (SIGKILL, by its PID) and
    /// recorded as a test failure: no tool may hang a test.
    @discardableResult
    static func run(_ exe: String?, _ args: [String], name: String = "tool", timeout: TimeInterval = 300,
                    sourceLocation: SourceLocation = #_sourceLocation) throws -> ToolResult {
        guard let exe else {
            Issue.record("\(name) is not installed: run scripts/install-deps (qemu-utils) or build swiftkvm")
            throw DiskImageError.invalid("\(name) missing")
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: exe)
        p.arguments = args
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = FileHandle.nullDevice
        try p.run()
        let pid = p.processIdentifier
        let finished = DispatchSemaphore(value: 0)
        let timedOut = Mutex(false)
        let watchdog = Thread {
            if finished.wait(timeout: .now() + timeout) == .timedOut {
                timedOut.withLock { $0 = true }
                kill(pid, SIGKILL)
            }
        }
        watchdog.start()
        let e = Mutex(Data())
        let errReader = Thread { let d = err.fileHandleForReading.readDataToEndOfFile(); e.withLock { $0 = d } }
        errReader.start()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        finished.signal()
        while errReader.isExecuting || !errReader.isFinished { usleep(1000) }
        if timedOut.withLock({ $0 }) {
            Issue.record("\(name) \(args.joined(separator: " ")) did not finish within \(Int(timeout)) s and was killed",
                         sourceLocation: sourceLocation)
        }
        return ToolResult(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self),
                          stderr: String(decoding: e.withLock { $0 }, as: UTF8.self))
    }

    @discardableResult
    static func qemuImg(_ args: String...) throws -> ToolResult { try run(qemuImg, args, name: "qemu-img") }
    @discardableResult
    static func qemuImg(_ args: [String]) throws -> ToolResult { try run(qemuImg, args, name: "qemu-img") }
    @discardableResult
    static func qemuIO(_ args: String...) throws -> ToolResult { try run(qemuIO, args, name: "qemu-io") }
}

/// A deterministic pseudo-random generator (SplitMix64) so failures reproduce.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Reads a whole image through the library.
func readAll(_ img: BlockBackend) throws -> [UInt8] {
    try img.read(at: 0, count: Int(img.size))
}

/// Reads a whole file.
func fileBytes(_ path: String) throws -> [UInt8] {
    [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
}

func sha256(_ path: String) throws -> String {
    try Tools.run("/usr/bin/sha256sum", [path], name: "sha256sum").stdout
}

/// Patches bytes of a file in place (for forging corrupt images).
func patch(_ path: String, at offset: UInt64, _ bytes: [UInt8]) throws {
    let h = try FileHandle(forUpdating: URL(fileURLWithPath: path))
    try h.seek(toOffset: offset)
    h.write(Data(bytes))
    try h.close()
}

func be64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64($0))) } }
func be32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (24 - 8 * UInt32($0))) } }
