import Synchronization

/// The PS/2 controller (Intel 8042) at ports 0x60-0x64, with a minimal keyboard behind it.
///
/// Insert it at `I8042.defaultBase` (0x60) with `I8042.portCount` (5) ports: offset 0 is the
/// data port (0x60), offset 4 the status/command port (0x64), offset 1 system control port B
/// (0x61: PIT channel 2 gate and speaker bits, a refresh bit that toggles on every read);
/// offsets 2-3 read 0xff. KVM's in-kernel PIT normally claims port 0x61 itself.
///
/// Controller commands: read/write the command byte (0x20/0x60), controller self-test
/// (0xAA → 0x55), keyboard and aux interface tests (0xAB/0xA9 → 0x00 or, without an aux
/// device, 0x01 for the aux port), disable/enable the keyboard (0xAD/0xAE) and aux port
/// (0xA7/0xA8), read/write the output port (0xD0/0xD1), write the keyboard/aux output
/// buffer (0xD2/0xD3), and the output-port pulses 0xF0-0xFF: a pulse with bit 0 clear (0xFE
/// and others) resets the CPU, as does writing the output port with bit 0 clear; both become
/// `MachineControl.request(.reset)`. With no aux device (the default), 0xD3 and 0xD4 get no
/// reply and Linux concludes there is no aux port.
///
/// The keyboard acknowledges every command with 0xFA, answers reset (0xFF) with 0xFA 0xAA,
/// identify (0xF2) with 0xFA 0xAB 0x83 and echo (0xEE) with 0xEE; its only keystrokes are `pressCtrlAltDel()`.
/// The keyboard interrupt is a level: asserted while the output buffer holds a keyboard byte
/// and the command byte enables keyboard interrupts (bit 0); the aux interrupt likewise. Each
/// read of the data port lowers the line, and it rises again if another byte follows, so an
/// edge-triggered interrupt controller sees every byte.
public final class I8042: BusDevice, Sendable {
    /// Port of the data register; the device spans `defaultBase ..< defaultBase + portCount`.
    public static let defaultBase: UInt64 = 0x60
    /// Ports covered: 0x60 (data), 0x61 (port B), 0x62-0x63 (absent), 0x64 (status/command).
    public static let portCount: UInt64 = 5
    /// ISA interrupt of the keyboard.
    public static let keyboardIRQ: UInt32 = 1
    /// ISA interrupt of the aux (mouse) port.
    public static let auxIRQ: UInt32 = 12

    // Status register bits.
    static let statOBF: UInt8 = 0x01, statSYS: UInt8 = 0x04, statCMD: UInt8 = 0x08
    static let statUnlocked: UInt8 = 0x10, statAuxData: UInt8 = 0x20
    // Command byte bits.
    static let ctrKbdInt: UInt8 = 0x01, ctrAuxInt: UInt8 = 0x02, ctrSys: UInt8 = 0x04
    static let ctrKbdDis: UInt8 = 0x10, ctrAuxDis: UInt8 = 0x20, ctrXlate: UInt8 = 0x40

    enum Source: UInt8, Sendable, Codable { case controller, keyboard, aux }

    /// The controller's registers and output queue (also its saved state).
    public struct State: Sendable {
        var commandByte: UInt8 = I8042.ctrKbdInt | I8042.ctrSys | I8042.ctrXlate
        var outputPort: UInt8 = 0x03              // bit 0: not in reset; bit 1: A20 enabled
        var lastWasCommand = false
        var pendingCommand: UInt8?                // controller command waiting for its data byte
        var keyboardPendingCommand: UInt8?        // keyboard command waiting for its parameter
        var queue: [(byte: UInt8, source: Source)] = []
        var portB: UInt8 = 0
        var refreshToggle = false
        var kbdLevel = false
        var auxLevel = false
        var dataRead = false                      // the output buffer was read: re-edge the line
        var unknownCommands: UInt64 = 0
    }

    private let state = Mutex(State())
    private let keyboardInterrupt: any InterruptLine
    private let auxInterrupt: any InterruptLine
    private let control: any MachineControl
    private let auxPresent: Bool

    /// Creates the controller.
    /// - Parameters:
    ///   - keyboardInterrupt: IRQ 1.
    ///   - auxInterrupt: IRQ 12.
    ///   - control: receives `.reset` for the reset pulse.
    ///   - auxPresent: whether the aux port answers its loopback and interface tests
    ///     (no mouse is ever attached; default false).
    public init(keyboardInterrupt: any InterruptLine, auxInterrupt: any InterruptLine = NullInterruptLine(),
                control: any MachineControl, auxPresent: Bool = false) {
        self.keyboardInterrupt = keyboardInterrupt
        self.auxInterrupt = auxInterrupt
        self.control = control
        self.auxPresent = auxPresent
    }

