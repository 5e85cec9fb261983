import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import NIOCore
import NIOHTTP1
import NIOPosix

/// The daemon's HTTP/1.1 API on its Unix socket (SwiftNIO; see the manager contract).
///
/// Requests are decoded by NIO's HTTP/1 server codec; bodies over `maxBodySize` get 413.
/// Actions run on a concurrent dispatch queue (they block: a shutdown waits for the guest),
/// never on the event loop. `GET /events` keeps the connection and streams NDJSON in chunks.
public final class DaemonServer: @unchecked Sendable {
    /// The largest request body (a definition).
    public static let maxBodySize = 1 << 20

    public let socketPath: String
    let manager: VMManager
    let version: String
    private let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    /// Where requests run: they block (a start waits for its vmm, a shutdown for the guest), so on
    /// real threads, as many as libvirtd's default `max_workers`. (A Dispatch concurrent queue
    /// runs only about as many blocking items as there are cores: with 5 starts at once on 2
    /// cores, 2 of them waited for the first ones to finish.)
    private let workers = NIOThreadPool(numberOfThreads: DaemonServer.workerCount)
    /// Requests handled at once; more wait in order.
    public static let workerCount = 20
    private var channel: (any Channel)?
    /// Connection bounds: at most `maxConnections` open (a new one closes the connection idle longest; event
    /// streams and requests in progress last), and one silent for `idleTimeout` with nothing in progress is closed.
    public let limits: APIConnectionLimits

    public init(socketPath: String, manager: VMManager, version: String,
                limits: APIConnectionLimits = .daemon) {
        self.socketPath = socketPath
        self.manager = manager
        self.version = version
        self.limits = limits
    }

    /// Binds the socket (a stale socket is replaced: the caller holds the daemon lock; any other
    /// file at the path is an error).
    public func start() throws(ManagerError) {
        guard socketPath.utf8.count < 108 else {
            throw ManagerError(.invalid, "the daemon socket path \(socketPath) is too long (\(socketPath.utf8.count) bytes, at most 107): use a shorter --state-dir or --socket")
        }
        var st = stat()
        if lstat(socketPath, &st) == 0 {
            guard (st.st_mode & S_IFMT) == S_IFSOCK else {
                throw ManagerError(.invalid, "the daemon socket path \(socketPath) exists and is not a socket")
            }
            unlink(socketPath) // stale: the caller holds the daemon lock
        }
        let router = DaemonRouter(manager: manager, version: version)
        let workers = self.workers
        workers.start()
        let tracker = APIConnectionTracker(limit: limits.maxConnections)
        let idle = limits.idleTimeout
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 64)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    tracker.admit(channel)
                    try channel.pipeline.syncOperations.addHandler(IdleStateHandler(readTimeout: idle))
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(DaemonHTTPHandler(router: router, workers: workers, tracker: tracker))
                }
            }
        do {
            channel = try bootstrap.bind(unixDomainSocketPath: socketPath).wait()
        } catch {
            throw ManagerError(.host, "cannot bind the daemon socket \(socketPath): \(UnixHTTPClient.describe(error))")
        }
        chmod(socketPath, 0o660)
    }

    /// Closes the socket and every connection, removes the socket file.
    public func stop() {
        try? channel?.close().wait()
        channel = nil
        unlink(socketPath)
        try? group.syncShutdownGracefully()
        // Not waited for: a request still running (a start waiting for its vmm) must not hold up the stop.
        workers.shutdownGracefully { _ in }
    }
}

/// A reply: status and JSON body (empty for 204).
struct DaemonReply: Sendable {
    var status: Int
    var body: [UInt8]

    static func json<T: Encodable>(_ status: Int, _ value: T) -> DaemonReply {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return DaemonReply(status: status, body: Array((try? e.encode(value)) ?? Data()))
    }

    static func error(_ e: ManagerError) -> DaemonReply { fault(e.status, e.message) }

    static func fault(_ status: Int, _ message: String) -> DaemonReply {
        json(status, ["fault_message": message])
    }
}

/// Maps requests to manager calls.
struct DaemonRouter: Sendable {
    let manager: VMManager
    let version: String

