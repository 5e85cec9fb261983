import Synchronization

/// A device reachable through port I/O or MMIO.
///
/// `offset` is relative to the base the device was inserted at. Devices guard their own
/// state (they are called from vCPU threads); a read fills every byte of `data`.
public protocol BusDevice: AnyObject, Sendable {
    /// Handles a guest read of `data.count` bytes at `offset`.
    func read(offset: UInt64, data: UnsafeMutableRawBufferPointer)
    /// Handles a guest write of `data.count` bytes at `offset`.
    func write(offset: UInt64, data: UnsafeRawBufferPointer)
}

/// An interrupt line a device raises. Edge-triggered users call `trigger()`;
/// level-triggered users call `set(level:)`.
public protocol InterruptLine: Sendable {
    /// Sets the line's level (true = asserted).
    func set(level: Bool)
    /// Pulses the line (assert then deassert).
    func trigger()
}

extension InterruptLine {
    public func trigger() { set(level: true); set(level: false) }
}

/// An interrupt line connected to nothing (for devices whose interrupt is not wired).
public struct NullInterruptLine: InterruptLine {
    public init() {}
    public func set(level: Bool) {}
}

/// Errors from building a bus.
public enum BusError: Error, Equatable, CustomStringConvertible {
    case overlap(base: UInt64, length: UInt64, existing: UInt64)
    case emptyRange(base: UInt64)
    case addressOverflow(base: UInt64, length: UInt64)

    public var description: String {
        switch self {
        case .overlap(let b, let l, let e):
            return "bus range 0x\(String(b, radix: 16))+0x\(String(l, radix: 16)) overlaps the device at 0x\(String(e, radix: 16))"
        case .emptyRange(let b):
            return "bus range at 0x\(String(b, radix: 16)) has zero length"
        case .addressOverflow(let b, let l):
            return "bus range 0x\(String(b, radix: 16))+0x\(String(l, radix: 16)) runs past the end of the address space"
        }
    }
}

/// Maps address ranges to devices (one bus for port I/O, one for MMIO). Rejects overlaps.
///
/// The bus is built before the vCPUs start and is immutable afterwards, so lookups need no lock.
public final class Bus: @unchecked Sendable {
    public struct Entry: Sendable {
        public let base: UInt64
        public let length: UInt64
        public let device: any BusDevice
    }

    private var entries: [Entry] = []
    private let unhandled = Atomic<UInt64>(0)

    public init() {}

    /// Inserts `device` at `[base, base+length)`.
    public func insert(_ device: any BusDevice, base: UInt64, length: UInt64) throws {
        guard length > 0 else { throw BusError.emptyRange(base: base) }
        // Compare inclusive last addresses so a range ending at 2^64 cannot overflow.
        let last = base.addingReportingOverflow(length - 1)
        guard !last.overflow else { throw BusError.addressOverflow(base: base, length: length) }
        for e in entries where base <= e.base + (e.length - 1) && e.base <= last.partialValue {
            throw BusError.overlap(base: base, length: length, existing: e.base)
        }
        entries.append(Entry(base: base, length: length, device: device))
        entries.sort { $0.base < $1.base }
    }

    /// The entry containing `address`, if any.
    public func find(_ address: UInt64) -> Entry? {
        var lo = 0, hi = entries.count
        while lo < hi {
            let mid = (lo + hi) / 2
            let e = entries[mid]
            if address < e.base { hi = mid }
            else if address - e.base >= e.length { lo = mid + 1 }
            else { return e }
        }
        return nil
    }

    /// Dispatches a read. Returns false (and fills `data` with 0xff) when no device is there.
    @discardableResult
    public func read(address: UInt64, data: UnsafeMutableRawBufferPointer) -> Bool {
        if let e = find(address) {
            e.device.read(offset: address - e.base, data: data)
            return true
        }
        for i in data.indices { data[i] = 0xff }
        unhandled.add(1, ordering: .relaxed)
        return false
    }

    /// Dispatches a write. Returns false when no device is there (the write is dropped).
    @discardableResult
    public func write(address: UInt64, data: UnsafeRawBufferPointer) -> Bool {
        if let e = find(address) {
            e.device.write(offset: address - e.base, data: data)
            return true
        }
        unhandled.add(1, ordering: .relaxed)
        return false
    }

    /// Number of accesses that reached no device.
    public var unhandledCount: UInt64 { unhandled.load(ordering: .relaxed) }

    /// All entries, sorted by base.
    public var allEntries: [Entry] { entries }
}

/// What a device can ask of the machine (reset, power-off, exit with a status).
public enum MachineRequest: Sendable, Equatable {
    /// Guest asked for a reset (i8042 0xFE, triple fault…).
    case reset
    /// Guest powered off.
    case powerOff
    /// Guest entered ACPI S3 (suspend to RAM).
    case suspend
    /// isa-debug-exit style exit: the process should exit with this status.
    case exit(status: Int32)
}

/// Receives machine requests from devices. The VMM implements it; tests record requests.
public protocol MachineControl: Sendable {
    func request(_ request: MachineRequest)
}
