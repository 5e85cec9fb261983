import Devices
import Foundation
import GuestMemory
import PCI
import Synchronization
import Testing
@testable import Virtio

final class RecordingVector: MSIVector, @unchecked Sendable {
    let fired = Mutex(0)
    let message = Mutex<(UInt64, UInt32)?>(nil)
    func program(address: UInt64, data: UInt32) { message.withLock { $0 = (address, data) } }
    func fire() { fired.withLock { $0 += 1 } }
    var count: Int { fired.withLock { $0 } }
}

final class RecordingController: MSIController, @unchecked Sendable {
    let vectors = Mutex<[RecordingVector]>([])
    func makeVector() throws -> any MSIVector {
        let v = RecordingVector()
        vectors.withLock { $0.append(v) }
        return v
    }
    func vector(_ i: Int) -> RecordingVector { vectors.withLock { $0[i] } }
}

final class RecordingLine: InterruptLine, @unchecked Sendable {
    let level = Mutex(false)
    func set(level l: Bool) { level.withLock { $0 = l } }
    var isHigh: Bool { level.withLock { $0 } }
}

/// Drives a VirtioPCITransport the way a guest driver does, through config space and BAR 4.
final class PCIDriver {
    let t: VirtioPCITransport
    init(_ t: VirtioPCITransport) { self.t = t }

    func cfgRead<T: FixedWidthInteger>(_ off: Int, _: T.Type = T.self) -> T {
        var b = [UInt8](repeating: 0, count: MemoryLayout<T>.size)
        b.withUnsafeMutableBytes { t.configuration.read(offset: off, data: $0) }
        return b.getLE(T.self, at: 0)!
    }
    func cfgWrite<T: FixedWidthInteger>(_ off: Int, _ v: T) {
        var b = [UInt8](); b.putLE(v, at: 0)
        b.withUnsafeBytes { t.configuration.write(offset: off, data: $0) }
    }
    func read<T: FixedWidthInteger>(_ off: UInt64, _: T.Type = T.self) -> T {
        var b = [UInt8](repeating: 0, count: MemoryLayout<T>.size)
        b.withUnsafeMutableBytes { t.barRead(index: 4, offset: off, data: $0) }
        return b.getLE(T.self, at: 0)!
    }
    func write<T: FixedWidthInteger>(_ off: UInt64, _ v: T) {
        var b = [UInt8](); b.putLE(v, at: 0)
        b.withUnsafeBytes { t.barWrite(index: 4, offset: off, data: $0) }
    }

    /// Vendor capabilities: cfg_type → (bar, offset, length, capability offset).
    func virtioCaps() -> [UInt8: (bar: UInt8, offset: UInt32, length: UInt32, at: Int)] {
        var out: [UInt8: (UInt8, UInt32, UInt32, Int)] = [:]
        var p = Int(cfgRead(0x34, UInt8.self))
        var guardCount = 0
        while p != 0, guardCount < 48 {
            if cfgRead(p, UInt8.self) == 0x09 {
                out[cfgRead(p + 3, UInt8.self)] = (cfgRead(p + 4, UInt8.self), cfgRead(p + 8, UInt32.self), cfgRead(p + 12, UInt32.self), p)
            }
            p = Int(cfgRead(p + 1, UInt8.self))
            guardCount += 1
        }
        return out
    }

    /// Status, feature negotiation and the setup of every queue from `drivers`; returns the status read back.
    @discardableResult
    func initialize(features: UInt64, queues: [MockDriverQueue], driverOK: Bool = true) -> UInt8 {
        write(0x14, UInt8(0))
        write(0x14, VirtioStatus.acknowledge)
        write(0x14, VirtioStatus.acknowledge | VirtioStatus.driver)
        write(0x08, UInt32(0)); write(0x0c, UInt32(truncatingIfNeeded: features))
        write(0x08, UInt32(1)); write(0x0c, UInt32(truncatingIfNeeded: features >> 32))
        write(0x14, VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK)
        let st: UInt8 = read(0x14)
        guard st & VirtioStatus.featuresOK != 0 else { return st }
        for (i, q) in queues.enumerated() {
            write(0x16, UInt16(i))
            write(0x18, q.size)
            write(0x20, UInt32(truncatingIfNeeded: q.layout.descriptorTable)); write(0x24, UInt32(q.layout.descriptorTable >> 32))
            write(0x28, q.layout.availableRing)
            write(0x30, q.layout.usedRing)
            write(0x1c, UInt16(1))
        }
        if driverOK { write(0x14, st | VirtioStatus.driverOK) }
        return read(0x14)
    }

