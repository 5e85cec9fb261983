// swiftkvm-test-helper: commands the test suite needs and users do not, kept out of the `swiftkvm` command.
//   crash-writer [--seed S] [--count N] [--flush-every K] IMAGE
//       writes CrashPlan into IMAGE, flushing every K writes and printing "FLUSHED n" once writes 0..<n are
//       durable, then "DONE"; tests SIGKILL it at random moments. With WRITELOG_PATH set (the power-loss tests'
//       write log, Tests/Tools/write_log.c), it also appends a marker record 'M' n there after each flush.
//   check-device DEVICE
//       runs `swiftkvm check`'s host evaluation against another KVM device path (without the probe guest) and
//       prints its report; exit 1 when that device cannot run guests.
import DiskImage
import SwiftKVMTestSupport
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// Writes `text` to a file descriptor (no stdio buffering: the tests read the lines as they come).
func emit(_ text: String, to fd: Int32 = STDOUT_FILENO) {
    var bytes = Array(text.utf8)
    bytes.append(0x0a)
    var done = 0
    while done < bytes.count {
        let n = bytes[done...].withUnsafeBytes { write(fd, $0.baseAddress!, $0.count) }
        if n <= 0 { return }
        done += n
    }
}

func fail(_ message: String, status: Int32 = 2) -> Never {
    emit("swiftkvm-test-helper: \(message)", to: STDERR_FILENO)
    exit(status)
}

/// The number after an option, or a usage failure naming the option.
func number<T: FixedWidthInteger>(_ value: String?, for option: String, minimum: T = 0) -> T {
    guard let value, let n = T(value), n >= minimum else { fail("\(option) needs a number of at least \(minimum)") }
    return n
}

/// Appends the record 'M' n (17 bytes, little-endian) to the write log named by WRITELOG_PATH, if any.
func logMarker(_ n: UInt64) {
    guard let path = getenv("WRITELOG_PATH") else { return }
    let fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o600)
    guard fd >= 0 else { return }
    defer { close(fd) }
    var record = [UInt8](repeating: 0, count: 17)
    record[0] = UInt8(ascii: "M")
    for k in 0..<8 { record[1 + k] = UInt8(truncatingIfNeeded: n >> (8 * UInt64(k))) }
    _ = record.withUnsafeBytes { write(fd, $0.baseAddress!, $0.count) }
}

func crashWriter(_ args: ArraySlice<String>) throws {
    var seed: UInt64 = 1, count = 200, flushEvery = 5
    var file: String?
    var rest = args
    while let a = rest.popFirst() {
        switch a {
        case "--seed": seed = number(rest.popFirst(), for: a)
        case "--count": count = number(rest.popFirst(), for: a)
        case "--flush-every": flushEvery = number(rest.popFirst(), for: a, minimum: 1)
        default: file = a
        }
    }
    guard let file else { fail("crash-writer needs an image") }
    let img = try openDiskImage(path: file, options: .init(readOnly: false))
    for i in 0..<count {
        let (off, len) = CrashPlan.write(i, seed: seed)
        guard off + UInt64(len) <= img.size else { break }
        try img.write(CrashPlan.pattern(i, length: len), at: off)
        if (i + 1) % flushEvery == 0 {
            try img.flush()
            emit("FLUSHED \(i + 1)")
            logMarker(UInt64(i + 1))
        }
    }
    try img.close()
    emit("DONE")
}

let arguments = CommandLine.arguments.dropFirst()
do {
    switch arguments.first {
    case "crash-writer":
        try crashWriter(arguments.dropFirst())
    case "check-device":
        guard let device = arguments.dropFirst().first else { fail("check-device needs a device path") }
        let report = HostCheck.evaluate(LiveHostFacts(devicePath: device), runProbe: false)
        emit(report.text)
        exit(report.canRunGuests ? 0 : 1)
    default:
        fail("usage: swiftkvm-test-helper crash-writer [--seed S] [--count N] [--flush-every K] IMAGE | check-device DEVICE")
    }
} catch {
    fail("\(error)", status: 1)
}
