import Devices
import Foundation
import GuestMemory
import Synchronization
import Testing
@testable import Virtio

/// A virtio-vsock device on mock rx/tx/event queues, listening in a temporary directory. The test
/// plays the guest driver (posting receive buffers, sending packets) and the host processes (Unix
/// sockets).
final class VsockHarness {
    static let cid: UInt64 = 3
    let memory: GuestMemory
    let rx: MockDriverQueue, tx: MockDriverQueue, event: MockDriverQueue
    let interrupt = RecordingInterrupt()
    let device: VirtioVsock
    let loop: EventLoop
    let log = RecordingLog()
    let dir: String
    var path: String { dir + "/v.sock" }
    /// Receive buffers posted, by head.
    var rxBuffers: [UInt16: UInt64] = [:]
    private var started = false

    init(requestTimeoutNs: UInt64 = 2_000_000_000) throws {
        memory = try makeMemory(size: 16 << 20)
        rx = MockDriverQueue(memory: memory, size: 256, base: 0x1000, dataBase: 0x10_0000)
        tx = MockDriverQueue(memory: memory, size: 256, base: 0x5000, dataBase: 0x40_0000)
        event = MockDriverQueue(memory: memory, size: 16, base: 0x9000, dataBase: 0xc0_0000)
        dir = NSTemporaryDirectory() + "vsk-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        mkdir(dir, 0o700)
        loop = try EventLoop(name: "vsock-test")
        device = try VirtioVsock(guestCID: Self.cid, udsPath: dir + "/v.sock", eventLoop: loop,
                                 requestTimeoutNs: requestTimeoutNs, log: log.log)
        try device.activate(VirtioActivation(memory: memory,
                                             queues: [try rx.deviceQueue(index: 0), try tx.deviceQueue(index: 1), try event.deviceQueue(index: 2)],
                                             features: VirtioFeature.common, interrupt: interrupt, schedule: { _ in }))
    }

    deinit {
        if started { loop.stop() }
        device.shutdown()
        if let names = try? FileManager.default.contentsOfDirectory(atPath: dir) {
            for n in names { unlink(dir + "/" + n) }
        }
        rmdir(dir)
    }

    func start() throws {
        try loop.start()
        started = true
    }

    /// Posts `count` receive buffers of `size` bytes and tells the device.
    func postRx(count: Int, size: Int = 4096) throws {
        for _ in 0..<count {
            let a = try rx.alloc(size)
            rxBuffers[try rx.addChain([(a, UInt32(size), true)])] = a
        }
        try device.processQueue(0)
    }

    /// Sends one packet (header and payload in separate buffers) and processes the tx queue.
    func send(_ h: VsockHeader, _ payload: [UInt8] = []) throws {
        var bufs: [(addr: UInt64, len: UInt32, writable: Bool)] = []
        let hb = h.encode()
        bufs.append((try tx.alloc(hb.count, fill: hb), UInt32(hb.count), false))
        if !payload.isEmpty { bufs.append((try tx.alloc(payload.count, fill: payload), UInt32(payload.count), false)) }
        try tx.addChain(bufs)
        try device.processQueue(1)
    }

    /// A packet from the guest on (guest port, host port).
    func packet(_ op: UInt16, guestPort: UInt32, hostPort: UInt32, len: UInt32 = 0, flags: UInt32 = 0,
                bufAlloc: UInt32 = 1 << 20, fwdCnt: UInt32 = 0) -> VsockHeader {
        VsockHeader(srcCID: Self.cid, dstCID: 2, srcPort: guestPort, dstPort: hostPort, len: len, op: op, flags: flags,
                    bufAlloc: bufAlloc, fwdCnt: fwdCnt)
    }

    /// Packets the device put in receive buffers since the last call.
    func received() throws -> [(header: VsockHeader, payload: [UInt8])] {
        try rx.takeUsed().map { e in
            let a = try #require(rxBuffers[UInt16(e.id)])
            let bytes = try memory.read(at: a, count: Int(e.len))
            let h = try #require(VsockHeader(bytes: bytes), "used length \(e.len) holds no header")
            return (h, Array(bytes[VsockHeader.size...]))
        }
    }

