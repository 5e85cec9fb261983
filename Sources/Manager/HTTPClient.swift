import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import NIOCore
import NIOHTTP1
import NIOPosix

/// One HTTP response: status, headers and the whole body.
public struct HTTPResponse: Sendable {
    /// The status code (200, 204, 400…).
    public var status: Int
    /// The headers, in order.
    public var headers: [(name: String, value: String)]
    /// The body bytes.
    public var body: [UInt8]

    public init(status: Int, headers: [(name: String, value: String)] = [], body: [UInt8] = []) {
        self.status = status
        self.headers = headers
        self.body = body
    }

    /// The body as UTF-8 text.
    public var text: String { String(decoding: body, as: UTF8.self) }

    /// The first header named `name` (case-insensitive).
    public func header(_ name: String) -> String? {
        headers.first { $0.name.lowercased() == name.lowercased() }?.value
    }

    /// The `fault_message` of a Firecracker-style error body, if it has one.
    public var faultMessage: String? {
        JSONValue.object(from: body)?["fault_message"]?.stringValue
    }
}

/// A small HTTP/1.1 client over a Unix socket (SwiftNIO's client codecs, no hand-written HTTP).
///
/// Each request uses its own connection (`Connection: close`), as curl does with `--unix-socket`.
/// The blocking methods must not be called on a NIO event loop thread; use the `async` ones there.
public struct UnixHTTPClient: Sendable {
    /// The socket path.
    public let socketPath: String
    /// The default deadline for connecting and for the whole reply.
    public var timeout: TimeInterval

    private let group: any EventLoopGroup

    /// A client of the server listening on `socketPath`; requests fail after `timeout` seconds.
    public init(socketPath: String, timeout: TimeInterval = 30, group: (any EventLoopGroup)? = nil) {
        self.socketPath = socketPath
        self.timeout = timeout
        self.group = group ?? MultiThreadedEventLoopGroup.singleton
    }

    /// Sends one request and waits for the whole response (blocking).
    ///
    /// - Parameters:
    ///   - method: `GET`, `PUT`, `PATCH`, `POST`, `DELETE`.
    ///   - path: the request target, e.g. `/vms/web1?all=true`.
    ///   - body: the request body (sent with `Content-Type: application/json`), or nil.
    ///   - timeout: overrides the client's deadline.
    /// - Throws: `ManagerError` with kind `.cannotConnect`, `.timeout` or `.transport`.
    public func request(_ method: String, _ path: String, body: [UInt8]? = nil,
                        timeout: TimeInterval? = nil) throws -> HTTPResponse {
        try start(method, path, body: body, timeout: timeout ?? self.timeout, lineHandler: nil).wait()
    }

    /// Sends one request and awaits the whole response.
    public func request(_ method: String, _ path: String, body: [UInt8]? = nil,
                        timeout: TimeInterval? = nil) async throws -> HTTPResponse {
        try await start(method, path, body: body, timeout: timeout ?? self.timeout, lineHandler: nil).get()
    }

    /// Sends a request whose successful (2xx) reply is a stream of lines (`GET /events`'s NDJSON):
    /// `onLine` is called for each complete line, without its newline, as it arrives (on a NIO thread).
    ///
    /// Returns when the server ends the reply, when `onLine` returns false, or when `duration`
    /// seconds have passed (if given); the returned response has the status and headers, and the
    /// body only for a non-2xx reply (an error, not streamed). `connectTimeout` bounds the time
    /// until the response head arrives.
    public func streamLines(_ method: String = "GET", _ path: String, body: [UInt8]? = nil,
                            duration: TimeInterval? = nil, connectTimeout: TimeInterval? = nil,
                            onLine: @escaping @Sendable (String) -> Bool) throws -> HTTPResponse {
        try start(method, path, body: body, timeout: connectTimeout ?? timeout,
                  lineHandler: onLine, duration: duration).wait()
    }