    /// A parsed request target: path segments and query items.
    struct Target {
        var segments: [String]
        var query: [String: String]
        /// `text` with %XX escapes decoded; unchanged when an escape is malformed or the result is not UTF-8.
        static func percentDecoded(_ text: String) -> String {
            guard text.contains("%") else { return text }
            var bytes: [UInt8] = []
            var utf8 = text.utf8[...]
            while let b = utf8.first {
                utf8 = utf8.dropFirst()
                guard b == UInt8(ascii: "%") else { bytes.append(b); continue }
                guard utf8.count >= 2, let v = UInt8(String(decoding: utf8.prefix(2), as: UTF8.self), radix: 16) else { return text }
                bytes.append(v)
                utf8 = utf8.dropFirst(2)
            }
            return String(validating: bytes, as: UTF8.self) ?? text
        }

        init(_ uri: String) {
            let parts = uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
            segments = parts[0].split(separator: "/").map { Self.percentDecoded(String($0)) }
            query = [:]
            if parts.count > 1 {
                for item in parts[1].split(separator: "&") {
                    let kv = item.split(separator: "=", maxSplits: 1)
                    query[String(kv[0])] = kv.count > 1 ? Self.percentDecoded(String(kv[1])) : ""
                }
            }
        }
    }

    /// Handles every request except `GET /events`.
    func handle(method: String, uri: String, body: [UInt8]) -> DaemonReply {
        let t = Target(uri)
        do throws(ManagerError) {
            switch (method, t.segments.count) {
            case ("GET", 0):
                return .json(200, DaemonInfo(version: version, pid: Int(getpid()), stateDir: manager.paths.root))
            case ("GET", 1) where t.segments[0] == "vms":
                let all = ["true", "1", ""].contains(t.query["all"] ?? "false")
                return .json(200, manager.list(all: all))
            case ("POST", 1) where t.segments[0] == "vms":
                let (info, replaced) = try manager.define(body)
                return .json(replaced ? 200 : 201, info)
            case ("POST", 2) where t.segments[0] == "vms" && t.segments[1] == "restore":
                struct Body: Decodable { var path: String }
                let b: Body = try decode(Body.self, body, keys: ["path"])
                return .json(200, try manager.restore(from: b.path))
            case ("GET", 2) where t.segments[0] == "vms":
                return .json(200, try manager.info(t.segments[1]))
            case ("DELETE", 2) where t.segments[0] == "vms":
                try manager.undefine(t.segments[1])
                return DaemonReply(status: 204, body: [])
            case ("PUT", 3) where t.segments[0] == "vms" && t.segments[2] == "state":
                return try changeState(t.segments[1], body)
            case ("PUT", 3) where t.segments[0] == "vms" && t.segments[2] == "autostart":
                struct Body: Decodable { var autostart: Bool }
                let b: Body = try decode(Body.self, body, keys: ["autostart"])
                return .json(200, try manager.setAutostart(t.segments[1], b.autostart))
            case ("PUT", 3) where t.segments[0] == "vms" && t.segments[2] == "memory":
                struct Body: Decodable { var current_mib: Int }
                let b: Body = try decode(Body.self, body, keys: ["current_mib"])
                return .json(200, try manager.setMemory(t.segments[1], currentMiB: b.current_mib))
            case ("POST", 3) where t.segments[0] == "vms" && t.segments[2] == "clone":
                struct Body: Decodable { var name: String }
                let b: Body = try decode(Body.self, body, keys: ["name"])
                return .json(201, try manager.clone(t.segments[1], as: b.name))
            case (_, 1...3) where t.segments[0] == "networks":
                return try handleNetwork(method: method, t, body)
            default:
                if knownPath(t) {
                    return .fault(405, "method \(method) is not allowed on \(t.segments.isEmpty ? "/" : "/" + t.segments.joined(separator: "/"))")
                }
                return .fault(404, "no such path: \(uri)")
            }
        } catch {
            return .error(error)
        }
    }

    func knownPath(_ t: Target) -> Bool {
        switch t.segments.count {
        case 0: return true
        case 1: return t.segments[0] == "vms" || t.segments[0] == "events" || t.segments[0] == "networks"
        case 2: return t.segments[0] == "vms"
        case 3: return t.segments[0] == "vms" && ["state", "autostart", "memory", "clone"].contains(t.segments[2])
        default: return false
        }
    }

