import Testing
import Synchronization
@testable import Devices

@Suite("i8042 PS/2 controller")
struct I8042Tests {
    let kbd = RecordingLine()
    let control = RecordingControl()
    let dev: I8042

    init() { dev = I8042(keyboardInterrupt: kbd, control: control) }

    /// Sends a controller command, with an optional data byte.
    func command(_ c: UInt8, _ data: UInt8? = nil) {
        dev.outb(4, c)
        if let data { dev.outb(0, data) }
    }

    /// Reads the output buffer if the status register says it is full.
    func readOutput() -> UInt8? {
        dev.inb(4) & 0x01 != 0 ? dev.inb(0) : nil
    }

    @Test("self-test answers 0x55 and the keyboard interface test answers 0x00")
    func selfTest() {
        command(0xAA)
        #expect(dev.inb(4) & 0x0d == 0x0d, "OBF, system flag and command/data")
        #expect(readOutput() == 0x55)
        #expect(readOutput() == nil)
        command(0xAB)
        #expect(readOutput() == 0x00)
        command(0xA9)
        #expect(readOutput() == 0x01, "no aux device: the aux interface test fails")
    }

    @Test("the command byte is read with 0x20 and written with 0x60; 0xAD/0xAE and 0xA7/0xA8 toggle its disable bits")
    func commandByte() {
        command(0x60, 0x65)
        command(0x20)
        #expect(readOutput() == 0x65)
        command(0xAE)
        command(0xA8)
        command(0x20)
        #expect(readOutput() == 0x45)
        command(0xAD)
        command(0xA7)
        #expect(dev.commandByte == 0x75)
    }

    @Test("the pulse-reset command 0xFE requests a machine reset; pulses with bit 0 set do not")
    func resetPulse() {
        command(0xFF)
        command(0xF1)
        #expect(control.all.isEmpty)
        command(0xFE)
        #expect(control.all == [.reset])
        command(0xF0)
        #expect(control.all == [.reset, .reset])
    }

    @Test("writing the output port with bit 0 clear resets; reading it reports A20 and not-in-reset")
    func outputPort() {
        command(0xD0)
        #expect(readOutput()! & 0x03 == 0x03)
        command(0xD1, 0x03)
        #expect(control.all.isEmpty)
        command(0xD1, 0x02)
        #expect(control.all == [.reset])
    }

    @Test("a keyboard command is acknowledged through the output buffer with IRQ 1 as a level")
    func keyboardReplies() {
        command(0x60, 0x47)                   // keyboard interrupt enabled
        dev.outb(0, 0xF2)                     // identify
        #expect(kbd.level == true)
        #expect(readOutput() == 0xFA)
        #expect(kbd.level == true)
        #expect(readOutput() == 0xAB)
        #expect(readOutput() == 0x41, "translated ID")
        #expect(kbd.level == false)
        // Every byte is a fresh rising edge: true, then (false, true) after each of two reads, false.
        #expect(kbd.history.suffix(6) == [true, false, true, false, true, false])
        dev.outb(0, 0xFF)                     // reset
        #expect(readOutput() == 0xFA)
        #expect(readOutput() == 0xAA)
        dev.outb(0, 0xED)                     // LEDs, with a parameter
        #expect(readOutput() == 0xFA)
        dev.outb(0, 0x07)
        #expect(readOutput() == 0xFA)
        #expect(readOutput() == nil)
    }

    @Test("with keyboard interrupts disabled in the command byte, replies raise no interrupt")
    func noInterruptWhenDisabled() {
        command(0x60, 0x44)
        dev.outb(0, 0xF4)
        #expect(readOutput() == 0xFA)
        #expect(kbd.history.allSatisfy { $0 == false })
    }

    @Test("port 0x61's refresh bit toggles and its low bits keep what was written")
    func portB() {
        dev.outb(1, 0x03)
        let a = dev.inb(1), b = dev.inb(1)
        #expect(a & 0x0f == 0x03 && b & 0x0f == 0x03)
        #expect((a ^ b) & 0x10 == 0x10)
        #expect(dev.inb(2) == 0xff)
    }

