import Devices
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import NIOCore
import NIOHTTP1
import NIOPosix
import Virtio

/// The HTTP/1.1 API server on a Unix socket (SwiftNIO), as Firecracker's `--api-sock`.
///
/// Requests are parsed by NIO's HTTP/1 decoder; bodies are limited to `maxBodySize` bytes
/// (Firecracker's default 51200): a larger body gets 413 and the connection is closed. Parsing
/// into an `APIRequest` happens on the event loop; the controller runs on a dedicated serial
/// thread ("api-vmm"), never on the event loop. Malformed HTTP gets NIO's 400 and a close.
///
/// Connections are bounded (`APIConnectionLimits`): at most `maxConnections` stay open (a new one closes the
/// connection idle longest), and one without a request in progress for `idleTimeout` is closed, so a flood of idle
/// clients neither exhausts the process's descriptors nor keeps others out.
public final class APIServer: @unchecked Sendable {
    /// Firecracker's default API payload limit.
    public static let defaultMaxBodySize = 51_200

    public let socketPath: String
    public let controller: VMController
    public let maxBodySize: Int
    /// The connection bounds.
    public let limits: APIConnectionLimits
    /// The socket's permission bits (owner-only by default).
    public let socketMode: mode_t
    private let group: MultiThreadedEventLoopGroup
    private var channel: (any Channel)?
    /// The controller's thread ("api-vmm"): started here, by the still unconfined main thread, so that it
    /// can build the machine at InstanceStart; it confines itself as a `vmm` thread once the guest started.
    private let queue = IOWorkerPool(threads: 1, name: "api-vmm", kind: nil)

    public init(socketPath: String, controller: VMController, maxBodySize: Int = defaultMaxBodySize,
                limits: APIConnectionLimits = APIConnectionLimits(), socketMode: mode_t = 0o600) {
        self.socketPath = socketPath
        self.controller = controller
        self.maxBodySize = maxBodySize
        self.limits = limits
        self.socketMode = socketMode
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    }

    /// Binds the socket. Fails with a clear `APIError` (status 500) when the path exists or
    /// cannot be bound.
    public func start() throws {
        var st = stat()
        if lstat(socketPath, &st) == 0 {
            throw APIError(status: 500, "the API socket path \(socketPath) already exists (another VMM, or a stale socket: remove it)")
        }
        guard socketPath.utf8.count < 108 else {
            throw APIError(status: 500, "the API socket path \(socketPath) is too long (\(socketPath.utf8.count) bytes, at most 107)")
        }
        let controller = self.controller, maxBody = maxBodySize, queue = self.queue
        let tracker = APIConnectionTracker(limit: limits.maxConnections)
        let idle = limits.idleTimeout
        let bootstrap = ServerBootstrap(group: group)
            // The event loop confines itself (seccomp `api` filter) before it binds and accepts anything.
            .serverChannelInitializer { channel in
                Seccomp.confineCurrentThread(.api)
                return channel.eventLoop.makeSucceededVoidFuture()
            }
            .serverChannelOption(ChannelOptions.backlog, value: 64)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    tracker.admit(channel)
                    try channel.pipeline.syncOperations.addHandler(IdleStateHandler(readTimeout: idle))
                    // Protocol errors reach APIHTTPHandler.errorCaught, which answers with a fault_message.
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: false)
                    try channel.pipeline.syncOperations.addHandler(
                        APIHTTPHandler(controller: controller, maxBodySize: maxBody, queue: queue, tracker: tracker))
                }
            }
        // The socket is the VM's control: owner only (0600, or `socketMode`), whatever the umask. It is bound in a fresh private
        // directory (mkdtemp, 0700) beside its path, made 0600, then linked into place (the path must not exist),
        // so no client can reach it while it is more open. (Not umask: it is process-wide, and a library's
        // caller may be creating files on other threads.) A path too long for that binds in place, then chmods.
        let slash = socketPath.lastIndex(of: "/")
        let parent = slash.map { String(socketPath[..<$0]) } ?? "."
        var template = Array((parent.isEmpty ? "/" : parent).utf8CString.dropLast()) + Array("/.swiftkvm-api-XXXXXX".utf8CString)
        let stagingDir: String? = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) != nil ? String(cString: $0.baseAddress!) : nil }
        let staging = stagingDir.map { $0 + "/s" }
        let useStaging = staging.map { $0.utf8.count < 108 } ?? false
        defer { if let stagingDir { rmdir(stagingDir) } }
        do {
            channel = try bootstrap.bind(unixDomainSocketPath: useStaging ? staging! : socketPath, cleanupExistingSocketFile: false).wait()
        } catch {
            if let staging { unlink(staging) }
            throw APIError(status: 500, "cannot bind the API socket \(socketPath): \(error)")
        }
        let bound = useStaging ? staging! : socketPath
        guard chmod(bound, socketMode) == 0 else {
            let e = errno
            try? channel?.close().wait()
            channel = nil
            unlink(bound)
            throw APIError(status: 500, "cannot set the mode of the API socket \(socketPath) to \(String(socketMode, radix: 8)): \(String(cString: strerror(e)))")
        }
        if useStaging {
            let linked = link(bound, socketPath) == 0
            let e = errno
            unlink(bound)
            guard linked else {
                try? channel?.close().wait()
                channel = nil
                throw APIError(status: 500, "cannot bind the API socket \(socketPath): \(String(cString: strerror(e)))")
            }
        }
    }

    /// Closes the socket, removes its path and stops the event loop. With `exiting` (the process exits next) the
    /// event loop is left running: NIO's graceful shutdown calls back through a Dispatch thread that the API
    /// thread's seccomp filter does not allow it to create.
    public func stop(exiting: Bool = false) {
        try? channel?.close().wait()
        channel = nil
        unlink(socketPath)
        if !exiting { try? group.syncShutdownGracefully() }
    }
}