    /// The `async` form of `streamLines`.
    public func streamLines(_ method: String = "GET", _ path: String, body: [UInt8]? = nil,
                            duration: TimeInterval? = nil, connectTimeout: TimeInterval? = nil,
                            onLine: @escaping @Sendable (String) -> Bool) async throws -> HTTPResponse {
        try await start(method, path, body: body, timeout: connectTimeout ?? timeout,
                        lineHandler: onLine, duration: duration).get()
    }

    /// Sends `value` encoded as JSON and decodes a 2xx reply as `T`; a non-2xx reply throws a
    /// `ManagerError` carrying the server's `fault_message`.
    public func json<T: Decodable>(_ method: String, _ path: String, body: (any Encodable)? = nil,
                                   as type: T.Type, timeout: TimeInterval? = nil) throws -> T {
        let bytes = try body.map { Array(try JSONEncoder().encode($0)) }
        let response = try request(method, path, body: bytes, timeout: timeout)
        guard (200..<300).contains(response.status) else {
            throw ManagerError(Self.kind(forStatus: response.status),
                               response.faultMessage ?? "\(method) \(path) on \(socketPath): HTTP \(response.status) \(response.text)")
        }
        do {
            return try JSONDecoder().decode(T.self, from: Data(response.body))
        } catch {
            throw ManagerError(.transport, "\(method) \(path) on \(socketPath): unexpected reply (\(error)): \(response.text.prefix(200))")
        }
    }

    static func kind(forStatus status: Int) -> ManagerError.Kind {
        switch status {
        case 404: return .notFound
        case 409: return .conflict
        case 400..<500: return .invalid
        case 504: return .timeout
        default: return .host
        }
    }

    private func start(_ method: String, _ path: String, body: [UInt8]?, timeout: TimeInterval,
                       lineHandler: (@Sendable (String) -> Bool)?, duration: TimeInterval? = nil) -> EventLoopFuture<HTTPResponse> {
        let loop = group.next()
        let promise = loop.makePromise(of: HTTPResponse.self)
        let socketPath = self.socketPath
        let what = "\(method) \(path) on \(socketPath)"
        guard socketPath.utf8.count < 108 else {
            promise.fail(ManagerError(.cannotConnect, "cannot connect to \(socketPath): the socket path is too long (\(socketPath.utf8.count) bytes, at most 107)"))
            return promise.futureResult
        }
        let handler = ClientResponseHandler(promise: promise, what: what, lineHandler: lineHandler)
        let deadline = TimeAmount.nanoseconds(Int64(max(0, timeout) * 1e9))
        let bootstrap = ClientBootstrap(group: loop)
            .connectTimeout(deadline)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
        bootstrap.connect(unixDomainSocketPath: socketPath).whenComplete { result in
            switch result {
            case .failure(let error):
                promise.fail(ManagerError(.cannotConnect, "cannot connect to \(socketPath): \(Self.describe(error))"))
            case .success(let channel):
                // The head deadline; a streaming reply then runs for `duration` (or until closed).
                let timer = channel.eventLoop.scheduleTask(in: deadline) {
                    handler.timeOut(channel: channel, seconds: timeout)
                }
                if let duration {
                    channel.eventLoop.scheduleTask(in: .nanoseconds(Int64(max(0, duration) * 1e9))) {
                        handler.finishStream(channel: channel)
                    }
                }
                handler.onHead = { timer.cancel() }
                var headers = HTTPHeaders()
                headers.add(name: "Host", value: "localhost")
                headers.add(name: "Accept", value: "application/json")
                headers.add(name: "Connection", value: "close")
                if let body {
                    headers.add(name: "Content-Type", value: "application/json")
                    headers.add(name: "Content-Length", value: String(body.count))
                } else if ["PUT", "POST", "PATCH"].contains(method) {
                    headers.add(name: "Content-Length", value: "0")
                }
                let head = HTTPRequestHead(version: .http1_1, method: HTTPMethod(rawValue: method), uri: path, headers: headers)
                channel.write(HTTPClientRequestPart.head(head), promise: nil)
                if let body, !body.isEmpty {
                    channel.write(HTTPClientRequestPart.body(.byteBuffer(channel.allocator.buffer(bytes: body))), promise: nil)
                }
                channel.writeAndFlush(HTTPClientRequestPart.end(nil)).whenFailure { error in
                    handler.fail(ManagerError(.transport, "\(what): cannot send the request: \(Self.describe(error))"), channel: channel)
                }
                promise.futureResult.whenComplete { _ in
                    timer.cancel()
                    channel.close(promise: nil)
                }
            }
        }
        return promise.futureResult
    }

