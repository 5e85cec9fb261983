import Foundation
import Testing
@testable import Devices

/// Saved device state (snapshots): save → JSON → restore into a fresh device → save gives the
/// same state and the device behaves the same; a bad saved state is refused, naming the field.
@Suite("device state save and restore")
struct DeviceStateTests {
    func roundTrip<D: StatefulDevice>(_ device: D, into fresh: D) throws -> (Data, Data) {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let saved = try encoder.encode(device.saveState())
        try fresh.restoreState(try JSONDecoder().decode(D.SavedState.self, from: saved))
        return (saved, try encoder.encode(fresh.saveState()))
    }

    @Test("a UART with FIFO, pending input and an asserted interrupt restores to the same registers, bytes and line level")
    func serial() throws {
        let line = RecordingLine(), out = RecordingOutput()
        let uart = Serial16550(interrupt: line, output: out)
        uart.outb(3, 0x83); uart.outb(0, 0x01); uart.outb(3, 0x03)   // divisor 1, 8N1
        uart.outb(2, 0x81); uart.outb(4, 0x0b); uart.outb(1, 0x01)   // FIFO trigger 8, OUT2, RX interrupt
        uart.outb(7, 0x5a)
        uart.enqueue(Array("hello, snapshot".utf8))
        _ = uart.inb(0)                                               // one byte consumed
        let freshLine = RecordingLine()
        let fresh = Serial16550(interrupt: freshLine, output: RecordingOutput())
        let (a, b) = try roundTrip(uart, into: fresh)
        #expect(a == b)
        #expect(fresh.divisor == 1 && fresh.inb(7) == 0x5a)
        #expect(freshLine.level == line.level, "the restored UART drives its line as the saved one did")
        var rest: [UInt8] = []
        while fresh.inb(5) & 0x01 != 0 { rest.append(fresh.inb(0)) }
        #expect(rest == Array("ello, snapshot".utf8))
    }

    @Test("an i8042 with queued bytes and a pending controller command restores them")
    func i8042() throws {
        let control = RecordingControl()
        let dev = I8042(keyboardInterrupt: RecordingLine(), control: control)
        dev.pressCtrlAltDel()
        dev.outb(4, 0x60)                                             // write command byte: waits for data
        let fresh = I8042(keyboardInterrupt: RecordingLine(), control: RecordingControl())
        let (a, b) = try roundTrip(dev, into: fresh)
        #expect(a == b)
        var bytes: [UInt8] = []
        while fresh.inb(4) & 0x01 != 0 { bytes.append(fresh.inb(0)) }
        #expect(bytes.count >= 4, "the Ctrl+Alt+Del scan codes survive: \(bytes)")
    }

    @Test("the CMOS RTC keeps its bytes and index; ACPI PM its registers")
    func rtcAndPM() throws {
        let rtc = CMOSRTC(clock: { 1_700_000_000 })
        rtc.outb(0, 0x40); rtc.outb(1, 0x99)
        rtc.outb(0, 0x41)
        let freshRTC = CMOSRTC(clock: { 1_700_000_000 })
        let (a, b) = try roundTrip(rtc, into: freshRTC)
        #expect(a == b)
        freshRTC.outb(0, 0x40)
        #expect(freshRTC.inb(1) == 0x99)
        let pm = ACPIPower(control: RecordingControl())
        pm.writeBytes(2, [0x00, 0x01])                                // PM1 enable: PWRBTN_EN bit
        let freshPM = ACPIPower(control: RecordingControl())
        let (c, d) = try roundTrip(pm, into: freshPM)
        #expect(c == d)
    }

    @Test("impossible saved states are refused with the field named", arguments: [
        (#"{"capacity": 0, "bytes": []}"#, "capacity"),
        (#"{"capacity": 4, "bytes": [1, 2, 3, 4, 5]}"#, "5 bytes in a queue of 4"),
        (#"{"capacity": 99999999, "bytes": []}"#, "capacity"),
    ])
    func badQueue(json: String, mentions: String) {
        #expect {
            _ = try JSONDecoder().decode(ByteQueue.self, from: Data(json.utf8))
        } throws: { "\($0)".contains(mentions) }
    }

    @Test("a UART state with a bad trigger level or FIFO is refused and the UART is unchanged")
    func badSerialState() throws {
        let uart = Serial16550(interrupt: RecordingLine(), output: RecordingOutput())
        uart.outb(7, 0x11)
        var s = uart.saveState()
        s.triggerLevel = 3
        #expect(throws: DeviceStateError.self) { try uart.restoreState(s) }
        var t = uart.saveState()
        t.rx = ByteQueue(capacity: 3)
        #expect(throws: DeviceStateError.self) { try uart.restoreState(t) }
        #expect(uart.inb(7) == 0x11)
        let rtc = CMOSRTC()
        var r = rtc.saveState()
        r.cmos = [1, 2, 3]
        #expect(throws: DeviceStateError.self) { try rtc.restoreState(r) }
    }
}
