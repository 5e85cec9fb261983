import Synchronization
import Testing
@testable import Devices

@Suite("ACPI PM registers")
struct ACPIPowerTests {
    func make() -> (ACPIPower, RecordingControl) {
        let control = RecordingControl()
        return (ACPIPower(control: control, s5SleepType: 5, resetValue: 1), control)
    }

    func word(_ d: ACPIPower, _ offset: UInt64) -> UInt16 {
        let b = d.readBytes(offset, count: 2)
        return UInt16(b[0]) | UInt16(b[1]) << 8
    }

    func writeWord(_ d: ACPIPower, _ offset: UInt64, _ v: UInt16) {
        d.writeBytes(offset, [UInt8(v & 0xff), UInt8(v >> 8)])
    }

    @Test("a 16-bit write of SLP_TYP=S5 with SLP_EN to PM1a control powers off at once")
    func s5() {
        let (d, c) = make()
        writeWord(d, ACPIPower.Offset.pm1Control, 5 << 10 | 1 << 13)
        #expect(c.all == [.powerOff])
    }

    @Test("SLP_TYP written first and SLP_EN later by a byte write also powers off; SLP_TYP alone does not")
    func twoSteps() {
        let (d, c) = make()
        writeWord(d, ACPIPower.Offset.pm1Control, 5 << 10)
        #expect(c.all.isEmpty)
        #expect(word(d, ACPIPower.Offset.pm1Control) == 5 << 10 | 1, "SLP_TYP kept, SCI_EN reads 1")
        d.outb(ACPIPower.Offset.pm1Control + 1, (5 << 2) | (1 << 5))
        #expect(c.all == [.powerOff])
    }

    @Test("SLP_TYP of S3 with SLP_EN asks the machine to suspend; the wake sets WAK_STS, and RTC_STS when the alarm woke it")
    func s3() {
        let control = RecordingControl()
        let d = ACPIPower(control: control, s5SleepType: 5, s3SleepType: 1, resetValue: 1)
        writeWord(d, ACPIPower.Offset.pm1Enable, ACPIPower.rtcEnable)
        writeWord(d, ACPIPower.Offset.pm1Control, 1 << 10 | 1 << 13)
        #expect(control.all == [.suspend])
        #expect(word(d, ACPIPower.Offset.pm1Status) == 0, "no status until the wake")
        d.woke(byRTC: true)
        #expect(word(d, ACPIPower.Offset.pm1Status) == 0x8400)
        #expect(d.pm1Enable == ACPIPower.rtcEnable)
    }

    @Test("another sleep type with SLP_EN does not power off but sets WAK_STS, which a write of 1 clears")
    func otherSleepType() {
        let (d, c) = make()
        writeWord(d, ACPIPower.Offset.pm1Control, 1 << 10 | 1 << 13)
        #expect(c.all.isEmpty)
        #expect(word(d, ACPIPower.Offset.pm1Status) & 0x8000 != 0)
        #expect(word(d, ACPIPower.Offset.pm1Control) & (1 << 13) == 0, "SLP_EN is write-only")
        writeWord(d, ACPIPower.Offset.pm1Status, 0x0001)
        #expect(word(d, ACPIPower.Offset.pm1Status) & 0x8000 != 0, "writing 0 to WAK_STS keeps it")
        writeWord(d, ACPIPower.Offset.pm1Status, 0x8000)
        #expect(word(d, ACPIPower.Offset.pm1Status) == 0)
    }

    @Test("PM1 control always reads SCI_EN (the machine is in ACPI mode), even after writing 0")
    func sciEnabled() {
        let (d, _) = make()
        #expect(word(d, ACPIPower.Offset.pm1Control) == 1)
        writeWord(d, ACPIPower.Offset.pm1Control, 0)
        #expect(word(d, ACPIPower.Offset.pm1Control) == 1)
    }

    @Test("PM1 enable keeps the defined event bits only; a 32-bit write covers status and enable")
    func enable() {
        let (d, _) = make()
        writeWord(d, ACPIPower.Offset.pm1Enable, 0xffff)
        #expect(word(d, ACPIPower.Offset.pm1Enable) == 0x0721)
        #expect(d.pm1Enable == 0x0721)
        d.writeBytes(ACPIPower.Offset.pm1Status, [0xff, 0xff, 0x00, 0x01])
        #expect(word(d, ACPIPower.Offset.pm1Enable) == 0x0100)
        #expect(d.readBytes(0, count: 4) == [0, 0, 0x00, 0x01])
    }

    @Test("the reset register requests a reset only for RESET_VALUE")
    func reset() {
        let (d, c) = make()
        d.outb(ACPIPower.Offset.reset, 0x06)
        #expect(c.all.isEmpty)
        d.outb(ACPIPower.Offset.reset, 0x01)
        #expect(c.all == [.reset])
    }

    @Test("unknown offsets read 0 and ignore writes, also at the very end of the address space")
    func unknown() {
        let (d, c) = make()
        #expect(d.readBytes(0x20, count: 4) == [0, 0, 0, 0])
        d.writeBytes(0x20, [0xff, 0xff])
        #expect(d.readBytes(UInt64.max, count: 2) == [0, 0])
        d.writeBytes(UInt64.max, [1, 1])
        #expect(c.all.isEmpty)
    }

    @Test("the PM timer counts 3579545 per second of the monotonic clock, all 32 bits, wrapping; one sample per access; writes ignored")
    func pmTimer() {
        let now = ManualNanos(0)
        let d = ACPIPower(control: RecordingControl(), monotonicNanos: { now.value })
        func timer() -> UInt32 { d.readBytes(ACPIPower.Offset.pmTimer, count: 4).reversed().reduce(0) { $0 << 8 | UInt32($1) } }
        #expect(timer() == 0)
        now.value = 1_000_000_000
        #expect(timer() == 3_579_545)
        now.value = 1_000_000_279                       // one more tick is 279.4 ns
        #expect(timer() == 3_579_545)
        now.value = 1_000_000_280
        #expect(timer() == 3_579_546)
        // 2^32 ticks is 1199.86 s: the counter wraps with all 32 bits in use.
        now.value = 1_199_000_000_000
        #expect(timer() == UInt32(truncatingIfNeeded: UInt64(1_199) * 3_579_545))
        now.value = 1_200_000_000_000
        #expect(timer() == UInt32(truncatingIfNeeded: UInt64(1_200) * 3_579_545))
        #expect(timer() < 3_579_545 * 2, "wrapped past 2^32")
        d.writeBytes(ACPIPower.Offset.pmTimer, [1, 2, 3, 4])
        #expect(timer() == UInt32(truncatingIfNeeded: UInt64(1_200) * 3_579_545))
        #expect(d.readBytes(ACPIPower.Offset.pmTimer + 2, count: 1)[0] == UInt8(truncatingIfNeeded: timer() >> 16))
        // The largest clock value neither traps nor loses the low bits' rate.
        #expect(ACPIPower.pmTimerValue(nanos: UInt64.max) &- ACPIPower.pmTimerValue(nanos: UInt64.max - 1_000_000_000) == 3_579_545)
    }
}

/// A settable clock for the PM timer.
final class ManualNanos: @unchecked Sendable {
    private let lock = Mutex<UInt64>(0)
    init(_ v: UInt64) { value = v }
    var value: UInt64 {
        get { lock.withLock { $0 } }
        set { lock.withLock { $0 = newValue } }
    }
}
