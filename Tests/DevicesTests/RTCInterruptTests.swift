import Foundation
import Synchronization
import Testing
@testable import Devices

/// The CMOS RTC's update cycle (UIP), update-ended, alarm and periodic flags and the IRQ 8 line,
/// on an injected nanosecond clock.
@Suite("CMOS RTC update cycle and interrupts")
struct RTCInterruptTests {
    /// 2024-02-29 13:45:07 UTC.
    static let when: Int64 = 1_709_214_307
    static let second: Int64 = 1_000_000_000

    final class Clock: @unchecked Sendable {
        let ns = Mutex<Int64>(0)
        init(_ v: Int64) { ns.withLock { $0 = v } }
        func advance(_ d: Int64) { ns.withLock { $0 += d } }
        func set(_ v: Int64) { ns.withLock { $0 = v } }
        var now: Int64 { ns.withLock { $0 } }
    }

    func make(at ns: Int64) -> (CMOSRTC, Clock, RecordingLine) {
        let clock = Clock(ns), line = RecordingLine()
        return (CMOSRTC(nanoClock: { clock.now }, interrupt: line), clock, line)
    }
    func reg(_ rtc: CMOSRTC, _ index: UInt8) -> UInt8 { rtc.outb(0, index); return rtc.inb(1) }
    func setReg(_ rtc: CMOSRTC, _ index: UInt8, _ v: UInt8) { rtc.outb(0, index); rtc.outb(1, v) }

    @Test("UIP reads 1 from 244 µs before each second boundary until 1984 µs after it, and never with SET or the divider in reset")
    func uip() {
        let base = Self.when * Self.second
        let (rtc, clock, _) = make(at: base + Self.second / 2)
        #expect(reg(rtc, 0x0a) == 0x26)
        for (offset, expected) in [(-245_000, false), (-244_000, true), (-1, true), (0, true), (1_983_999, true), (1_984_000, false)] {
            clock.set(base + Self.second + Int64(offset))
            #expect((reg(rtc, 0x0a) & 0x80 != 0) == expected, "UIP at \(offset) ns from the boundary")
        }
        clock.set(base + Self.second)
        setReg(rtc, 0x0b, 0x82)
        #expect(reg(rtc, 0x0a) & 0x80 == 0, "SET stops the update cycle")
        setReg(rtc, 0x0b, 0x02)
        setReg(rtc, 0x0a, 0x66)
        #expect(reg(rtc, 0x0a) == 0x66, "divider held in reset: no UIP")
    }

    @Test("the time registers change as the update ends; update-ended sets UF after each update, IRQF only with UIE, and the line follows IRQF")
    func updateEnded() {
        let base = Self.when * Self.second
        let (rtc, clock, line) = make(at: base + Self.second / 2)
        setReg(rtc, 0x0a, 0x20)                             // no periodic rate
        #expect(reg(rtc, 0x00) == 0x07)
        clock.set(base + Self.second + 1_000_000)           // inside the update: old time, no UF yet
        #expect(reg(rtc, 0x0a) & 0x80 != 0)
        #expect(reg(rtc, 0x00) == 0x07)
        #expect(reg(rtc, 0x0c) == 0x00)
        clock.set(base + Self.second + 2_000_000)
        #expect(reg(rtc, 0x0a) & 0x80 == 0 && reg(rtc, 0x00) == 0x08, "UIP fell and the new second shows")
        #expect(reg(rtc, 0x0c) == 0x10, "UF without UIE: no IRQF")
        #expect(reg(rtc, 0x0c) == 0x00, "reading C cleared it")
        #expect(line.history.isEmpty)
        setReg(rtc, 0x0b, 0x12)                             // UIE
        clock.advance(Self.second)
        #expect(reg(rtc, 0x0c) == 0x90)
        #expect(line.history == [true, false], "raised when the flag was found, lowered by the read")
        clock.advance(3 * Self.second)
        setReg(rtc, 0x0b, 0x92)                             // SET clears UIE
        #expect(reg(rtc, 0x0b) == 0x82)
        _ = reg(rtc, 0x0c)
        clock.advance(5 * Self.second)
        #expect(reg(rtc, 0x0c) == 0x00, "no update cycles while SET")
    }

    @Test("the alarm fires when hours, minutes and seconds match (BCD), not before; 0xC0-0xFF matches any value")
    func alarm() {
        let base = Self.when * Self.second
        let (rtc, clock, line) = make(at: base + Self.second / 2)  // 13:45:07.5
        setReg(rtc, 0x0a, 0x20)
        setReg(rtc, 0x01, 0x10); setReg(rtc, 0x03, 0x45); setReg(rtc, 0x05, 0x13)   // 13:45:10
        setReg(rtc, 0x0b, 0x22)                             // AIE
        clock.advance(2 * Self.second)                      // 13:45:09.5
        #expect(reg(rtc, 0x0c) == 0x10, "updates but no alarm yet")
        #expect(!line.level)
        clock.advance(Self.second)                          // 13:45:10.5
        #expect(line.history.isEmpty, "the line rises when the flags are evaluated (a read or the timer)")
        #expect(reg(rtc, 0x0c) == 0xb0)
        #expect(line.history == [true, false])
        clock.advance(Self.second)
        #expect(reg(rtc, 0x0c) == 0x10, "one match only")
        setReg(rtc, 0x01, 0xff); setReg(rtc, 0x03, 0xc0); setReg(rtc, 0x05, 0xc5)
        clock.advance(Self.second)
        #expect(reg(rtc, 0x0c) == 0xb0, "don't-care alarm fires every second")
        // A long gap (the guest read nothing for two days) still finds one match, quickly.
        setReg(rtc, 0x01, 0x00); setReg(rtc, 0x03, 0x00); setReg(rtc, 0x05, 0x00)
        clock.advance(2 * 86_400 * Self.second)
        #expect(reg(rtc, 0x0c) == 0xb0)
        // Binary, 12-hour mode: 1 PM is 0x81. Now 13:45:12.5 (two days on).
        setReg(rtc, 0x0b, 0x24)
        setReg(rtc, 0x01, 14); setReg(rtc, 0x03, 45); setReg(rtc, 0x05, 0x81)
        _ = reg(rtc, 0x0c)
        clock.advance(Self.second)
        #expect(reg(rtc, 0x0c) & 0x20 == 0)
        clock.advance(Self.second)
        #expect(reg(rtc, 0x0c) & 0x20 != 0, "binary 12-hour alarm 1 PM 45:14 matched")
    }

