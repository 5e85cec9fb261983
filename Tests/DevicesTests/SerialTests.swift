import Testing
@testable import Devices

// Register offsets.
private let RBR: UInt64 = 0, IER: UInt64 = 1, IIR: UInt64 = 2, FCR: UInt64 = 2, LCR: UInt64 = 3
private let MCR: UInt64 = 4, LSR: UInt64 = 5, MSR: UInt64 = 6, SCR: UInt64 = 7

@Suite("16550A UART")
struct SerialTests {
    let line = RecordingLine()
    let out = RecordingOutput()
    let uart: Serial16550

    init() { uart = Serial16550(interrupt: line, output: out) }

    /// Puts the UART in the state Linux leaves it: 8N1, FIFO on (trigger 8), DTR|RTS|OUT2.
    func linuxSetup() {
        uart.outb(LCR, 0x03)
        uart.outb(FCR, 0x81)
        uart.outb(MCR, 0x0b)
    }

    @Test("THR writes reach the output in order and LSR reports THRE and TEMT")
    func transmit() {
        for b in Array("hi\n".utf8) { uart.outb(RBR, b) }
        #expect(out.written == Array("hi\n".utf8))
        #expect(uart.inb(LSR) == 0x60)
        #expect(uart.transmittedBytes == 3)
        uart.flush()
        #expect(out.flushCount == 1)
    }

    @Test("the divisor latch is reached through DLAB and does not disturb THR, RBR or IER")
    func divisorLatch() {
        uart.outb(IER, 0x05)
        uart.outb(LCR, 0x83)
        uart.outb(0, 0x01)
        uart.outb(1, 0x02)
        #expect(uart.inb(0) == 0x01)
        #expect(uart.inb(1) == 0x02)
        #expect(uart.divisor == 0x0201)
        #expect(out.written.isEmpty)
        uart.outb(LCR, 0x03)
        #expect(uart.inb(IER) == 0x05)
        #expect(uart.inb(LCR) == 0x03)
    }

    @Test("IER keeps only its low four bits and the scratch register holds any byte")
    func ierAndScratch() {
        uart.outb(IER, 0xff)
        #expect(uart.inb(IER) == 0x0f)
        uart.outb(SCR, 0x5a)
        #expect(uart.inb(SCR) == 0x5a)
    }

    @Test("with the FIFO disabled, IIR reads 0x01 and there is a one-byte holding register")
    func noFIFO() {
        #expect(uart.inb(IIR) == 0x01)
        uart.enqueue([1, 2, 3])
        #expect(uart.inb(LSR) & 0x01 == 0x01)
        #expect(uart.inb(RBR) == 1)
        #expect(uart.inb(RBR) == 2)
        #expect(uart.inb(RBR) == 3)
        #expect(uart.inb(LSR) & 0x01 == 0)
    }

    @Test("enabling the FIFO sets IIR bits 7-6 and the receive FIFO holds 16 bytes")
    func fifo() {
        uart.outb(FCR, 0x01)
        #expect(uart.inb(IIR) == 0xc1)
        uart.enqueue(Array(0..<20))
        #expect(uart.pendingInputBytes == 20)
        var got: [UInt8] = []
        while uart.inb(LSR) & 0x01 != 0 { got.append(uart.inb(RBR)) }
        #expect(got == Array(0..<20))
        uart.outb(FCR, 0x00)
        #expect(uart.inb(IIR) == 0x01)
    }

    @Test("a receive-FIFO reset gives host bytes back to the input buffer instead of losing them")
    func fifoResetKeepsHostInput() {
        uart.outb(FCR, 0x01)
        uart.enqueue(Array("abc".utf8))
        uart.outb(FCR, 0x07)
        var got: [UInt8] = []
        while uart.inb(LSR) & 0x01 != 0 { got.append(uart.inb(RBR)) }
        #expect(got == Array("abc".utf8))
    }

