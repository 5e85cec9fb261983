import GuestMemory
import Synchronization
import Testing
@testable import Virtio

/// Records what the device signals.
private final class CountingInterrupt: VirtioInterrupt, @unchecked Sendable {
    let queues = Mutex<[Int]>([])
    let configChanges = Mutex(0)
    func signalQueue(_ queue: Int) { queues.withLock { $0.append(queue) } }
    func signalConfigChange() { configChanges.withLock { $0 += 1 } }
}

@Suite("virtio-balloon")
struct BalloonTests {
    /// A balloon activated on four mock queues (inflate, deflate, stats, reporting) with `features`.
    private func make(features: UInt64) throws -> (VirtioBalloon, GuestMemory, [MockDriverQueue], CountingInterrupt) {
        let mem = try makeMemory(size: 8 << 20)
        let drivers = (0..<4).map { MockDriverQueue(memory: mem, size: 8, base: 0x1000 + UInt64($0) * 0x1000, dataBase: 0x10_0000 + UInt64($0) * 0x4_0000) }
        let balloon = VirtioBalloon(deflateOnOOM: true, statsInterval: 0, freePageReporting: true, eventLoop: nil)
        let irq = CountingInterrupt()
        let queues = try drivers.enumerated().map { i, d in try d.deviceQueue(index: i) }
        try balloon.activate(VirtioActivation(memory: mem, queues: queues, features: features, interrupt: irq, schedule: { _ in }))
        return (balloon, mem, drivers, irq)
    }

    @Test("features: stats queue always, deflate-on-OOM and free page reporting when asked; the config has num_pages and actual, and only actual is the driver's")
    func config() throws {
        let b = VirtioBalloon(deflateOnOOM: false, statsInterval: 1, freePageReporting: false, eventLoop: nil)
        #expect(b.deviceFeatures == VirtioBalloon.Feature.statsVQ)
        #expect(b.deviceType.rawValue == 5 && b.queueMaxSizes.count == 4 && b.configSize == 8)
        b.setTarget(pages: 300)
        var c = [UInt8](repeating: 0xee, count: 8)
        c.withUnsafeMutableBytes { b.readConfig(offset: 0, data: $0) }
        #expect(c.getLE(UInt32.self, at: 0) == 300 && c.getLE(UInt32.self, at: 4) == 0)
        var w = [UInt8](); w.putLE(UInt32(123), at: 0)
        w.withUnsafeBytes { b.writeConfig(offset: 4, data: $0) }
        w.withUnsafeBytes { b.writeConfig(offset: 0, data: $0) }        // num_pages: the host's, ignored
        #expect(b.status.actualPages == 123 && b.status.targetPages == 300)
    }

    @Test("inflate discards the listed pages (they read zero), counts them, and skips page numbers outside RAM; deflate counts; both return the buffers")
    func inflateDeflate() throws {
        let (b, mem, drv, _) = try make(features: VirtioBalloon.Feature.statsVQ)
        for p: UInt64 in [0x300, 0x301] { try mem.writeLE(UInt64(0x1122_3344_5566_7788), at: p * 4096) }
        var pfns = [UInt8]()
        for (i, pfn) in [UInt32(0x300), 0x301, 0xfffff].enumerated() { pfns.putLE(pfn, at: 4 * i) }
        let list = try drv[0].alloc(pfns.count, fill: pfns)
        try drv[0].addChain([(list, UInt32(pfns.count), false)])
        try b.processQueue(0)
        #expect(try drv[0].takeUsed().count == 1)
        #expect(b.status.inflatedPages == 2 && b.status.invalidEntries == 1)
        #expect(try mem.readLE(UInt64.self, at: 0x300 * 4096) == 0, "an inflated page reads zero")
        let back = try drv[1].alloc(4, fill: [0x00, 0x03, 0, 0])
        try drv[1].addChain([(back, 4, false)])
        try b.processQueue(1)
        #expect(try b.status.deflatedPages == 1 && drv[1].takeUsed().count == 1)
    }

    @Test("the stats buffer is read and kept; polling returns it (used) so the guest refills it; free page reporting discards page-aligned ranges and skips the rest")
    func statsAndReporting() throws {
        let features = VirtioBalloon.Feature.statsVQ | VirtioBalloon.Feature.pageReporting
        let (b, mem, drv, irq) = try make(features: features)
        var stats = [UInt8]()
        for (i, (tag, value)) in [(UInt16(4), UInt64(1 << 30)), (5, 2 << 30)].enumerated() {
            stats.putLE(tag, at: 10 * i)
            stats.putLE(value, at: 10 * i + 2)
        }
        let sbuf = try drv[2].alloc(stats.count, fill: stats)
        try drv[2].addChain([(sbuf, UInt32(stats.count), false)])
        try b.processQueue(2)
        #expect(b.statistics == ["free_memory": 1 << 30, "total_memory": 2 << 30])
        #expect(try drv[2].usedIndex() == 0, "the stats buffer is kept until the next poll")

        try mem.writeLE(UInt64(42), at: 0x200 * 4096)
        try drv[3].addChain([(0x200 * 4096, 8192, true), (0x300 * 4096 + 1, 4096, true)])
        try b.processQueue(3)
        #expect(b.status.reportedBytes == 8192 && b.status.invalidEntries == 1)
        #expect(try mem.readLE(UInt64.self, at: 0x200 * 4096) == 0)
        #expect(try drv[3].takeUsed().count == 1)
        _ = irq
    }

    @Test("without the stats queue negotiated, queue 2 is the reporting queue")
    func queueNumbering() throws {
        let (b, _, drv, _) = try make(features: VirtioBalloon.Feature.pageReporting)
        try drv[2].addChain([(0x100 * 4096, 4096, true)])
        try b.processQueue(2)
        #expect(b.status.reportedBytes == 4096)
    }

    @Test("activation needs the inflate and deflate queues")
    func needsQueues() throws {
        let mem = try makeMemory()
        let b = VirtioBalloon(deflateOnOOM: false, statsInterval: 0, freePageReporting: false, eventLoop: nil)
        #expect(throws: VirtioError.self) {
            try b.activate(VirtioActivation(memory: mem, queues: [nil, nil, nil, nil], features: 0,
                                            interrupt: CountingInterrupt(), schedule: { _ in }))
        }
    }
}