    /// The current command byte (controller configuration).
    public var commandByte: UInt8 { state.withLock { $0.commandByte } }
    /// Controller commands the model does not know (ignored).
    public var unknownCommandCount: UInt64 { state.withLock { $0.unknownCommands } }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        state.withLock { s in
            for i in 0..<data.count {
                let (reg, overflow) = offset.addingReportingOverflow(UInt64(i))
                data[i] = overflow ? 0xff : readPort(reg, &s)
            }
            updateLevels(&s)
        }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        var reset = false
        state.withLock { s in
            for i in 0..<data.count {
                let (reg, overflow) = offset.addingReportingOverflow(UInt64(i))
                if !overflow && writePort(reg, data[i], &s) { reset = true }
            }
            updateLevels(&s)
        }
        if reset { control.request(.reset) }
    }

    /// Ctrl, Alt and Delete pressed then released, in scan code set 2 (Firecracker sends the
    /// same presses for SendCtrlAltDel).
    static let ctrlAltDelSet2: [UInt8] = [0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14]
    /// The same keys in scan code set 1 (what the guest reads when the controller translates).
    static let ctrlAltDelSet1: [UInt8] = [0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D]

    /// Presses and releases Ctrl+Alt+Del on the keyboard: the scan codes are queued as keyboard
    /// bytes (set 1 when the command byte's translate bit is on, else set 2) and raise IRQ 1.
    /// Bytes that do not fit the output queue are dropped, as from a real keyboard's buffer.
    public func pressCtrlAltDel() {
        state.withLock { s in
            let codes = s.commandByte & Self.ctrXlate != 0 ? Self.ctrlAltDelSet1 : Self.ctrlAltDelSet2
            for b in codes { enqueue(b, .keyboard, &s) }
            updateLevels(&s)
        }
    }

    // MARK: Ports (lock held)

    private func readPort(_ reg: UInt64, _ s: inout State) -> UInt8 {
        switch reg {
        case 0:
            guard !s.queue.isEmpty else { return 0 }
            s.dataRead = true
            return s.queue.removeFirst().byte
        case 1:
            s.refreshToggle.toggle()
            // Bit 4 toggles (DRAM refresh), bit 5 follows it so PIT-output polls terminate.
            return (s.portB & 0x0f) | (s.refreshToggle ? 0x30 : 0)
        case 4:
            var v = Self.statUnlocked
            if let head = s.queue.first {
                v |= Self.statOBF
                if head.source == .aux { v |= Self.statAuxData }
            }
            if s.commandByte & Self.ctrSys != 0 { v |= Self.statSYS }
            if s.lastWasCommand { v |= Self.statCMD }
            return v
        default:
            return 0xff
        }
    }

    /// Returns true when the write asks for a CPU reset.
    private func writePort(_ reg: UInt64, _ v: UInt8, _ s: inout State) -> Bool {
        switch reg {
        case 0:
            s.lastWasCommand = false
            if let cmd = s.pendingCommand {
                s.pendingCommand = nil
                return commandData(cmd, v, &s)
            }
            // Data for the keyboard; sending it re-enables the keyboard interface.
            s.commandByte &= ~Self.ctrKbdDis
            keyboardByte(v, &s)
        case 1:
            s.portB = v & 0x0f
        case 4:
            s.lastWasCommand = true
            return command(v, &s)
        default:
            break
        }
        return false
    }

    private func command(_ c: UInt8, _ s: inout State) -> Bool {
        s.pendingCommand = nil
        switch c {
        case 0x20:
            enqueue(s.commandByte, .controller, &s)
        case 0x60, 0xD1, 0xD2, 0xD3, 0xD4:
            s.pendingCommand = c
        case 0xA7:
            s.commandByte |= Self.ctrAuxDis
        case 0xA8:
            s.commandByte &= ~Self.ctrAuxDis
        case 0xA9:
            enqueue(auxPresent ? 0x00 : 0x01, .controller, &s)
        case 0xAA:
            s.commandByte |= Self.ctrSys
            enqueue(0x55, .controller, &s)
        case 0xAB:
            enqueue(0x00, .controller, &s)
        case 0xAD:
            s.commandByte |= Self.ctrKbdDis
        case 0xAE:
            s.commandByte &= ~Self.ctrKbdDis
        case 0xC0:
            enqueue(0xFF, .controller, &s)
        case 0xD0:
            var v = s.outputPort & 0x03
            if s.queue.first.map({ $0.source != .aux }) ?? false { v |= 0x10 }
            if s.queue.first?.source == .aux { v |= 0x20 }
            enqueue(v, .controller, &s)
        case 0xF0...0xFF:
            // Pulse output-port lines whose bit is clear; line 0 is the CPU reset.
            return c & 0x01 == 0
        default:
            s.unknownCommands += 1
        }
        return false
    }

    private func commandData(_ cmd: UInt8, _ v: UInt8, _ s: inout State) -> Bool {
        switch cmd {
        case 0x60:
            s.commandByte = v
        case 0xD1:
            s.outputPort = v
            return v & 0x01 == 0
        case 0xD2:
            enqueue(v, .keyboard, &s)
        case 0xD3:
            if auxPresent { enqueue(v, .aux, &s) }
        default:
            break   // 0xD4: no aux device answers.
        }
        return false
    }

    /// The attached keyboard's reply to a byte sent to it.
    private func keyboardByte(_ v: UInt8, _ s: inout State) {
        if s.keyboardPendingCommand != nil {
            s.keyboardPendingCommand = nil
            enqueue(0xFA, .keyboard, &s)
            return
        }
        switch v {
        case 0xFF:
            enqueue(0xFA, .keyboard, &s)
            enqueue(0xAA, .keyboard, &s)
        case 0xF2:
            enqueue(0xFA, .keyboard, &s)
            enqueue(0xAB, .keyboard, &s)
            enqueue(s.commandByte & Self.ctrXlate != 0 ? 0x41 : 0x83, .keyboard, &s)
        case 0xEE:
            enqueue(0xEE, .keyboard, &s)
        case 0xED, 0xF0, 0xF3:
            s.keyboardPendingCommand = v
            enqueue(0xFA, .keyboard, &s)
        default:
            enqueue(0xFA, .keyboard, &s)
        }
    }

    private func enqueue(_ b: UInt8, _ source: Source, _ s: inout State) {
        // Bounded: a guest that never reads cannot grow the queue without limit.
        if s.queue.count < 16 { s.queue.append((b, source)) }
    }

    private func updateLevels(_ s: inout State) {
        if s.dataRead {
            // As on a real 8042, reading the output buffer drops the line and loading the next
            // byte raises it again: an edge for edge-triggered interrupt controllers.
            s.dataRead = false
            if s.kbdLevel { s.kbdLevel = false; keyboardInterrupt.set(level: false) }
            if s.auxLevel { s.auxLevel = false; auxInterrupt.set(level: false) }
        }
        let head = s.queue.first
        let kbd = head.map { $0.source != .aux } ?? false && s.commandByte & Self.ctrKbdInt != 0
        let aux = head?.source == .aux && s.commandByte & Self.ctrAuxInt != 0
        if kbd != s.kbdLevel { s.kbdLevel = kbd; keyboardInterrupt.set(level: kbd) }
        if aux != s.auxLevel { s.auxLevel = aux; auxInterrupt.set(level: aux) }
    }
}

