import Synchronization

/// System control port A (port 0x92, "fast A20 and reset"): bit 1 reads as set (A20 is always
/// enabled: guest memory has no A20 wrap) and keeps what was written; writing bit 0 requests a
/// reset. Firmware polls and writes it while switching modes.
public final class SystemControlPortA: BusDevice, Sendable {
    /// The port.
    public static let defaultPort: UInt64 = 0x92
    static let a20: UInt8 = 1 << 1, reset: UInt8 = 1 << 0

    private let value = Mutex<UInt8>(SystemControlPortA.a20)
    private let control: any MachineControl

    /// Creates the port; a reset goes to `control`.
    public init(control: any MachineControl) { self.control = control }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        let v = value.withLock { $0 }
        for i in data.indices { data[i] = i == 0 && offset == 0 ? v : 0xff }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        guard offset == 0, let v = data.first else { return }
        value.withLock { $0 = (v & ~Self.reset) | Self.a20 }
        if v & Self.reset != 0 { control.request(.reset) }
    }
}