    /// Waits (up to 5 s) until `done` holds for what was received meanwhile; returns all of it.
    func receive(until done: ([(header: VsockHeader, payload: [UInt8])]) -> Bool) throws -> [(header: VsockHeader, payload: [UInt8])] {
        var all: [(header: VsockHeader, payload: [UInt8])] = []
        let deadline = Date().addingTimeInterval(5)
        repeat {
            all += try received()
            if done(all) { return all }
            usleep(5_000)
        } while Date() < deadline
        return all
    }
}

/// A Unix stream socket connected to `path` (blocking).
func unixConnect(_ path: String) -> Int32 {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    var addr = sockaddr_un()
    _ = VirtioVsock.fillAddress(&addr, path)
    let r = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    if r != 0 { close(fd); return -1 }
    return fd
}

/// A listening Unix socket at `path`.
func unixListen(_ path: String) throws -> Int32 {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    var addr = sockaddr_un()
    _ = VirtioVsock.fillAddress(&addr, path)
    let r = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    try #require(r == 0 && listen(fd, 8) == 0, "bind/listen \(path): \(errno)")
    return fd
}

/// Reads exactly `count` bytes (5 s receive timeout); fewer on EOF or timeout.
func readExactly(_ fd: Int32, _ count: Int) -> [UInt8] {
    var tv = timeval(tv_sec: 5, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    var out = [UInt8](repeating: 0, count: count)
    var got = 0
    while got < count {
        let n = out.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + got, count - got, 0) }
        if n <= 0 { break }
        got += n
    }
    return Array(out[0..<got])
}

func writeAll(_ fd: Int32, _ bytes: [UInt8]) {
    var off = 0
    while off < bytes.count {
        let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + off, bytes.count - off, Int32(MSG_NOSIGNAL)) }
        if n <= 0 { return }
        off += n
    }
}

@Suite("virtio-vsock")
struct VsockTests {
    typealias Op = VsockHeader.Op

    @Test("the 44-byte header encodes little-endian field by field and decodes back; fewer bytes are no header")
    func headerCoding() {
        let h = VsockHeader(srcCID: 3, dstCID: 2, srcPort: 0x1234_5678, dstPort: 80, len: 4096, op: Op.rw, flags: 3,
                            bufAlloc: 262144, fwdCnt: 0xdead_beef)
        let b = h.encode()
        #expect(b.count == 44)
        #expect(Array(b[0..<8]) == [3, 0, 0, 0, 0, 0, 0, 0])
        #expect(Array(b[16..<20]) == [0x78, 0x56, 0x34, 0x12])
        #expect(Array(b[28..<32]) == [1, 0, 5, 0])
        #expect(Array(b[40..<44]) == [0xef, 0xbe, 0xad, 0xde])
        #expect(VsockHeader(bytes: b) == h)
        #expect(VsockHeader(bytes: Array(b[0..<43])) == nil)
    }

    @Test("device type 19, three queues, the guest CID in the configuration space")
    func configuration() throws {
        let h = try VsockHarness()
        #expect(h.device.deviceType.rawValue == 19)
        #expect(h.device.queueMaxSizes.count == 3)
        var bytes = [UInt8](repeating: 0xff, count: 8)
        bytes.withUnsafeMutableBytes { h.device.readConfig(offset: 0, data: $0) }
        #expect(bytes == [3, 0, 0, 0, 0, 0, 0, 0])
        var st = stat()
        #expect(lstat(h.path, &st) == 0 && st.st_mode & S_IFMT == S_IFSOCK)
    }

    @Test("packets for a connection that does not exist are answered with RST on the same ports")
    func rstOnUnknown() throws {
        let h = try VsockHarness()
        try h.postRx(count: 8)
        try h.send(h.packet(Op.rw, guestPort: 1234, hostPort: 99, len: 3), [1, 2, 3])
        try h.send(h.packet(Op.creditUpdate, guestPort: 1235, hostPort: 99))
        try h.send(h.packet(Op.rst, guestPort: 1236, hostPort: 99)) // never answered
        let got = try h.received()
        #expect(got.count == 2)
        #expect(got.allSatisfy { $0.header.op == Op.rst && $0.header.srcCID == 2 && $0.header.dstCID == 3 && $0.header.srcPort == 99 })
        #expect(got.map(\.header.dstPort) == [1234, 1235])
        #expect(h.device.counters.unknownConnection == 2)
        #expect(h.device.counters.rstSent == 2)
        #expect(try h.tx.takeUsed().count == 3)
    }

