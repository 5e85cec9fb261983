import Synchronization
@testable import Devices

/// An interrupt line that records every level change.
final class RecordingLine: InterruptLine {
    private let levels = Mutex<[Bool]>([])
    func set(level: Bool) { levels.withLock { $0.append(level) } }
    /// Every level set, in order.
    var history: [Bool] { levels.withLock { $0 } }
    /// The last level set (false if never set).
    var level: Bool { levels.withLock { $0.last ?? false } }
    func clear() { levels.withLock { $0.removeAll() } }
}

/// A machine control that records requests.
final class RecordingControl: MachineControl {
    private let requests = Mutex<[MachineRequest]>([])
    func request(_ request: MachineRequest) { requests.withLock { $0.append(request) } }
    var all: [MachineRequest] { requests.withLock { $0 } }
}

/// A serial output that records everything written.
final class RecordingOutput: SerialOutput {
    private let bytes = Mutex<[UInt8]>([])
    private let flushes = Mutex(0)
    func write(_ b: [UInt8]) { bytes.withLock { $0 += b } }
    func flush() { flushes.withLock { $0 += 1 } }
    var written: [UInt8] { bytes.withLock { $0 } }
    var flushCount: Int { flushes.withLock { $0 } }
}

extension BusDevice {
    /// Reads `count` bytes at `offset` through the BusDevice interface.
    func readBytes(_ offset: UInt64, count: Int = 1) -> [UInt8] {
        var buf = [UInt8](repeating: 0xAA, count: count)
        buf.withUnsafeMutableBytes { read(offset: offset, data: $0) }
        return buf
    }
    /// Reads one byte at `offset`.
    func inb(_ offset: UInt64) -> UInt8 { readBytes(offset)[0] }
    /// Writes `bytes` at `offset` as one access.
    func writeBytes(_ offset: UInt64, _ bytes: [UInt8]) {
        bytes.withUnsafeBytes { write(offset: offset, data: $0) }
    }
    /// Writes one byte at `offset`.
    func outb(_ offset: UInt64, _ v: UInt8) { writeBytes(offset, [v]) }
}
