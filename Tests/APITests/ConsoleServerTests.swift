import Foundation
import Synchronization
import Testing
@testable import API
#if canImport(Glibc)
import Glibc
#endif

/// The console socket server alone (no guest, no /dev/kvm).
@Suite("ConsoleServer (the vmm's --console-sock)")
struct ConsoleServerTests {
    /// Connects to `path`; returns the socket.
    func connectClient(_ path: String, receiveBuffer: Int32? = nil) throws -> Int32 {
        let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        try #require(s >= 0)
        if var size = receiveBuffer { setsockopt(s, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size)) }
        var tv = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in path.utf8.enumerated() { p[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        try #require(rc == 0, "connect: \(String(cString: strerror(errno)))")
        return s
    }

    /// Reads until `count` bytes arrived or the receive timeout hits.
    func readBytes(_ fd: Int32, count: Int) -> [UInt8] {
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while out.count < count {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            out += buf[0..<n]
        }
        return out
    }

    func waitUntil(_ seconds: Double = 10, _ condition: () -> Bool) -> Bool {
        let end = Date().addingTimeInterval(seconds)
        while Date() < end {
            if condition() { return true }
            usleep(5_000)
        }
        return condition()
    }

    @Test("clients get output from the moment they connect, and their input reaches the handler")
    func outputAndInput() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let path = dir.path + "/c.sock"
        let server = try ConsoleServer(path: path)
        defer { server.stop() }
        let received = Mutex<[UInt8]>([])
        server.setInputHandler { bytes in received.withLock { $0 += bytes } }
        try server.start()
        server.write(Array("before anyone\n".utf8))
        let a = try connectClient(path)
        defer { close(a) }
        #expect(waitUntil { server.clientCount == 1 })
        server.write(Array("one\n".utf8))
        let b = try connectClient(path)
        defer { close(b) }
        #expect(waitUntil { server.clientCount == 2 })
        server.write(Array("two\n".utf8))
        #expect(readBytes(a, count: 8) == Array("one\ntwo\n".utf8))
        #expect(readBytes(b, count: 4) == Array("two\n".utf8))
        _ = "ls\n".withCString { write(b, $0, 3) }
        #expect(waitUntil { received.withLock { $0 } == Array("ls\n".utf8) })
        close(a)
        #expect(waitUntil { server.clientCount == 1 }, "a closed client is dropped")
    }

    @Test("a client that never reads does not block writes: its backlog is bounded and the excess dropped and counted")
    func stuckClient() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let path = dir.path + "/c.sock"
        let server = try ConsoleServer(path: path)
        defer { server.stop() }
        try server.start()
        let stuck = try connectClient(path, receiveBuffer: 4096)
        defer { close(stuck) }
        let reader = try connectClient(path)
        defer { close(reader) }
        #expect(waitUntil { server.clientCount == 2 })
        // The reading client drains concurrently.
        let got = Mutex(0)
        let t = Thread {
            var buf = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = buf.withUnsafeMutableBytes { read(reader, $0.baseAddress, $0.count) }
                if n <= 0 { break }
                got.withLock { $0 += n }
            }
        }
        t.start()
        let chunk = [UInt8](repeating: 0x41, count: 4096)
        let total = 4 * ConsoleServer.clientBufferLimit + 1_000_000
        let start = Date()
        var sent = 0
        while sent < total {
            server.write(chunk)
            sent += chunk.count
            // Let the reading client catch up now and then (it must never fall behind by more
            // than its own bound); the stuck client never does.
            if sent % (32 * 4096) == 0 {
                let caughtUp = waitUntil(10) { got.withLock { $0 } >= sent }
                #expect(caughtUp)
            }
        }
        #expect(Date().timeIntervalSince(start) < 60, "writes never wait for the stuck client")
        #expect(server.droppedBytes > 0, "the stuck client's excess is dropped")
        #expect(server.droppedBytes <= UInt64(total), "only the stuck client loses output")
        #expect(waitUntil(20) { got.withLock { $0 } >= total }, "the reading client gets everything: \(got.withLock { $0 }) of \(total)")
        shutdown(reader, Int32(SHUT_RDWR))
    }

    @Test("an existing path is refused with a message naming it; stop() removes the socket")
    func existingPathAndCleanup() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let existing = dir.file("taken")
        #expect(throws: APIError(status: 500, "the console socket path \(existing) already exists (another VMM, or a stale socket: remove it)")) {
            _ = try ConsoleServer(path: existing)
        }
        let long = dir.path + "/" + String(repeating: "x", count: 120)
        #expect(throws: APIError.self) { _ = try ConsoleServer(path: long) }
        let path = dir.path + "/c.sock"
        let server = try ConsoleServer(path: path)
        try server.start()
        #expect(FileManager.default.fileExists(atPath: path))
        server.stop()
        #expect(!FileManager.default.fileExists(atPath: path))
        server.stop()
    }
}
