import Foundation
import Synchronization
@testable import API
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// A minimal HTTP/1.1 client over a Unix socket for the tests: sends raw bytes, reads the whole
/// reply until the server closes (every request says `Connection: close`), with a receive
/// timeout so that a hung server fails the test instead of hanging it.
struct UnixHTTPClient {
    let path: String

    struct Reply {
        var status: Int
        var headers: [String: String]
        var body: String
        /// The `fault_message` of an error body, if any.
        var fault: String? {
            guard let data = body.data(using: .utf8),
                  let obj = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else { return nil }
            return obj["fault_message"] as? String
        }
        var json: [String: Any]? {
            body.data(using: .utf8).flatMap { try? JSONSerialization.jsonObject(with: $0) as? [String: Any] }
        }
    }

    struct ClientError: Error, CustomStringConvertible { var description: String }

    /// Sends `method path` with `body` (Content-Length set) and returns the parsed reply.
    func send(_ method: String, _ path: String, _ body: String? = nil, extraHeaders: String = "") throws -> Reply {
        var text = "\(method) \(path) HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\(extraHeaders)"
        if let body { text += "Content-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n" }
        text += "\r\n" + (body ?? "")
        let replies = try parse(raw(Array(text.utf8)))
        guard let first = replies.first else { throw ClientError(description: "no reply") }
        return first
    }

    /// Writes `bytes` as is and returns everything the server sent until it closed.
    func raw(_ bytes: [UInt8], timeoutSeconds: Int = 15) throws -> [UInt8] {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw ClientError(description: "socket: \(errno)") }
        defer { close(fd) }
        var tv = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in path.utf8.prefix(p.count - 1).enumerated() { p[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { throw ClientError(description: "connect \(path): \(String(cString: strerror(errno)))") }
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + sent, $0.count - sent) }
            if n <= 0 { break } // the server may close early (e.g. after a 413)
            sent += n
        }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            if n > 0 { out += buf[0..<n]; continue }
            if n == 0 { break }
            if errno == EINTR { continue }
            if errno == EAGAIN || errno == EWOULDBLOCK { throw ClientError(description: "timed out waiting for the server") }
            if errno == ECONNRESET { break }
            throw ClientError(description: "read: \(String(cString: strerror(errno)))")
        }
        return out
    }

    /// Splits a byte stream into replies (Content-Length framed).
    func parse(_ bytes: [UInt8]) throws -> [Reply] {
        var replies: [Reply] = []
        var rest = bytes[...]
        let sep: [UInt8] = [13, 10, 13, 10]
        while !rest.isEmpty {
            guard let end = rest.indices.first(where: { i in
                i + 4 <= rest.endIndex && Array(rest[i..<(i + 4)]) == sep
            }) else { throw ClientError(description: "incomplete reply: \(String(decoding: rest, as: UTF8.self))") }
            let head = String(decoding: rest[rest.startIndex..<end], as: UTF8.self)
            var lines = head.components(separatedBy: "\r\n")
            let statusLine = lines.removeFirst().split(separator: " ")
            guard statusLine.count >= 2, let status = Int(statusLine[1]) else {
                throw ClientError(description: "bad status line in \(head)")
            }
            var headers: [String: String] = [:]
            for l in lines {
                if let c = l.firstIndex(of: ":") {
                    headers[l[..<c].lowercased()] = l[l.index(after: c)...].trimmingCharacters(in: .whitespaces)
                }
            }
            let length = Int(headers["content-length"] ?? "0") ?? 0
            let bodyStart = end + 4
            let bodyEnd = min(bodyStart + length, rest.endIndex)
            replies.append(Reply(status: status, headers: headers,
                                 body: String(decoding: rest[bodyStart..<bodyEnd], as: UTF8.self)))
            rest = rest[bodyEnd...]
        }
        return replies
    }
}

