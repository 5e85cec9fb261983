import Devices
import Foundation
import GuestMemory
import Net
import Synchronization
import Testing
@testable import Virtio

/// A backend on one end of a datagram socket pair: each datagram is one frame. The test holds
/// the other end (`peer`) and plays the host's network.
final class SocketPairBackend: NetBackend, @unchecked Sendable {
    let fd: Int32
    let peer: Int32
    let hasVnetHeader: Bool
    var label: String { "socketpair" }
    var supportedOffloads: NetOffloads { hasVnetHeader ? [.checksum, .tso4, .tso6] : [] }
    let offloads = Mutex<NetOffloads?>(nil)

    init(vnetHeader: Bool) {
        var fds: [Int32] = [0, 0]
        precondition(socketpair(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0, &fds) == 0)
        for f in fds { _ = fcntl(f, F_SETFL, O_NONBLOCK) }
        fd = fds[0]
        peer = fds[1]
        hasVnetHeader = vnetHeader
    }
    deinit { Glibc.close(fd); Glibc.close(peer) }

    func setOffloads(_ o: NetOffloads) throws(NetError) { offloads.withLock { $0 = o } }
    func receive(into iov: UnsafeBufferPointer<iovec>) -> Int {
        let n = readv(fd, iov.baseAddress, Int32(iov.count))
        return n < 0 ? -Int(errno) : n
    }
    func send(_ iov: UnsafeBufferPointer<iovec>) -> Int {
        let n = writev(fd, iov.baseAddress, Int32(iov.count))
        return n < 0 ? -Int(errno) : n
    }
    func close() {}

    /// The host sends one frame to the guest.
    func inject(_ bytes: [UInt8]) { #expect(Glibc.send(peer, bytes, bytes.count, 0) == bytes.count) }
    /// Frames the guest sent.
    func sent() -> [[UInt8]] {
        var out: [[UInt8]] = []
        var buf = [UInt8](repeating: 0, count: 70000)
        while true {
            let n = recv(peer, &buf, buf.count, 0)
            if n <= 0 { return out }
            out.append(Array(buf[0..<n]))
        }
    }
}

/// A virtio-net device activated on mock rx, tx and control queues.
struct NetHarness {
    let memory: GuestMemory
    let rx: MockDriverQueue, tx: MockDriverQueue, ctrl: MockDriverQueue
    let interrupt = RecordingInterrupt()
    let device: VirtioNet
    let backend: SocketPairBackend
    let loop: EventLoop
    let log = RecordingLog()

    static let mac: [UInt8] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]

    init(vnetHeader: Bool = true, features: UInt64 = VirtioNet.Feature.mrgRxbuf | VirtioNet.Feature.ctrlVQ
            | VirtioNet.Feature.ctrlRx | VirtioNet.Feature.ctrlMacAddr, queueSize: UInt16 = 64) throws {
        memory = try makeMemory(size: 16 << 20)
        rx = MockDriverQueue(memory: memory, size: queueSize, base: 0x1000, dataBase: 0x10_0000)
        tx = MockDriverQueue(memory: memory, size: queueSize, base: 0x4000, dataBase: 0x40_0000)
        ctrl = MockDriverQueue(memory: memory, size: 16, base: 0x7000, dataBase: 0x80_0000)
        backend = SocketPairBackend(vnetHeader: vnetHeader)
        loop = try EventLoop(name: "net-test")
        device = try VirtioNet(backend: backend, mac: Self.mac, eventLoop: loop, log: log.log)
        try device.activate(VirtioActivation(memory: memory,
                                             queues: [try rx.deviceQueue(index: 0), try tx.deviceQueue(index: 1), try ctrl.deviceQueue(index: 2)],
                                             features: VirtioFeature.common | features, interrupt: interrupt, schedule: { _ in }))
    }

    /// Posts `count` receive buffers of `size` bytes; returns their addresses by head.
    @discardableResult
    func postRx(count: Int, size: Int) throws -> [UInt16: UInt64] {
        var out: [UInt16: UInt64] = [:]
        for _ in 0..<count {
            let a = try rx.alloc(size)
            out[try rx.addChain([(a, UInt32(size), true)])] = a
        }
        return out
    }

