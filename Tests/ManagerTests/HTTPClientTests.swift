import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing
@testable import Manager

/// A real NIO HTTP server on a Unix socket for the client tests:
/// `/echo` answers with the method, path and body; `/status/N` answers N with a fault body;
/// `/lines` streams three NDJSON lines in separate chunks (one split mid-line) then ends;
/// `/forever` streams one line and keeps the connection open; `/silent` never answers.
final class TestHTTPServer: @unchecked Sendable {
    let path: String
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    var channel: (any Channel)?

    init() throws {
        path = try makeShortTempDir() + "/t.sock"
        channel = try ServerBootstrap(group: group)
            .childChannelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.configureHTTPServerPipeline()
                    try ch.pipeline.syncOperations.addHandler(Handler())
                }
            }
            .bind(unixDomainSocketPath: path).wait()
    }

    func stop() {
        try? channel?.close().wait()
        try? group.syncShutdownGracefully()
        try? FileManager.default.removeItem(atPath: (path as NSString).deletingLastPathComponent)
    }

    final class Handler: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        var head: HTTPRequestHead?
        var body: [UInt8] = []

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h): head = h; body = []
            case .body(let b): body += b.readableBytesView
            case .end:
                guard let head else { return }
                respond(context: context, head: head)
            }
        }

        func send(_ context: ChannelHandlerContext, _ status: Int, _ text: String, chunked: Bool = false) {
            var headers = HTTPHeaders()
            if !chunked { headers.add(name: "Content-Length", value: String(text.utf8.count)) }
            else { headers.add(name: "Transfer-Encoding", value: "chunked") }
            headers.add(name: "X-Test", value: "yes")
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .init(statusCode: status), headers: headers))), promise: nil)
            if !text.isEmpty {
                context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: text)))), promise: nil)
            }
        }

        func respond(context: ChannelHandlerContext, head: HTTPRequestHead) {
            let uri = head.uri
            if uri == "/echo" {
                send(context, 200, "\(head.method.rawValue) \(uri) \(String(decoding: body, as: UTF8.self))")
                context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
            } else if uri.hasPrefix("/status/"), let code = Int(uri.dropFirst(8)) {
                send(context, code, "{\"fault_message\":\"status \(code) here\"}")
                context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
            } else if uri == "/lines" {
                send(context, 200, "", chunked: true)
                for part in ["{\"seq\":1}\n{\"se", "q\":2}\n", "{\"seq\":3}\n"] {
                    context.writeAndFlush(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: part)))), promise: nil)
                }
                context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
            } else if uri == "/forever" {
                send(context, 200, "", chunked: true)
                context.writeAndFlush(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: "{\"seq\":1}\n")))), promise: nil)
            } else if uri == "/silent" {
                // never answers
            } else {
                send(context, 404, "{\"fault_message\":\"no such path\"}")
                context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
            }
        }
    }
}

/// A new short temporary directory (/tmp/skm-XXXXXX), for the 107-byte socket path limit.
func makeShortTempDir() throws -> String {
    var template = Array("/tmp/skm-XXXXXX".utf8CString)
    guard let p = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
        throw ManagerError(.host, "mkdtemp failed: \(ManagerError.errnoText())")
    }
    return String(cString: p)
}

/// A thread-safe list for callbacks.
final class Collected: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [String] = []
    func add(_ s: String) { lock.lock(); items.append(s); lock.unlock() }
    var all: [String] { lock.lock(); defer { lock.unlock() }; return items }
}

@Suite("HTTP client over a Unix socket")
struct HTTPClientTests {
    @Test("a request carries method, path and body and returns status, headers and body")
    func echo() throws {
        let server = try TestHTTPServer()
        defer { server.stop() }
        let client = UnixHTTPClient(socketPath: server.path, timeout: 5)
        let r = try client.request("PUT", "/echo", body: Array("{\"a\":1}".utf8))
        #expect(r.status == 200)
        #expect(r.text == "PUT /echo {\"a\":1}")
        #expect(r.header("x-test") == "yes")
        let g = try client.request("GET", "/echo")
        #expect(g.text == "GET /echo ")
    }

