import Devices
import DiskImage
import Foundation
import GuestMemory
import Synchronization
import Testing
@testable import Virtio

/// An edge-triggered interrupt line that counts its pulses (the irqfd of the VMM).
final class PulseCounter: InterruptLine, @unchecked Sendable {
    let pulses = Mutex(0)
    func set(level: Bool) { if level { trigger() } }
    func trigger() { pulses.withLock { $0 += 1 } }
    var count: Int { pulses.withLock { $0 } }
}

/// Records ioeventfd registrations.
final class RecordingIOEvents: IOEventRegistry, @unchecked Sendable {
    struct Registration: Equatable { let address: UInt64; let length: Int; let datamatch: UInt64? }
    let registrations = Mutex<[Registration]>([])
    func register(address: UInt64, length: Int, datamatch: UInt64?, eventFD: EventFD, pio: Bool) throws {
        registrations.withLock { $0.append(Registration(address: address, length: length, datamatch: datamatch)) }
    }
    func unregister(address: UInt64, length: Int, datamatch: UInt64?, eventFD: EventFD, pio: Bool) throws {}
}

/// Drives a VirtioMMIOTransport as a guest driver does (Linux's virtio_mmio.c order), through bus accesses.
final class MMIODriver {
    typealias R = VirtioMMIOTransport.Register
    let t: VirtioMMIOTransport
    init(_ t: VirtioMMIOTransport) { self.t = t }

    func read<T: FixedWidthInteger>(_ off: UInt64, _: T.Type = UInt32.self) -> T {
        var b = [UInt8](repeating: 0xaa, count: MemoryLayout<T>.size)
        b.withUnsafeMutableBytes { t.read(offset: off, data: $0) }
        return b.getLE(T.self, at: 0)!
    }
    func write<T: FixedWidthInteger>(_ off: UInt64, _ v: T) {
        var b = [UInt8](); b.putLE(v, at: 0)
        b.withUnsafeBytes { t.write(offset: off, data: $0) }
    }
    func r32(_ off: UInt64) -> UInt32 { read(off, UInt32.self) }
    func w32(_ off: UInt64, _ v: UInt32) { write(off, v) }
    var status: UInt32 { r32(R.status) }

    /// Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, the queues of `queues` (QueueNum = `sizes` or the
    /// queue's size), then DRIVER_OK unless told otherwise; returns the status read back.
    @discardableResult
    func initialize(features: UInt64, queues: [MockDriverQueue], sizes: [UInt32]? = nil, driverOK: Bool = true) -> UInt32 {
        w32(R.status, 0)
        w32(R.status, UInt32(VirtioStatus.acknowledge))
        w32(R.status, UInt32(VirtioStatus.acknowledge | VirtioStatus.driver))
        w32(R.driverFeaturesSel, 0); w32(R.driverFeatures, UInt32(truncatingIfNeeded: features))
        w32(R.driverFeaturesSel, 1); w32(R.driverFeatures, UInt32(truncatingIfNeeded: features >> 32))
        w32(R.status, UInt32(VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK))
        let st = status
        guard st & UInt32(VirtioStatus.featuresOK) != 0 else { return st }
        for (i, q) in queues.enumerated() {
            w32(R.queueSel, UInt32(i))
            w32(R.queueNum, sizes?[i] ?? UInt32(q.size))
            w32(R.queueDescLow, UInt32(truncatingIfNeeded: q.layout.descriptorTable)); w32(R.queueDescHigh, UInt32(q.layout.descriptorTable >> 32))
            w32(R.queueDriverLow, UInt32(truncatingIfNeeded: q.layout.availableRing)); w32(R.queueDriverHigh, UInt32(q.layout.availableRing >> 32))
            w32(R.queueDeviceLow, UInt32(truncatingIfNeeded: q.layout.usedRing)); w32(R.queueDeviceHigh, UInt32(q.layout.usedRing >> 32))
            w32(R.queueReady, 1)
        }
        if driverOK { w32(R.status, st | UInt32(VirtioStatus.driverOK)) }
        return status
    }

    func notify(_ q: UInt32) { w32(R.queueNotify, q) }
}

@Suite("virtio-mmio transport")
struct MMIOTransportTests {
    typealias R = VirtioMMIOTransport.Register
    static let base: UInt64 = 0xf000_0000

    func make(_ device: any VirtioDevice, memory: GuestMemory, log: VirtioLog = .discard, ioEvents: (any IOEventRegistry)? = nil) throws
        -> (VirtioMMIOTransport, MMIODriver, PulseCounter, EventLoop) {
        let loop = try EventLoop(name: "virtio-mmio-test")
        try loop.start()
        let line = PulseCounter()
        let t = try VirtioMMIOTransport(device: device, base: Self.base, memory: memory, interrupt: line, eventLoop: loop,
                                        ioEvents: ioEvents, log: log)
        return (t, MMIODriver(t), line, loop)
    }