    /// Queues one frame for transmission, split into `pieces` buffers, and processes the tx queue.
    func transmit(_ bytes: [UInt8], pieces: Int = 1) throws {
        var bufs: [(addr: UInt64, len: UInt32, writable: Bool)] = []
        let step = max(1, (bytes.count + pieces - 1) / pieces)
        var i = 0
        while i < bytes.count {
            let part = Array(bytes[i..<min(bytes.count, i + step)])
            bufs.append((try tx.alloc(part.count, fill: part), UInt32(part.count), false))
            i += step
        }
        try tx.addChain(bufs)
        try device.processQueue(1)
    }

    /// Sends one control command; returns the ack byte.
    func control(_ cls: UInt8, _ cmd: UInt8, _ data: [UInt8]) throws -> UInt8 {
        let hdr = try ctrl.alloc(2, fill: [cls, cmd])
        var bufs: [(addr: UInt64, len: UInt32, writable: Bool)] = [(hdr, 2, false)]
        if !data.isEmpty { bufs.append((try ctrl.alloc(data.count, fill: data), UInt32(data.count), false)) }
        let ack = try ctrl.alloc(1, fill: [0xee])
        bufs.append((ack, 1, true))
        try ctrl.addChain(bufs)
        try device.processQueue(2)
        #expect(try ctrl.takeUsed().count == 1)
        return try memory.read(at: ack, count: 1)[0]
    }
}

/// An Ethernet frame of `length` bytes to `dst` with a recognizable payload.
func ethernetFrame(dst: [UInt8] = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff], length: Int, seed: UInt8 = 0) -> [UInt8] {
    var f = dst + [0x02, 0, 0, 0, 0, 1, 0x88, 0xb5]
    for i in 0..<(length - 14) { f.append(UInt8(truncatingIfNeeded: i &+ Int(seed))) }
    return f
}

@Suite("virtio-net")
struct NetTests {
    let header = [UInt8](repeating: 0, count: 12)

    @Test("a frame split over guest buffers reaches the backend whole, header included")
    func transmitGathers() throws {
        let h = try NetHarness()
        let frame = ethernetFrame(length: 1000)
        var hdr = header
        hdr[0] = 1 // NEEDS_CSUM: passed through untouched to a vnet-header backend
        try h.transmit(hdr + frame, pieces: 3)
        #expect(h.backend.sent() == [hdr + frame])
        let used = try h.tx.takeUsed()
        #expect(used.count == 1 && used[0].len == 0)
        #expect(h.device.counters.txPackets == 1)
        #expect(h.device.counters.txBytes == 1000)
        #expect(h.interrupt.queueSignals == [1])
    }

    @Test("a backend without vnet headers gets the frame without the header, and the guest a zero header")
    func headerlessBackend() throws {
        let h = try NetHarness(vnetHeader: false)
        let frame = ethernetFrame(length: 200)
        try h.transmit(header + frame, pieces: 2)
        #expect(h.backend.sent() == [frame])
        let bufs = try h.postRx(count: 2, size: 2048)
        for (_, a) in bufs { try h.memory.write([UInt8](repeating: 0xaa, count: 12), at: a) }
        let back = ethernetFrame(dst: NetHarness.mac, length: 100, seed: 9)
        h.backend.inject(back)
        try h.device.processQueue(0)
        let used = try h.rx.takeUsed()
        #expect(used.count == 1)
        #expect(used.first?.len == 112)
        let a = bufs[UInt16(used[0].id)]!
        var expectHeader = header
        expectHeader[10] = 1 // num_buffers
        #expect(try h.memory.read(at: a, count: 112) == expectHeader + back)
        #expect(!h.device.deviceFeatures.hasBit(VirtioNet.Feature.csum))
    }

    @Test("with MRG_RXBUF a large frame spans several small buffers and num_buffers counts them")
    func mergeableReceive() throws {
        let h = try NetHarness()
        let bufs = try h.postRx(count: 10, size: 256)
        let frame = ethernetFrame(dst: NetHarness.mac, length: 1000, seed: 3)
        h.backend.inject(header + frame)
        try h.device.processQueue(0)
        let used = try h.rx.takeUsed()
        #expect(used.map(\.len) == [256, 256, 256, 244])
        var got: [UInt8] = []
        for u in used { got += try h.memory.read(at: bufs[UInt16(u.id)]!, count: Int(u.len)) }
        #expect(got.count == 1012)
        #expect(got[10] == 4 && got[11] == 0)
        #expect(Array(got[12...]) == frame)
        #expect(h.device.counters.rxPackets == 1)
        #expect(h.device.counters.rxBytes == 1000)
        // The buffers left over serve the next frame.
        h.backend.inject(header + ethernetFrame(dst: NetHarness.mac, length: 60))
        try h.device.processQueue(0)
        #expect(try h.rx.takeUsed().map(\.len) == [72])
    }

