import Devices
import PCI
import Synchronization

/// Reads `count` bytes of config space at `offset` as a little-endian integer.
func cfgRead(_ c: PCIConfiguration, _ offset: Int, _ count: Int) -> UInt64 {
    readLE(count) { c.read(offset: offset, data: $0) }
}

/// Writes `count` little-endian bytes of `value` at `offset`.
func cfgWrite(_ c: PCIConfiguration, _ offset: Int, _ count: Int, _ value: UInt64) {
    writeLE(count, value) { c.write(offset: offset, data: $0) }
}

/// Little-endian read through any raw reader.
func readLE(_ count: Int, _ body: (UnsafeMutableRawBufferPointer) -> Void) -> UInt64 {
    var bytes = [UInt8](repeating: 0x5a, count: count)
    bytes.withUnsafeMutableBytes { body($0) }
    return bytes.enumerated().reduce(0) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
}

/// Little-endian write through any raw writer.
func writeLE(_ count: Int, _ value: UInt64, _ body: (UnsafeRawBufferPointer) -> Void) {
    let bytes = (0..<count).map { UInt8((value >> (8 * UInt64($0))) & 0xff) }
    bytes.withUnsafeBytes { body($0) }
}

/// An MSI vector that records what it was asked to do.
final class RecordingVector: MSIVector {
    enum Event: Equatable { case program(UInt64, UInt32), fire }
    let events = Mutex<[Event]>([])
    func program(address: UInt64, data: UInt32) { events.withLock { $0.append(.program(address, data)) } }
    func fire() { events.withLock { $0.append(.fire) } }
    var log: [Event] { events.withLock { $0 } }
    func clear() { events.withLock { $0.removeAll() } }
}

/// An MSI controller handing out recording vectors.
final class RecordingController: MSIController {
    let made = Mutex<[RecordingVector]>([])
    let failAfter: Int?
    init(failAfter: Int? = nil) { self.failAfter = failAfter }
    struct Exhausted: Error {}
    func makeVector() throws -> any MSIVector {
        try made.withLock { m in
            if let f = failAfter, m.count >= f { throw Exhausted() }
            let v = RecordingVector()
            m.append(v)
            return v
        }
    }
    var vectors: [RecordingVector] { made.withLock { $0 } }
}

/// An interrupt line that records levels.
final class RecordingLine: InterruptLine {
    let levels = Mutex<[Bool]>([])
    func set(level: Bool) { levels.withLock { $0.append(level) } }
    var log: [Bool] { levels.withLock { $0 } }
}

/// A test device with configurable BARs; records BAR writes and remaps; BAR reads return
/// `0xA0 + index` in every byte.
final class TestDevice: PCIDevice {
    let configuration: PCIConfiguration
    struct Access: Equatable { var index: Int; var offset: UInt64; var bytes: [UInt8] }
    struct Remap: Equatable { var index: Int; var old: UInt64?; var new: UInt64? }
    let writes = Mutex<[Access]>([])
    let remaps = Mutex<[Remap]>([])

    init(bars: [PCIBarSpec], deviceID: UInt16 = 0x1234) {
        configuration = PCIConfiguration(vendorID: 0x1af4, deviceID: deviceID, classCode: 0xff, subclass: 0, progIF: 0,
                                         revision: 1, subsystemVendorID: 0x1af4, subsystemID: 0x42)
        for b in bars { configuration.addBAR(b) }
    }
    func barRead(index: Int, offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        for i in data.indices { data[i] = UInt8(0xA0 + index) }
    }
    func barWrite(index: Int, offset: UInt64, data: UnsafeRawBufferPointer) {
        writes.withLock { $0.append(Access(index: index, offset: offset, bytes: Array(data))) }
    }
    func barRemapped(index: Int, from old: UInt64?, to new: UInt64?) {
        remaps.withLock { $0.append(Remap(index: index, old: old, new: new)) }
    }
    var writeLog: [Access] { writes.withLock { $0 } }
    var remapLog: [Remap] { remaps.withLock { $0 } }
}
