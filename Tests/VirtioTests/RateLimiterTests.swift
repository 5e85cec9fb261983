import DiskImage
import Devices
import Dispatch
import Foundation
import GuestMemory
import Synchronization
import Testing
@testable import Virtio

/// A clock the test moves by hand (nanoseconds).
final class ManualClock: Sendable {
    private let now = Mutex<UInt64>(1_000_000_000)
    var read: RateLimiter.Clock { { [self] in now.withLock { $0 } } }
    func advance(ms: UInt64) { now.withLock { $0 += ms * 1_000_000 } }
}

@Suite("token buckets and rate limiters (injected clock)")
struct TokenBucketTests {
    let ms: UInt64 = 1_000_000

    @Test("a bucket starts full, empties, and refills in proportion to the time passed")
    func refill() {
        let clock = ManualClock()
        let l = RateLimiter(RateLimitConfig(bandwidth: TokenBucketConfig(size: 1000, refillTimeMs: 100)), clock: clock.read)
        #expect(l.consume(bytes: 1000) == .allowed)
        #expect(l.consume(bytes: 1) == .throttled(retryAfterNs: ms))        // 0.1 ms needed, 1 ms minimum
        #expect(l.consume(bytes: 500) == .throttled(retryAfterNs: 50 * ms))
        clock.advance(ms: 30)
        #expect(l.consume(bytes: 500) == .throttled(retryAfterNs: 20 * ms))
        #expect(l.state.bandwidth?.budget == 300)
        clock.advance(ms: 20)
        #expect(l.consume(bytes: 500) == .allowed)
        #expect(l.state.bandwidth?.budget == 0)
        clock.advance(ms: 1000)                                              // never above the size
        #expect(l.state.bandwidth?.budget == 0)
        #expect(l.consume(bytes: 0) == .allowed)
        #expect(l.state.bandwidth?.budget == 1000)
        #expect(l.consume(bytes: 1001) == .allowed)                          // oversized but full: served
    }

    @Test("the one-time burst is used first and never refilled")
    func oneTimeBurst() {
        let clock = ManualClock()
        let l = RateLimiter(RateLimitConfig(bandwidth: TokenBucketConfig(size: 100, oneTimeBurst: 250, refillTimeMs: 1000)),
                            clock: clock.read)
        #expect(l.consume(bytes: 200) == .allowed)
        #expect(l.state.bandwidth?.oneTimeBurst == 50)
        #expect(l.state.bandwidth?.budget == 100)
        #expect(l.consume(bytes: 120) == .allowed)                           // 50 from the burst, 70 from the budget
        #expect(l.state.bandwidth?.oneTimeBurst == 0)
        #expect(l.state.bandwidth?.budget == 30)
        clock.advance(ms: 5000)
        #expect(l.consume(bytes: 0) == .allowed)
        #expect(l.state.bandwidth?.oneTimeBurst == 0)
        #expect(l.state.bandwidth?.budget == 100)
        #expect(l.consume(bytes: 101) == .allowed)                           // oversized, bucket full
        #expect(l.consume(bytes: 1) != .allowed)
    }

    @Test("both buckets must have tokens; a refused request takes nothing from either")
    func bothBuckets() {
        let clock = ManualClock()
        let l = RateLimiter(RateLimitConfig(bandwidth: TokenBucketConfig(size: 4096, refillTimeMs: 1000),
                                            ops: TokenBucketConfig(size: 2, refillTimeMs: 1000)), clock: clock.read)
        #expect(l.consume(bytes: 2048) == .allowed)
        #expect(l.consume(bytes: 1024) == .allowed)
        // Ops are exhausted although bandwidth remains: refused, and the bandwidth is untouched.
        #expect(l.consume(bytes: 1024) == .throttled(retryAfterNs: 500 * ms))
        #expect(l.state.bandwidth?.budget == 1024)
        #expect(l.state.ops?.budget == 0)
        clock.advance(ms: 500)
        // One op is back and the bandwidth is at 3072: 4096 bytes need 250 ms more.
        #expect(l.consume(bytes: 4096) == .throttled(retryAfterNs: 250 * ms))
        #expect(l.state.ops?.budget == 1)
        #expect(l.consume(bytes: 3072) == .allowed)
    }