    func notify(_ q: Int) { write(0x3000 + 4 * UInt64(q), UInt16(q)) }
}

/// Waits (bounded) until `cond` holds; not a timing assertion.
func waitUntil(_ cond: () throws -> Bool) rethrows -> Bool {
    for _ in 0..<500 {
        if try cond() { return true }
        usleep(10_000)
    }
    return try cond()
}

@Suite("virtio-pci transport")
struct TransportTests {
    func make(_ device: any VirtioDevice, memory: GuestMemory, log: VirtioLog = .discard) throws
        -> (VirtioPCITransport, PCIDriver, RecordingController, RecordingLine, EventLoop) {
        let loop = try EventLoop(name: "virtio-test")
        try loop.start()
        let ctl = RecordingController()
        let t = try VirtioPCITransport(device: device, memory: memory, msiController: ctl, eventLoop: loop, ioEvents: nil, log: log)
        let line = RecordingLine()
        t.configuration.attachINTx(line)
        return (t, PCIDriver(t), ctl, line, loop)
    }

    @Test("PCI identity and the vendor capabilities point into BAR 4")
    func identity() throws {
        let mem = try makeMemory()
        let (_, drv, _, _, loop) = try make(VirtioEntropy(), memory: mem)
        defer { loop.stop() }
        #expect(drv.cfgRead(0, UInt16.self) == 0x1af4)
        #expect(drv.cfgRead(2, UInt16.self) == 0x1044)
        #expect(drv.cfgRead(8, UInt8.self) == 1)
        #expect(drv.cfgRead(0x2c, UInt16.self) == 0x1af4)
        let caps = drv.virtioCaps()
        #expect(caps[1]?.bar == 4 && caps[1]?.offset == 0)
        #expect(caps[2]?.offset == 0x3000)
        #expect(drv.cfgRead(caps[2]!.at + 16, UInt32.self) == 4)
        #expect(caps[3]?.offset == 0x1000)
        #expect(caps[4] == nil) // rng has no device config
        #expect(caps[5] != nil)
        #expect(drv.read(0x12, UInt16.self) == 1) // num_queues
    }

    @Test("feature negotiation refuses drivers without VERSION_1 or with unknown features")
    func negotiation() throws {
        let mem = try makeMemory()
        let (_, drv, _, _, loop) = try make(VirtioEntropy(), memory: mem)
        defer { loop.stop() }
        drv.write(0x00, UInt32(1))
        #expect(drv.read(0x04, UInt32.self) & 1 == 1) // VERSION_1 offered
        #expect(drv.initialize(features: 0, queues: []) & VirtioStatus.featuresOK == 0)
        #expect(drv.initialize(features: VirtioFeature.version1 | (1 << 40), queues: []) & VirtioStatus.featuresOK == 0)
        #expect(drv.initialize(features: VirtioFeature.version1, queues: [], driverOK: false) & VirtioStatus.featuresOK != 0)
        drv.write(0x14, UInt8(0))
        #expect(drv.read(0x14, UInt8.self) == 0)
    }

    @Test("a request notified through the notify area is served on the event loop and raises INTx with ISR bit 0")
    func requestWithINTx() throws {
        let mem = try makeMemory()
        let (t, drv, _, line, loop) = try make(VirtioEntropy(), memory: mem)
        defer { loop.stop() }
        let q = MockDriverQueue(memory: mem, size: 8)
        let st = drv.initialize(features: VirtioFeature.common, queues: [q])
        #expect(st & VirtioStatus.driverOK != 0)
        let buf = try q.alloc(32)
        try q.addChain([(buf, 32, true)])
        drv.notify(0)
        #expect(try waitUntil { try q.usedIndex() == 1 })
        #expect(try q.takeUsed().first?.len == 32)
        #expect(waitUntil { line.isHigh })
        #expect(drv.read(0x1000, UInt8.self) == 1)
        #expect(!line.isHigh)
        #expect(drv.read(0x1000, UInt8.self) == 0)
        #expect(t.status & VirtioStatus.deviceNeedsReset == 0)
    }