/// One connection's request handler: collects the body (bounded), parses, dispatches, replies.
final class APIHTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let controller: VMController
    let maxBodySize: Int
    let queue: IOWorkerPool
    let tracker: APIConnectionTracker?
    private var head: HTTPRequestHead?
    private var body: ByteBuffer?
    private var rejected = false
    private var answeredParseError = false
    /// Requests dispatched and not yet answered.
    private var inFlight = 0

    init(controller: VMController, maxBodySize: Int, queue: IOWorkerPool, tracker: APIConnectionTracker? = nil) {
        self.controller = controller
        self.maxBodySize = maxBodySize
        self.queue = queue
        self.tracker = tracker
    }

    /// A connection that sent nothing for the idle timeout is closed, unless it waits for an answer.
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            if inFlight == 0 { context.close(promise: nil) }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        tracker?.touch(context.channel, busy: inFlight > 0 || head != nil)
        switch unwrapInboundIn(data) {
        case .head(let h):
            head = h
            body = nil
            rejected = false
            if let length = h.headers.first(name: "content-length").flatMap({ Int($0) }), length > maxBodySize {
                reject(context: context, size: length)
            }
        case .body(var part):
            guard !rejected else { return }
            let size = (body?.readableBytes ?? 0) + part.readableBytes
            if size > maxBodySize {
                reject(context: context, size: size)
                return
            }
            if body == nil { body = part } else { body!.writeBuffer(&part) }
        case .end:
            guard !rejected, let head else { return }
            self.head = nil
            let bytes = body.map { Array($0.readableBytesView) }
            body = nil
            dispatch(context: context, head: head, body: bytes)
        }
    }

    /// 413 for a body over the limit; the rest of the request is not read.
    private func reject(context: ChannelHandlerContext, size: Int) {
        rejected = true
        let error = APIError(status: 413, "Request payload with size \(size) is larger than the limit of \(maxBodySize) allowed by server.")
        write(context: context, status: error.status, body: error.jsonBody, keepAlive: false)
    }

    private func dispatch(context: ChannelHandlerContext, head: HTTPRequestHead, body: [UInt8]?) {
        let keepAlive = head.isKeepAlive
        let request: APIRequest
        do {
            request = try APIRequest.parse(method: head.method.rawValue, uri: head.uri, body: body)
        } catch {
            controller.metrics.countParseFailure(method: head.method.rawValue, uri: head.uri)
            write(context: context, status: error.status, body: error.jsonBody, keepAlive: keepAlive)
            return
        }
        let promise = context.eventLoop.makePromise(of: Result<APIResponse, APIError>.self)
        let controller = self.controller
        inFlight += 1
        tracker?.touch(context.channel, busy: true)
        queue.submit { promise.succeed(controller.handle(request)) }
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        promise.futureResult.whenSuccess { result in
            let (handler, context) = bound.value
            handler.inFlight -= 1
            handler.tracker?.touch(context.channel, busy: handler.inFlight > 0)
            switch result {
            case .success(let r): handler.write(context: context, status: r.status, body: r.body, keepAlive: keepAlive)
            case .failure(let e): handler.write(context: context, status: e.status, body: e.jsonBody, keepAlive: keepAlive)
            }
        }
    }

    private func write(context: ChannelHandlerContext, status: Int, body: [UInt8], keepAlive: Bool) {
        var headers = HTTPHeaders()
        headers.add(name: "Server", value: "SwiftKVM")
        if !body.isEmpty { headers.add(name: "Content-Type", value: "application/json") }
        headers.add(name: "Content-Length", value: String(body.count))
        if !keepAlive { headers.add(name: "Connection", value: "close") }
        let head = HTTPResponseHead(version: .http1_1, status: HTTPResponseStatus(statusCode: status), headers: headers)
        context.write(wrapOutboundOut(.head(head)), promise: nil)
        if !body.isEmpty {
            var buffer = context.channel.allocator.buffer(capacity: body.count)
            buffer.writeBytes(body)
            context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
        }
        let done = context.writeAndFlushWithFuture(wrapOutboundOut(.end(nil)))
        if !keepAlive {
            let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
            done.whenComplete { _ in bound.value.close(promise: nil) }
        }
    }

    /// A request NIO's HTTP parser refuses (a garbage request line, an unknown method, an oversized URL or header,
    /// a bad Content-Length) gets a 400 with Firecracker's `fault_message` naming the problem, then the connection
    /// closes; other errors close it.
    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let parse = error as? HTTPParserError, !answeredParseError {
            answeredParseError = true
            let e = APIError.badRequest("Invalid HTTP request: \(Self.describe(parse)).")
            write(context: context, status: e.status, body: e.jsonBody, keepAlive: false)
            return
        }
        context.close(promise: nil)
    }

    static func describe(_ e: HTTPParserError) -> String {
        switch e {
        case .invalidMethod: return "unknown method"
        case .invalidURL: return "invalid URL"
        case .headerOverflow: return "the request line or headers are too long"
        case .invalidContentLength: return "invalid Content-Length"
        case .unexpectedContentLength: return "unexpected Content-Length"
        case .invalidVersion: return "invalid HTTP version"
        case .invalidHeaderToken, .invalidConstant: return "malformed request line or header"
        default: return "\(e)"
        }
    }
}