    /// `/networks…`: libvirt's net-* verbs.
    func handleNetwork(method: String, _ t: Target, _ body: [UInt8]) throws(ManagerError) -> DaemonReply {
        let nets = manager.networks
        let s = t.segments
        switch (method, s.count) {
        case ("GET", 1):
            let all = ["true", "1", ""].contains(t.query["all"] ?? "false")
            return .json(200, nets.list(all: all))
        case ("POST", 1):
            let (info, replaced) = try nets.define(body)
            return .json(replaced ? 200 : 201, info)
        case ("GET", 2):
            return .json(200, try nets.info(s[1]))
        case ("DELETE", 2):
            try nets.undefine(s[1])
            return DaemonReply(status: 204, body: [])
        case ("PUT", 3) where s[2] == "state":
            struct Body: Decodable { var action: String }
            let b: Body = try decode(Body.self, body, keys: ["action"])
            switch b.action {
            case "start": return .json(200, try nets.start(s[1]))
            case "stop": return .json(200, try nets.stop(s[1]))
            default: throw ManagerError(.invalid, "unknown action `\(b.action)` (key `action`), expected `start` or `stop`")
            }
        case ("PUT", 3) where s[2] == "autostart":
            struct Body: Decodable { var autostart: Bool }
            let b: Body = try decode(Body.self, body, keys: ["autostart"])
            return .json(200, try nets.setAutostart(s[1], b.autostart))
        case ("GET", 3) where s[2] == "leases":
            return .json(200, try nets.leases(s[1]))
        default:
            let known = s.count <= 2 || ["state", "autostart", "leases"].contains(s[2])
            let path = "/" + s.joined(separator: "/")
            return known ? .fault(405, "method \(method) is not allowed on \(path)") : .fault(404, "no such path: \(path)")
        }
    }

    /// Decodes a small JSON body strictly: only `keys` allowed, errors name the key.
    func decode<T: Decodable>(_ type: T.Type, _ body: [UInt8], keys: [String]) throws(ManagerError) -> T {
        guard let object = JSONValue.object(from: body) else {
            throw ManagerError(.invalid, "the request body must be a JSON object")
        }
        for k in object.keys.sorted() where !keys.contains(k) {
            throw ManagerError(.invalid, "unknown key `\(k)` in the request body, expected one of \(keys.map { "`\($0)`" }.joined(separator: ", "))")
        }
        do {
            return try JSONDecoder().decode(T.self, from: Data(body))
        } catch let e as DecodingError {
            throw ManagerError(.invalid, "invalid request body: " + API.StrictJSON.describe(e).replacing("field `", with: "key `"))
        } catch {
            throw ManagerError(.invalid, "invalid request body: \(error)")
        }
    }

    func changeState(_ name: String, _ body: [UInt8]) throws(ManagerError) -> DaemonReply {
        struct Body: Decodable {
            var action: String
            var timeout_s: Double?
            var path: String?
            var destination: String?
            var max_downtime_ms: Int?
        }
        let b: Body = try decode(Body.self, body, keys: ["action", "timeout_s", "path", "destination", "max_downtime_ms"])
        if b.action == "migrate" {
            guard let destination = b.destination else { throw ManagerError(.invalid, "action `migrate` needs key `destination` (unix:PATH or tcp:HOST:PORT)") }
            return DaemonReply(status: 200, body: try manager.migrate(name, to: destination, maxDowntimeMs: b.max_downtime_ms))
        }
        guard b.destination == nil, b.max_downtime_ms == nil else {
            throw ManagerError(.invalid, "keys `destination` and `max_downtime_ms` are only for action `migrate`")
        }
        guard (b.action == "save") == (b.path != nil) else {
            throw ManagerError(.invalid, b.action == "save" ? "action `save` needs key `path` (the snapshot directory)" : "key `path` is only for action `save`")
        }
        if let t = b.timeout_s, !(0...86_400).contains(t) {
            throw ManagerError(.invalid, "key `timeout_s` must be from 0 to 86400 seconds, not \(t)")
        }
        let info: VMInfo
        switch b.action {
        case "start": info = try manager.start(name)
        case "shutdown": info = try manager.shutdown(name, timeout: b.timeout_s)
        case "destroy": info = try manager.destroy(name)
        case "pause": info = try manager.pause(name)
        case "resume": info = try manager.resume(name)
        case "save": info = try manager.save(name, to: b.path ?? "")
        default:
            throw ManagerError(.invalid, "unknown action `\(b.action)` (key `action`), expected one of `start`, `shutdown`, `destroy`, `pause`, `resume`, `save`, `migrate`")
        }
        return .json(200, info)
    }
}

import API