    @Test("the async form returns the same reply")
    func asyncEcho() async throws {
        let server = try TestHTTPServer()
        defer { server.stop() }
        let r = try await UnixHTTPClient(socketPath: server.path, timeout: 5).request("POST", "/echo", body: Array("x".utf8))
        #expect(r.text == "POST /echo x")
    }

    @Test("error statuses come back with their fault_message, and json() throws them with the right kind")
    func errors() throws {
        let server = try TestHTTPServer()
        defer { server.stop() }
        let client = UnixHTTPClient(socketPath: server.path, timeout: 5)
        let r = try client.request("GET", "/status/409")
        #expect(r.status == 409)
        #expect(r.faultMessage == "status 409 here")
        let e = #expect(throws: ManagerError.self) { try client.json("GET", "/status/409", as: [String: Int].self) }
        #expect(e?.kind == .conflict)
        #expect(e?.message == "status 409 here")
        let n = #expect(throws: ManagerError.self) { try client.json("GET", "/status/404", as: [String: Int].self) }
        #expect(n?.kind == .notFound)
    }

    @Test("a missing socket is a cannotConnect error naming the path")
    func noServer() throws {
        let dir = try makeShortTempDir()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let e = #expect(throws: ManagerError.self) {
            try UnixHTTPClient(socketPath: dir + "/none.sock", timeout: 2).request("GET", "/")
        }
        #expect(e?.kind == .cannotConnect)
        #expect(e?.message.contains(dir + "/none.sock") == true)
    }

    @Test("a socket path over 107 bytes is refused with a clear error")
    func longPath() throws {
        let e = #expect(throws: ManagerError.self) {
            try UnixHTTPClient(socketPath: "/tmp/" + String(repeating: "x", count: 120), timeout: 2).request("GET", "/")
        }
        #expect(e?.message.contains("too long") == true)
    }

    @Test("a server that never answers gives a timeout error, not a hang")
    func timeout() throws {
        let server = try TestHTTPServer()
        defer { server.stop() }
        let e = #expect(throws: ManagerError.self) {
            try UnixHTTPClient(socketPath: server.path, timeout: 0.5).request("GET", "/silent")
        }
        #expect(e?.kind == .timeout)
    }

    @Test("a chunked NDJSON stream is delivered line by line, lines split across chunks reassembled")
    func streamLines() throws {
        let server = try TestHTTPServer()
        defer { server.stop() }
        let lines = Collected()
        let r = try UnixHTTPClient(socketPath: server.path, timeout: 5).streamLines("GET", "/lines") { lines.add($0); return true }
        #expect(r.status == 200)
        #expect(lines.all == ["{\"seq\":1}", "{\"seq\":2}", "{\"seq\":3}"])
    }

    @Test("a stream ends when the callback returns false, and after its duration")
    func streamStops() throws {
        let server = try TestHTTPServer()
        defer { server.stop() }
        let client = UnixHTTPClient(socketPath: server.path, timeout: 5)
        let lines = Collected()
        _ = try client.streamLines("GET", "/lines") { lines.add($0); return false }
        #expect(lines.all == ["{\"seq\":1}"])
        let more = Collected()
        let start = Date()
        let r = try client.streamLines("GET", "/forever", duration: 0.5) { more.add($0); return true }
        #expect(r.status == 200)
        #expect(more.all == ["{\"seq\":1}"])
        #expect(Date().timeIntervalSince(start) < 4.5)
    }

    @Test("a stream request answered with an error returns the status and the error body")
    func streamError() throws {
        let server = try TestHTTPServer()
        defer { server.stop() }
        let lines = Collected()
        let r = try UnixHTTPClient(socketPath: server.path, timeout: 5).streamLines("GET", "/status/400") { lines.add($0); return true }
        #expect(r.status == 400)
        #expect(r.faultMessage == "status 400 here")
        #expect(lines.all.isEmpty)
    }
}