    @Test("without MRG_RXBUF each frame takes one chain and num_buffers is 1")
    func plainReceive() throws {
        let h = try NetHarness(features: 0)
        let bufs = try h.postRx(count: 2, size: 1600)
        let frame = ethernetFrame(length: 1514)
        h.backend.inject(header + frame)
        h.backend.inject(header + frame)
        try h.device.processQueue(0)
        let used = try h.rx.takeUsed()
        #expect(used.map(\.len) == [1526, 1526])
        let first = try h.memory.read(at: bufs[UInt16(used[0].id)]!, count: 1526)
        #expect(first[10] == 1)
        #expect(Array(first[12...]) == frame)
    }

    @Test("without guest buffers frames wait in the backend and arrive once buffers are posted")
    func starvedReceive() throws {
        let h = try NetHarness()
        let frame = ethernetFrame(dst: NetHarness.mac, length: 500)
        h.backend.inject(header + frame)
        try h.device.processQueue(0)
        #expect(try h.rx.takeUsed().isEmpty)
        #expect(h.device.counters.noRxAvailBuffer == 1)
        // Not enough for a largest frame (1530 bytes): still waiting.
        try h.postRx(count: 1, size: 1024)
        try h.device.processQueue(0)
        #expect(try h.rx.takeUsed().isEmpty)
        try h.postRx(count: 1, size: 1024)
        try h.device.processQueue(0)
        #expect(try h.rx.takeUsed().map(\.len) == [512])
    }

    @Test("hostile transmit chains are returned unused and counted, never sent")
    func hostileTransmit() throws {
        let h = try NetHarness()
        // A header cut short.
        try h.transmit([0, 0, 0, 0, 0, 0, 0, 0])
        // Longer than a header and the largest offloaded frame.
        try h.transmit([UInt8](repeating: 0, count: 12 + VirtioNet.maxOffloadFrame + 1), pieces: 2)
        // Only device-writable buffers.
        let w = try h.tx.alloc(100)
        try h.tx.addChain([(w, 100, true)])
        try h.device.processQueue(1)
        // A buffer outside guest RAM: the ring code returns it as malformed.
        try h.tx.addChain([(0x7fff_0000_0000, 64, false)])
        try h.device.processQueue(1)
        #expect(h.backend.sent().isEmpty)
        let used = try h.tx.takeUsed()
        #expect(used.count == 4 && used.allSatisfy { $0.len == 0 })
        #expect(h.device.counters.txMalformedFrames == 4)
        #expect(h.device.counters.txPackets == 0)
        // The device still works.
        try h.transmit(header + ethernetFrame(length: 64))
        #expect(h.backend.sent().count == 1)
    }

    @Test("hostile receive chains (readable buffers, too small for a header) are returned empty")
    func hostileReceive() throws {
        let h = try NetHarness()
        let r = try h.rx.alloc(64, fill: [UInt8](repeating: 1, count: 64))
        try h.rx.addChain([(r, 64, false)])
        let tiny = try h.rx.alloc(8)
        try h.rx.addChain([(tiny, 8, true)])
        try h.postRx(count: 8, size: 256)
        h.backend.inject(header + ethernetFrame(dst: NetHarness.mac, length: 100))
        try h.device.processQueue(0)
        let used = try h.rx.takeUsed()
        #expect(used.prefix(2).map(\.len) == [0, 0])
        #expect(used.dropFirst(2).map(\.len) == [112])
        #expect(h.device.counters.rxMalformedChains == 2)
    }

    @Test("a frame shorter than an Ethernet header from the backend is counted and its buffers reused")
    func runtFrame() throws {
        let h = try NetHarness()
        try h.postRx(count: 8, size: 256)
        h.backend.inject(header + [1, 2, 3])
        h.backend.inject(header + ethernetFrame(dst: NetHarness.mac, length: 60))
        try h.device.processQueue(0)
        #expect(try h.rx.takeUsed().map(\.len) == [72])
        #expect(h.device.counters.rxFails == 1)
    }