    @Test("hostile packets: short headers, len beyond the chain or 64 KiB, wrong CIDs, a bad type; dropped, counted, RST where a connection is named")
    func hostileHeaders() throws {
        let h = try VsockHarness()
        try h.postRx(count: 32)
        // 10 bytes: no header.
        try h.tx.addChain([(try h.tx.alloc(10, fill: [UInt8](repeating: 7, count: 10)), 10, false)])
        try h.device.processQueue(1)
        // len larger than the chain.
        try h.send(h.packet(Op.rw, guestPort: 1, hostPort: 2, len: 1000), [1, 2, 3])
        // len larger than 64 KiB (and than the chain).
        try h.send(h.packet(Op.rw, guestPort: 1, hostPort: 2, len: 0xffff_ffff))
        // Wrong source CID, wrong destination CID.
        var bad = h.packet(Op.request, guestPort: 1, hostPort: 2)
        bad.srcCID = 77
        try h.send(bad)
        bad = h.packet(Op.request, guestPort: 1, hostPort: 2)
        bad.dstCID = 5
        try h.send(bad)
        // Not a stream.
        bad = h.packet(Op.request, guestPort: 1, hostPort: 2)
        bad.type = 2
        try h.send(bad)
        // An unknown op on an unknown connection.
        try h.send(h.packet(99, guestPort: 1, hostPort: 2))
        // A header-only chain whose buffers are device-writable.
        let w = try h.tx.alloc(44)
        try h.tx.addChain([(w, 44, true)])
        try h.device.processQueue(1)
        let c = h.device.counters
        #expect(c.txMalformed == 4) // short, len > chain, len > 64 KiB, writable-only
        #expect(c.badCID == 2)
        #expect(c.badType == 1)
        #expect(c.unknownConnection == 1)
        #expect(try h.tx.takeUsed().count == 8)
        let got = try h.received()
        #expect(got.allSatisfy { $0.header.op == Op.rst && $0.payload.isEmpty })
        #expect(got.count == 6)
        #expect(h.device.connectionCount == 0)
    }

    @Test("a flood of bad packets without receive buffers queues a bounded number of RSTs")
    func flood() throws {
        let h = try VsockHarness()
        for round in 0..<12 {
            for i in 0..<200 { try h.send(h.packet(Op.rw, guestPort: UInt32(round * 200 + i), hostPort: 9, len: 0)) }
        }
        let c = h.device.counters
        #expect(c.unknownConnection == 2400)
        #expect(c.rxQueueOverflows == UInt64(2400 - VirtioVsock.maxControlPackets))
        try h.postRx(count: 200, size: 64)
        #expect(try h.received().count == 200)
    }

    @Test("guest → host: REQUEST connects to <uds>_<port>, RESPONSE, bytes both ways, SHUTDOWN ends it with RST")
    func guestInitiated() throws {
        let h = try VsockHarness()
        let server = try unixListen(h.path + "_5000")
        defer { close(server) }
        try h.start()
        try h.postRx(count: 64)
        try h.send(h.packet(Op.request, guestPort: 1234, hostPort: 5000))
        var got = try h.receive { $0.count >= 1 }
        #expect(got.first?.header.op == Op.response)
        #expect(got.first?.header.srcPort == 5000 && got.first?.header.dstPort == 1234)
        #expect(got.first?.header.bufAlloc == VirtioVsock.bufferSize)
        let conn = accept(server, nil, nil)
        try #require(conn >= 0)
        defer { close(conn) }
        try h.send(h.packet(Op.rw, guestPort: 1234, hostPort: 5000, len: 5), Array("hello".utf8))
        #expect(readExactly(conn, 5) == Array("hello".utf8))
        writeAll(conn, Array("world!".utf8))
        got = try h.receive { $0.reduce(0) { $0 + $1.payload.count } >= 6 }
        #expect(got.allSatisfy { $0.header.op == Op.rw && $0.header.len == UInt32($0.payload.count) })
        #expect(got.flatMap(\.payload) == Array("world!".utf8))
        #expect(h.device.counters.guestConnections == 1)
        try h.send(h.packet(Op.shutdown, guestPort: 1234, hostPort: 5000, flags: 3))
        #expect(readExactly(conn, 1).isEmpty, "the host socket sees EOF")
        got = try h.receive { $0.contains { $0.header.op == Op.rst } }
        #expect(got.last?.header.op == Op.rst)
        #expect(h.device.connectionCount == 0)
    }