    @Test("a request larger than the bucket waits until the bucket is full, then leaves a debt")
    func oversized() {
        let clock = ManualClock()
        let l = RateLimiter(RateLimitConfig(bandwidth: TokenBucketConfig(size: 1000, refillTimeMs: 100)), clock: clock.read)
        #expect(l.consume(bytes: 10) == .allowed)
        // 2500 > size: only served from a full bucket (10 tokens missing = 1 ms).
        #expect(l.consume(bytes: 2500) == .throttled(retryAfterNs: ms))
        clock.advance(ms: 1)
        #expect(l.consume(bytes: 2500) == .allowed)
        #expect(l.state.bandwidth?.budget == -1500)
        // The debt is paid back before anything else: 1 byte needs 1501 tokens = 150.1 ms.
        #expect(l.consume(bytes: 1) == .throttled(retryAfterNs: 150_100_000))
        clock.advance(ms: 150)
        #expect(l.consume(bytes: 1) != .allowed)
        clock.advance(ms: 1)
        #expect(l.consume(bytes: 1) == .allowed)
    }

    @Test("updates replace, disable or keep each bucket; size or refill time 0 means no limit")
    func updates() {
        let clock = ManualClock()
        let l = RateLimiter(RateLimitConfig(bandwidth: TokenBucketConfig(size: 100, refillTimeMs: 1000),
                                            ops: TokenBucketConfig(size: 0, refillTimeMs: 1000)), clock: clock.read)
        #expect(l.state.ops == nil)
        #expect(l.consume(bytes: 100) == .allowed)
        #expect(l.consume(bytes: 100) != .allowed)
        l.update(bandwidth: .keep, ops: .set(TokenBucketConfig(size: 1, refillTimeMs: 1000)))
        #expect(l.consume(bytes: 100) != .allowed)
        l.update(bandwidth: .set(TokenBucketConfig(size: 500, refillTimeMs: 1000)), ops: .keep)
        #expect(l.consume(bytes: 500) == .allowed)                           // a new bucket starts full
        #expect(l.consume(bytes: 0) != .allowed)                             // the ops bucket (1 op) is used up
        l.update(bandwidth: .disable, ops: RateLimiter.BucketUpdate(TokenBucketConfig(size: 5, refillTimeMs: 0)))
        #expect(!l.isLimiting)
        for _ in 0..<100 { #expect(l.consume(bytes: 1 << 30) == .allowed) }
        #expect(RateLimiter.BucketUpdate(nil) == .keep)
        #expect(RateLimiter.BucketUpdate(TokenBucketConfig(size: 0, refillTimeMs: 10)) == .disable)
    }

    @Test("huge sizes and refill times do not overflow")
    func extremes() {
        let clock = ManualClock()
        let l = RateLimiter(RateLimitConfig(bandwidth: TokenBucketConfig(size: UInt64.max, oneTimeBurst: UInt64.max, refillTimeMs: UInt64.max),
                                            ops: TokenBucketConfig(size: 1, refillTimeMs: UInt64.max)), clock: clock.read)
        #expect(l.consume(bytes: UInt64.max) == .allowed)
        if case .throttled(let ns) = l.consume(bytes: 1) { #expect(ns > 1_000_000_000) } else { Issue.record("expected throttled") }
    }
}

/// A block or rng device on a 64-entry mock queue whose `schedule` processes the queue on a
/// serial dispatch queue (as the transport's event loop would).
final class LimitedHarness: @unchecked Sendable {
    let memory: GuestMemory
    let driver: MockDriverQueue
    let interrupt = RecordingInterrupt()
    let device: any VirtioDevice
    private let queue = DispatchQueue(label: "limited-harness")
    private let driverLock = NSLock()

    init(device: any VirtioDevice) throws {
        self.device = device
        memory = try makeMemory(size: 8 << 20)
        driver = MockDriverQueue(memory: memory, size: 64, base: 0x1000, dataBase: 0x10_0000)
        let q = try driver.deviceQueue()
        let run: @Sendable (Int) -> Void = { [queue, device] _ in queue.async { try? device.processQueue(0) } }
        try device.activate(VirtioActivation(memory: memory, queues: [q], features: VirtioFeature.common,
                                             interrupt: interrupt, schedule: run))
    }

    /// A driver kick: process the queue (serialized with timer-driven runs).
    func kick() { queue.sync { try? device.processQueue(0) } }

    /// Adds a read of `length` bytes at `sector`; returns (data address, status address).
    func addRead(sector: UInt64, length: Int) throws -> (data: UInt64, status: UInt64) {
        var hdr = [UInt8](repeating: 0, count: 16)
        hdr.putLE(VirtioBlock.RequestType.input, at: 0)
        hdr.putLE(sector, at: 8)
        let h = try driver.alloc(16, fill: hdr)
        let data = try driver.alloc(length)
        let st = try driver.alloc(1, fill: [0xee])
        try queue.sync { try driver.addChain([(h, 16, false), (data, UInt32(length), true), (st, 1, true)]) }
        return (data, st)
    }

    /// Waits (up to `timeout` seconds) until `count` used entries were returned; returns them in order.
    func waitUsed(_ count: Int, timeout: Double = 30) throws -> [(id: UInt32, len: UInt32)] {
        var all: [(id: UInt32, len: UInt32)] = []
        let deadline = Date().addingTimeInterval(timeout)
        while all.count < count, Date() < deadline {
            all += try queue.sync { try driver.takeUsed() }
            if all.count < count { usleep(2000) }
        }
        return all
    }
}

@Suite("rate-limited virtio-blk and virtio-rng")
struct RateLimitedDeviceTests {
    func seconds(since start: UInt64) -> Double { Double(RateLimiter.monotonicClock() - start) / 1e9 }

    /// Reads 1 MiB in 8 requests with a 2.56 MB/s limit (256 KiB bucket refilled in 100 ms).
    func throttledRead(ioThreads: Int, loop: EventLoop?) throws {
        let disk = try TempDisk(size: 2 << 20)
        let backend = try RawFileBackend(path: disk.path, readOnly: true, direct: false)
        let limit = RateLimitConfig(bandwidth: TokenBucketConfig(size: 256 << 10, refillTimeMs: 100))
        let dev = VirtioBlock(backend: backend, serial: "rl", ioThreads: ioThreads, rateLimit: limit, eventLoop: loop)
        defer { dev.shutdown() }
        let h = try LimitedHarness(device: dev)
        let original = try disk.contents()
        let start = RateLimiter.monotonicClock()
        var reqs: [(data: UInt64, status: UInt64)] = []
        for i in 0..<8 { reqs.append(try h.addRead(sector: UInt64(i) * 256, length: 128 << 10)) }
        h.kick()
        let used = try h.waitUsed(8)
        let elapsed = seconds(since: start)
        try #require(used.count == 8)
        // The first 256 KiB come from the full bucket; the other 768 KiB need 300 ms of refill.
        #expect(elapsed >= 0.29, "1 MiB at 2.56 MB/s after a 256 KiB burst took only \(elapsed) s")
        if ioThreads == 0 {
            #expect(used.map(\.id) == (0..<8).map { UInt32($0 * 3) })       // in order
        }
        #expect(used.allSatisfy { $0.len == (128 << 10) + 1 })
        for (i, r) in reqs.enumerated() {
            #expect(try h.memory.read(at: r.status, count: 1) == [0])
            #expect(try h.memory.read(at: r.data, count: 128 << 10) == Array(original[(i * (128 << 10))..<((i + 1) * (128 << 10))]))
        }
    }

    @Test("reading 1 MiB with a bandwidth limit takes at least the limit's time, in order (event-loop timerfd)")
    func bandwidthLimitedRead() throws {
        let loop = try EventLoop(name: "rl-test")
        try loop.start()
        defer { loop.stop() }
        try throttledRead(ioThreads: 0, loop: loop)
    }

    @Test("the limit also holds with I/O threads and a dispatch timer; no request is lost")
    func bandwidthLimitedReadThreads() throws {
        try throttledRead(ioThreads: 3, loop: nil)
    }

    @Test("an ops limit holds requests; a runtime update releases the held request at once")
    func opsUpdate() throws {
        let disk = try TempDisk(size: 64 << 10)
        let dev = VirtioBlock(backend: try RawFileBackend(path: disk.path, readOnly: true, direct: false), serial: "ops",
                              rateLimit: RateLimitConfig(ops: TokenBucketConfig(size: 1, refillTimeMs: 3_600_000)))
        let h = try LimitedHarness(device: dev)
        _ = try h.addRead(sector: 0, length: 512)
        _ = try h.addRead(sector: 1, length: 512)
        _ = try h.addRead(sector: 2, length: 512)
        h.kick()
        #expect(try h.waitUsed(1).count == 1)
        h.kick()                                                             // more kicks do not bypass the limit
        usleep(50_000)
        #expect(try h.waitUsed(1, timeout: 0.1).isEmpty)
        dev.updateRateLimit(bandwidth: .keep, ops: .disable)
        let rest = try h.waitUsed(2)
        #expect(rest.map(\.id) == [3, 6])
    }

    @Test("a held request is resumed by the timer alone (no further kick): the guest is never starved")
    func timerResumes() throws {
        let disk = try TempDisk(size: 64 << 10)
        let dev = VirtioBlock(backend: try RawFileBackend(path: disk.path, readOnly: true, direct: false), serial: "t",
                              rateLimit: RateLimitConfig(ops: TokenBucketConfig(size: 1, refillTimeMs: 100)))
        let h = try LimitedHarness(device: dev)
        let start = RateLimiter.monotonicClock()
        for i in 0..<4 { _ = try h.addRead(sector: UInt64(i), length: 512) }
        h.kick()
        let used = try h.waitUsed(4)
        #expect(used.map(\.id) == [0, 3, 6, 9])
        #expect(seconds(since: start) >= 0.29)                                // 3 more ops at 10/s
    }

    @Test("the bandwidth bucket is charged the data bytes of reads and writes, even with a header split across descriptors")
    func chargedBytes() throws {
        let disk = try TempDisk(size: 64 << 10)
        let dev = VirtioBlock(backend: try RawFileBackend(path: disk.path, readOnly: false, direct: false), serial: "c")
        let memory = try makeMemory(size: 8 << 20)
        let d = MockDriverQueue(memory: memory, size: 16)
        let q = try d.deviceQueue()
        func header(_ type: UInt32) -> [UInt8] {
            var h = [UInt8](repeating: 0, count: 16)
            h.putLE(type, at: 0)
            return h
        }
        func chain() throws -> DescriptorChain {
            guard case .chain(let c)? = try q.popAvailable() else { throw VirtioError.badRequest(queue: 0, head: 0, reason: "no chain") }
            return c
        }
        let read = header(VirtioBlock.RequestType.input)
        try d.addChain([(try d.alloc(2, fill: Array(read[0..<2])), 2, false), (try d.alloc(14, fill: Array(read[2...])), 14, false),
                        (try d.alloc(4096), 4096, true), (try d.alloc(1), 1, true)])
        #expect(dev.dataBytes(try chain(), memory: memory) == 4096)
        try d.addChain([(try d.alloc(16, fill: header(VirtioBlock.RequestType.output)), 16, false),
                        (try d.alloc(1024), 1024, false), (try d.alloc(1), 1, true)])
        #expect(dev.dataBytes(try chain(), memory: memory) == 1024)
        try d.addChain([(try d.alloc(16, fill: header(VirtioBlock.RequestType.flush)), 16, false), (try d.alloc(1), 1, true)])
        #expect(dev.dataBytes(try chain(), memory: memory) == 0)
        try d.addChain([(try d.alloc(2), 2, false), (try d.alloc(1), 1, true)])   // too short for a type
        #expect(dev.dataBytes(try chain(), memory: memory) == 0)
    }

    @Test("reset drops a held request; the device works again after re-activation")
    func resetDropsHeld() throws {
        let disk = try TempDisk(size: 64 << 10)
        let dev = VirtioBlock(backend: try RawFileBackend(path: disk.path, readOnly: true, direct: false), serial: "r",
                              rateLimit: RateLimitConfig(ops: TokenBucketConfig(size: 1, refillTimeMs: 3_600_000)))
        let h = try LimitedHarness(device: dev)
        _ = try h.addRead(sector: 0, length: 512)
        _ = try h.addRead(sector: 1, length: 512)
        h.kick()
        #expect(try h.waitUsed(1).count == 1)
        dev.reset()
        dev.updateRateLimit(bandwidth: .keep, ops: .disable)
        let h2 = try LimitedHarness(device: dev)
        _ = try h2.addRead(sector: 3, length: 512)
        h2.kick()
        #expect(try h2.waitUsed(1).map(\.id) == [0])
    }

    @Test("virtio-rng with a bandwidth limit serves every request, in order, no faster than the limit")
    func entropyLimited() throws {
        let dev = VirtioEntropy(rateLimit: RateLimitConfig(bandwidth: TokenBucketConfig(size: 64, refillTimeMs: 100)))
        let h = try LimitedHarness(device: dev)
        let start = RateLimiter.monotonicClock()
        var bufs: [UInt64] = []
        for _ in 0..<4 {
            let b = try h.driver.alloc(64)
            bufs.append(b)
            try h.driver.addChain([(b, 64, true)])
        }
        h.kick()
        let used = try h.waitUsed(4)
        #expect(used.map(\.id) == [0, 1, 2, 3])
        #expect(used.allSatisfy { $0.len == 64 })
        #expect(seconds(since: start) >= 0.29)                                // 192 bytes more at 640 B/s
    }
}

@Suite("virtio-blk backend replacement")
struct ReplaceBackendTests {
    @Test("a new backing file is used from the next request; capacity and config change are signalled")
    func replace() throws {
        let a = try TempDisk(size: 64 << 10)
        let b = try TempDisk(size: 128 << 10, pattern: false)
        let bBytes = (0..<(128 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 5) }
        FileManager.default.createFile(atPath: b.path, contents: Data(bBytes))
        let dev = VirtioBlock(backend: try RawFileBackend(path: a.path, readOnly: false, direct: false), serial: "swap", ioThreads: 2)
        defer { dev.shutdown() }
        let h = try LimitedHarness(device: dev)
        func capacity() -> UInt64 {
            var c = [UInt8](repeating: 0, count: 8)
            c.withUnsafeMutableBytes { dev.readConfig(offset: 0, data: $0) }
            return c.getLE(UInt64.self, at: 0) ?? 0
        }
        #expect(capacity() == 128)
        let r1 = try h.addRead(sector: 0, length: 4096)
        h.kick()
        #expect(try h.waitUsed(1).count == 1)
        #expect(try h.memory.read(at: r1.data, count: 4096) == Array(try a.contents()[0..<4096]))

        let old = try #require(try dev.replaceBackend { try RawFileBackend(path: b.path, readOnly: false, direct: false) })
        try old.close()
        #expect(capacity() == 256)
        #expect(h.interrupt.configs.withLock { $0 } == 1)
        let r2 = try h.addRead(sector: 200, length: 4096)                    // past the old disk's end
        h.kick()
        #expect(try h.waitUsed(1).count == 1)
        #expect(try h.memory.read(at: r2.status, count: 1) == [0])
        #expect(try h.memory.read(at: r2.data, count: 4096) == Array(bBytes[(200 * 512)..<(200 * 512 + 4096)]))
    }

    @Test("a backend whose read-only state differs, or an open that fails, leaves the old one in use")
    func readOnlyMismatch() throws {
        let a = try TempDisk(size: 64 << 10)
        let b = try TempDisk(size: 128 << 10)
        let dev = VirtioBlock(backend: try RawFileBackend(path: a.path, readOnly: false, direct: false), serial: "ro")
        #expect(try dev.replaceBackend { try RawFileBackend(path: b.path, readOnly: true, direct: false) } == nil)
        #expect(dev.capacitySectors == 128)
        // A failing open leaves the old backend in use.
        struct OpenFailed: Error {}
        #expect(throws: OpenFailed.self) { try dev.replaceBackend { throw OpenFailed() } }
        #expect(dev.capacitySectors == 128)
        #expect(dev.backend is RawFileBackend)
    }
}
