import Synchronization

/// Where a UART's transmitted bytes go.
///
/// Implementations must not lose bytes: `write` hands them on (or deliberately discards them,
/// as `--serial none` does) before returning, and `flush()` pushes out anything buffered.
public protocol SerialOutput: Sendable {
    /// Takes bytes the guest transmitted, in order.
    func write(_ bytes: [UInt8])
    /// Pushes out buffered bytes (called at exit).
    func flush()
}

extension SerialOutput {
    public func flush() {}
}

/// A `SerialOutput` that calls a closure for every write (tests, simple sinks).
public struct ClosureSerialOutput: SerialOutput {
    private let sink: @Sendable ([UInt8]) -> Void
    /// Wraps `sink`, which receives every transmitted chunk in order.
    public init(_ sink: @escaping @Sendable ([UInt8]) -> Void) { self.sink = sink }
    public func write(_ bytes: [UInt8]) { sink(bytes) }
}

/// A `SerialOutput` that discards everything.
public struct DiscardSerialOutput: SerialOutput {
    public init() {}
    public func write(_ bytes: [UInt8]) {}
}

/// A 16550A UART (the PC's COM port), as Linux's 8250 driver expects it.
///
/// Registers at `base...base+7` (offsets 0-7): RBR/THR/DLL, IER/DLM, IIR/FCR, LCR, MCR, LSR,
/// MSR, SCR. Transmission is instantaneous: THR and the transmitter are always empty, so
/// LSR.THRE and LSR.TEMT always read 1 and every THR write goes straight to the output.
///
/// Interrupts: the highest-priority pending source is reported in IIR (line status, then
/// received data or character timeout, then THR empty, then modem status). The THR-empty
/// source is latched when IER.ETBEI goes from 0 to 1 and after every THR write, and is cleared
/// by an IIR read that reports it, by a THR write, or by clearing IER.ETBEI. A FIFO below its
/// trigger level reports a character timeout (IIR 0x0C) at once instead of after four
/// character times. As on a PC, the interrupt reaches the pin only when MCR.OUT2 is set and
/// loopback is off; the pin is driven with `InterruptLine.set(level:)` whenever it changes.
///
/// Input: `enqueue(_:)` buffers host bytes (at most `inputCapacity`; when full, the oldest
/// buffered byte is dropped, counted in `droppedInputBytes`, and LSR.OE is set). Buffered bytes
/// move into the receive FIFO (16 bytes with FCR.0 set, else a 1-byte holding register) as the
/// guest reads, and never while loopback is on (the receive pin is disconnected then).
///
/// So that a driver (re)initialising the port does not eat typed or piped input, the host side
/// acts as if it were flow-controlled: a FIFO reset (FCR bits 0/1) discards loopback bytes but
/// returns host bytes to the input buffer, and host bytes are only delivered while the guest
/// looks ready to receive: receive interrupts enabled (IER.ERBFI), or the FIFO enabled, or FCR
/// never written since reset (a simple polled program). Linux's 8250 startup, which resets and
/// disables the FIFO and then reads RBR twice to clear it, therefore loses nothing.
public final class Serial16550: BusDevice, Sendable {
    /// COM1's I/O port base.
    public static let defaultBase: UInt64 = 0x3f8
    /// COM1's ISA interrupt.
    public static let defaultIRQ: UInt32 = 4
    /// Number of I/O ports the UART occupies.
    public static let portCount: UInt64 = 8
    /// Default bound of the host input buffer (64 KiB).
    public static let defaultInputCapacity = 64 * 1024
    /// Receive FIFO size of a 16550A.
    public static let fifoSize = 16

