import DiskImage
import Devices
import Foundation
import GuestMemory
import Synchronization
import Testing
@testable import Virtio

/// Records interrupts.
final class RecordingInterrupt: VirtioInterrupt, @unchecked Sendable {
    let queues = Mutex<[Int]>([])
    let configs = Mutex(0)
    func signalQueue(_ queue: Int) { queues.withLock { $0.append(queue) } }
    func signalConfigChange() { configs.withLock { $0 += 1 } }
    var queueSignals: [Int] { queues.withLock { $0 } }
}

/// Records log lines.
final class RecordingLog: Sendable {
    let lines = Mutex<[String]>([])
    var log: VirtioLog { VirtioLog(burst: 1000) { [self] s in self.lines.withLock { $0.append(s) } } }
    var all: [String] { lines.withLock { $0 } }
}

/// Collects console output.
final class ByteSink: SerialOutput, @unchecked Sendable {
    let bytes = Mutex<[UInt8]>([])
    func write(_ b: [UInt8]) { bytes.withLock { $0 += b } }
    var all: [UInt8] { bytes.withLock { $0 } }
}

/// A temporary raw disk file removed on deinit.
final class TempDisk {
    let path: String
    init(size: Int, pattern: Bool = true) throws {
        path = NSTemporaryDirectory() + "virtio-test-\(UUID().uuidString).raw"
        var data = [UInt8](repeating: 0, count: size)
        if pattern { for i in 0..<size { data[i] = UInt8(truncatingIfNeeded: i / 512 + i) } }
        FileManager.default.createFile(atPath: path, contents: Data(data))
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
    func contents() throws -> [UInt8] { Array(try Data(contentsOf: URL(fileURLWithPath: path))) }
}

/// A device activated on one or more mock driver queues.
struct Harness {
    let memory: GuestMemory
    let drivers: [MockDriverQueue]
    let interrupt = RecordingInterrupt()

    init(device: any VirtioDevice, queueCount: Int, eventIdx: Bool = false) throws {
        memory = try makeMemory(size: 8 << 20)
        var ds: [MockDriverQueue] = []
        var qs: [Virtqueue?] = []
        for i in 0..<queueCount {
            let d = MockDriverQueue(memory: memory, size: 16, base: 0x1000 + UInt64(i) * 0x1000, dataBase: 0x10_0000 + UInt64(i) << 20)
            ds.append(d)
            qs.append(try d.deviceQueue(index: i, eventIdx: eventIdx))
        }
        drivers = ds
        try device.activate(VirtioActivation(memory: memory, queues: qs, features: VirtioFeature.common,
                                             interrupt: interrupt, schedule: { _ in }))
    }
}

@Suite("virtio-blk")
struct BlockTests {
    /// Submits one request and returns (status, used length).
    func request(_ dev: VirtioBlock, _ h: Harness, type: UInt32, sector: UInt64, out: [UInt8] = [], inLength: Int = 0,
                 splitData: Bool = false) throws -> (status: UInt8, used: UInt32, data: [UInt8]) {
        let d = h.drivers[0]
        var hdr = [UInt8](repeating: 0, count: 16)
        hdr.putLE(type, at: 0)
        hdr.putLE(sector, at: 8)
        var bufs: [(addr: UInt64, len: UInt32, writable: Bool)] = [(try d.alloc(16, fill: hdr), 16, false)]
        if !out.isEmpty {
            if splitData && out.count >= 2 {
                let half = out.count / 2
                bufs.append((try d.alloc(half, fill: Array(out[..<half])), UInt32(half), false))
                bufs.append((try d.alloc(out.count - half, fill: Array(out[half...])), UInt32(out.count - half), false))
            } else {
                bufs.append((try d.alloc(out.count, fill: out), UInt32(out.count), false))
            }
        }
        var inAddr: UInt64 = 0
        if inLength > 0 { inAddr = try d.alloc(inLength); bufs.append((inAddr, UInt32(inLength), true)) }
        let st = try d.alloc(1, fill: [0xee])
        bufs.append((st, 1, true))
        try d.addChain(bufs)
        try dev.processQueue(0)
        let used = try d.takeUsed()
        #expect(used.count == 1)
        let data = inLength > 0 ? try h.memory.read(at: inAddr, count: inLength) : []
        return (try h.memory.read(at: st, count: 1)[0], used.first?.len ?? 0, data)
    }