    @Test("with an aux device, 0xD3 loops a byte back as aux data on IRQ 12; without one it is swallowed")
    func auxLoop() {
        let aux = RecordingLine()
        let withAux = I8042(keyboardInterrupt: kbd, auxInterrupt: aux, control: control, auxPresent: true)
        withAux.outb(4, 0x60); withAux.outb(0, 0x47)     // keyboard and aux interrupts on
        withAux.outb(4, 0xD3); withAux.outb(0, 0x5a)
        #expect(withAux.inb(4) & 0x21 == 0x21, "OBF with AUXDATA")
        #expect(aux.level == true)
        #expect(withAux.inb(0) == 0x5a)
        #expect(aux.level == false)
        withAux.outb(4, 0xA9)
        #expect(withAux.inb(0) == 0x00)
        command(0xD3, 0x5a)
        #expect(readOutput() == nil)
    }

    @Test("unknown controller commands are counted and ignored")
    func unknown() {
        command(0x12)
        #expect(dev.unknownCommandCount == 1)
        #expect(readOutput() == nil)
        #expect(control.all.isEmpty)
    }
}

@Suite("CMOS RTC")
struct CMOSRTCTests {
    // 2024-02-29 13:45:07 UTC, a Thursday.
    static let when: Int64 = 1_709_214_307

    func reg(_ rtc: CMOSRTC, _ index: UInt8) -> UInt8 {
        rtc.outb(0, index)
        return rtc.inb(1)
    }
    func setReg(_ rtc: CMOSRTC, _ index: UInt8, _ v: UInt8) {
        rtc.outb(0, index)
        rtc.outb(1, v)
    }

    @Test("time and date read in BCD, 24-hour, by default from the injected clock")
    func bcd24() {
        let rtc = CMOSRTC(clock: { Self.when })
        #expect(reg(rtc, 0x0B) == 0x02)
        #expect(reg(rtc, 0x00) == 0x07)
        #expect(reg(rtc, 0x02) == 0x45)
        #expect(reg(rtc, 0x04) == 0x13)
        #expect(reg(rtc, 0x06) == 0x05, "Thursday, with Sunday = 1")
        #expect(reg(rtc, 0x07) == 0x29)
        #expect(reg(rtc, 0x08) == 0x02)
        #expect(reg(rtc, 0x09) == 0x24)
        #expect(reg(rtc, 0x32) == 0x20)
    }

    @Test("register B's DM bit selects binary and its 24/12 bit selects 12-hour with bit 7 for PM")
    func binaryAnd12h() {
        let rtc = CMOSRTC(clock: { Self.when })
        setReg(rtc, 0x0B, 0x06)
        #expect(reg(rtc, 0x04) == 13)
        #expect(reg(rtc, 0x02) == 45)
        #expect(reg(rtc, 0x09) == 24)
        #expect(reg(rtc, 0x32) == 20)
        setReg(rtc, 0x0B, 0x04)
        #expect(reg(rtc, 0x04) == 0x80 | 1)
        setReg(rtc, 0x0B, 0x00)
        #expect(reg(rtc, 0x04) == 0x81)
        // Midnight and noon in 12-hour form are 12 AM and 12 PM.
        let midnight = CMOSRTC(clock: { 1_709_164_800 })
        setReg(midnight, 0x0B, 0x00)
        #expect(reg(midnight, 0x04) == 0x12)
        let noon = CMOSRTC(clock: { 1_709_164_800 + 12 * 3600 })
        setReg(noon, 0x0B, 0x04)
        #expect(reg(noon, 0x04) == 0x80 | 12)
    }

    @Test("register A ignores writes to UIP (clear mid-second), C reads 0 with no time passed and D reports valid RAM")
    func statusRegisters() {
        let rtc = CMOSRTC(clock: { Self.when })
        setReg(rtc, 0x0A, 0xA6)
        #expect(reg(rtc, 0x0A) == 0x26)
        #expect(reg(rtc, 0x0C) == 0x00)
        #expect(reg(rtc, 0x0D) == 0x80)
    }