    @Test("control queue: MAC address, promiscuous mode off filters other unicast, MAC tables, bad commands refused")
    func controlQueue() throws {
        let h = try NetHarness()
        try h.postRx(count: 16, size: 256)
        let newMAC: [UInt8] = [0x02, 0, 0, 0, 0, 0x42]
        #expect(try h.control(1, 1, newMAC) == 0)
        #expect(h.device.currentMAC == newMAC)
        #expect(try h.control(0, 0, [0]) == 0) // promiscuous off
        let other: [UInt8] = [0x02, 0, 0, 0, 0, 0x99]
        h.backend.inject(header + ethernetFrame(dst: other, length: 60))
        h.backend.inject(header + ethernetFrame(dst: newMAC, length: 61))
        h.backend.inject(header + ethernetFrame(length: 62)) // broadcast
        h.backend.inject(header + ethernetFrame(dst: [0x01, 0, 0x5e, 0, 0, 1], length: 63)) // multicast, not allowed
        try h.device.processQueue(0)
        #expect(try h.rx.takeUsed().map(\.len) == [73, 74])
        #expect(h.device.counters.rxFiltered == 2)
        // Unicast table with `other`, multicast table with one group.
        var table: [UInt8] = [1, 0, 0, 0] + other
        table += [1, 0, 0, 0] + [0x01, 0, 0x5e, 0, 0, 1]
        #expect(try h.control(1, 0, table) == 0)
        h.backend.inject(header + ethernetFrame(dst: other, length: 60))
        h.backend.inject(header + ethernetFrame(dst: [0x01, 0, 0x5e, 0, 0, 1], length: 63))
        try h.device.processQueue(0)
        #expect(try h.rx.takeUsed().map(\.len) == [72, 75])
        // A table whose count exceeds its bytes, an unknown class, a short MAC.
        #expect(try h.control(1, 0, [9, 0, 0, 0] + other + [0, 0, 0, 0]) == 1)
        #expect(try h.control(9, 0, [0]) == 1)
        #expect(try h.control(1, 1, [1, 2, 3]) == 1)
        // Guest offloads not negotiated are refused.
        #expect(try h.control(5, 0, [2, 0, 0, 0, 0, 0, 0, 0]) == 1)
    }

    @Test("offloads: the guest's GUEST_* features set the backend's, and the offered features follow the backend")
    func offloads() throws {
        let f = VirtioNet.Feature.mrgRxbuf | VirtioNet.Feature.guestCsum | VirtioNet.Feature.guestTSO4 | VirtioNet.Feature.ctrlGuestOffloads
        let h = try NetHarness(features: f)
        #expect(h.backend.offloads.withLock { $0 } == [.checksum, .tso4])
        #expect(h.device.deviceFeatures.hasBit(VirtioNet.Feature.hostTSO4))
        #expect(!h.device.deviceFeatures.hasBit(VirtioNet.Feature.hostUFO))
        // Turning TSO off at run time.
        #expect(try h.control(5, 0, [2, 0, 0, 0, 0, 0, 0, 0]) == 0)
        #expect(h.backend.offloads.withLock { $0 } == [.checksum])
        h.device.reset()
        #expect(h.backend.offloads.withLock { $0 } == [])
    }

    @Test("the configuration space holds the MAC, link up and one queue pair")
    func config() throws {
        let h = try NetHarness()
        var bytes = [UInt8](repeating: 0, count: 12)
        bytes.withUnsafeMutableBytes { h.device.readConfig(offset: 0, data: $0) }
        #expect(Array(bytes[0..<6]) == NetHarness.mac)
        #expect(bytes[6] == 1 && bytes[8] == 1)
    }