    // Register bits (names from the 16550 data sheet).
    static let ierERBFI: UInt8 = 0x01, ierETBEI: UInt8 = 0x02, ierELSI: UInt8 = 0x04, ierEDSSI: UInt8 = 0x08
    static let lsrDR: UInt8 = 0x01, lsrOE: UInt8 = 0x02, lsrPE: UInt8 = 0x04, lsrFE: UInt8 = 0x08
    static let lsrBI: UInt8 = 0x10, lsrTHRE: UInt8 = 0x20, lsrTEMT: UInt8 = 0x40
    static let mcrDTR: UInt8 = 0x01, mcrRTS: UInt8 = 0x02, mcrOUT1: UInt8 = 0x04, mcrOUT2: UInt8 = 0x08
    static let mcrLOOP: UInt8 = 0x10
    static let msrCTS: UInt8 = 0x10, msrDSR: UInt8 = 0x20, msrRI: UInt8 = 0x40, msrDCD: UInt8 = 0x80
    static let lcrDLAB: UInt8 = 0x80
    static let iirNone: UInt8 = 0x01, iirLineStatus: UInt8 = 0x06, iirRxData: UInt8 = 0x04
    static let iirTimeout: UInt8 = 0x0C, iirTHRE: UInt8 = 0x02, iirModem: UInt8 = 0x00
    static let iirFIFOEnabled: UInt8 = 0xC0

    /// The UART's registers, FIFOs and host input buffer (also its saved state).
    public struct State: Codable, Sendable {
        var ier: UInt8 = 0
        var lcr: UInt8 = 0
        var mcr: UInt8 = 0
        var lsrErrors: UInt8 = 0          // OE/PE/FE/BI, cleared by reading LSR
        var msrDeltas: UInt8 = 0          // DCTS/DDSR/TERI/DDCD, cleared by reading MSR
        var scr: UInt8 = 0
        var dll: UInt8 = 0x0c             // 9600 baud
        var dlm: UInt8 = 0
        var fifoEnabled = false
        var triggerLevel = 1
        var rx = ByteQueue(capacity: Serial16550.fifoSize)
        var rxFromHost = ByteQueue(capacity: Serial16550.fifoSize)   // 1 = byte came from the host
        var input: ByteQueue
        var thrIPending = false
        var pinLevel = false
        var droppedInput: UInt64 = 0
        var transmitted: UInt64 = 0

        var fcrWritten = false

        var loopback: Bool { mcr & Serial16550.mcrLOOP != 0 }
        /// Whether host bytes may enter the receiver now (see the type's documentation).
        var receiverReady: Bool {
            !loopback && (fifoEnabled || ier & Serial16550.ierERBFI != 0 || !fcrWritten)
        }
        var rxLimit: Int { fifoEnabled ? Serial16550.fifoSize : 1 }
    }

    private let state: Mutex<State>
    private let interrupt: any InterruptLine
    private let output: any SerialOutput

    /// Creates a UART raising `interrupt` and transmitting into `output`.
    /// - Parameter inputCapacity: bound of the host input buffer, in bytes.
    public init(interrupt: any InterruptLine, output: any SerialOutput,
                inputCapacity: Int = Serial16550.defaultInputCapacity) {
        self.interrupt = interrupt
        self.output = output
        self.state = Mutex(State(input: ByteQueue(capacity: max(1, inputCapacity))))
    }

    // MARK: Host side

    /// Queues bytes typed or piped on the host for the guest to receive (any thread).
    public func enqueue(_ bytes: [UInt8]) {
        guard !bytes.isEmpty else { return }
        state.withLock { s in
            for b in bytes {
                if s.input.pushDroppingOldest(b) {
                    s.droppedInput += 1
                    s.lsrErrors |= Self.lsrOE
                }
                refill(&s)
            }
            updatePin(&s)
        }
    }

    /// Flushes the output sink (call at exit so no console output is lost).
    public func flush() { output.flush() }