    @Test("input piped before Linux's 8250 startup survives its FIFO resets and clearing reads")
    func linuxStartupKeepsInput() {
        uart.enqueue(Array("echo ok\n".utf8))
        // Autoconfig and console setup: FIFO probed, then enabled at trigger 8.
        uart.outb(FCR, 0x01)
        _ = uart.inb(IIR)
        uart.outb(FCR, 0x07)
        uart.outb(FCR, 0x00)
        uart.outb(LCR, 0x03)
        uart.outb(FCR, 0x81)
        // serial8250_do_startup: clear and disable the FIFOs, clear the interrupt registers,
        // THRE tests, raise OUT2, clear the registers again.
        uart.outb(FCR, 0x07)
        uart.outb(FCR, 0x00)
        for r in [LSR, RBR, IIR, MSR] { _ = uart.inb(r) }
        uart.outb(IER, 0x02); _ = uart.inb(IIR); uart.outb(IER, 0x00)
        uart.outb(IER, 0x02); _ = uart.inb(IIR); uart.outb(IER, 0x00)
        uart.outb(MCR, 0x0b)
        uart.outb(IER, 0x02); _ = uart.inb(LSR); _ = uart.inb(IIR); uart.outb(IER, 0x00)
        for r in [LSR, RBR, IIR, MSR] { _ = uart.inb(r) }
        // set_termios: FIFO on, receive interrupts on.
        uart.outb(FCR, 0x81)
        uart.outb(IER, 0x05)
        #expect(line.level == true)
        var got: [UInt8] = []
        while uart.inb(LSR) & 0x01 != 0 { got.append(uart.inb(RBR)) }
        #expect(got == Array("echo ok\n".utf8))
        #expect(line.level == false)
    }

    @Test("loopback sends THR to the receiver, not the output, and mirrors MCR in MSR")
    func loopback() {
        uart.outb(MCR, 0x10 | 0x0a)           // Linux's 8250 probe: LOOP | RTS | OUT2
        #expect(uart.inb(MSR) & 0xf0 == 0x90)
        uart.outb(MCR, 0x10 | 0x05)           // LOOP | DTR | OUT1
        #expect(uart.inb(MSR) & 0xf0 == 0x60)
        uart.outb(RBR, 0x42)
        #expect(out.written.isEmpty)
        #expect(uart.inb(LSR) & 0x01 == 0x01)
        #expect(uart.inb(RBR) == 0x42)
        // A second byte with the one-byte holding register full overruns.
        uart.outb(RBR, 1)
        uart.outb(RBR, 2)
        #expect(uart.inb(LSR) & 0x03 == 0x03)
        #expect(uart.inb(LSR) & 0x02 == 0, "reading LSR clears OE")
        uart.outb(MCR, 0x00)
        #expect(uart.inb(MSR) & 0xf0 == 0xb0, "CTS, DSR and DCD outside loopback")
    }

    @Test("host input waits while loopback is on and arrives after it ends")
    func loopbackDisconnectsInput() {
        uart.outb(MCR, 0x10)
        uart.enqueue([7])
        #expect(uart.inb(LSR) & 0x01 == 0)
        uart.outb(MCR, 0x00)
        #expect(uart.inb(LSR) & 0x01 == 0x01)
        #expect(uart.inb(RBR) == 7)
    }

    @Test("MSR delta bits record modem line changes and clear on read")
    func msrDeltas() {
        uart.outb(MCR, 0x10)                  // loopback, all lines low: CTS/DSR/DCD fall
        #expect(uart.inb(MSR) == 0x0b)
        #expect(uart.inb(MSR) == 0x00)
        uart.outb(MCR, 0x14)                  // OUT1 -> RI rises: no TERI on a rising edge
        #expect(uart.inb(MSR) == 0x40)
        uart.outb(MCR, 0x10)                  // RI falls: TERI
        #expect(uart.inb(MSR) == 0x04)
    }

    @Test("enabling ETBEI with an empty THR raises a THRE interrupt; reading IIR clears it")
    func threEdge() {
        linuxSetup()
        #expect(line.history.isEmpty)
        uart.outb(IER, 0x02)
        #expect(line.level == true)
        #expect(uart.inb(IIR) == 0xc2)
        #expect(line.level == false)
        #expect(uart.inb(IIR) == 0xc1, "THRE is reported once")
        // Toggling ETBEI off and on raises it again (Linux's startup THRE test).
        uart.outb(IER, 0x00)
        uart.outb(IER, 0x02)
        #expect(uart.inb(IIR) == 0xc2)
    }

    @Test("writing THR re-arms the THRE interrupt while ETBEI is set; clearing ETBEI drops it")
    func threAfterWrite() {
        linuxSetup()
        uart.outb(IER, 0x02)
        _ = uart.inb(IIR)
        #expect(line.level == false)
        uart.outb(RBR, 0x41)
        #expect(line.level == true)
        uart.outb(IER, 0x00)
        #expect(line.level == false)
        #expect(uart.inb(IIR) == 0xc1)
    }