extension I8042.State: Codable {
    private enum CodingKeys: String, CodingKey {
        case commandByte, outputPort, lastWasCommand, pendingCommand, keyboardPendingCommand, queueBytes, queueSources
        case portB, refreshToggle, kbdLevel, auxLevel, dataRead, unknownCommands
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init()
        commandByte = try c.decode(UInt8.self, forKey: .commandByte)
        outputPort = try c.decode(UInt8.self, forKey: .outputPort)
        lastWasCommand = try c.decode(Bool.self, forKey: .lastWasCommand)
        pendingCommand = try c.decodeIfPresent(UInt8.self, forKey: .pendingCommand)
        keyboardPendingCommand = try c.decodeIfPresent(UInt8.self, forKey: .keyboardPendingCommand)
        let bytes = try c.decode([UInt8].self, forKey: .queueBytes)
        let sources = try c.decode([I8042.Source].self, forKey: .queueSources)
        guard bytes.count == sources.count, bytes.count <= 16 else {
            throw DecodingError.dataCorruptedError(forKey: .queueBytes, in: c,
                                                   debugDescription: "\(bytes.count) queued bytes with \(sources.count) sources (at most 16)")
        }
        queue = zip(bytes, sources).map { ($0, $1) }
        portB = try c.decode(UInt8.self, forKey: .portB)
        refreshToggle = try c.decode(Bool.self, forKey: .refreshToggle)
        kbdLevel = try c.decode(Bool.self, forKey: .kbdLevel)
        auxLevel = try c.decode(Bool.self, forKey: .auxLevel)
        dataRead = try c.decode(Bool.self, forKey: .dataRead)
        unknownCommands = try c.decode(UInt64.self, forKey: .unknownCommands)
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(commandByte, forKey: .commandByte)
        try c.encode(outputPort, forKey: .outputPort)
        try c.encode(lastWasCommand, forKey: .lastWasCommand)
        try c.encodeIfPresent(pendingCommand, forKey: .pendingCommand)
        try c.encodeIfPresent(keyboardPendingCommand, forKey: .keyboardPendingCommand)
        try c.encode(queue.map(\.byte), forKey: .queueBytes)
        try c.encode(queue.map(\.source), forKey: .queueSources)
        try c.encode(portB, forKey: .portB)
        try c.encode(refreshToggle, forKey: .refreshToggle)
        try c.encode(kbdLevel, forKey: .kbdLevel)
        try c.encode(auxLevel, forKey: .auxLevel)
        try c.encode(dataRead, forKey: .dataRead)
        try c.encode(unknownCommands, forKey: .unknownCommands)
    }
}

extension I8042: StatefulDevice {
    public static let stateVersion: UInt32 = 1

    public func saveState() -> State { state.withLock { $0 } }

    public func restoreState(_ saved: State) throws(DeviceStateError) {
        state.withLock { s in
            s = saved
            keyboardInterrupt.set(level: s.kbdLevel)
            auxInterrupt.set(level: s.auxLevel)
        }
    }
}