    /// Host bytes dropped because the input buffer was full.
    public var droppedInputBytes: UInt64 { state.withLock { $0.droppedInput } }
    /// Host bytes buffered and not yet read by the guest (including those in the receive FIFO).
    public var pendingInputBytes: Int { state.withLock { $0.input.count + $0.rx.count } }
    /// Bytes the guest transmitted to the output (loopback bytes excluded).
    public var transmittedBytes: UInt64 { state.withLock { $0.transmitted } }
    /// The divisor latch (DLM:DLL); the line runs at 115200 / divisor baud.
    public var divisor: UInt16 { state.withLock { UInt16($0.dlm) << 8 | UInt16($0.dll) } }
    /// Whether the interrupt pin is currently asserted.
    public var interruptAsserted: Bool { state.withLock { $0.pinLevel } }

    // MARK: BusDevice

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        state.withLock { s in
            for i in 0..<data.count {
                let (reg, overflow) = offset.addingReportingOverflow(UInt64(i))
                data[i] = (!overflow && reg < Self.portCount) ? readRegister(Int(reg), &s) : 0xff
            }
            updatePin(&s)
        }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        state.withLock { s in
            for i in 0..<data.count {
                let (reg, overflow) = offset.addingReportingOverflow(UInt64(i))
                if !overflow && reg < Self.portCount { writeRegister(Int(reg), data[i], &s) }
            }
            updatePin(&s)
        }
    }

    // MARK: Register logic (called with the lock held)

    private func readRegister(_ reg: Int, _ s: inout State) -> UInt8 {
        switch reg {
        case 0:
            if s.lcr & Self.lcrDLAB != 0 { return s.dll }
            let b = s.rx.pop() ?? 0
            _ = s.rxFromHost.pop()
            refill(&s)
            return b
        case 1:
            return s.lcr & Self.lcrDLAB != 0 ? s.dlm : s.ier
        case 2:
            let id = Self.interruptIdentification(s)
            if id == Self.iirTHRE { s.thrIPending = false }
            return id | (s.fifoEnabled ? Self.iirFIFOEnabled : 0)
        case 3:
            return s.lcr
        case 4:
            return s.mcr
        case 5:
            let v = (s.rx.isEmpty ? 0 : Self.lsrDR) | s.lsrErrors | Self.lsrTHRE | Self.lsrTEMT
            s.lsrErrors = 0
            return v
        case 6:
            let v = Self.modemLines(mcr: s.mcr) | s.msrDeltas
            s.msrDeltas = 0
            return v
        default:
            return s.scr
        }
    }

    private func writeRegister(_ reg: Int, _ v: UInt8, _ s: inout State) {
        switch reg {
        case 0:
            if s.lcr & Self.lcrDLAB != 0 { s.dll = v; return }
            if s.loopback {
                if s.rx.count >= s.rxLimit {
                    s.lsrErrors |= Self.lsrOE
                } else {
                    s.rx.push(v)
                    s.rxFromHost.push(0)
                }
            } else {
                output.write([v])
                s.transmitted += 1
            }
            // The THR empties at once, so the THRE interrupt is pending again if enabled.
            s.thrIPending = s.ier & Self.ierETBEI != 0
        case 1:
            if s.lcr & Self.lcrDLAB != 0 { s.dlm = v; return }
            let new = v & 0x0f
            if (s.ier ^ new) & Self.ierETBEI != 0 {
                // Rising edge of ETBEI with an empty THR latches the THRE interrupt.
                s.thrIPending = new & Self.ierETBEI != 0
            }
            s.ier = new
            refill(&s)
        case 2:
            s.fcrWritten = true
            let enable = v & 0x01 != 0
            if enable != s.fifoEnabled {
                resetReceiveFIFO(&s)
                s.fifoEnabled = enable
            }
            if v & 0x02 != 0 { resetReceiveFIFO(&s) }
            if enable { s.triggerLevel = [1, 4, 8, 14][Int(v >> 6)] }
            refill(&s)
        case 3:
            s.lcr = v
        case 4:
            let old = s.mcr
            let new = v & 0x1f
            let before = Self.modemLines(mcr: old), after = Self.modemLines(mcr: new)
            s.mcr = new
            let changed = before ^ after
            if changed & Self.msrCTS != 0 { s.msrDeltas |= 0x01 }
            if changed & Self.msrDSR != 0 { s.msrDeltas |= 0x02 }
            if before & Self.msrRI != 0 && after & Self.msrRI == 0 { s.msrDeltas |= 0x04 }
            if changed & Self.msrDCD != 0 { s.msrDeltas |= 0x08 }
            refill(&s)
        case 7:
            s.scr = v
        default:
            break   // LSR and MSR writes (factory test) are ignored.
        }
    }

    /// The MSR status bits (7-4): fixed "carrier, ready, clear to send" unless looped back.
    static func modemLines(mcr: UInt8) -> UInt8 {
        guard mcr & mcrLOOP != 0 else { return msrCTS | msrDSR | msrDCD }
        var v: UInt8 = 0
        if mcr & mcrRTS != 0 { v |= msrCTS }
        if mcr & mcrDTR != 0 { v |= msrDSR }
        if mcr & mcrOUT1 != 0 { v |= msrRI }
        if mcr & mcrOUT2 != 0 { v |= msrDCD }
        return v
    }

    /// IIR bits 3-0 for the highest-priority enabled pending source.
    static func interruptIdentification(_ s: State) -> UInt8 {
        if s.ier & ierELSI != 0 && s.lsrErrors & (lsrOE | lsrPE | lsrFE | lsrBI) != 0 { return iirLineStatus }
        if s.ier & ierERBFI != 0 && !s.rx.isEmpty {
            return (s.fifoEnabled && s.rx.count < s.triggerLevel) ? iirTimeout : iirRxData
        }
        if s.ier & ierETBEI != 0 && s.thrIPending { return iirTHRE }
        if s.ier & ierEDSSI != 0 && s.msrDeltas != 0 { return iirModem }
        return iirNone
    }

    /// Empties the receive FIFO; host bytes go back to the front of the input buffer.
    private func resetReceiveFIFO(_ s: inout State) {
        var host: [UInt8] = []
        while let b = s.rx.pop() {
            if s.rxFromHost.pop() == 1 { host.append(b) }
        }
        for b in host.reversed() where !s.input.pushFront(b) {
            s.droppedInput += 1
        }
    }

    /// Moves buffered host bytes into the receive FIFO while the receiver is ready.
    private func refill(_ s: inout State) {
        guard s.receiverReady else { return }
        while s.rx.count < s.rxLimit, let b = s.input.pop() {
            s.rx.push(b)
            s.rxFromHost.push(1)
        }
    }

    private func updatePin(_ s: inout State) {
        let pending = Self.interruptIdentification(s) != Self.iirNone
        let level = pending && s.mcr & Self.mcrOUT2 != 0 && !s.loopback
        if level != s.pinLevel {
            s.pinLevel = level
            interrupt.set(level: level)
        }
    }
}

extension Serial16550: StatefulDevice {
    public static let stateVersion: UInt32 = 1

    public func saveState() -> State { state.withLock { $0 } }

    public func restoreState(_ saved: State) throws(DeviceStateError) {
        guard [1, 4, 8, 14].contains(saved.triggerLevel) else { throw DeviceStateError("serial: trigger level \(saved.triggerLevel) is not 1, 4, 8 or 14") }
        guard saved.rx.capacity == Self.fifoSize, saved.rxFromHost.capacity == Self.fifoSize else {
            throw DeviceStateError("serial: receive FIFO capacity \(saved.rx.capacity) is not \(Self.fifoSize)")
        }
        guard saved.rxFromHost.count == saved.rx.count else {
            throw DeviceStateError("serial: \(saved.rx.count) received bytes but \(saved.rxFromHost.count) origin marks")
        }
        state.withLock { s in
            s = saved
            interrupt.set(level: s.pinLevel)
        }
    }
}