    @Test("guest → host with nothing listening on <uds>_<port>: RST, counted")
    func guestConnectRefused() throws {
        let h = try VsockHarness()
        try h.postRx(count: 4)
        try h.send(h.packet(Op.request, guestPort: 1234, hostPort: 6000))
        let got = try h.received()
        #expect(got.map(\.header.op) == [Op.rst])
        #expect(h.device.counters.connectFails == 1)
        #expect(h.device.connectionCount == 0)
    }

    @Test("host → guest: CONNECT <port> (in pieces) becomes a REQUEST; the RESPONSE gives the host OK <hostport>; an echo; host EOF becomes SHUTDOWN")
    func hostInitiated() throws {
        let h = try VsockHarness()
        try h.start()
        try h.postRx(count: 64)
        let fd = unixConnect(h.path)
        try #require(fd >= 0)
        defer { close(fd) }
        // The line may arrive in pieces.
        writeAll(fd, Array("CONN".utf8))
        usleep(50_000)
        writeAll(fd, Array("ECT 52\n".utf8))
        var got = try h.receive { $0.count >= 1 }
        let req = try #require(got.first?.header)
        #expect(req.op == Op.request && req.dstPort == 52 && req.srcCID == 2 && req.dstCID == 3)
        #expect(req.srcPort >= VirtioVsock.firstLocalPort)
        try h.send(h.packet(Op.response, guestPort: 52, hostPort: req.srcPort))
        let ok = Array("OK \(req.srcPort)\n".utf8)
        #expect(readExactly(fd, ok.count) == ok)
        #expect(h.device.counters.hostConnections == 1)
        writeAll(fd, Array("ping".utf8))
        got = try h.receive { $0.reduce(0) { $0 + $1.payload.count } >= 4 }
        #expect(got.flatMap(\.payload) == Array("ping".utf8))
        try h.send(h.packet(Op.rw, guestPort: 52, hostPort: req.srcPort, len: 4), Array("pong".utf8))
        #expect(readExactly(fd, 4) == Array("pong".utf8))
        // fwd_cnt counts the guest's bytes only, not the OK line.
        try h.send(h.packet(Op.creditRequest, guestPort: 52, hostPort: req.srcPort))
        got = try h.receive { $0.contains { $0.header.op == Op.creditUpdate } }
        #expect(got.last { $0.header.op == Op.creditUpdate }?.header.fwdCnt == 4)
        Glibc.shutdown(fd, Int32(SHUT_WR))
        got = try h.receive { $0.contains { $0.header.op == Op.shutdown } }
        let sd = try #require(got.last?.header)
        #expect(sd.op == Op.shutdown && sd.flags & VsockHeader.shutdownSend != 0)
        // Half-closed: the guest may still send.
        try h.send(h.packet(Op.rw, guestPort: 52, hostPort: req.srcPort, len: 3), Array("bye".utf8))
        #expect(readExactly(fd, 3) == Array("bye".utf8))
        try h.send(h.packet(Op.rst, guestPort: 52, hostPort: req.srcPort))
        #expect(readExactly(fd, 1).isEmpty)
        #expect(h.device.connectionCount == 0)
    }

    @Test("a host CONNECT the guest never answers is closed after the timeout, with an RST to the guest")
    func requestTimeout() throws {
        let h = try VsockHarness(requestTimeoutNs: 100_000_000)
        try h.start()
        try h.postRx(count: 8)
        let fd = unixConnect(h.path)
        try #require(fd >= 0)
        defer { close(fd) }
        writeAll(fd, Array("CONNECT 7\n".utf8))
        let got = try h.receive { $0.count >= 2 }
        #expect(got.map(\.header.op) == [Op.request, Op.rst])
        #expect(readExactly(fd, 1).isEmpty)
        #expect(h.device.counters.requestTimeouts == 1)
    }