    @Test("reads and writes sectors of a raw file, across split buffers")
    func readWrite() throws {
        let disk = try TempDisk(size: 64 << 10)
        let backend = try openDiskImage(path: disk.path, options: .init(readOnly: false, allowBackingFiles: false, format: "raw"))
        let dev = VirtioBlock(backend: backend, serial: "disk0")
        let h = try Harness(device: dev, queueCount: 1)
        let original = try disk.contents()
        let r = try request(dev, h, type: 0, sector: 2, inLength: 1024)
        #expect(r.status == 0)
        #expect(r.used == 1025)
        #expect(r.data == Array(original[1024..<2048]))
        let payload = (0..<1024).map { UInt8(truncatingIfNeeded: $0 * 7) }
        let w = try request(dev, h, type: 1, sector: 4, out: payload, splitData: true)
        #expect(w.status == 0)
        #expect(w.used == 1)
        #expect(try request(dev, h, type: 4, sector: 0).status == 0) // flush
        #expect(Array(try disk.contents()[2048..<3072]) == payload)
        #expect(h.interrupt.queueSignals.count == 3)
    }

    /// A backend that counts flushes and the writes not yet flushed, over a raw file.
    final class FlushCountingBackend: BlockBackend, @unchecked Sendable {
        let inner: BlockBackend
        let state = Mutex((flushes: 0, unflushedWrites: 0))
        init(_ inner: BlockBackend) { self.inner = inner }
        var size: UInt64 { inner.size }
        var isReadOnly: Bool { inner.isReadOnly }
        func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws { try inner.read(into: buffer, at: offset) }
        func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
            try inner.write(data, at: offset)
            state.withLock { $0.unflushedWrites += 1 }
        }
        func flush() throws {
            try inner.flush()
            state.withLock { $0.flushes += 1; $0.unflushedWrites = 0 }
        }
        func discard(at offset: UInt64, length: UInt64) throws { try inner.discard(at: offset, length: length) }
        func writeZeroes(at offset: UInt64, length: UInt64) throws { try inner.writeZeroes(at: offset, length: length) }
        func resize(to newSize: UInt64, allowShrink: Bool) throws { try inner.resize(to: newSize, allowShrink: allowShrink) }
        func close() throws { try inner.close() }
    }

    @Test("FLUSH reaches the backend before the request completes: every write acknowledged before it is durable")
    func flushReachesBackend() throws {
        let disk = try TempDisk(size: 64 << 10)
        let backend = FlushCountingBackend(try openDiskImage(path: disk.path, options: .init(readOnly: false, allowBackingFiles: false, format: "raw")))
        let dev = VirtioBlock(backend: backend, serial: "disk0")
        let h = try Harness(device: dev, queueCount: 1)
        #expect(try request(dev, h, type: 1, sector: 4, out: [UInt8](repeating: 0x5a, count: 512)).status == 0)
        #expect(backend.state.withLock { $0.unflushedWrites } == 1)
        #expect(try request(dev, h, type: 4, sector: 0).status == 0)
        let after = backend.state.withLock { $0 }
        #expect(after.flushes == 1 && after.unflushedWrites == 0, "FLUSH completed without flushing the backend: \(after)")
    }

    @Test("requests past the end, unaligned lengths and unknown types fail with IOERR/UNSUPP")
    func badRequests() throws {
        let disk = try TempDisk(size: 8192)
        let backend = try openDiskImage(path: disk.path, options: .init(readOnly: false, allowBackingFiles: false, format: "raw"))
        let log = RecordingLog()
        let dev = VirtioBlock(backend: backend, serial: "d", log: log.log)
        let h = try Harness(device: dev, queueCount: 1)
        #expect(try request(dev, h, type: 0, sector: 15, inLength: 1024).status == 1)
        #expect(try request(dev, h, type: 0, sector: UInt64.max, inLength: 512).status == 1)
        #expect(try request(dev, h, type: 1, sector: 0, out: [1, 2, 3]).status == 1)
        #expect(try request(dev, h, type: 99, sector: 0).status == 2)
        #expect(log.all.count >= 3)
        #expect(log.all.contains { $0.contains("past the end") })
    }

    @Test("a read whose data buffer is device-readable, or a write whose data is device-writable, fails with IOERR")
    func wrongDataDirection() throws {
        let disk = try TempDisk(size: 8192)
        let before = try disk.contents()
        let dev = VirtioBlock(backend: try openDiskImage(path: disk.path, options: .init(readOnly: false, allowBackingFiles: false, format: "raw")), serial: "d")
        let h = try Harness(device: dev, queueCount: 1)
        let d = h.drivers[0]
        let st = try d.alloc(1)
        try d.addChain([(try d.alloc(16, fill: [UInt8](repeating: 0, count: 16)), 16, false), (try d.alloc(512), 512, false), (st, 1, true)])
        try dev.processQueue(0)
        #expect(try h.memory.read(at: st, count: 1) == [1])
        var hdr = [UInt8](repeating: 0, count: 16); hdr[0] = 1
        let st2 = try d.alloc(1)
        try d.addChain([(try d.alloc(16, fill: hdr), 16, false), (try d.alloc(512, fill: [UInt8](repeating: 7, count: 512)), 512, true), (st2, 1, true)])
        try dev.processQueue(0)
        #expect(try h.memory.read(at: st2, count: 1) == [1])
        #expect(try disk.contents() == before)
    }