    @Test("with MSI-X enabled, the queue's vector fires; VIRTIO_MSI_NO_VECTOR fires nothing")
    func msix() throws {
        let mem = try makeMemory()
        let (t, drv, ctl, line, loop) = try make(VirtioEntropy(), memory: mem)
        defer { loop.stop() }
        // Enable MSI-X (Message Control bit 15) and unmask entry 1 with a message.
        var p = Int(drv.cfgRead(0x34, UInt8.self)), msixCap = 0
        while p != 0 { if drv.cfgRead(p, UInt8.self) == 0x11 { msixCap = p }; p = Int(drv.cfgRead(p + 1, UInt8.self)) }
        #expect(msixCap != 0)
        drv.cfgWrite(msixCap + 2, UInt16(0x8000))
        drv.write(0x4000 + 16, UInt32(0xfee0_0000)); drv.write(0x4000 + 16 + 8, UInt32(0x41)); drv.write(0x4000 + 16 + 12, UInt32(0))
        #expect(t.msix.isEnabled)
        let q = MockDriverQueue(memory: mem, size: 8)
        drv.initialize(features: VirtioFeature.common, queues: [q], driverOK: false)
        drv.write(0x16, UInt16(0)); drv.write(0x1a, UInt16(1))
        #expect(drv.read(0x1a, UInt16.self) == 1)
        drv.write(0x14, drv.read(0x14, UInt8.self) | VirtioStatus.driverOK)
        try q.addChain([(try q.alloc(8), 8, true)])
        drv.notify(0)
        #expect(waitUntil { ctl.vector(1).count == 1 })
        #expect(!line.isHigh)
        drv.write(0x1a, virtioMSINoVector)
        try q.addChain([(try q.alloc(8), 8, true)])
        drv.notify(0)
        #expect(try waitUntil { try q.usedIndex() == 2 })
        #expect(ctl.vector(1).count == 1)
    }

    @Test("rings outside guest RAM or a hostile avail index set DEVICE_NEEDS_RESET; the VMM keeps running and reset recovers")
    func needsReset() throws {
        let mem = try makeMemory()
        let log = RecordingLog()
        let (t, drv, _, line, loop) = try make(VirtioEntropy(), memory: mem, log: log.log)
        defer { loop.stop() }
        var bad = MockDriverQueue(memory: mem, size: 8, base: 0x1000)
        bad = MockDriverQueue(memory: mem, size: 8, base: 0x7fff_f000)
        let st = drv.initialize(features: VirtioFeature.common, queues: [bad])
        #expect(st & VirtioStatus.deviceNeedsReset != 0)
        #expect(line.isHigh) // config change interrupt
        #expect(drv.read(0x1000, UInt8.self) == 2)
        #expect(log.all.contains { $0.contains("not in guest RAM") })
        // Reset and set up a good queue, then jump avail.idx.
        let q = MockDriverQueue(memory: mem, size: 8)
        #expect(drv.initialize(features: VirtioFeature.common, queues: [q]) & VirtioStatus.deviceNeedsReset == 0)
        try q.setAvailIndex(100)
        drv.notify(0)
        #expect(waitUntil { t.status & VirtioStatus.deviceNeedsReset != 0 })
        // After a reset the device works again.
        let q2 = MockDriverQueue(memory: mem, size: 8, base: 0x4000)
        #expect(drv.initialize(features: VirtioFeature.common, queues: [q2]) == 0x0f)
        try q2.addChain([(try q2.alloc(8), 8, true)])
        drv.notify(0)
        #expect(try waitUntil { try q2.usedIndex() == 1 })
    }

    @Test("common config accesses out of range or of odd widths do not crash; queue_select past the end reads zero")
    func oddAccesses() throws {
        let mem = try makeMemory()
        let (_, drv, _, _, loop) = try make(VirtioConsole(output: NullSerialOutputForTests()), memory: mem)
        defer { loop.stop() }
        drv.write(0x16, UInt16(7))
        #expect(drv.read(0x18, UInt16.self) == 0)
        drv.write(0x20, UInt64.max)
        drv.write(0x37, UInt32.max)
        drv.write(0x7ff, UInt64.max)
        drv.write(0x3000 + 4 * 50, UInt16(50))
        drv.write(0x3001, UInt8(0))
        #expect(drv.read(0x2000, UInt16.self) == 80) // console cols
        _ = drv.read(0x2000 + 10, UInt64.self)       // past the config: zero, no crash
        _ = drv.read(0x7ff8, UInt64.self)
        drv.write(0x16, UInt16(1))
        #expect(drv.read(0x18, UInt16.self) == 256)
        drv.write(0x18, UInt16(4096))
        #expect(drv.read(0x18, UInt16.self) == 256)
    }
}

final class NullSerialOutputForTests: SerialOutput, Sendable {
    func write(_ bytes: [UInt8]) {}
}