    @Test("credit: the device sends no more than the guest's buf_alloc - (tx_cnt - fwd_cnt), asks for credit once, resumes on CREDIT_UPDATE")
    func peerCredit() throws {
        let h = try VsockHarness()
        let server = try unixListen(h.path + "_7000")
        defer { close(server) }
        try h.start()
        try h.postRx(count: 64)
        try h.send(h.packet(Op.request, guestPort: 40, hostPort: 7000, bufAlloc: 100))
        #expect(try h.receive { $0.count >= 1 }.first?.header.op == Op.response)
        let conn = accept(server, nil, nil)
        defer { close(conn) }
        writeAll(conn, [UInt8](repeating: 0xab, count: 300))
        var got = try h.receive { $0.contains { $0.header.op == Op.creditRequest } }
        #expect(got.reduce(0) { $0 + $1.payload.count } == 100)
        #expect(got.filter { $0.header.op == Op.creditRequest }.count == 1)
        usleep(50_000)
        #expect(try h.received().isEmpty, "nothing more without credit")
        try h.send(h.packet(Op.creditUpdate, guestPort: 40, hostPort: 7000, bufAlloc: 100, fwdCnt: 100))
        got = try h.receive { $0.reduce(0) { $0 + $1.payload.count } >= 100 }
        #expect(got.reduce(0) { $0 + $1.payload.count } == 100)
        try h.send(h.packet(Op.creditUpdate, guestPort: 40, hostPort: 7000, bufAlloc: 1000, fwdCnt: 200))
        got = try h.receive { $0.reduce(0) { $0 + $1.payload.count } >= 100 }
        #expect(got.reduce(0) { $0 + $1.payload.count } == 100)
    }

    @Test("credit: a guest that sends beyond the advertised buffer while the host does not read is reset; credit updates follow the host's reads")
    func ownCredit() throws {
        let h = try VsockHarness()
        let server = try unixListen(h.path + "_7001")
        defer { close(server) }
        try h.start()
        try h.postRx(count: 128)
        try h.send(h.packet(Op.request, guestPort: 41, hostPort: 7001))
        #expect(try h.receive { $0.count >= 1 }.first?.header.op == Op.response)
        let conn = accept(server, nil, nil)
        defer { close(conn) }
        // Within credit: 4 × 64 KiB; the host reads them all, and the device reports the progress.
        let chunk = [UInt8](repeating: 0x5a, count: 64 << 10)
        for _ in 0..<4 { try h.send(h.packet(Op.rw, guestPort: 41, hostPort: 7001, len: UInt32(chunk.count)), chunk) }
        #expect(readExactly(conn, 4 * chunk.count).count == 4 * chunk.count)
        let updates = try h.receive { $0.contains { $0.header.op == Op.creditUpdate } }
        let update = try #require(updates.last { $0.header.op == Op.creditUpdate }?.header)
        #expect(update.bufAlloc == VirtioVsock.bufferSize && update.fwdCnt > 0 && update.fwdCnt <= 4 * UInt32(chunk.count))
        // Now the host stops reading: the socket buffer fills, then the device's buffer; then a violation.
        var sent = 0
        while h.device.counters.creditViolations == 0 && sent < 64 {
            try h.send(h.packet(Op.rw, guestPort: 41, hostPort: 7001, len: UInt32(chunk.count)), chunk)
            sent += 1
        }
        #expect(h.device.counters.creditViolations == 1)
        #expect(h.device.connectionCount == 0)
        #expect(try h.receive { $0.contains { $0.header.op == Op.rst } }.contains { $0.header.op == Op.rst })
    }

