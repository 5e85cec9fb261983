#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// The MC146818-style CMOS real-time clock and its 128 bytes of CMOS memory (ports 0x70-0x71).
///
/// Insert it at `CMOSRTC.defaultBase` with `portCount` (2) ports: offset 0 (0x70) selects a
/// register (bit 7 is the NMI-disable bit, recorded but masked off the index; reads of 0x70
/// return 0xff), offset 1 (0x71) reads or writes the selected register.
///
/// Time registers (0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 day of week with Sunday = 1,
/// 0x07 day of month, 0x08 month, 0x09 year, 0x32 century) follow the injected clock (UTC),
/// in BCD or binary per register B bit 2 (DM) and in 24-hour or 12-hour form (bit 7 = PM) per
/// register B bit 1. Register A reads with UIP clear; register C reads 0 (no RTC interrupts are
/// generated); register D reads 0x80 (valid RAM and time). While register B bit 7 (SET) is set
/// the time registers hold what the guest writes; clearing SET makes that the clock's new time
/// (kept as an offset from the host clock). Other bytes are plain memory; `setMemorySize`
/// fills the memory-size bytes the way QEMU and SeaBIOS do.
public final class CMOSRTC: BusDevice, Sendable {
    /// The index port; the device spans two ports.
    public static let defaultBase: UInt64 = 0x70
    /// Number of ports.
    public static let portCount: UInt64 = 2
    /// ISA interrupt of the RTC (not raised by this model).
    public static let defaultIRQ: UInt32 = 8

    static let regA = 0x0A, regB = 0x0B, regC = 0x0C, regD = 0x0D, century = 0x32
    static let bSET: UInt8 = 0x80, bDM: UInt8 = 0x04, b24h: UInt8 = 0x02
    static let timeIndices: Set<Int> = [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32]

    /// The index register and CMOS bytes (also its saved state).
    public struct State: Codable, Sendable {
        var index = 0
        var nmiDisabled = false
        var cmos = [UInt8](repeating: 0, count: 128)
        var offset: Int64 = 0
    }

    private let state: Mutex<State>
    private let clock: @Sendable () -> Int64

    /// Creates the RTC.
    /// - Parameter clock: seconds since the Unix epoch, UTC (default: the host's clock).
    public init(clock: @escaping @Sendable () -> Int64 = { Int64(time(nil)) }) {
        self.clock = clock
        var s = State()
        s.cmos[Self.regA] = 0x26        // 32.768 kHz time base, 1024 Hz rate
        s.cmos[Self.regB] = Self.b24h   // 24-hour, BCD
        s.cmos[Self.regD] = 0x80
        state = Mutex(s)
    }

    /// Whether the guest last wrote the index port with bit 7 (NMI disable) set.
    public var nmiDisabled: Bool { state.withLock { $0.nmiDisabled } }