    @Test("host input sets DR and raises the receive interrupt, lowered once the FIFO is drained")
    func receiveInterrupt() {
        linuxSetup()
        uart.outb(IER, 0x01)
        #expect(line.level == false)
        uart.enqueue(Array("ls\r".utf8))
        #expect(uart.inb(LSR) & 0x01 == 0x01)
        #expect(line.level == true)
        // Three bytes are below the trigger level of 8: a character timeout.
        #expect(uart.inb(IIR) == 0xcc)
        #expect(uart.inb(RBR) == UInt8(ascii: "l"))
        #expect(uart.inb(RBR) == UInt8(ascii: "s"))
        #expect(line.level == true)
        #expect(uart.inb(RBR) == UInt8(ascii: "\r"))
        #expect(line.level == false)
        #expect(uart.inb(IIR) == 0xc1)
        // At or above the trigger level it is "received data available".
        uart.enqueue(Array(repeating: 0x61, count: 10))
        #expect(uart.inb(IIR) == 0xc4)
    }

    @Test("IIR reports line status before received data, before THRE, before modem status")
    func priorities() {
        linuxSetup()
        uart.outb(IER, 0x0f)
        uart.outb(MCR, 0x10)                  // loopback with all lines low, then back: modem deltas
        uart.outb(MCR, 0x0b)
        uart.outb(RBR, 0x00)                  // arms THRE
        #expect(uart.inb(IIR) == 0xc2)        // THRE beats modem status (and is now cleared)
        #expect(uart.inb(IIR) == 0xc0)        // modem status
        _ = uart.inb(MSR)
        #expect(uart.inb(IIR) == 0xc1)
        // Overrun the input buffer: OE (line status) beats received data.
        let small = Serial16550(interrupt: line, output: out, inputCapacity: 4)
        small.outb(LCR, 0x03)
        small.outb(MCR, 0x0b)
        small.outb(IER, 0x07)
        _ = small.inb(IIR)
        small.enqueue([1, 2, 3, 4, 5, 6, 7])
        #expect(small.droppedInputBytes > 0)
        #expect(small.inb(IIR) == 0x06)
        #expect(small.inb(LSR) & 0x03 == 0x03)
        #expect(small.inb(IIR) == 0x04)
        #expect(small.inb(IIR) == 0x04, "received data is not cleared by reading IIR")
    }

    @Test("a loopback overrun raises a line-status interrupt that reading LSR clears")
    func lineStatusInterrupt() {
        uart.outb(IER, 0x04)
        uart.outb(MCR, 0x10)
        uart.outb(RBR, 1)
        uart.outb(RBR, 2)                     // holding register full: overrun
        #expect(uart.inb(IIR) == 0x06)
        #expect(uart.inb(LSR) & 0x02 == 0x02)
        #expect(uart.inb(IIR) == 0x01)
        #expect(uart.inb(RBR) == 1)
    }

    @Test("the input buffer drops the oldest bytes when full")
    func dropOldest() {
        let u = Serial16550(interrupt: line, output: out, inputCapacity: 4)
        u.enqueue([1, 2, 3, 4, 5, 6])
        // One byte already sits in the holding register; the buffer kept the newest four.
        var got: [UInt8] = []
        while u.inb(LSR) & 0x01 != 0 { got.append(u.inb(RBR)) }
        #expect(got == [1, 3, 4, 5, 6])
        #expect(u.droppedInputBytes == 1)
    }

    @Test("without OUT2 (or in loopback) the pending interrupt does not reach the pin")
    func out2Gates() {
        uart.outb(LCR, 0x03)
        uart.outb(IER, 0x01)
        uart.enqueue([9])
        #expect(uart.inb(IIR) == 0x04)
        #expect(line.history.isEmpty)
        uart.outb(MCR, 0x08)
        #expect(line.level == true)
        uart.outb(MCR, 0x18)
        #expect(line.level == false)
        #expect(uart.interruptAsserted == false)
    }

    @Test("accesses past the eight registers read 0xff and multi-byte accesses go register by register")
    func outOfRange() {
        #expect(uart.inb(8) == 0xff)
        uart.outb(9, 0x12)
        uart.writeBytes(SCR, [0x33, 0x44])
        #expect(uart.readBytes(MSR, count: 3) == [0xb0, 0x33, 0xff])
        #expect(uart.readBytes(UInt64.max, count: 2) == [0xff, 0xff])
    }
}