    @Test("an existing path that is not a socket, a path too long for sun_path and a reserved CID are refused; a stale socket is replaced")
    func badSetup() throws {
        let loop = try EventLoop(name: "vsock-bad")
        let file = NSTemporaryDirectory() + "vsk-file-\(getpid())"
        FileManager.default.createFile(atPath: file, contents: Data([1]))
        defer { unlink(file) }
        #expect(throws: VsockError("\(file) exists and is not a socket")) {
            _ = try VirtioVsock(guestCID: 3, udsPath: file, eventLoop: loop)
        }
        let long = "/tmp/" + String(repeating: "x", count: 120)
        #expect(throws: VsockError.self) { _ = try VirtioVsock(guestCID: 3, udsPath: long, eventLoop: loop) }
        #expect(throws: VsockError.self) { _ = try VirtioVsock(guestCID: 2, udsPath: file + ".sock", eventLoop: loop) }
        // A socket nobody listens on any more (a crashed VMM's) is replaced; the device removes its own at shutdown.
        let stale = NSTemporaryDirectory() + "vsk-stale-\(getpid()).sock"
        let fd = try unixListen(stale)
        close(fd)
        let d = try VirtioVsock(guestCID: 3, udsPath: stale, eventLoop: loop)
        #expect(access(stale, F_OK) == 0)
        // A second device on a live socket is refused.
        #expect(throws: VsockError("\(stale) is in use: another process listens on it")) {
            _ = try VirtioVsock(guestCID: 4, udsPath: stale, eventLoop: loop)
        }
        d.shutdown()
        #expect(access(stale, F_OK) != 0)
    }

    @Test("a host line that is not CONNECT <port> closes that host socket; a driver reset closes every connection")
    func badConnectLineAndReset() throws {
        let h = try VsockHarness()
        let server = try unixListen(h.path + "_7002")
        defer { close(server) }
        try h.start()
        try h.postRx(count: 16)
        let bad = unixConnect(h.path)
        try #require(bad >= 0)
        defer { close(bad) }
        writeAll(bad, Array("HELLO 52\n".utf8))
        #expect(readExactly(bad, 1).isEmpty, "closed without an answer")
        let long = unixConnect(h.path)
        defer { close(long) }
        writeAll(long, [UInt8](repeating: 0x41, count: 100))
        #expect(readExactly(long, 1).isEmpty, "a line longer than 32 bytes without a newline is refused")
        // One guest-initiated connection, then the driver resets: the host socket closes.
        try h.send(h.packet(Op.request, guestPort: 50, hostPort: 7002))
        #expect(try h.receive { $0.count >= 1 }.first?.header.op == Op.response)
        let conn = accept(server, nil, nil)
        defer { close(conn) }
        #expect(h.device.connectionCount == 1)
        h.device.reset()
        #expect(h.device.connectionCount == 0)
        #expect(readExactly(conn, 1).isEmpty, "the host sees EOF after the reset")
        #expect(try h.received().isEmpty)
    }

    @Test("random packets (ops, ports, CIDs, lengths, chain shapes) never crash the device and keep its tables bounded")
    func randomPackets() throws {
        let h = try VsockHarness()
        let server = try unixListen(h.path + "_3")
        defer { close(server) }
        var rng = FuzzTests.XorShift(state: 0x5eed_0f_5eed)
        var fatal = 0
        for _ in 0..<400 {
            if Int.random(in: 0..<4, using: &rng) == 0 { try? h.postRx(count: Int.random(in: 1..<8, using: &rng), size: Int.random(in: 1..<200, using: &rng)) }
            var hdr = h.packet(UInt16.random(in: 0..<9, using: &rng), guestPort: UInt32.random(in: 0..<4, using: &rng),
                               hostPort: UInt32.random(in: 0..<5, using: &rng), len: 0,
                               flags: UInt32.random(in: 0..<4, using: &rng), bufAlloc: UInt32.random(in: 0..<1000, using: &rng),
                               fwdCnt: UInt32.random(in: 0..<1000, using: &rng))
            if Int.random(in: 0..<8, using: &rng) == 0 { hdr.srcCID = UInt64.random(in: 0..<6, using: &rng) }
            if Int.random(in: 0..<8, using: &rng) == 0 { hdr.type = UInt16.random(in: 0..<3, using: &rng) }
            let payload = [UInt8](repeating: 0x33, count: Int.random(in: 0..<64, using: &rng))
            hdr.len = Int.random(in: 0..<4, using: &rng) == 0 ? UInt32.random(in: 0..<100_000, using: &rng) : UInt32(payload.count)
            var bytes = hdr.encode() + payload
            if Int.random(in: 0..<10, using: &rng) == 0 { bytes = Array(bytes.prefix(Int.random(in: 0..<bytes.count, using: &rng))) }
            // Split the packet at random points across 1-3 buffers (possibly empty ones).
            var bufs: [(addr: UInt64, len: UInt32, writable: Bool)] = []
            var rest = bytes[...]
            for k in 0..<Int.random(in: 1...3, using: &rng) {
                let take = k == 2 ? rest.count : Int.random(in: 0...rest.count, using: &rng)
                let part = Array(rest.prefix(take))
                rest = rest.dropFirst(take)
                bufs.append((try h.tx.alloc(max(1, part.count), fill: part.isEmpty ? [0] : part), UInt32(part.count), false))
            }
            if !rest.isEmpty { bufs.append((try h.tx.alloc(rest.count, fill: Array(rest)), UInt32(rest.count), false)) }
            try h.tx.addChain(bufs)
            do { try h.device.processQueue(1) } catch { fatal += 1 }
            _ = try h.rx.takeUsed()
            _ = try h.tx.takeUsed()
        }
        #expect(fatal == 0)
        #expect(h.device.connectionCount <= 20)
        let c = h.device.counters
        #expect(c.txMalformed + c.badCID + c.badType + c.unknownConnection > 50)
    }
}