    /// Records guest RAM sizes in CMOS as QEMU does for SeaBIOS: base memory (640 KiB, 0x15-0x16),
    /// KiB above 1 MiB up to 64 MiB (0x17-0x18 and 0x30-0x31, capped at 0xffff), 64 KiB units
    /// above 16 MiB below 4 GiB (0x34-0x35), 64 KiB units above 4 GiB (0x5b-0x5d), and the
    /// checksum of 0x10-0x2d at 0x2e-0x2f.
    public func setMemorySize(belowFourGiB: UInt64, aboveFourGiB: UInt64) {
        state.withLock { s in
            func put16(_ v: UInt64, _ at: Int) {
                let c = UInt16(min(v, 0xffff))
                s.cmos[at] = UInt8(c & 0xff)
                s.cmos[at + 1] = UInt8(c >> 8)
            }
            put16(640, 0x15)
            let ext = belowFourGiB > 1 << 20 ? (belowFourGiB - (1 << 20)) / 1024 : 0
            put16(ext, 0x17)
            put16(ext, 0x30)
            let high = belowFourGiB > 16 << 20 ? (belowFourGiB - (16 << 20)) / 65536 : 0
            put16(high, 0x34)
            let above = min(aboveFourGiB / 65536, 0xff_ffff)
            s.cmos[0x5b] = UInt8(above & 0xff)
            s.cmos[0x5c] = UInt8((above >> 8) & 0xff)
            s.cmos[0x5d] = UInt8((above >> 16) & 0xff)
            let sum = s.cmos[0x10...0x2d].reduce(UInt16(0)) { $0 &+ UInt16($1) }
            s.cmos[0x2e] = UInt8(sum >> 8)
            s.cmos[0x2f] = UInt8(sum & 0xff)
        }
    }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        state.withLock { s in
            for i in 0..<data.count {
                let (reg, overflow) = offset.addingReportingOverflow(UInt64(i))
                data[i] = (!overflow && reg == 1) ? readRegister(&s) : 0xff
            }
        }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        state.withLock { s in
            for i in 0..<data.count {
                let (reg, overflow) = offset.addingReportingOverflow(UInt64(i))
                guard !overflow else { continue }
                if reg == 0 {
                    s.index = Int(data[i] & 0x7f)
                    s.nmiDisabled = data[i] & 0x80 != 0
                } else if reg == 1 {
                    writeRegister(data[i], &s)
                }
            }
        }
    }

    // MARK: Registers (lock held)

    private func readRegister(_ s: inout State) -> UInt8 {
        let i = s.index
        switch i {
        case Self.regA:
            return s.cmos[i] & 0x7f          // UIP is never set
        case Self.regC:
            let v = s.cmos[i]
            s.cmos[i] = 0
            return v
        case Self.regD:
            return 0x80
        default:
            if Self.timeIndices.contains(i) && s.cmos[Self.regB] & Self.bSET == 0 {
                return Self.encodeTime(clock() &+ s.offset, registerB: s.cmos[Self.regB])[i] ?? 0
            }
            return s.cmos[i]
        }
    }

    private func writeRegister(_ v: UInt8, _ s: inout State) {
        let i = s.index
        switch i {
        case Self.regA:
            s.cmos[i] = v & 0x7f
        case Self.regB:
            let old = s.cmos[i]
            if old & Self.bSET == 0 && v & Self.bSET != 0 {
                s.cmos[i] = v
                snapshotTime(&s)
            } else if old & Self.bSET != 0 && v & Self.bSET == 0 {
                adoptWrittenTime(&s)
                s.cmos[i] = v
            } else {
                s.cmos[i] = v
            }
        case Self.regC, Self.regD:
            break   // read-only
        default:
            if Self.timeIndices.contains(i) {
                if s.cmos[Self.regB] & Self.bSET != 0 {
                    s.cmos[i] = v
                } else {
                    snapshotTime(&s)
                    s.cmos[i] = v
                    adoptWrittenTime(&s)
                }
            } else {
                s.cmos[i] = v
            }
        }
    }

    /// Copies the running time into the time registers.
    private func snapshotTime(_ s: inout State) {
        for (i, v) in Self.encodeTime(clock() &+ s.offset, registerB: s.cmos[Self.regB]) { s.cmos[i] = v }
    }

    /// Makes the time in the registers the clock's time.
    private func adoptWrittenTime(_ s: inout State) {
        if let t = Self.decodeTime(s.cmos, registerB: s.cmos[Self.regB]) {
            s.offset = t &- clock()
        }
    }

    /// The time registers' values for `seconds` since the epoch (UTC) in the format `registerB` selects.
    static func encodeTime(_ seconds: Int64, registerB: UInt8) -> [Int: UInt8] {
        var t = time_t(seconds)
        var tm = Glibc.tm()
        guard gmtime_r(&t, &tm) != nil else { return [:] }
        let binary = registerB & bDM != 0
        func enc(_ x: Int32) -> UInt8 {
            let x = UInt8(clamping: max(0, x))
            return binary ? x : (x / 10) << 4 | (x % 10)
        }
        var hour = enc(tm.tm_hour)
        if registerB & b24h == 0 {
            let h12 = tm.tm_hour % 12 == 0 ? 12 : tm.tm_hour % 12
            hour = enc(h12) | (tm.tm_hour >= 12 ? 0x80 : 0)
        }
        let year = Int32(tm.tm_year) + 1900
        return [0x00: enc(tm.tm_sec), 0x02: enc(tm.tm_min), 0x04: hour, 0x06: enc(tm.tm_wday + 1),
                0x07: enc(tm.tm_mday), 0x08: enc(tm.tm_mon + 1), 0x09: enc(year % 100),
                century: enc(year / 100)]
    }

    /// Seconds since the epoch for the time registers in `cmos`, or nil if they make no date.
    static func decodeTime(_ cmos: [UInt8], registerB: UInt8) -> Int64? {
        let binary = registerB & bDM != 0
        func dec(_ b: UInt8) -> Int32 { binary ? Int32(b) : Int32(b >> 4) * 10 + Int32(b & 0x0f) }
        var hour = dec(cmos[0x04])
        if registerB & b24h == 0 {
            let pm = cmos[0x04] & 0x80 != 0
            hour = dec(cmos[0x04] & 0x7f) % 12 + (pm ? 12 : 0)
        }
        var tm = Glibc.tm()
        tm.tm_sec = dec(cmos[0x00])
        tm.tm_min = dec(cmos[0x02])
        tm.tm_hour = hour
        tm.tm_mday = dec(cmos[0x07])
        tm.tm_mon = dec(cmos[0x08]) - 1
        tm.tm_year = dec(cmos[century]) * 100 + dec(cmos[0x09]) - 1900
        let t = timegm(&tm)
        return t == -1 ? nil : Int64(t)
    }
}

extension CMOSRTC: StatefulDevice {
    public static let stateVersion: UInt32 = 1

    public func saveState() -> State { state.withLock { $0 } }

    public func restoreState(_ saved: State) throws(DeviceStateError) {
        guard saved.cmos.count == 128 else { throw DeviceStateError("rtc: \(saved.cmos.count) CMOS bytes, expected 128") }
        guard (0..<128).contains(saved.index) else { throw DeviceStateError("rtc: index \(saved.index) out of range") }
        state.withLock { $0 = saved }
    }
}