    @Test("periodic: PF at the rate of register A (2 Hz here), IRQF with PIE; rate 0 stops it; changing the rate restarts counting")
    func periodic() {
        let base = Self.when * Self.second
        let (rtc, clock, line) = make(at: base + 100_000_000)
        setReg(rtc, 0x0a, 0x2f)                             // 2 Hz
        setReg(rtc, 0x0b, 0x42)                             // PIE
        clock.set(base + 400_000_000)
        #expect(reg(rtc, 0x0c) == 0x00)
        clock.set(base + 500_000_000)
        #expect(reg(rtc, 0x0c) == 0xc0)
        #expect(line.history == [true, false])
        clock.set(base + 900_000_000)
        #expect(reg(rtc, 0x0c) == 0x00)
        setReg(rtc, 0x0a, 0x20)
        clock.set(base + 5 * Self.second / 2)
        #expect(reg(rtc, 0x0c) & 0x40 == 0, "rate 0: no periodic flag")
        #expect(CMOSRTC.periodicHz(0x26) == 1024 && CMOSRTC.periodicHz(0x21) == 256 && CMOSRTC.periodicHz(0x22) == 128
                && CMOSRTC.periodicHz(0x23) == 8192)
    }

    @Test("enabling an interrupt whose flag is already set raises the line; disabling it lowers the line")
    func enableAfterFlag() {
        let base = Self.when * Self.second
        let (rtc, clock, line) = make(at: base + Self.second / 2)
        setReg(rtc, 0x0a, 0x20)
        clock.advance(Self.second)
        _ = reg(rtc, 0x00)                                  // no refresh from time reads
        setReg(rtc, 0x0b, 0x12)                             // UIE: the pending UF now raises IRQF
        #expect(line.level)
        setReg(rtc, 0x0b, 0x02)
        #expect(!line.level && line.history == [true, false])
    }

    @Test("saved state with pending flags and the line high restores to identical bytes and drives the new line high")
    func savedState() throws {
        let base = Self.when * Self.second
        let (rtc, clock, _) = make(at: base + Self.second / 2)
        setReg(rtc, 0x0a, 0x2f)
        setReg(rtc, 0x0b, 0x52)                             // PIE + UIE
        setReg(rtc, 0x01, 0x33)
        clock.advance(Self.second)
        setReg(rtc, 0x0b, 0x52)                             // evaluates: line high
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let saved = try encoder.encode(rtc.saveState())
        let (fresh, _, freshLine) = make(at: clock.now)
        try fresh.restoreState(try JSONDecoder().decode(CMOSRTC.State.self, from: saved))
        #expect(try encoder.encode(fresh.saveState()) == saved)
        #expect(freshLine.level, "the restored RTC drives IRQ 8 as the saved one did")
        #expect(reg(fresh, 0x0c) & 0xd0 == 0xd0 && reg(fresh, 0x01) == 0x33)
        #expect(!freshLine.level)
        #expect(CMOSRTC.stateVersion == 2)
    }

    @Test("the timer thread raises IRQ 8 on its own once an update ends with UIE set, and stops")
    func timerThread() throws {
        let line = RecordingLine()
        let rtc = CMOSRTC(interrupt: line)
        try rtc.startTimer(kind: nil)
        defer { rtc.stopTimer() }
        setReg(rtc, 0x0a, 0x20)
        _ = reg(rtc, 0x0c)
        setReg(rtc, 0x0b, 0x12)
        let deadline = Date().addingTimeInterval(10)
        while !line.level && Date() < deadline { usleep(10_000) }
        #expect(line.level, "no update-ended interrupt within 10 s")
        #expect(reg(rtc, 0x0c) & 0x90 == 0x90)
    }
}

extension RTCInterruptTests {
    @Test("a held timer raises nothing however long it waits; released, it raises IRQ 8 for the pending update")
    func heldTimer() throws {
        let line = RecordingLine()
        let rtc = CMOSRTC(interrupt: line)
        try rtc.startTimer(kind: nil)
        defer { rtc.stopTimer() }
        setReg(rtc, 0x0a, 0x20)
        _ = reg(rtc, 0x0c)
        rtc.holdTimer()
        setReg(rtc, 0x0b, 0x12)                             // UIE while held
        usleep(2_200_000)                                   // at least two update cycles
        #expect(line.history.isEmpty, "nothing raised while held")
        rtc.releaseTimer()
        let deadline = Date().addingTimeInterval(5)
        while !line.level && Date() < deadline { usleep(10_000) }
        #expect(line.level)
    }
}