/// Bounds on the API's connections.
public struct APIConnectionLimits: Sendable, Equatable {
    /// At most this many connections stay open; to admit another, the one idle longest (and not waiting for an
    /// answer) is closed.
    public var maxConnections: Int
    /// A connection that sends nothing for this long while no request of it is in progress is closed.
    public var idleTimeout: TimeAmount

    /// The default idle timeout is long (Firecracker never closes idle API connections; keep-alive clients reuse
    /// theirs), the cap is what protects against floods.
    public init(maxConnections: Int = 64, idleTimeout: TimeAmount = .seconds(300)) {
        self.maxConnections = max(1, maxConnections)
        self.idleTimeout = idleTimeout
    }

    /// The daemon's defaults: more clients (the CLI, event streams) than one VM's API has.
    public static let daemon = APIConnectionLimits(maxConnections: 256)
    /// The values the command-line options accept.
    public static let connectionRange = 1...100_000
    public static let idleSecondsRange = 1...86_400

    /// The usage error for command-line values outside `connectionRange` or `idleSecondsRange`, naming the option.
    public static func optionError(maxConnections: Int, connectionsOption: String, idleSeconds: Int, idleOption: String) -> String? {
        if !connectionRange.contains(maxConnections) {
            return "invalid \(connectionsOption) \(maxConnections): expected \(connectionRange.lowerBound) to \(connectionRange.upperBound)"
        }
        if !idleSecondsRange.contains(idleSeconds) {
            return "invalid \(idleOption) \(idleSeconds): expected \(idleSecondsRange.lowerBound) to \(idleSecondsRange.upperBound) seconds"
        }
        return nil
    }
}

/// The open connections of a one-event-loop NIO server (the API's, the daemon's), with when each was last active
/// and whether it is busy (waits for an answer, or streams). Used only on that event loop (NIO calls every method
/// there), hence unchecked.
public final class APIConnectionTracker: @unchecked Sendable {
    private struct Entry {
        let channel: any Channel
        var lastActive: NIODeadline
        var busy: Bool
    }
    private let limit: Int
    private var entries: [ObjectIdentifier: Entry] = [:]

    public init(limit: Int) { self.limit = limit }

    /// A new connection: when the limit is reached, the connection idle longest is closed first (a busy one only
    /// when every one is busy, the oldest of them).
    public func admit(_ channel: any Channel) {
        if entries.count >= limit {
            let idle = entries.values.filter { !$0.busy }
            if let victim = (idle.isEmpty ? Array(entries.values) : idle).min(by: { $0.lastActive < $1.lastActive }) {
                entries[ObjectIdentifier(victim.channel)] = nil
                victim.channel.close(promise: nil)
            }
        }
        let id = ObjectIdentifier(channel)
        entries[id] = Entry(channel: channel, lastActive: .now(), busy: false)
        let loopBound = NIOLoopBound(self, eventLoop: channel.eventLoop)
        channel.closeFuture.whenComplete { _ in loopBound.value.entries[id] = nil }
    }

    /// Records activity on `channel`.
    public func touch(_ channel: any Channel, busy: Bool) {
        let id = ObjectIdentifier(channel)
        guard entries[id] != nil else { return }
        entries[id]!.lastActive = .now()
        entries[id]!.busy = busy
    }
}

extension ChannelHandlerContext {
    func writeAndFlushWithFuture(_ data: NIOAny) -> EventLoopFuture<Void> {
        let p = eventLoop.makePromise(of: Void.self)
        writeAndFlush(data, promise: p)
        return p.futureResult
    }
}
