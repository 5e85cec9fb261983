import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Helpers to run the built `swiftkvm` binary (or any program) as a subprocess from tests.
///
/// Usage:
/// ```swift
/// let r = try ProcessRunner.runSwiftKVM(["run", "--flat", path, "--load-address", "0x1000"], timeout: 60)
/// #expect(r.status == 11)
/// #expect(r.stdout.contains("Hi"))
/// ```
/// The child gets its own stdin (empty unless `input` is given), and stdout and stderr are
/// captured separately. On timeout the child (and only it, by PID) gets SIGTERM, then SIGKILL.
enum ProcessRunner {
    /// What a finished (or timed-out) child did.
    struct Result: Sendable {
        /// Exit status, or 128 + signal number when killed by a signal.
        var status: Int32
        /// Whether it was stopped because it ran past the timeout.
        var timedOut: Bool
        var stdout: String
        var stderr: String
        /// Non-empty stderr lines.
        var stderrLines: [String] { stderr.split(separator: "\n").map(String.init) }
    }

    /// The package root (this file is Tests/IntegrationTests/Support/SwiftKVMProcess.swift).
    static let packageRoot: URL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// The `swiftkvm` executable: `$SWIFTKVM_BIN`, else next to the running test binary (same
    /// scratch path), else `<package>/.build/debug/swiftkvm`; nil when none is executable.
    static let swiftkvmPath: String? = {
        let fm = FileManager.default
        if let env = ProcessInfo.processInfo.environment["SWIFTKVM_BIN"], fm.isExecutableFile(atPath: env) { return env }
        var candidates: [URL] = []
        if let exe = try? fm.destinationOfSymbolicLink(atPath: "/proc/self/exe") {
            var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
            for _ in 0..<4 {
                candidates.append(dir.appendingPathComponent("swiftkvm"))
                dir = dir.deletingLastPathComponent()
            }
        }
        candidates.append(packageRoot.appendingPathComponent(".build/debug/swiftkvm"))
        return candidates.map(\.path).first { fm.isExecutableFile(atPath: $0) }
    }()

    /// Errors from launching.
    struct LaunchError: Error, CustomStringConvertible {
        var description: String
    }

    /// Runs `swiftkvm` with `arguments`.
    static func runSwiftKVM(_ arguments: [String], input: String? = nil, timeout: TimeInterval = 120,
                            environment: [String: String]? = nil,
                            afterStart: ((Process) -> Void)? = nil) throws -> Result {
        guard let path = swiftkvmPath else {
            throw LaunchError(description: "swiftkvm binary not found: build it (swift build) or set SWIFTKVM_BIN")
        }
        return try run(path, arguments, input: input, timeout: timeout, environment: environment, afterStart: afterStart)
    }

    /// Runs `executable` with `arguments`, feeding `input` on stdin (then closing it), and waits
    /// at most `timeout` seconds. `afterStart` is called once the child runs (e.g. to signal it).
    static func run(_ executable: String, _ arguments: [String], input: String? = nil, timeout: TimeInterval = 120,
                    environment: [String: String]? = nil, afterStart: ((Process) -> Void)? = nil) throws -> Result {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        if let environment { process.environment = environment }
        let stdinPipe = Pipe(), outPipe = Pipe(), errPipe = Pipe()
        process.standardInput = stdinPipe
        process.standardOutput = outPipe
        process.standardError = errPipe

        let done = DispatchSemaphore(value: 0)
        process.terminationHandler = { _ in done.signal() }
        do { try process.run() } catch {
            throw LaunchError(description: "cannot start \(executable): \(error)")
        }
        let out = PipeDrainer(outPipe.fileHandleForReading), err = PipeDrainer(errPipe.fileHandleForReading)
        if let input { stdinPipe.fileHandleForWriting.write(Data(input.utf8)) }
        try? stdinPipe.fileHandleForWriting.close()
        afterStart?(process)

        var timedOut = false
        if done.wait(timeout: .now() + timeout) == .timedOut {
            timedOut = true
            kill(process.processIdentifier, SIGTERM)
            if done.wait(timeout: .now() + 2) == .timedOut {
                kill(process.processIdentifier, SIGKILL)
                done.wait()
            }
        }
        // Collect what is left in the pipes (bounded: a grandchild may still hold them open).
        out.waitForEnd(timeout: 5)
        err.waitForEnd(timeout: 5)
        let status = process.terminationReason == .uncaughtSignal ? 128 + process.terminationStatus : process.terminationStatus
        return Result(status: status, timedOut: timedOut,
                      stdout: String(decoding: out.bytes, as: UTF8.self), stderr: String(decoding: err.bytes, as: UTF8.self))
    }

    /// Writes `bytes` to a new temporary file and returns its path; remove it with `removeTemporary`.
    static func temporaryFile(_ bytes: [UInt8], name: String) throws -> String {
        let url = FileManager.default.temporaryDirectory
            .appendingPathComponent("swiftkvm-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))-\(name)")
        try Data(bytes).write(to: url)
        return url.path
    }

    /// Removes a file made by `temporaryFile`.
    static func removeTemporary(_ path: String) {
        try? FileManager.default.removeItem(atPath: path)
    }
}