    @Test("GET_ID returns the serial padded to 20 bytes")
    func getID() throws {
        let disk = try TempDisk(size: 4096)
        let dev = VirtioBlock(backend: try openDiskImage(path: disk.path, options: .init(readOnly: true, format: "raw")), serial: "my-disk")
        let h = try Harness(device: dev, queueCount: 1)
        let r = try request(dev, h, type: 8, sector: 0, inLength: 20)
        #expect(r.status == 0)
        #expect(r.used == 21)
        #expect(r.data == Array("my-disk".utf8) + [UInt8](repeating: 0, count: 13))
    }

    @Test("a read-only disk offers VIRTIO_BLK_F_RO and answers writes, discards and write-zeroes with IOERR")
    func readOnly() throws {
        let disk = try TempDisk(size: 4096)
        let before = try disk.contents()
        let dev = VirtioBlock(backend: try openDiskImage(path: disk.path, options: .init(readOnly: true, format: "raw")), serial: "ro")
        #expect(dev.deviceFeatures & VirtioBlock.Feature.readOnly != 0)
        #expect(dev.deviceFeatures & VirtioBlock.Feature.discard == 0)
        let h = try Harness(device: dev, queueCount: 1)
        #expect(try request(dev, h, type: 1, sector: 0, out: [UInt8](repeating: 9, count: 512)).status == 1)
        var seg = [UInt8](repeating: 0, count: 16); seg.putLE(UInt32(1), at: 8)
        #expect(try request(dev, h, type: 11, sector: 0, out: seg).status == 1)
        #expect(try request(dev, h, type: 13, sector: 0, out: seg).status == 1)
        #expect(try request(dev, h, type: 4, sector: 0).status == 0)
        #expect(try disk.contents() == before)
    }

    @Test("DISCARD and WRITE_ZEROES (with UNMAP) zero the sectors; bad segments fail")
    func discardAndZeroes() throws {
        let disk = try TempDisk(size: 64 << 10)
        let backend = try openDiskImage(path: disk.path, options: .init(readOnly: false, allowBackingFiles: false, format: "raw"))
        let dev = VirtioBlock(backend: backend, serial: "z")
        let h = try Harness(device: dev, queueCount: 1)
        func seg(_ sector: UInt64, _ n: UInt32, _ flags: UInt32) -> [UInt8] {
            var s = [UInt8](repeating: 0, count: 16); s.putLE(sector, at: 0); s.putLE(n, at: 8); s.putLE(flags, at: 12); return s
        }
        #expect(try request(dev, h, type: 13, sector: 0, out: seg(8, 16, 1)).status == 0)
        #expect(try request(dev, h, type: 13, sector: 0, out: seg(40, 8, 0) + seg(60, 4, 0)).status == 0)
        #expect(try request(dev, h, type: 11, sector: 0, out: seg(100, 8, 0)).status == 0)
        let c = try disk.contents()
        #expect(c[(8 * 512)..<(24 * 512)].allSatisfy { $0 == 0 })
        #expect(c[(40 * 512)..<(48 * 512)].allSatisfy { $0 == 0 })
        #expect(c[(60 * 512)..<(64 * 512)].allSatisfy { $0 == 0 })
        #expect(c[(24 * 512)..<(40 * 512)].contains { $0 != 0 })
        #expect(try request(dev, h, type: 13, sector: 0, out: seg(127, 2, 0)).status == 1) // past the end
        #expect(try request(dev, h, type: 11, sector: 0, out: seg(0, 1, 1)).status == 2)   // discard flags
        #expect(try request(dev, h, type: 13, sector: 0, out: [1, 2, 3]).status == 1)      // partial segment
    }

    @Test("a request without a writable status byte is returned with length 0 and logged")
    func noStatusByte() throws {
        let disk = try TempDisk(size: 4096)
        let log = RecordingLog()
        let dev = VirtioBlock(backend: try openDiskImage(path: disk.path, options: .init(readOnly: true, format: "raw")), serial: "x", log: log.log)
        let h = try Harness(device: dev, queueCount: 1)
        let d = h.drivers[0]
        try d.addChain([(try d.alloc(16, fill: [UInt8](repeating: 0, count: 16)), 16, false)])
        try dev.processQueue(0)
        #expect(try d.takeUsed().first?.len == 0)
        #expect(log.all.contains { $0.contains("status byte") })
        // A header shorter than 16 bytes: IOERR in the status byte.
        let st = try d.alloc(1)
        try d.addChain([(try d.alloc(8), 8, false), (st, 1, true)])
        try dev.processQueue(0)
        #expect(try h.memory.read(at: st, count: 1) == [1])
    }

