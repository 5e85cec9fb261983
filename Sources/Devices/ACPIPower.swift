#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// ACPI fixed-hardware power management registers (the FADT's PM1a event and control blocks and
/// RESET_REG), one device covering a 64-port block (insert it at 0x600 with length 0x40).
///
/// | offset | register | semantics |
/// |---|---|---|
/// | 0 | PM1a status (16 bits) | write 1 to clear; WAK_STS (bit 15) set after a sleep request |
/// | 2 | PM1a enable (16 bits) | read/write (only defined event bits are kept) |
/// | 4 | PM1a control (16 bits) | SCI_EN (bit 0) always reads 1; SLP_TYP bits 10–12; SLP_EN (bit 13) is write-only |
/// | 8 | reset (8 bits) | writing `resetValue` requests a reset |
/// | 0xC | PM timer (32 bits) | read-only: a free-running 3.579545 MHz counter (all 32 bits: the FADT's TMR_VAL_EXT) |
///
/// Writing SLP_EN with SLP_TYP = `s5SleepType` requests a power-off at once; other sleep types
/// are not supported (the DSDT declares only S5) and only set WAK_STS, as if the guest had woken
/// immediately. Accesses of any width at any offset are assembled byte by byte; unknown offsets
/// read 0 and ignore writes. The SCI is never raised: no event this device models is enabled (the
/// PM timer's TMR_STS carry bit is not modelled). The PM timer follows the injected monotonic clock
/// (CLOCK_MONOTONIC by default) at the real rate, also under time dilation.
public final class ACPIPower: BusDevice, Sendable {
    /// Register offsets in the block.
    public enum Offset {
        public static let pm1Status: UInt64 = 0
        public static let pm1Enable: UInt64 = 2
        public static let pm1Control: UInt64 = 4
        public static let reset: UInt64 = 8
        public static let pmTimer: UInt64 = 0xc
    }
    /// The PM timer's frequency (Hz).
    public static let pmTimerHz: UInt64 = 3_579_545
    /// Ports the block spans.
    public static let portCount: UInt64 = 0x40
    /// PM1 control bits.
    public static let sciEnable: UInt16 = 1 << 0
    public static let sleepEnable: UInt16 = 1 << 13
    public static let sleepTypeShift: UInt16 = 10
    public static let sleepTypeMask: UInt16 = 0x7 << 10
    /// PM1 status/enable bits kept: TMR, BM (status only), GBL, PWRBTN, SLPBTN, RTC, WAK (status only).
    static let statusBits: UInt16 = 0x8000 | 0x0400 | 0x0200 | 0x0100 | 0x0020 | 0x0010 | 0x0001
    static let enableBits: UInt16 = 0x0400 | 0x0200 | 0x0100 | 0x0020 | 0x0001
    static let wakeStatus: UInt16 = 0x8000

    /// PM1 status, enable and control (also the saved state).
    public struct State: Codable, Sendable {
        var status: UInt16 = 0
        var enable: UInt16 = 0
        var control: UInt16 = ACPIPower.sciEnable
    }

    private let state = Mutex(State())
    private let control: any MachineControl
    private let s5SleepType: UInt8
    private let s3SleepType: UInt8?
    private let resetValue: UInt8
    private let monotonicNanos: @Sendable () -> UInt64

    /// Creates the device; power-off and reset go to `control`. `s5SleepType` must match the DSDT's
    /// `\_S5` package and `resetValue` the FADT's RESET_VALUE. `monotonicNanos` drives the PM timer.
    public init(control: any MachineControl, s5SleepType: UInt8 = 5, s3SleepType: UInt8? = nil, resetValue: UInt8 = 1,
                monotonicNanos: @escaping @Sendable () -> UInt64 = ACPIPower.hostMonotonicNanos) {
        self.control = control
        self.monotonicNanos = monotonicNanos
        self.s5SleepType = s5SleepType & 0x7
        self.s3SleepType = s3SleepType.map { $0 & 0x7 }
        self.resetValue = resetValue
    }

