/// QEMU's `isa-debug-exit` device: a guest write of value `v` ends the VM with status
/// `(v << 1) | 1`.
///
/// Writes of 1, 2 or 4 bytes at any offset are accepted; `v` is the little-endian value written
/// (wider writes use their first 4 bytes). The status is truncated to 8 bits, as a process exit
/// code is: `v = 0` gives 1, `v = 1` gives 3, `v = 0x7f` gives 255, `v = 0x80` gives 1 again.
/// Reads return 0. Insert it at `defaultPort` (0xf4) with length 1, or as QEMU does, 2.
public final class DebugExit: BusDevice, Sendable {
    /// The port QEMU test harnesses conventionally use (`iobase=0xf4`).
    public static let defaultPort: UInt64 = 0xf4

    private let control: any MachineControl

    /// Creates the device; exits are sent to `control` as `.exit(status:)`.
    public init(control: any MachineControl) { self.control = control }

    /// The exit status for a written value: `((value << 1) | 1) & 0xff`.
    public static func status(forValue value: UInt32) -> Int32 {
        Int32(((UInt64(value) << 1) | 1) & 0xff)
    }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        for i in data.indices { data[i] = 0 }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        guard !data.isEmpty else { return }
        var value: UInt32 = 0
        for i in 0..<min(data.count, 4) { value |= UInt32(data[i]) << (8 * UInt32(i)) }
        control.request(.exit(status: Self.status(forValue: value)))
    }
}
