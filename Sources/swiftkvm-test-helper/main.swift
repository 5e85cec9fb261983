// swiftkvm-test-helper: commands the test suite needs and users do not, kept out of the `swiftkvm` command.
//   crash-writer [--seed S] [--count N] [--flush-every K] IMAGE
//       writes CrashPlan into IMAGE, flushing every K writes and printing "FLUSHED n" once writes 0..<n are
//       durable, then "DONE"; tests SIGKILL it at random moments. With WRITELOG_PATH set (the power-loss tests'
//       write log, Tests/Tools/write_log.c), it also appends a marker record 'M' n there after each flush.
//   check-device DEVICE
//       runs `swiftkvm check`'s host evaluation against another KVM device path (without the probe guest) and
//       prints its report; exit 1 when that device cannot run guests.
//   seccomp-violation KIND
//       turns on the built-in seccomp filters, starts a KIND thread (HostThread.start(kind:)) that calls
//       socket(AF_PACKET, SOCK_RAW), which no filter allows (the vmm kind may open AF_UNIX, AF_INET and AF_INET6 sockets, for migration): the process must die of SIGSYS with a report.
//   seccomp-export [--without SYSCALL@KIND]
//       prints the built-in filters as a --seccomp-filter JSON file, optionally without one syscall of one kind.
import API
import Devices
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

func seccompViolation(_ kindName: String?) throws {
    guard let kindName, let kind = ThreadKind(rawValue: kindName) else { fail("seccomp-violation needs a thread kind") }
    try SeccompFile.enable(disabled: false, filterFile: nil)
    let done = StartGate()
    try HostThread.start(name: "violation", kind: kind) {
        let fd = socket(AF_PACKET, Int32(SOCK_RAW.rawValue), 0)
        emit("socket returned \(fd)") // only reached when the filter allowed it
        done.open()
    }
    done.wait()
    exit(0)
}

/// A confined thread of `kind` allocates and frees 2 MiB in 64 KiB blocks: its malloc arena shrinks,
/// which glibc handles with a one-time openat that the filters do not allow. With `raised`, an 8 MiB
/// block is freed first (glibc's trim threshold rises to 16 MiB, so the start-up priming trims
/// nothing) and the thread then frees 32 MiB in 1 MiB blocks: the openat happens on the confined thread.
func seccompMallocTrim(_ kindName: String?, raised: Bool) throws {
    guard let kindName, let kind = ThreadKind(rawValue: kindName) else { fail("seccomp-malloc-trim needs a thread kind") }
    if raised {
        let big = malloc(8 << 20)
        if let big { memset(big, 3, 8 << 20) }
        free(big)
    }
    try SeccompFile.enable(disabled: false, filterFile: nil)
    let done = StartGate()
    let (count, size) = raised ? (32, 1 << 20) : (32, 64 << 10)
    try HostThread.start(name: "trim", kind: kind) {
        var blocks: [UnsafeMutableRawPointer] = []
        for _ in 0..<count { if let p = malloc(size) { memset(p, 2, size); blocks.append(p) } }
        for p in blocks.reversed() { free(p) }
        emit("freed")
        done.open()
    }
    done.wait()
    exit(0)
}

func seccompExport(_ args: ArraySlice<String>) {
    var filters = SeccompPolicy.builtIn
    if args.first == "--without", let spec = args.dropFirst().first {
        let parts = spec.split(separator: "@").map(String.init)
        guard parts.count == 2, let kind = ThreadKind(rawValue: parts[1]) else { fail("--without needs SYSCALL@KIND") }
        filters[kind]?.rules.removeAll { $0.syscall == parts[0] }
    }
    func action(_ a: SeccompAction) -> String {
        switch a {
        case .allow: return "\"allow\""
        case .trap: return "\"trap\""
        case .log: return "\"log\""
        case .killThread: return "\"kill_thread\""
        case .killProcess: return "\"kill_process\""
        case .errno(let e): return "{\"errno\": \(e)}"
        case .trace(let t): return "{\"trace\": \(t)}"
        }
    }
    func op(_ o: SeccompCondition.Operator) -> String {
        switch o {
        case .eq: return "\"eq\""
        case .ne: return "\"ne\""
        case .lt: return "\"lt\""
        case .le: return "\"le\""
        case .gt: return "\"gt\""
        case .ge: return "\"ge\""
        case .maskedEq(let m): return "{\"masked_eq\": \(m)}"
        }
    }
    let kinds = ThreadKind.allCases.map { kind -> String in
        let f = filters[kind]!
        let rules = f.rules.map { r -> String in
            let args = r.conditions.map {
                "{\"index\": \($0.index), \"type\": \"\($0.dword ? "dword" : "qword")\", \"op\": \(op($0.op)), \"val\": \($0.value)}"
            }
            return args.isEmpty ? "{\"syscall\": \"\(r.syscall)\"}"
                : "{\"syscall\": \"\(r.syscall)\", \"args\": [\(args.joined(separator: ", "))]}"
        }
        return "  \"\(kind.rawValue)\": {\"default_action\": \(action(f.defaultAction)), \"filter_action\": \(action(f.filterAction)),\n"
            + "    \"filter\": [\n      " + rules.joined(separator: ",\n      ") + "]}"
    }
    emit("{\n" + kinds.joined(separator: ",\n") + "\n}")
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
    case "seccomp-violation":
        try seccompViolation(arguments.dropFirst().first)
    case "seccomp-malloc-trim":
        try seccompMallocTrim(arguments.dropFirst().first, raised: arguments.dropFirst(2).first == "--raised-threshold")
    case "seccomp-export":
        seccompExport(arguments.dropFirst())
    default:
        fail("usage: swiftkvm-test-helper seccomp-violation KIND | seccomp-malloc-trim KIND [--raised-threshold] | seccomp-export [--without SYSCALL@KIND] | crash-writer [--seed S] [--count N] [--flush-every K] IMAGE | check-device DEVICE")
    }
} catch {
    fail("\(error)", status: 1)
}