    @Test("bit 7 of the index is the NMI-disable bit and is masked off the register number")
    func nmiBit() {
        let rtc = CMOSRTC(clock: { Self.when })
        rtc.outb(0, 0x80 | 0x04)
        #expect(rtc.inb(1) == 0x13)
        #expect(rtc.nmiDisabled)
        rtc.outb(0, 0x04)
        #expect(!rtc.nmiDisabled)
        #expect(rtc.inb(0) == 0xff)
    }

    @Test("a time written under SET runs on from there once SET is cleared")
    func setTime() {
        let now = Mutex(Self.when)
        let rtc = CMOSRTC(clock: { now.withLock { $0 } })
        setReg(rtc, 0x0B, 0x82)
        setReg(rtc, 0x04, 0x01)               // 01:xx
        #expect(reg(rtc, 0x04) == 0x01)
        now.withLock { $0 += 3600 }
        #expect(reg(rtc, 0x04) == 0x01, "frozen while SET")
        setReg(rtc, 0x0B, 0x02)
        #expect(reg(rtc, 0x04) == 0x01)
        #expect(reg(rtc, 0x02) == 0x45)
        now.withLock { $0 += 3600 }
        #expect(reg(rtc, 0x04) == 0x02)
    }

    @Test("writing one time register while the clock runs moves the clock by that much")
    func writeWhileRunning() {
        let rtc = CMOSRTC(clock: { Self.when })
        setReg(rtc, 0x09, 0x25)                          // year 2024 -> 2025
        #expect(reg(rtc, 0x09) == 0x25)
        #expect(reg(rtc, 0x08) == 0x03, "2025 has no 29 February: the date normalises to 1 March")
        #expect(reg(rtc, 0x07) == 0x01)
        #expect(reg(rtc, 0x02) == 0x45)
    }

    @Test("CMOS memory holds bytes, and memory sizes land where SeaBIOS reads them")
    func memory() {
        let rtc = CMOSRTC(clock: { Self.when })
        setReg(rtc, 0x40, 0xAB)
        #expect(reg(rtc, 0x40) == 0xAB)
        rtc.setMemorySize(belowFourGiB: 3 << 30, aboveFourGiB: 1 << 30)
        #expect(reg(rtc, 0x15) == 0x80 && reg(rtc, 0x16) == 0x02)            // 640 KiB
        #expect(reg(rtc, 0x17) == 0xff && reg(rtc, 0x18) == 0xff)            // capped
        #expect(reg(rtc, 0x30) == 0xff && reg(rtc, 0x31) == 0xff)
        let above16 = ((3 << 30) - (16 << 20)) / 65536
        #expect(reg(rtc, 0x34) == UInt8(above16 & 0xff) && reg(rtc, 0x35) == UInt8(above16 >> 8))
        #expect(reg(rtc, 0x5b) == 0x00 && reg(rtc, 0x5c) == 0x40 && reg(rtc, 0x5d) == 0x00)
        let small = CMOSRTC(clock: { Self.when })
        small.setMemorySize(belowFourGiB: 8 << 20, aboveFourGiB: 0)
        #expect(reg(small, 0x17) == 0x00 && reg(small, 0x18) == 0x1c)         // 7168 KiB
        #expect(reg(small, 0x34) == 0 && reg(small, 0x35) == 0)
    }
}

@Suite("isa-debug-exit")
struct DebugExitTests {
    @Test("a written value v becomes exit status (v << 1) | 1, truncated to 8 bits")
    func statusMath() {
        #expect(DebugExit.status(forValue: 0) == 1)
        #expect(DebugExit.status(forValue: 1) == 3)
        #expect(DebugExit.status(forValue: 0x10) == 0x21)
        #expect(DebugExit.status(forValue: 0x7f) == 255)
        #expect(DebugExit.status(forValue: 0x80) == 1)
        #expect(DebugExit.status(forValue: 0xffff_ffff) == 255)
    }

    @Test("1-, 2- and 4-byte writes request an exit with the little-endian value")
    func writes() {
        let control = RecordingControl()
        let dev = DebugExit(control: control)
        dev.writeBytes(0, [0x01])
        dev.writeBytes(0, [0x02, 0x00])
        dev.writeBytes(0, [0x03, 0x01, 0x00, 0x00])
        dev.writeBytes(0, [])
        #expect(control.all == [.exit(status: 3), .exit(status: 5), .exit(status: 7)])
        #expect(dev.readBytes(0, count: 2) == [0, 0])
    }
}