    @Test("identity registers: magic \"virt\", version 2, device and vendor IDs, QueueNumMax per queue, no shared memory")
    func identity() throws {
        let mem = try makeMemory()
        let (_, drv, _, loop) = try make(VirtioConsole(output: NullSerialOutputForTests()), memory: mem)
        defer { loop.stop() }
        #expect(drv.r32(R.magicValue) == 0x7472_6976)
        #expect(drv.r32(R.version) == 2)
        #expect(drv.r32(R.deviceID) == 3)
        #expect(drv.r32(R.vendorID) == 0x1af4)
        drv.w32(R.deviceFeaturesSel, 1)
        #expect(drv.r32(R.deviceFeatures) & 1 == 1) // VERSION_1 (bit 32)
        drv.w32(R.deviceFeaturesSel, 2)
        #expect(drv.r32(R.deviceFeatures) == 0)
        drv.w32(R.queueSel, 1)
        #expect(drv.r32(R.queueNumMax) == 256)
        #expect(drv.r32(R.queueReady) == 0)
        drv.w32(R.queueSel, 2)
        #expect(drv.r32(R.queueNumMax) == 0, "a queue the device does not have reads QueueNumMax 0")
        for shm in [R.shmLenLow, R.shmLenHigh, R.shmBaseLow, R.shmBaseHigh] { #expect(drv.r32(shm) == 0xffff_ffff) }
        #expect(drv.read(0x100, UInt16.self) == 80) // console cols at configuration offset 0
    }

    @Test("each queue's QueueNotify gets an ioeventfd (4 bytes, datamatch = the queue index)")
    func ioeventfds() throws {
        let mem = try makeMemory()
        let events = RecordingIOEvents()
        let (_, _, _, loop) = try make(VirtioConsole(output: NullSerialOutputForTests()), memory: mem, ioEvents: events)
        defer { loop.stop() }
        let expected = (0..<2).map { RecordingIOEvents.Registration(address: Self.base + 0x50, length: 4, datamatch: UInt64($0)) }
        #expect(events.registrations.withLock { $0 } == expected)
    }

    @Test("feature negotiation refuses drivers without VERSION_1 or with unknown features; features freeze at FEATURES_OK")
    func negotiation() throws {
        let mem = try makeMemory()
        let (_, drv, _, loop) = try make(VirtioEntropy(), memory: mem)
        defer { loop.stop() }
        #expect(drv.initialize(features: 0, queues: []) & UInt32(VirtioStatus.featuresOK) == 0)
        #expect(drv.initialize(features: VirtioFeature.version1 | (1 << 40), queues: []) & UInt32(VirtioStatus.featuresOK) == 0)
        #expect(drv.initialize(features: VirtioFeature.version1, queues: [], driverOK: false) & UInt32(VirtioStatus.featuresOK) != 0)
        // After FEATURES_OK, DriverFeatures is ignored: a later write of an unknown bit changes nothing.
        drv.w32(R.driverFeaturesSel, 1); drv.w32(R.driverFeatures, 0xffff_ffff)
        let q = MockDriverQueue(memory: mem, size: 8)
        drv.w32(R.queueSel, 0); drv.w32(R.queueNum, 8)
        drv.w32(R.queueDescLow, UInt32(q.layout.descriptorTable)); drv.w32(R.queueDriverLow, UInt32(q.layout.availableRing))
        drv.w32(R.queueDeviceLow, UInt32(q.layout.usedRing)); drv.w32(R.queueReady, 1)
        drv.w32(R.status, drv.status | UInt32(VirtioStatus.driverOK))
        #expect(drv.status == 0x0f)
        drv.w32(R.status, 0)
        #expect(drv.status == 0)
    }

    @Test("a request notified through QueueNotify is served on the event loop; InterruptStatus bit 0 and one pulse; InterruptACK clears")
    func request() throws {
        let mem = try makeMemory()
        let (t, drv, line, loop) = try make(VirtioEntropy(), memory: mem)
        defer { loop.stop() }
        let q = MockDriverQueue(memory: mem, size: 8)
        #expect(drv.initialize(features: VirtioFeature.common, queues: [q]) == 0x0f)
        drv.w32(R.queueSel, 0)
        #expect(drv.r32(R.queueReady) == 1)
        let buf = try q.alloc(32)
        try q.addChain([(buf, 32, true)])
        drv.notify(0)
        #expect(try waitUntil { try q.usedIndex() == 1 })
        #expect(try q.takeUsed().first?.len == 32)
        #expect(waitUntil { line.count == 1 })
        #expect(drv.r32(R.interruptStatus) == 1)
        drv.w32(R.interruptACK, 1)
        #expect(drv.r32(R.interruptStatus) == 0)
        #expect(t.status & VirtioStatus.deviceNeedsReset == 0)
    }

    @Test("QueueNum above QueueNumMax, zero or not a power of two, and rings outside RAM set DEVICE_NEEDS_RESET with a configuration interrupt; reset recovers",
          arguments: [UInt32(512), UInt32(0), UInt32(12), UInt32(65536 + 8)])
    func badQueueSize(size: UInt32) throws {
        let mem = try makeMemory()
        let log = RecordingLog()
        let (t, drv, line, loop) = try make(VirtioEntropy(), memory: mem, log: log.log)
        defer { loop.stop() }
        let q = MockDriverQueue(memory: mem, size: 8)
        let st = drv.initialize(features: VirtioFeature.common, queues: [q], sizes: [size])
        #expect(st & UInt32(VirtioStatus.deviceNeedsReset) != 0, "QueueNum \(size): \(log.all)")
        #expect(line.count == 1)
        #expect(drv.r32(R.interruptStatus) == 2)
        let generation = drv.r32(R.configGeneration)
        #expect(generation == 1)
        // The queue was never activated: a notify does nothing.
        try q.addChain([(try q.alloc(8), 8, true)])
        drv.notify(0)
        usleep(20_000)
        #expect(try q.usedIndex() == 0)
        // Rings outside RAM.
        let outside = MockDriverQueue(memory: mem, size: 8, base: 0x7fff_f000)
        #expect(drv.initialize(features: VirtioFeature.common, queues: [outside]) & UInt32(VirtioStatus.deviceNeedsReset) != 0)
        #expect(log.all.contains { $0.contains("not in guest RAM") })
        // After a reset the device works.
        let good = MockDriverQueue(memory: mem, size: 8, base: 0x4000)
        #expect(drv.initialize(features: VirtioFeature.common, queues: [good]) == 0x0f)
        #expect(drv.r32(R.interruptStatus) == 0, "reset clears InterruptStatus")
        try good.addChain([(try good.alloc(8), 8, true)])
        drv.notify(0)
        #expect(try waitUntil { try good.usedIndex() == 1 })
        #expect(t.status == 0x0f)
    }

    @Test("a hostile avail index after DRIVER_OK sets DEVICE_NEEDS_RESET; the transport keeps answering")
    func hostileAvail() throws {
        let mem = try makeMemory()
        let (t, drv, line, loop) = try make(VirtioEntropy(), memory: mem)
        defer { loop.stop() }
        let q = MockDriverQueue(memory: mem, size: 8)
        #expect(drv.initialize(features: VirtioFeature.common, queues: [q]) == 0x0f)
        try q.setAvailIndex(100)
        drv.notify(0)
        #expect(waitUntil { t.status & VirtioStatus.deviceNeedsReset != 0 })
        #expect(waitUntil { line.count == 1 })
        #expect(drv.r32(R.interruptStatus) & 2 == 2)
        #expect(drv.r32(R.magicValue) == 0x7472_6976)
    }

    @Test("read-only registers ignore writes, write-only registers read 0, queue registers are frozen after DRIVER_OK, status bits cannot be cleared")
    func readOnlyAndFrozen() throws {
        let mem = try makeMemory()
        let log = RecordingLog()
        let (t, drv, _, loop) = try make(VirtioEntropy(), memory: mem, log: log.log)
        defer { loop.stop() }
        for reg in [R.magicValue, R.version, R.deviceID, R.vendorID, R.deviceFeatures, R.queueNumMax, R.interruptStatus, R.configGeneration] {
            let before = drv.r32(reg)
            drv.w32(reg, 0x1234_5678)
            #expect(drv.r32(reg) == before, "register 0x\(String(reg, radix: 16))")
        }
        #expect(log.all.contains { $0.contains("read-only or reserved register 0x0") })
        for reg in [R.driverFeatures, R.queueNotify, R.interruptACK, R.queueDescLow, R.queueDeviceHigh, R.queueNum, 0x0c0, 0x0f8] {
            #expect(drv.r32(reg) == 0, "register 0x\(String(reg, radix: 16))")
        }
        let q = MockDriverQueue(memory: mem, size: 8)
        #expect(drv.initialize(features: VirtioFeature.common, queues: [q]) == 0x0f)
        // Live: moving the rings or disabling the queue is ignored, and the device keeps serving the old rings.
        drv.w32(R.queueSel, 0)
        drv.w32(R.queueReady, 0)
        drv.w32(R.queueDescLow, 0x7000_0000)
        drv.w32(R.queueNum, 4)
        #expect(drv.r32(R.queueReady) == 1)
        drv.w32(R.status, UInt32(VirtioStatus.acknowledge)) // clearing bits
        #expect(drv.status == 0x0f)
        drv.w32(R.status, 0x1ff)                              // not an 8-bit value
        #expect(drv.status == 0x0f)
        drv.notify(7)                                         // no such queue
        drv.notify(UInt32.max)
        try q.addChain([(try q.alloc(8), 8, true)])
        drv.notify(0)
        #expect(try waitUntil { try q.usedIndex() == 1 })
        #expect(t.status == 0x0f)
        // Selecting a queue that does not exist: its registers read 0 and writes go nowhere.
        drv.w32(R.status, 0)
        drv.w32(R.queueSel, 5)
        drv.w32(R.queueNum, 8); drv.w32(R.queueReady, 1)
        #expect(drv.r32(R.queueReady) == 0 && drv.r32(R.queueNumMax) == 0)
    }

    @Test("accesses of the wrong width or alignment to the registers are ignored, configuration accesses past its end too")
    func widths() throws {
        let mem = try makeMemory()
        let log = RecordingLog()
        let blk = VirtioBlock(backend: ZeroBackend(size: 1 << 20), serial: "w")
        let (_, drv, _, loop) = try make(blk, memory: mem, log: log.log)
        defer { loop.stop() }
        #expect(drv.read(R.magicValue, UInt8.self) == 0)
        #expect(drv.read(R.magicValue, UInt16.self) == 0)
        #expect(drv.read(R.magicValue, UInt64.self) == 0)
        #expect(drv.read(R.magicValue + 1, UInt32.self) == 0)
        drv.write(R.status, UInt8(VirtioStatus.acknowledge))
        drv.write(R.status, UInt16(VirtioStatus.acknowledge))
        drv.write(R.status, UInt64(VirtioStatus.acknowledge))
        drv.write(R.status + 2, UInt32(VirtioStatus.acknowledge))
        #expect(drv.status == 0)
        #expect(log.all.contains { $0.contains("registers are 32-bit") })
        // Configuration: capacity (sectors) at offset 0, any width within bounds; past the end reads 0.
        #expect(drv.read(0x100, UInt64.self) == (1 << 20) / 512)
        #expect(drv.read(0x100, UInt32.self) == (1 << 20) / 512)
        #expect(drv.read(0x100 + 58, UInt32.self) == 0)
        #expect(drv.read(0x100 + 4000, UInt64.self) == 0)
        #expect(drv.read(0xfff, UInt8.self) == 0)
        drv.write(0x100 + 59, UInt64.max)
        drv.write(0x100, UInt64.max) // read-only fields of the block configuration stay
        #expect(drv.read(0x100, UInt64.self) == (1 << 20) / 512)
        // An odd-sized access (3 bytes) is refused too.
        var three = [UInt8](repeating: 0xff, count: 3)
        three.withUnsafeMutableBytes { drv.t.read(offset: 0x100, data: $0) }
        #expect(three == [0, 0, 0])
    }

    @Test("random register traffic (any offset, width and value) never crashes and leaves the transport answering")
    func randomTraffic() throws {
        let mem = try makeMemory()
        let blk = VirtioBlock(backend: ZeroBackend(size: 1 << 20), serial: "r")
        let (_, drv, _, loop) = try make(blk, memory: mem)
        defer { loop.stop() }
        var rng = SplitMix64(seed: 0x5eed_0013)
        let widths = [1, 2, 3, 4, 8]
        for _ in 0..<20_000 {
            let offset = rng.next() % 0x1000
            let width = widths[Int(rng.next() % UInt64(widths.count))]
            // Bias towards the registers and values that matter.
            let value = rng.next() % 4 == 0 ? rng.next() % 16 : rng.next()
            var bytes = (0..<width).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) }
            if rng.next() % 2 == 0 {
                bytes.withUnsafeBytes { drv.t.write(offset: offset & ~3, data: $0) }
            } else {
                bytes.withUnsafeMutableBytes { drv.t.read(offset: offset, data: $0) }
            }
        }
        drv.w32(R.status, 0)
        #expect(drv.r32(R.magicValue) == 0x7472_6976)
        let q = MockDriverQueue(memory: mem, size: 8, base: 0x8000)
        #expect(drv.initialize(features: VirtioFeature.common, queues: [q]) == 0x0f)
    }
}

/// A deterministic generator for the random tests.
struct SplitMix64 {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}

/// A read-only disk of zeroes (the transport tests only read its configuration).
final class ZeroBackend: BlockBackend, @unchecked Sendable {
    let size: UInt64
    init(size: UInt64) { self.size = size }
    var isReadOnly: Bool { true }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        for i in 0..<buffer.count { buffer[i] = 0 }
    }
    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {}
    func flush() throws {}
    func discard(at offset: UInt64, length: UInt64) throws {}
    func writeZeroes(at offset: UInt64, length: UInt64) throws {}
    func resize(to newSize: UInt64, allowShrink: Bool) throws {}
    func close() throws {}
}