    static func describe(_ error: any Error) -> String {
        if let e = error as? IOError { return String(cString: strerror(e.errnoCode)) }
        if error is ChannelError, case ChannelError.connectTimeout = error { return "connection timed out" }
        return "\(error)"
    }
}

/// Collects one response (or streams its lines); all state is touched on the channel's loop only.
private final class ClientResponseHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPClientResponsePart

    let promise: EventLoopPromise<HTTPResponse>
    let what: String
    let lineHandler: (@Sendable (String) -> Bool)?
    var onHead: (() -> Void)?
    private var response: HTTPResponse?
    private var pending: [UInt8] = []
    private var done = false

    init(promise: EventLoopPromise<HTTPResponse>, what: String, lineHandler: (@Sendable (String) -> Bool)?) {
        self.promise = promise
        self.what = what
        self.lineHandler = lineHandler
    }

    private var streaming: Bool {
        guard lineHandler != nil, let response else { return false }
        return (200..<300).contains(response.status)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !done else { return }
        switch unwrapInboundIn(data) {
        case .head(let head):
            response = HTTPResponse(status: Int(head.status.code), headers: head.headers.map { ($0.name, $0.value) })
            onHead?()
        case .body(let buffer):
            if streaming {
                pending.append(contentsOf: buffer.readableBytesView)
                deliverLines(context: context)
            } else {
                response?.body.append(contentsOf: buffer.readableBytesView)
            }
        case .end:
            if streaming, !pending.isEmpty, let lineHandler {
                _ = lineHandler(String(decoding: pending, as: UTF8.self))
                pending.removeAll()
            }
            succeed()
            context.close(promise: nil)
        }
    }

    private func deliverLines(context: ChannelHandlerContext) {
        guard let lineHandler else { return }
        while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
            var line = Array(pending[..<newline])
            pending.removeSubrange(...newline)
            if line.last == UInt8(ascii: "\r") { line.removeLast() }
            if !lineHandler(String(decoding: line, as: UTF8.self)) {
                succeed()
                context.close(promise: nil)
                return
            }
        }
    }

    private func succeed() {
        guard !done, let response else { return }
        done = true
        var r = response
        if streaming { r.body = [] }
        promise.succeed(r)
    }

    func fail(_ error: ManagerError, channel: any Channel) {
        channel.eventLoop.execute {
            guard !self.done else { return }
            self.done = true
            self.promise.fail(error)
            channel.close(promise: nil)
        }
    }

    func timeOut(channel: any Channel, seconds: TimeInterval) {
        fail(ManagerError(.timeout, "\(what): no reply within \(seconds) s"), channel: channel)
    }

    /// Ends a streamed reply normally (its duration has passed).
    func finishStream(channel: any Channel) {
        channel.eventLoop.execute {
            if self.response != nil { self.succeed() }
            else if !self.done {
                self.done = true
                self.promise.fail(ManagerError(.timeout, "\(self.what): no reply"))
            }
            channel.close(promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        if streaming {
            succeed()
        } else if !done {
            done = true
            promise.fail(ManagerError(.transport, "\(what): the connection closed before the reply was complete"))
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if !done {
            done = true
            promise.fail(ManagerError(.transport, "\(what): \(UnixHTTPClient.describe(error))"))
        }
        context.close(promise: nil)
    }
}
