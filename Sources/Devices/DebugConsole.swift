import Synchronization

/// QEMU's debug console (`-debugcon`), where SeaBIOS writes its log: a port that reads 0xE9 (which
/// is how SeaBIOS detects it) and collects written bytes into lines for `sink`. A line longer
/// than `maxLine` bytes is passed on in pieces; bytes other than printable ASCII and tab become '.'.
public final class DebugConsole: BusDevice, Sendable {
    /// SeaBIOS's debug port.
    public static let defaultPort: UInt64 = 0x402
    /// The value a read returns.
    public static let readValue: UInt8 = 0xe9
    /// Longest line kept before it is passed on.
    public static let maxLine = 512

    private let buffer = Mutex<[UInt8]>([])
    private let sink: @Sendable (String) -> Void

    /// Creates the port; `sink` receives each complete line (without its newline).
    public init(sink: @escaping @Sendable (String) -> Void) { self.sink = sink }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        for i in data.indices { data[i] = Self.readValue }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        var lines: [String] = []
        buffer.withLock { b in
            for byte in data {
                if byte == 0x0a || b.count >= Self.maxLine {
                    lines.append(String(decoding: b, as: UTF8.self))
                    b.removeAll(keepingCapacity: true)
                    if byte == 0x0a { continue }
                }
                if byte == 0x0d { continue }
                b.append((0x20..<0x7f).contains(byte) || byte == 0x09 ? byte : UInt8(ascii: "."))
            }
        }
        for l in lines { sink(l) }
    }
}