/// A guest stand-in: runs until stopped, counts pauses, resumes and Ctrl+Alt+Del presses.
final class FakeVM: VMInstance, @unchecked Sendable {
    struct Counts { var pauses = 0, resumes = 0, ctrlAltDel = 0 }
    let counts = Mutex(Counts())
    private let exit = Mutex<MachineExit?>(nil)
    let config: VMConfiguration
    /// Disk rate-limit updates this guest was asked for (RateLimitAPITests). Kept per object: a global keyed by
    /// ObjectIdentifier mixed up guests when a freed one's address was reused in a parallel run.
    let diskUpdates = Mutex<[FakeDiskCalls.Update]>([])
    /// Balloon targets (MiB) and polling intervals (s) this guest was asked for (BalloonAPITests).
    let balloonCalls = Mutex<(targets: [UInt32], intervals: [UInt32])>(([], []))

    init(config: VMConfiguration) { self.config = config }

    func runToCompletion() -> MachineExit {
        while true {
            if let e = exit.withLock({ $0 }) { return e }
            usleep(1000)
        }
    }
    func stop(_ e: MachineExit) { exit.withLock { if $0 == nil { $0 = e } } }
    func pause(timeoutMs: Int) throws { counts.withLock { $0.pauses += 1 } }
    func resume() { counts.withLock { $0.resumes += 1 } }
    func sendCtrlAltDel() throws {
        counts.withLock { $0.ctrlAltDel += 1 }
        stop(.reset) // as a Linux guest with reboot=k would
    }
    var metrics: MachineMetrics {
        MachineMetrics(exits: ["io": 10, "hlt": 2], vcpuTimeUs: [0: 1234], serialTransmittedBytes: 7,
                       serialDroppedInputBytes: 0, unhandledIO: 1, unhandledMMIO: 0)
    }
}

/// A temporary directory removed by `cleanup()`.
struct TempDir {
    let path: String
    init() {
        path = NSTemporaryDirectory() + "swk-api-" + String(UInt64.random(in: 0...UInt64.max), radix: 36)
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func file(_ name: String, contents: String = "") -> String {
        let p = path + "/" + name
        _ = FileManager.default.createFile(atPath: p, contents: Data(contents.utf8))
        return p
    }
    func cleanup() { try? FileManager.default.removeItem(atPath: path) }
}

/// A server with a controller whose guests are `FakeVM`s, on a fresh socket.
final class FakeServerFixture: @unchecked Sendable {
    let dir = TempDir()
    let socket: String
    let controller: VMController
    let server: APIServer
    let client: UnixHTTPClient
    let built = Locked<[FakeVM]>([])
    let exits = Locked<[MachineExit]>([])
    /// A readable file to use as a kernel.
    let kernel: String

    init(maxBodySize: Int = APIServer.defaultMaxBodySize, transport: VirtioTransportKind = .mmio) throws {
        socket = "/tmp/swk-\(String(UInt32.random(in: 0...UInt32.max), radix: 36)).sock"
        kernel = dir.file("vmlinux", contents: "not really a kernel")
        var options = VMController.Options()
        options.instanceID = "test-vm"
        options.metricsInterval = 0
        options.defaultSerial = .none
        options.virtioTransport = transport
        let built = self.built, exits = self.exits
        options.builder = { config, _, _, _ in
            let vm = FakeVM(config: config)
            built.withLock { $0.append(vm) }
            return vm
        }
        options.onExit = { e in exits.withLock { $0.append(e) } }
        controller = VMController(options: options)
        server = APIServer(socketPath: socket, controller: controller, maxBodySize: maxBodySize)
        try server.start()
        client = UnixHTTPClient(path: socket)
    }

    func send(_ method: String, _ path: String, _ body: String? = nil) throws -> UnixHTTPClient.Reply {
        try client.send(method, path, body)
    }

    /// Configures a kernel and starts the (fake) guest.
    func start() throws {
        _ = try send("PUT", "/boot-source", #"{"kernel_image_path": "\#(kernel)"}"#)
        let r = try send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#)
        guard r.status == 204 else { throw UnixHTTPClient.ClientError(description: "InstanceStart: \(r.status) \(r.body)") }
    }

    func shutdown() {
        built.withLock { $0 }.forEach { $0.stop(.powerOff) }
        server.stop()
        dir.cleanup()
    }
}

/// A Mutex in a class, so closures can share it.
final class Locked<T: Sendable>: Sendable {
    private let mutex: Mutex<T>
    init(_ value: T) { mutex = Mutex(value) }
    func withLock<R>(_ body: (inout T) -> R) -> R { mutex.withLock { body(&$0) } }
}
