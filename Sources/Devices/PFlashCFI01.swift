#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// A parallel NOR flash with Intel's CFI command set 1 (QEMU's `pflash_cfi01`), as OVMF uses it for its variable
/// store: an MMIO window whose bytes come from a file (a per-VM copy of OVMF_VARS), read in array mode, and a
/// command state machine that programs bytes, erases blocks (to 0xFF) and answers status, ID and CFI queries.
/// Programmed and erased data is written through to the file at once (pwrite), so variables survive the VM.
///
/// OVMF tells flash from ROM and RAM by writing 0x50 (clear status) and 0x70 (read status) at offset 0: a flash then
/// reads 0x00 (QEMU's behaviour, which OVMF's QemuFlashDetected expects).
///
/// Commands: 0xFF read array, 0x70 read status, 0x50 clear status, 0x90 read ID, 0x98 CFI query, 0x10/0x40 program
/// one byte (the next write is the data), 0x20 + 0xD0 block erase. Anything else, or an erase not confirmed, sets
/// the status register's error bits and goes back to array mode. Every offset is checked against the size.
public final class PFlashCFI01: BusDevice, Sendable {
    /// Erase-block size (QEMU's for OVMF).
    public static let blockSize = 4096
    /// Intel's manufacturer and a device ID, as QEMU answers.
    static let manufacturerID: UInt8 = 0x89, deviceID: UInt8 = 0x18

    enum Mode: Sendable { case array, status, id, cfi, program, erase }
    struct State {
        var mode: Mode = .array
        var status: UInt8 = 0x80          // ready
        var data: [UInt8]
    }

    private let state: Mutex<State>
    private let fd: Int32
    private let writable: Bool
    /// The window's size in bytes.
    public let size: Int
    /// Where write-through failures go (the guest sees a status error).
    private let log: @Sendable (String) -> Void

    /// A flash over `bytes`, whose changes are written to `fd` (-1: none) from offset 0; `writable` false makes
    /// every program or erase fail with a status error (a read-only flash).
    public init(bytes: [UInt8], fd: Int32 = -1, writable: Bool = true, log: @escaping @Sendable (String) -> Void = { _ in }) {
        state = Mutex(State(data: bytes))
        size = bytes.count
        self.fd = fd
        self.writable = writable
        self.log = log
    }

    /// The contents now (for tests and snapshots).
    public var contents: [UInt8] { state.withLock { $0.data } }

    /// The CFI query table (offsets in bytes of the x8 query space): "QRY", command set 1, timing, device size as
    /// 2^n, one erase-block region of `size / blockSize` blocks of `blockSize`.
    var cfiTable: [UInt8] {
        var t = [UInt8](repeating: 0, count: 0x40)
        t[0x10] = 0x51; t[0x11] = 0x52; t[0x12] = 0x59          // "QRY"
        t[0x13] = 0x01; t[0x14] = 0x00                          // primary command set: Intel/Sharp extended
        t[0x15] = 0x31; t[0x16] = 0x00                          // primary extended table at 0x31
        t[0x1b] = 0x45; t[0x1c] = 0x55                          // Vcc min/max 4.5 V, 5.5 V
        t[0x1f] = 0x07; t[0x20] = 0x07; t[0x21] = 0x0a          // typical timeouts (2^n µs / ms)
        t[0x23] = 0x04; t[0x24] = 0x04; t[0x25] = 0x04
        var log2 = 0
        while (1 << log2) < size { log2 += 1 }
        t[0x27] = UInt8(log2)                                   // device size 2^n bytes
        t[0x28] = 0x02                                          // x8/x16 interface
        t[0x2c] = 0x01                                          // one erase-block region
        let blocks = max(size / Self.blockSize, 1) - 1
        t[0x2d] = UInt8(blocks & 0xff); t[0x2e] = UInt8(blocks >> 8)
        t[0x2f] = UInt8((Self.blockSize >> 8) & 0xff); t[0x30] = UInt8(Self.blockSize >> 16)
        t[0x31] = 0x50; t[0x32] = 0x52; t[0x33] = 0x49           // "PRI"
        t[0x34] = 0x31; t[0x35] = 0x31
        return t
    }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        state.withLock { s in
            for i in data.indices {
                let o = Int(clamping: offset &+ UInt64(i))
                switch s.mode {
                case .array:
                    data[i] = o < s.data.count ? s.data[o] : 0xff
                case .status, .program, .erase:
                    data[i] = s.status          // as QEMU: status while a program or erase waits for its data
                case .id:
                    data[i] = (o & 0xff) == 0 ? Self.manufacturerID : (o & 0xff) == 1 ? Self.deviceID : 0
                case .cfi:
                    let t = cfiTable
                    data[i] = (o & 0xff) < t.count ? t[o & 0xff] : 0
                }
            }
        }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        guard let value = data.first else { return }
        let o = Int(clamping: offset)
        guard o < size else { return }
        var flush: (at: Int, bytes: [UInt8])?
        state.withLock { s in
            switch s.mode {
            case .program:
                s.mode = .status
                guard writable else { s.status |= 0x10 | 0x02; return }   // program error, block locked
                // A multi-byte write programs each byte (OVMF writes one at a time).
                let n = min(data.count, size - o)
                for k in 0..<n { s.data[o + k] = data[k] }
                s.status |= 0x80
                flush = (o, Array(s.data[o..<(o + n)]))
            case .erase:
                s.mode = .status
                guard value == 0xd0 else { s.status |= 0x30; return }   // command sequence error
                guard writable else { s.status |= 0x20 | 0x02; return }
                let start = o / Self.blockSize * Self.blockSize, end = min(start + Self.blockSize, size)
                for k in start..<end { s.data[k] = 0xff }
                s.status |= 0x80
                flush = (start, Array(s.data[start..<end]))
            default:
                switch value {
                case 0xff: s.mode = .array
                case 0x70: s.mode = .status
                case 0x50: s.status = 0; s.mode = .array       // QEMU clears every bit, ready included
                case 0x90: s.mode = .id
                case 0x98: s.mode = .cfi
                case 0x10, 0x40: s.mode = .program
                case 0x20: s.mode = .erase
                default:
                    s.status |= 0x30
                    s.mode = .array
                }
            }
            // Written through under the lock, so the file sees the writes in the guest's order.
            if let f = flush, fd >= 0 {
                let written = f.bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(f.at)) }
                if written != f.bytes.count {
                    log("pflash: cannot write \(f.bytes.count) bytes at offset \(f.at) of the variable store: \(String(cString: strerror(errno)))")
                    s.status |= 0x10
                }
            }
        }
    }
}