    @Test("a qcow2 overlay on a read-only base takes writes without changing the base")
    func qcow2Overlay() throws {
        let base = try TempDisk(size: 64 << 10)
        let baseBefore = try base.contents()
        let overlay = NSTemporaryDirectory() + "virtio-test-\(UUID().uuidString).qcow2"
        defer { try? FileManager.default.removeItem(atPath: overlay) }
        var o = Qcow2CreateOptions(size: 64 << 10)
        o.backingFile = base.path
        o.backingFormat = "raw"
        try Qcow2Image.create(path: overlay, options: o)
        #expect(throws: (any Error).self) {
            _ = try openDiskImage(path: overlay, options: .init(readOnly: false, allowBackingFiles: false, format: "qcow2"))
        }
        let backend = try openDiskImage(path: overlay, options: .init(readOnly: false, allowBackingFiles: true, format: "qcow2"))
        let dev = VirtioBlock(backend: backend, serial: "ov")
        let h = try Harness(device: dev, queueCount: 1)
        let r = try request(dev, h, type: 0, sector: 1, inLength: 512)
        #expect(r.data == Array(baseBefore[512..<1024]))
        #expect(try request(dev, h, type: 1, sector: 1, out: [UInt8](repeating: 0xab, count: 512)).status == 0)
        #expect(try request(dev, h, type: 4, sector: 0).status == 0)
        #expect(try request(dev, h, type: 0, sector: 1, inLength: 512).data == [UInt8](repeating: 0xab, count: 512))
        #expect(try base.contents() == baseBefore)
        try backend.close()
    }
}

@Suite("virtio-rng and virtio-console")
struct EntropyConsoleTests {
    @Test("virtio-rng fills every writable byte with random data")
    func entropy() throws {
        let dev = VirtioEntropy()
        let h = try Harness(device: dev, queueCount: 1)
        let d = h.drivers[0]
        let a = try d.alloc(64), b = try d.alloc(64)
        try d.addChain([(a, 64, true), (b, 64, true)])
        try dev.processQueue(0)
        #expect(try d.takeUsed().first?.len == 128)
        let bytes = try h.memory.read(at: a, count: 64) + h.memory.read(at: b, count: 64)
        #expect(Set(bytes).count > 16)
        #expect(h.interrupt.queueSignals == [0])
    }

    @Test("virtio-console sends TX buffers to the output and host input into RX buffers")
    func console() throws {
        let sink = ByteSink()
        let dev = VirtioConsole(output: sink, columns: 100, rows: 40)
        let h = try Harness(device: dev, queueCount: 2)
        var cfg = [UInt8](repeating: 0, count: 8)
        cfg.withUnsafeMutableBytes { dev.readConfig(offset: 0, data: $0) }
        #expect(cfg.getLE(UInt16.self, at: 0) == 100)
        #expect(cfg.getLE(UInt16.self, at: 2) == 40)
        let tx = h.drivers[1]
        try tx.addChain([(try tx.alloc(6, fill: Array("hello ".utf8)), 6, false), (try tx.alloc(5, fill: Array("world".utf8)), 5, false)])
        try dev.processQueue(1)
        #expect(sink.all == Array("hello world".utf8))
        #expect(try tx.takeUsed().count == 1)
        // Input before any RX buffer is held, then delivered.
        dev.enqueueInput(Array("abcdef".utf8))
        let rx = h.drivers[0]
        let r1 = try rx.alloc(4), r2 = try rx.alloc(4)
        try rx.addChain([(r1, 4, true)])
        try rx.addChain([(r2, 4, true)])
        try dev.processQueue(0)
        let used = try rx.takeUsed()
        #expect(used.map(\.len) == [4, 2])
        #expect(try h.memory.read(at: r1, count: 4) == Array("abcd".utf8))
        #expect(try h.memory.read(at: r2, count: 2) == Array("ef".utf8))
        // A TX chain with a writable buffer in the wrong place is malformed, not fatal.
        try tx.addChain([(try tx.alloc(4), 4, true), (try tx.alloc(4), 4, false)])
        try dev.processQueue(1)
        #expect(try tx.takeUsed().first?.len == 0)
    }
}