    /// CLOCK_MONOTONIC in nanoseconds.
    @Sendable public static func hostMonotonicNanos() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    /// The PM timer's 32-bit value at `nanos` of the monotonic clock.
    public static func pmTimerValue(nanos: UInt64) -> UInt32 {
        let p = nanos.multipliedFullWidth(by: pmTimerHz)
        return UInt32(truncatingIfNeeded: UInt64(1_000_000_000).dividingFullWidth((high: p.high, low: p.low)).quotient)
    }

    /// The byte at register offset `offset` (`timer`: the PM timer's value for this access).
    private func byte(_ s: State, _ offset: UInt64, timer: UInt32) -> UInt8 {
        switch offset {
        case Offset.pmTimer..<Offset.pmTimer + 4:
            return UInt8(truncatingIfNeeded: timer >> (8 * (offset - Offset.pmTimer)))
        case 0, 1: return UInt8(truncatingIfNeeded: s.status >> (8 * (offset & 1)))
        case 2, 3: return UInt8(truncatingIfNeeded: s.enable >> (8 * (offset & 1)))
        case 4, 5:
            let visible = (s.control & ~Self.sleepEnable) | Self.sciEnable
            return UInt8(truncatingIfNeeded: visible >> (8 * (offset & 1)))
        default: return 0
        }
    }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        let s = state.withLock { $0 }
        let timer = Self.pmTimerValue(nanos: monotonicNanos())   // one sample per access
        for i in data.indices {
            let (o, overflow) = offset.addingReportingOverflow(UInt64(i))
            data[i] = overflow ? 0 : byte(s, o, timer: timer)
        }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        // Assemble the written bytes per 16-bit register, so a 16- or 32-bit write acts at once.
        var status: UInt16 = 0, statusMask: UInt16 = 0
        var enable: UInt16 = 0, enableMask: UInt16 = 0
        var ctl: UInt16 = 0, ctlMask: UInt16 = 0
        var resetByte: UInt8?
        for i in data.indices {
            let (o, overflow) = offset.addingReportingOverflow(UInt64(i))
            if overflow { break }
            let v = UInt16(data[i]), shift = UInt16(8 * (o & 1))
            switch o {
            case 0, 1: status |= v << shift; statusMask |= 0xff << shift
            case 2, 3: enable |= v << shift; enableMask |= 0xff << shift
            case 4, 5: ctl |= v << shift; ctlMask |= 0xff << shift
            case Offset.reset: resetByte = data[i]
            default: break
            }
        }
        var request: MachineRequest?
        state.withLock { s in
            s.status &= ~(status & statusMask & Self.statusBits)
            s.enable = (s.enable & ~enableMask) | (enable & enableMask & Self.enableBits)
            if ctlMask != 0 {
                let merged = (s.control & ~ctlMask) | (ctl & ctlMask)
                s.control = (merged & ~Self.sleepEnable) | Self.sciEnable
                if merged & Self.sleepEnable != 0 {
                    let type = UInt8((merged & Self.sleepTypeMask) >> Self.sleepTypeShift)
                    if type == s5SleepType {
                        request = .powerOff
                    } else if type == s3SleepType {
                        request = .suspend                // the machine wakes it later (`wake(rtc:)`)
                    } else {
                        s.status |= Self.wakeStatus      // unsupported sleep state: "woke up" at once
                    }
                }
            }
        }
        if let resetByte, resetByte == resetValue, request == nil { request = .reset }
        if let request { control.request(request) }
    }

    /// The PM1 enable register (for tests and diagnostics).
    public var pm1Enable: UInt16 { state.withLock { $0.enable } }

    /// PM1_EN.RTC_EN: the RTC alarm may wake the machine from a sleep state.
    public static let rtcEnable: UInt16 = 0x0400

    /// The machine woke from S3: PM1_STS.WAK_STS, and RTC_STS when the RTC alarm woke it.
    public func woke(byRTC: Bool) {
        state.withLock { $0.status |= Self.wakeStatus | (byRTC ? Self.rtcEnable : 0) }
    }
}

extension ACPIPower: StatefulDevice {
    public static let stateVersion: UInt32 = 1
    public func saveState() -> State { state.withLock { $0 } }
    public func restoreState(_ saved: State) throws(DeviceStateError) { state.withLock { $0 = saved } }
}