/// One connection: collects a request (bounded), dispatches it, replies; or streams events.
final class DaemonHTTPHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let router: DaemonRouter
    private var head: HTTPRequestHead?
    private var body: [UInt8] = []
    private var rejected = false
    private var subscription: UInt64?
    private let workers: NIOThreadPool
    private let tracker: APIConnectionTracker?
    /// Requests dispatched and not yet answered.
    private var inFlight = 0
    /// Whether the connection has something in progress: a request, an answer due, or an event stream.
    private var busy: Bool { inFlight > 0 || head != nil || subscription != nil }

    init(router: DaemonRouter, workers: NIOThreadPool, tracker: APIConnectionTracker? = nil) {
        self.router = router
        self.workers = workers
        self.tracker = tracker
    }

    /// A connection silent for the idle timeout is closed unless something is in progress on it.
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            if !busy { context.close(promise: nil) }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        tracker?.touch(context.channel, busy: busy)
        switch unwrapInboundIn(data) {
        case .head(let h):
            guard subscription == nil else {
                // A request after GET /events on the same connection: the stream owns it.
                context.close(promise: nil)
                return
            }
            head = h
            body = []
            rejected = false
            if let n = h.headers.first(name: "content-length").flatMap({ Int($0) }), n > DaemonServer.maxBodySize {
                reject(context: context, size: n)
            }
        case .body(let part):
            guard !rejected else { return }
            if body.count + part.readableBytes > DaemonServer.maxBodySize {
                reject(context: context, size: body.count + part.readableBytes)
                return
            }
            body += part.readableBytesView
        case .end:
            guard !rejected, let head else { return }
            self.head = nil
            let path = head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.uri
            if head.method == .GET && (path == "/events" || path == "/events/") {
                streamEvents(context: context, uri: head.uri)
                return
            }
            let router = self.router, method = head.method.rawValue, uri = head.uri, bytes = body
            let keepAlive = head.isKeepAlive
            body = []
            inFlight += 1
            tracker?.touch(context.channel, busy: true)
            let reply = workers.runIfActive(eventLoop: context.eventLoop) {
                router.handle(method: method, uri: uri, body: bytes)
            }
            let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            reply.whenComplete { _ in
                let (handler, context) = bound.value
                handler.inFlight -= 1
                handler.tracker?.touch(context.channel, busy: handler.busy)
            }
            reply.whenSuccess { reply in
                let (handler, context) = bound.value
                handler.write(context: context, reply, keepAlive: keepAlive)
            }
        }
    }

    private func reject(context: ChannelHandlerContext, size: Int) {
        rejected = true
        write(context: context, .fault(413, "the request body (\(size) bytes) is larger than the limit of \(DaemonServer.maxBodySize) bytes"), keepAlive: false)
    }

    private func write(context: ChannelHandlerContext, _ reply: DaemonReply, keepAlive: Bool) {
        var headers = HTTPHeaders()
        headers.add(name: "Server", value: "swiftkvm-daemon")
        if !reply.body.isEmpty { headers.add(name: "Content-Type", value: "application/json") }
        headers.add(name: "Content-Length", value: String(reply.body.count))
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: HTTPResponseStatus(statusCode: reply.status), headers: headers))), promise: nil)
        if !reply.body.isEmpty {
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: reply.body)))), promise: nil)
        }
        let p = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: p)
        if !keepAlive {
            let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
            p.futureResult.whenComplete { _ in bound.value.close(promise: nil) }
        }
    }

    /// `GET /events[?since=SEQ]`: a chunked NDJSON stream until the client goes away.
    private func streamEvents(context: ChannelHandlerContext, uri: String) {
        let t = DaemonRouter.Target(uri)
        var since: UInt64?
        if let s = t.query["since"] {
            guard let n = UInt64(s) else {
                write(context: context, .fault(400, "invalid query `since`: '\(s)' is not a sequence number"), keepAlive: false)
                return
            }
            since = n
        }
        var headers = HTTPHeaders()
        headers.add(name: "Server", value: "swiftkvm-daemon")
        headers.add(name: "Content-Type", value: "application/x-ndjson")
        headers.add(name: "Transfer-Encoding", value: "chunked")
        context.writeAndFlush(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .ok, headers: headers))), promise: nil)
        let channel = context.channel
        let send: @Sendable (VMEvent) -> Void = { event in
            let line = event.jsonLine
            channel.eventLoop.execute {
                guard channel.isActive else { return }
                // A client that stops reading is dropped rather than buffered without bound.
                guard channel.isWritable else {
                    channel.close(promise: nil)
                    return
                }
                channel.writeAndFlush(HTTPServerResponsePart.body(.byteBuffer(channel.allocator.buffer(bytes: line))), promise: nil)
            }
        }
        let (id, replay) = router.manager.events.subscribe(since: since, send)
        subscription = id
        tracker?.touch(channel, busy: true)
        for e in replay { send(e) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        if let subscription { router.manager.events.unsubscribe(subscription) }
        subscription = nil
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
