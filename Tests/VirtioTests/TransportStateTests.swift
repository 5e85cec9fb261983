import Devices
import Foundation
import GuestMemory
import PCI
import Testing
@testable import Virtio

@Suite("virtio-pci transport saved state")
struct TransportStateTests {
    static func encode(_ s: VirtioPCITransport.SavedState) throws -> Data {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return try e.encode(s)
    }

    /// An rng transport driven to DRIVER_OK with MSI-X entry 1 (message 0xfee00000/0x41) for
    /// queue 0, which served `served` requests.
    static func liveRNG(memory: GuestMemory, queue q: MockDriverQueue, served: Int) throws
        -> (VirtioPCITransport, PCIDriver, RecordingController, EventLoop) {
        let (t, drv, ctl, _, loop) = try TransportTests().make(VirtioEntropy(), memory: memory)
        var p = Int(drv.cfgRead(0x34, UInt8.self)), msixCap = 0
        while p != 0 { if drv.cfgRead(p, UInt8.self) == 0x11 { msixCap = p }; p = Int(drv.cfgRead(p + 1, UInt8.self)) }
        drv.cfgWrite(msixCap + 2, UInt16(0x8000))
        drv.write(0x4000 + 16, UInt32(0xfee0_0000)); drv.write(0x4000 + 16 + 8, UInt32(0x41)); drv.write(0x4000 + 16 + 12, UInt32(0))
        drv.initialize(features: VirtioFeature.common | VirtioFeature.ringEventIdx, queues: [q], driverOK: false)
        drv.write(0x16, UInt16(0)); drv.write(0x1a, UInt16(1))
        drv.write(0x14, drv.read(0x14, UInt8.self) | VirtioStatus.driverOK)
        for i in 0..<served {
            try q.addChain([(try q.alloc(16), 16, true)])
            drv.notify(0)
            #expect(try waitUntil { try q.usedIndex() == UInt16(i + 1) })
        }
        return (t, drv, ctl, loop)
    }

    @Test("a live device saved with a request waiting in its ring continues on a fresh transport: a second save gives the same bytes, the waiting request is served, and the restored MSI-X vector is programmed and fires")
    func liveRoundTrip() throws {
        let mem = try makeMemory()
        let q = MockDriverQueue(memory: mem, size: 8)
        let (a, _, _, loopA) = try Self.liveRNG(memory: mem, queue: q, served: 2)
        // A third request made available while the device's loop is paused: saved unserved.
        loopA.pause()
        try q.addChain([(try q.alloc(16), 16, true)])
        try q.setUsedEvent(2)                            // EVENT_IDX: interrupt at the next used entry
        a.quiesce()
        let saved = a.saveState()
        loopA.stop()
        #expect(try q.usedIndex() == 2)

        let loopB = try EventLoop(name: "virtio-test")
        defer { loopB.stop() }
        let ctlB = RecordingController()
        let b = try VirtioPCITransport(device: VirtioEntropy(), memory: mem, msiController: ctlB, eventLoop: loopB, ioEvents: nil)
        try b.restoreState(saved)
        #expect(try Self.encode(b.saveState()) == Self.encode(saved), "save → restore → save gives identical bytes")
        #expect(b.status & VirtioStatus.driverOK != 0 && b.msix.isEnabled)
        try loopB.start()
        #expect(try waitUntil { try q.usedIndex() == 3 }, "the request left in the ring is served after the restore")
        #expect(waitUntil { ctlB.vector(1).count == 1 })
        #expect(ctlB.vector(1).message.withLock { $0 }.map { $0.0 == 0xfee0_0000 && $0.1 == 0x41 } == true)
        #expect(ctlB.vector(0).count == 0)
    }

    @Test("a device the driver never started restores as not started")
    func idleRoundTrip() throws {
        let mem = try makeMemory()
        let (a, _, _, _, loopA) = try TransportTests().make(VirtioEntropy(), memory: mem)
        defer { loopA.stop() }
        let saved = a.saveState()
        let (b, drv, _, _, loopB) = try TransportTests().make(VirtioEntropy(), memory: mem)
        defer { loopB.stop() }
        try b.restoreState(saved)
        #expect(try Self.encode(b.saveState()) == Self.encode(saved))
        #expect(drv.read(0x14, UInt8.self) == 0)
    }

    @Test("saved states that cannot be right are refused, naming what is wrong: wrong queue count, a queue larger than offered, a live device without DRIVER_OK, an enabled queue without a position, rings outside guest RAM, another device's configuration space")
    func refused() throws {
        let mem = try makeMemory()
        let q = MockDriverQueue(memory: mem, size: 8)
        let (a, _, _, loopA) = try Self.liveRNG(memory: mem, queue: q, served: 1)
        loopA.pause()
        let good = a.saveState()
        loopA.stop()
        func attempt(_ change: (inout VirtioPCITransport.SavedState) -> Void) throws -> String? {
            var s = good
            change(&s)
            let (t, _, _, _, loop) = try TransportTests().make(VirtioEntropy(), memory: mem)
            defer { loop.stop() }
            do { try t.restoreState(s) } catch { return error.description }
            return nil
        }
        #expect(try attempt { $0.registers.queues.append($0.registers.queues[0]) }?.contains("2 saved queues") == true)
        #expect(try attempt { $0.registers.queues[0].size = 4096 }?.contains("larger than") == true)
        #expect(try attempt { $0.registers.status &= ~VirtioStatus.driverOK }?.contains("DRIVER_OK") == true)
        #expect(try attempt { $0.rings = [nil] }?.contains("enabled without a saved position") == true)
        #expect(try attempt { $0.registers.queues[0].desc = 1 << 40 }?.contains("not in guest RAM") == true)
        #expect(try attempt { $0.config.bytes[2] ^= 0xff }?.contains("read-only configuration byte") == true)
        #expect(try attempt { _ in } == nil)
    }
}
