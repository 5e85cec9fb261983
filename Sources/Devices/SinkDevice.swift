import Synchronization

/// A device that quietly absorbs accesses: writes are dropped, reads return a fixed byte.
///
/// Used for legacy ports a PC guest probes (POST code port 0x80, 0xed, VGA, absent COM and LPT
/// ports) so they are neither logged as unknown nor slow. Absent devices read 0xff, as an
/// empty ISA bus does (Linux's 8250 probe then finds no UART there). Accesses are counted.
public final class SinkDevice: BusDevice, Sendable {
    /// What the sink stands for, for statistics ("POST", "VGA"…).
    public let name: String
    /// The byte every read returns.
    public let readValue: UInt8
    private let reads = Atomic<UInt64>(0)
    private let writes = Atomic<UInt64>(0)

    /// Creates a sink named `name` whose reads return `readValue` (default 0xff, "absent").
    public init(name: String, readValue: UInt8 = 0xff) {
        self.name = name
        self.readValue = readValue
    }

    /// Number of reads absorbed.
    public var readCount: UInt64 { reads.load(ordering: .relaxed) }
    /// Number of writes absorbed.
    public var writeCount: UInt64 { writes.load(ordering: .relaxed) }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        reads.add(1, ordering: .relaxed)
        for i in data.indices { data[i] = readValue }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        writes.add(1, ordering: .relaxed)
    }
}

/// Legacy PC port ranges that a guest probes and that SwiftKVM answers as absent.
public enum LegacyPorts {
    /// A port range to cover with a `SinkDevice`.
    public struct Range: Sendable, Equatable {
        public let name: String
        public let base: UInt64
        public let length: UInt64
        public let readValue: UInt8
    }

    /// Ports to ignore on a PC whose PIC, PIT and speaker port are emulated by KVM in-kernel:
    /// the POST port 0x80, the alternative delay port 0xed, the DMA page registers around 0x80,
    /// the chipset probe ports 0x22-0x23, MDA/VGA 0x3b0-0x3df, COM2-COM4 (0x2f8, 0x3e8, 0x2e8)
    /// and LPT1-LPT3 (0x378, 0x278, 0x3bc) as absent devices. None overlaps COM1, the i8042,
    /// the RTC or the debug-exit port 0xf4.
    public static let defaultIgnored: [Range] = [
        Range(name: "chipset config", base: 0x22, length: 2, readValue: 0xff),
        Range(name: "POST", base: 0x80, length: 1, readValue: 0xff),
        Range(name: "DMA page", base: 0x81, length: 15, readValue: 0xff),
        Range(name: "io delay", base: 0xed, length: 1, readValue: 0xff),
        Range(name: "COM4", base: 0x2e8, length: 8, readValue: 0xff),
        Range(name: "COM2", base: 0x2f8, length: 8, readValue: 0xff),
        Range(name: "LPT2", base: 0x278, length: 3, readValue: 0xff),
        Range(name: "LPT1", base: 0x378, length: 3, readValue: 0xff),
        Range(name: "LPT3", base: 0x3bc, length: 3, readValue: 0xff),
        Range(name: "MDA/VGA", base: 0x3b0, length: 0x0c, readValue: 0xff),
        Range(name: "VGA", base: 0x3c0, length: 0x20, readValue: 0xff),
        Range(name: "COM3", base: 0x3e8, length: 8, readValue: 0xff),
    ]

    /// Inserts a `SinkDevice` for every range of `ranges` into `bus` and returns them.
    @discardableResult
    public static func install(_ ranges: [Range] = defaultIgnored, on bus: Bus) throws -> [SinkDevice] {
        try ranges.map { r in
            let d = SinkDevice(name: r.name, readValue: r.readValue)
            try bus.insert(d, base: r.base, length: r.length)
            return d
        }
    }
}