@Suite("Bus and sinks")
struct BusTests {
    @Test("overlapping ranges are refused, adjacent ones accepted, and lookup finds the right device")
    func overlapAndLookup() throws {
        let bus = Bus()
        let a = SinkDevice(name: "a", readValue: 1), b = SinkDevice(name: "b", readValue: 2)
        try bus.insert(a, base: 0x3f8, length: 8)
        try bus.insert(b, base: 0x400, length: 4)
        #expect(throws: BusError.overlap(base: 0x3f0, length: 9, existing: 0x3f8)) {
            try bus.insert(SinkDevice(name: "c"), base: 0x3f0, length: 9)
        }
        #expect(throws: BusError.overlap(base: 0x3ff, length: 1, existing: 0x3f8)) {
            try bus.insert(SinkDevice(name: "c"), base: 0x3ff, length: 1)
        }
        #expect(throws: BusError.emptyRange(base: 0x10)) {
            try bus.insert(SinkDevice(name: "c"), base: 0x10, length: 0)
        }
        #expect(throws: BusError.addressOverflow(base: .max, length: 2)) {
            try bus.insert(SinkDevice(name: "c"), base: .max, length: 2)
        }
        try bus.insert(SinkDevice(name: "top"), base: .max, length: 1)
        #expect(throws: BusError.self) { try bus.insert(SinkDevice(name: "c"), base: .max - 1, length: 2) }
        #expect(bus.find(0x3f7) == nil)
        #expect(bus.find(0x3f8)?.device === a)
        #expect(bus.find(0x3ff)?.device === a)
        #expect(bus.find(0x400)?.device === b)
        #expect(bus.find(0x404) == nil)
        #expect(bus.allEntries.map(\.base) == [0x3f8, 0x400, .max])
    }

    @Test("dispatch passes offsets relative to the base; misses read 0xff and are counted")
    func dispatch() throws {
        let bus = Bus()
        let uartOut = RecordingOutput()
        try bus.insert(Serial16550(interrupt: NullInterruptLine(), output: uartOut), base: 0x3f8, length: 8)
        var byte: [UInt8] = [0x41]
        #expect(byte.withUnsafeBytes { bus.write(address: 0x3f8, data: $0) })
        #expect(uartOut.written == [0x41])
        #expect(byte.withUnsafeMutableBytes { bus.read(address: 0x3fd, data: $0) })
        #expect(byte == [0x60])
        #expect(!byte.withUnsafeMutableBytes { bus.read(address: 0x3f0, data: $0) })
        #expect(byte == [0xff])
        #expect(bus.unhandledCount == 1)
    }

    @Test("the default legacy sinks install without overlaps, read as absent and count accesses")
    func legacySinks() throws {
        let bus = Bus()
        try bus.insert(Serial16550(interrupt: NullInterruptLine(), output: DiscardSerialOutput()),
                       base: Serial16550.defaultBase, length: Serial16550.portCount)
        try bus.insert(I8042(keyboardInterrupt: NullInterruptLine(), control: RecordingControl()),
                       base: I8042.defaultBase, length: I8042.portCount)
        try bus.insert(CMOSRTC(), base: CMOSRTC.defaultBase, length: CMOSRTC.portCount)
        try bus.insert(DebugExit(control: RecordingControl()), base: DebugExit.defaultPort, length: 1)
        let sinks = try LegacyPorts.install(on: bus)
        let post = try #require(sinks.first { $0.name == "POST" })
        var b: [UInt8] = [0]
        b.withUnsafeBytes { _ = bus.write(address: 0x80, data: $0) }
        b.withUnsafeMutableBytes { _ = bus.read(address: 0x80, data: $0) }
        #expect(b == [0xff])
        #expect(post.writeCount == 1 && post.readCount == 1)
        // COM2's IER reads 0xff, so Linux's 8250 probe finds no UART there.
        b.withUnsafeMutableBytes { _ = bus.read(address: 0x2f9, data: $0) }
        #expect(b == [0xff])
        #expect(bus.unhandledCount == 0)
    }
}