    @Test("a rate-limited transmit holds the frame until the bucket refills, in order")
    func txRateLimit() throws {
        let memory = try makeMemory(size: 16 << 20)
        let tx = MockDriverQueue(memory: memory, size: 16, base: 0x4000, dataBase: 0x40_0000)
        let backend = SocketPairBackend(vnetHeader: true)
        let loop = try EventLoop(name: "net-rl")
        let limit = RateLimitConfig(ops: TokenBucketConfig(size: 1, refillTimeMs: 100))
        let device = try VirtioNet(backend: backend, mac: NetHarness.mac, eventLoop: loop, txRateLimit: limit)
        let rxq = MockDriverQueue(memory: memory, size: 16, base: 0x1000, dataBase: 0x10_0000)
        let scheduled = DispatchSemaphore(value: 0)
        try device.activate(VirtioActivation(memory: memory, queues: [try rxq.deviceQueue(index: 0), try tx.deviceQueue(index: 1), nil],
                                             features: VirtioFeature.common, interrupt: RecordingInterrupt(),
                                             schedule: { _ in scheduled.signal() }))
        try loop.start()
        defer { loop.stop() }
        for seed in 0..<3 {
            let bytes = [UInt8](repeating: 0, count: 12) + ethernetFrame(length: 64, seed: UInt8(seed))
            try tx.addChain([(try tx.alloc(bytes.count, fill: bytes), UInt32(bytes.count), false)])
        }
        try device.processQueue(1)
        #expect(backend.sent().count == 1)
        #expect(device.counters.txRateLimiterThrottled == 1)
        // The timer on the loop releases the rest, one per refill.
        let deadline = Date().addingTimeInterval(5)
        var frames: [[UInt8]] = []
        while frames.count < 2 && Date() < deadline {
            usleep(20_000)
            frames += backend.sent()
        }
        #expect(frames.map { $0[26] } == [1, 2])
    }

    @Test("the readiness loop delivers frames injected while the guest waits")
    func loopDelivers() throws {
        let h = try NetHarness()
        try h.postRx(count: 16, size: 2048)
        try h.device.processQueue(0) // arms the watch
        try h.loop.start()
        defer { h.loop.stop() }
        for i in 0..<5 { h.backend.inject(header + ethernetFrame(dst: NetHarness.mac, length: 100 + i)) }
        let deadline = Date().addingTimeInterval(5)
        var used: [(id: UInt32, len: UInt32)] = []
        while used.count < 5 && Date() < deadline {
            usleep(10_000)
            used += try h.rx.takeUsed()
        }
        #expect(used.map(\.len) == [112, 113, 114, 115, 116])
    }
}

@Suite("network backends")
struct NetBackendTests {
    @Test("a missing passt is named with its Debian package")
    func passtMissing() {
        #expect(throws: NetError("passt is not installed: user-mode networking needs it (Debian package passt)")) {
            _ = try PasstBackend(executable: "/nonexistent/passt")
        }
    }

    @Test("passt's stream framing: frames arriving in pieces are handed over whole, sends carry a big-endian length")
    func passtFraming() throws {
        // A script stands in for passt: it echoes the stream on fd 3 back, so what we send is what we receive.
        let fake = NSTemporaryDirectory() + "fake-passt-\(getpid()).sh"
        try "#!/bin/sh\nexec cat <&3 >&3\n".write(toFile: fake, atomically: true, encoding: .utf8)
        chmod(fake, 0o755)
        defer { unlink(fake) }
        let b = try PasstBackend(executable: fake)
        defer { b.close() }
        let frames: [[UInt8]] = [ethernetFrame(length: 60), ethernetFrame(length: 1514, seed: 7), ethernetFrame(length: 9000, seed: 1)]
        for f in frames {
            var copy = f
            let n = copy.withUnsafeMutableBytes { p -> Int in
                var v = [iovec(iov_base: p.baseAddress, iov_len: 10), iovec(iov_base: p.baseAddress! + 10, iov_len: f.count - 10)]
                return v.withUnsafeMutableBufferPointer { b.send(UnsafeBufferPointer($0)) }
            }
            #expect(n == f.count)
        }
        var got: [[UInt8]] = []
        let deadline = Date().addingTimeInterval(5)
        var buf = [UInt8](repeating: 0, count: 70000)
        while got.count < frames.count && Date() < deadline {
            let n = buf.withUnsafeMutableBytes { p -> Int in
                var v = [iovec(iov_base: p.baseAddress, iov_len: 100), iovec(iov_base: p.baseAddress! + 100, iov_len: p.count - 100)]
                return v.withUnsafeMutableBufferPointer { b.receive(into: UnsafeBufferPointer($0)) }
            }
            if n > 0 { got.append(Array(buf[0..<n])) } else { usleep(10_000) }
        }
        #expect(got == frames)
    }
}

extension UInt64 {
    func hasBit(_ bit: UInt64) -> Bool { self & bit != 0 }
}
