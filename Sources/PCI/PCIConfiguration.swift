import Devices
import Synchronization

/// The address space a BAR decodes.
public enum PCIBarKind: Sendable, Equatable {
    /// 32-bit memory BAR.
    case memory32
    /// 64-bit memory BAR (occupies this BAR and the next).
    case memory64
    /// I/O-port BAR.
    case io
}

/// Describes one BAR a device implements.
public struct PCIBarSpec: Sendable, Equatable {
    /// BAR number, 0–5 (a 64-bit BAR also uses `index + 1`).
    public var index: Int
    /// Size in bytes: a power of two, at least 16 for memory and 4 for I/O BARs.
    public var size: UInt64
    /// The address space it decodes.
    public var kind: PCIBarKind
    /// The prefetchable bit of a memory BAR.
    public var prefetchable: Bool

    public init(index: Int, size: UInt64, kind: PCIBarKind, prefetchable: Bool = false) {
        self.index = index
        self.size = size
        self.kind = kind
        self.prefetchable = prefetchable
    }
}

/// Offsets and bits of the type-0 configuration header.
public enum PCIConfigRegister {
    public static let vendorID = 0x00
    public static let deviceID = 0x02
    public static let command = 0x04
    public static let status = 0x06
    public static let revision = 0x08
    public static let classCode = 0x09
    public static let cacheLineSize = 0x0C
    public static let latencyTimer = 0x0D
    public static let headerType = 0x0E
    public static let bar0 = 0x10
    public static let subsystemVendorID = 0x2C
    public static let subsystemID = 0x2E
    public static let expansionROM = 0x30
    public static let capabilitiesPointer = 0x34
    public static let interruptLine = 0x3C
    public static let interruptPin = 0x3D

    /// Command: I/O space decoding.
    public static let commandIO: UInt16 = 1 << 0
    /// Command: memory space decoding.
    public static let commandMemory: UInt16 = 1 << 1
    /// Command: bus master.
    public static let commandBusMaster: UInt16 = 1 << 2
    /// Command: INTx disable.
    public static let commandINTxDisable: UInt16 = 1 << 10
    /// Status: interrupt status (INTx asserted).
    public static let statusInterrupt: UInt16 = 1 << 3
    /// Status: capabilities list present.
    public static let statusCapabilities: UInt16 = 1 << 4
}

/// Called after a guest write touched a capability: `offset` is the capability's offset in
/// configuration space, `bytes` its whole content (header included) after the write.
public typealias PCICapabilityWriteHook = @Sendable (_ offset: Int, _ bytes: [UInt8]) -> Void

/// Called (outside the configuration lock) when a guest read touches a capability: `offset` is
/// the capability's offset, `bytes` its stored content (header included); returns the bytes the
/// guest should see for this read (same length; e.g. virtio's PCI_CFG window filled from the
/// BAR). Returned bytes are not stored.
public typealias PCICapabilityReadHook = @Sendable (_ offset: Int, _ bytes: [UInt8]) -> [UInt8]

/// Configuration space of one PCI function (header type 0).
///
/// Models what the guest sees: IDs and class, command/status (status bits that are
/// write-one-to-clear), BAR sizing exactly as hardware (writing all-ones reads back the size
/// mask and the type bits; 64-bit BARs as pairs; I/O BARs; prefetchable bit), a capability
/// list, interrupt line/pin. Each byte has a writable mask, so read-only fields stay
/// read-only; accesses may have any width and alignment. Offsets at or beyond 256 read all
/// ones and ignore writes. Thread-safe (Mutex inside); hooks run outside the lock.
public final class PCIConfiguration: Sendable {
    /// Size of the conventional configuration space.
    public static let size = 256
    /// Where capabilities start.
    static let firstCapability = 0x40

    struct Capability {
        var offset: Int
        var length: Int
        var hook: PCICapabilityWriteHook?
        var readHook: PCICapabilityReadHook?
    }

    struct State {
        var bytes = [UInt8](repeating: 0, count: PCIConfiguration.size)
        var writable = [UInt8](repeating: 0, count: PCIConfiguration.size)
        var writeOneToClear = [UInt8](repeating: 0, count: PCIConfiguration.size)
        var bars = [PCIBarSpec?](repeating: nil, count: 6)
        var romSize: UInt64?
        var capabilities: [Capability] = []
        var nextCapability = PCIConfiguration.firstCapability
        var intxLevel = false
        var intxLine: (any InterruptLine)?
        var intxDelivered = false

        func read16(_ o: Int) -> UInt16 { UInt16(bytes[o]) | UInt16(bytes[o + 1]) << 8 }
        func read32(_ o: Int) -> UInt32 { UInt32(read16(o)) | UInt32(read16(o + 2)) << 16 }
        mutating func store16(_ o: Int, _ v: UInt16) { bytes[o] = UInt8(v & 0xff); bytes[o + 1] = UInt8(v >> 8) }
        mutating func store32(_ o: Int, _ v: UInt32) { store16(o, UInt16(v & 0xffff)); store16(o + 2, UInt16(v >> 16)) }
        mutating func mask32(_ o: Int, _ v: UInt32) {
            for i in 0..<4 { writable[o + i] = UInt8((v >> (8 * UInt32(i))) & 0xff) }
        }

        var command: UInt16 { read16(PCIConfigRegister.command) }

        /// Whether INTx should be asserted on the line now.
        var intxEffective: Bool { intxLevel && (command & PCIConfigRegister.commandINTxDisable) == 0 }

        func barAddress(_ index: Int) -> UInt64? {
            guard index >= 0, index < 6, let spec = bars[index], spec.index == index else { return nil }
            let cmd = command
            let lo = read32(PCIConfigRegister.bar0 + 4 * index)
            let address: UInt64
            switch spec.kind {
            case .io:
                guard cmd & PCIConfigRegister.commandIO != 0 else { return nil }
                address = UInt64(lo & ~0x3)
            case .memory32:
                guard cmd & PCIConfigRegister.commandMemory != 0 else { return nil }
                address = UInt64(lo & ~0xf)
            case .memory64:
                guard cmd & PCIConfigRegister.commandMemory != 0 else { return nil }
                let hi = read32(PCIConfigRegister.bar0 + 4 * (index + 1))
                address = UInt64(hi) << 32 | UInt64(lo & ~0xf)
            }
            // Unassigned, or a range that wraps past the end of the address space.
            guard address != 0, address.addingReportingOverflow(spec.size - 1).overflow == false else { return nil }
            if spec.kind != .memory64, address + spec.size > 1 << 32 { return nil }
            return address
        }

        /// The expansion ROM's address: nil without a ROM, with its enable bit or memory decoding
        /// off, unassigned, or running past 4 GiB.
        var expansionROMAddress: UInt64? {
            guard let size = romSize, command & PCIConfigRegister.commandMemory != 0 else { return nil }
            let word = read32(PCIConfigRegister.expansionROM)
            let address = UInt64(word & 0xffff_f800)
            guard word & 1 != 0, address != 0, address + size <= 1 << 32 else { return nil }
            return address
        }
    }

    private let state: Mutex<State>

    /// Creates a type-0 header with the given identity; interrupt pin 0 (none) until set.
    public init(vendorID: UInt16, deviceID: UInt16, classCode: UInt8, subclass: UInt8, progIF: UInt8,
                revision: UInt8, subsystemVendorID: UInt16, subsystemID: UInt16) {
        var s = State()
        s.store16(PCIConfigRegister.vendorID, vendorID)
        s.store16(PCIConfigRegister.deviceID, deviceID)
        s.bytes[PCIConfigRegister.revision] = revision
        s.bytes[PCIConfigRegister.classCode] = progIF
        s.bytes[PCIConfigRegister.classCode + 1] = subclass
        s.bytes[PCIConfigRegister.classCode + 2] = classCode
        s.store16(PCIConfigRegister.subsystemVendorID, subsystemVendorID)
        s.store16(PCIConfigRegister.subsystemID, subsystemID)
        // Command: I/O, memory, bus master, parity error response, SERR#, INTx disable.
        s.writable[PCIConfigRegister.command] = 0x47
        s.writable[PCIConfigRegister.command + 1] = 0x05
        // Status: parity/abort/SERR bits are write-one-to-clear (all read 0 here, kept for semantics).
        s.writeOneToClear[PCIConfigRegister.status] = 0x00
        s.writeOneToClear[PCIConfigRegister.status + 1] = 0xf9
        s.writable[PCIConfigRegister.cacheLineSize] = 0xff
        s.writable[PCIConfigRegister.latencyTimer] = 0xff
        s.writable[PCIConfigRegister.interruptLine] = 0xff
        state = Mutex(s)
    }

    // MARK: Building (by the device and the VMM, before the guest runs)

    /// Declares a BAR. Its address starts at 0 (unassigned). A 64-bit BAR also takes `index + 1`.
    /// Invalid specs are a bug in the device model (precondition).
    public func addBAR(_ spec: PCIBarSpec) {
        let minimum: UInt64 = spec.kind == .io ? 4 : 16
        precondition(spec.index >= 0 && spec.index < 6, "BAR index \(spec.index) is outside 0–5")
        precondition(spec.size >= minimum && spec.size & (spec.size - 1) == 0,
                     "BAR \(spec.index) size \(spec.size) is not a power of two ≥ \(minimum)")
        precondition(spec.kind != .memory64 || spec.index < 5, "64-bit BAR \(spec.index) needs BAR \(spec.index + 1)")
        precondition(spec.kind == .memory64 || spec.size <= 1 << 31, "32-bit BAR \(spec.index) of \(spec.size) bytes")
        state.withLock { s in
            precondition(s.bars[spec.index] == nil, "BAR \(spec.index) declared twice")
            if spec.kind == .memory64 { precondition(s.bars[spec.index + 1] == nil, "BAR \(spec.index + 1) declared twice") }
            let o = PCIConfigRegister.bar0 + 4 * spec.index
            s.bars[spec.index] = spec
            switch spec.kind {
            case .io:
                s.store32(o, 0x1)
                s.mask32(o, ~UInt32(spec.size - 1) & ~0x3)
            case .memory32:
                s.store32(o, spec.prefetchable ? 0x8 : 0x0)
                s.mask32(o, ~UInt32(spec.size - 1) & ~0xf)
            case .memory64:
                s.bars[spec.index + 1] = spec
                s.store32(o, 0x4 | (spec.prefetchable ? 0x8 : 0x0))
                let mask = ~(spec.size - 1)
                s.mask32(o, UInt32(mask & 0xffff_ffff) & ~0xf)
                s.mask32(o + 4, UInt32(mask >> 32))
            }
        }
    }

    /// Declares an expansion ROM BAR (offset 0x30) of `size` bytes: a power of two from 2 KiB to
    /// 16 MiB. It starts unassigned and disabled; firmware sizes it like a BAR, places it and sets
    /// its enable bit (0) while it copies the ROM. Invalid sizes are a bug in the VMM (precondition).
    public func addExpansionROM(size: UInt64) {
        precondition(size >= 2048 && size <= 16 << 20 && size & (size - 1) == 0, "expansion ROM size \(size)")
        state.withLock { s in
            precondition(s.romSize == nil, "expansion ROM declared twice")
            s.romSize = size
            s.mask32(PCIConfigRegister.expansionROM, ~UInt32(size - 1) & 0xffff_f800 | 1)
        }
    }

    /// Where the expansion ROM decodes now (nil: no ROM, not enabled, or not placed).
    public var expansionROMAddress: UInt64? { state.withLock { $0.expansionROMAddress } }

    /// The BARs declared (a 64-bit BAR appears once, under its first index).
    public var bars: [PCIBarSpec] {
        state.withLock { s in s.bars.enumerated().compactMap { i, b in b?.index == i ? b : nil } }
    }

    /// Appends a capability whose body (the bytes after the 2-byte id/next header, i.e. from
    /// `cap + 2`) is `body`, links it into the list and returns its offset. `writableMask`
    /// (same length as `body`) makes bits guest-writable; `onWrite` runs after a guest write
    /// touched the capability; `onRead` may replace what a guest read of it returns. Running
    /// out of the 192 bytes of capability space is a bug in the device model (precondition).
    @discardableResult
    public func addCapability(id: UInt8, body: [UInt8], writableMask: [UInt8]? = nil,
                              onWrite: PCICapabilityWriteHook? = nil, onRead: PCICapabilityReadHook? = nil) -> Int {
        precondition(writableMask == nil || writableMask!.count == body.count, "capability mask length mismatch")
        return state.withLock { s in
            let offset = s.nextCapability
            let length = 2 + body.count
            precondition(offset + length <= PCIConfiguration.size, "capability \(id) does not fit in config space")
            s.bytes[offset] = id
            s.bytes[offset + 1] = 0
            for (i, b) in body.enumerated() {
                s.bytes[offset + 2 + i] = b
                s.writable[offset + 2 + i] = writableMask?[i] ?? 0
            }
            if let last = s.capabilities.last {
                s.bytes[last.offset + 1] = UInt8(offset)
            } else {
                s.bytes[PCIConfigRegister.capabilitiesPointer] = UInt8(offset)
                s.store16(PCIConfigRegister.status, s.read16(PCIConfigRegister.status) | PCIConfigRegister.statusCapabilities)
            }
            s.capabilities.append(Capability(offset: offset, length: length, hook: onWrite, readHook: onRead))
            s.nextCapability = (offset + length + 3) & ~3
            return offset
        }
    }

    /// Adds an MSI-X capability for `table`, whose table is at `tableOffset` in BAR `tableBAR`
    /// and whose PBA is at `pbaOffset` in BAR `pbaBAR` (offsets 8-byte aligned). Guest writes to
    /// Message Control (enable, function mask) reach the table. Returns the capability offset.
    @discardableResult
    public func addMSIX(_ table: MSIXTable, tableBAR: Int, tableOffset: UInt32, pbaBAR: Int, pbaOffset: UInt32) -> Int {
        precondition(tableBAR >= 0 && tableBAR < 6 && pbaBAR >= 0 && pbaBAR < 6, "MSI-X BIR outside 0–5")
        precondition(tableOffset & 7 == 0 && pbaOffset & 7 == 0, "MSI-X table/PBA offsets must be 8-byte aligned")
        let control = UInt16(table.vectorCount - 1)
        let tableWord = tableOffset | UInt32(tableBAR)
        let pbaWord = pbaOffset | UInt32(pbaBAR)
        var body: [UInt8] = [UInt8(control & 0xff), UInt8(control >> 8)]
        for w in [tableWord, pbaWord] { for i in 0..<4 { body.append(UInt8((w >> (8 * UInt32(i))) & 0xff)) } }
        var mask = [UInt8](repeating: 0, count: body.count)
        mask[1] = 0xc0 // Message Control bits 15 (enable) and 14 (function mask)
        return addCapability(id: 0x11, body: body, writableMask: mask) { [table] _, bytes in
            let value = UInt16(bytes[2]) | UInt16(bytes[3]) << 8
            table.setControl(enabled: value & 0x8000 != 0, functionMasked: value & 0x4000 != 0)
        }
    }

    /// Sets the Interrupt Line register (the GSI the VMM wired INTA# to) and Interrupt Pin
    /// (1 = INTA#, 0 = none).
    public func setInterrupt(line: UInt8, pin: UInt8) {
        state.withLock { s in
            s.bytes[PCIConfigRegister.interruptLine] = line
            s.bytes[PCIConfigRegister.interruptPin] = pin
        }
    }

    /// Connects the INTx line that `setINTx(level:)` drives (done by the VMM on attach).
    public func attachINTx(_ line: any InterruptLine) {
        state.withLock { s in s.intxLine = line; s.intxDelivered = false }
    }

    /// Sets the device's INTx level: updates status bit 3 and drives the attached line unless
    /// the guest set Interrupt Disable in the command register.
    public func setINTx(level: Bool) {
        update { s in s.intxLevel = level }
    }

    /// Sets bits in the command register (used by the VMM when it assigns BARs, as firmware does).
    public func setCommandBits(_ bits: UInt16) {
        update { s in s.store16(PCIConfigRegister.command, s.command | bits) }
    }

    /// Places BAR `index` at `address` (aligned down to the BAR size). Used by the VMM; the
    /// guest may move BARs later.
    public func setBARAddress(_ index: Int, _ address: UInt64) {
        state.withLock { s in
            guard index >= 0, index < 6, let spec = s.bars[index], spec.index == index else { return }
            let o = PCIConfigRegister.bar0 + 4 * index
            let aligned = address & ~(spec.size - 1)
            switch spec.kind {
            case .io: s.store32(o, UInt32(truncatingIfNeeded: aligned) & ~0x3 | 0x1)
            case .memory32: s.store32(o, UInt32(truncatingIfNeeded: aligned) & ~0xf | (s.read32(o) & 0xf))
            case .memory64:
                s.store32(o, UInt32(truncatingIfNeeded: aligned) & ~0xf | (s.read32(o) & 0xf))
                s.store32(o + 4, UInt32(truncatingIfNeeded: aligned >> 32))
            }
        }
    }

    // MARK: Queries

    /// Decoded address of a BAR, nil when unassigned (0), not declared, or its space is
    /// disabled in the command register.
    public func barAddress(_ index: Int) -> UInt64? {
        state.withLock { $0.barAddress(index) }
    }

    /// Decoded address of every BAR index (nil for undeclared or disabled ones); 64-bit BARs under their first index.
    public var barAddresses: [UInt64?] {
        state.withLock { s in (0..<6).map { s.barAddress($0) } }
    }

    /// The command register.
    public var command: UInt16 { state.withLock { $0.command } }

    /// Whether the guest enabled bus mastering (devices must not DMA otherwise).
    public var busMasterEnabled: Bool { command & PCIConfigRegister.commandBusMaster != 0 }

    /// The vendor ID.
    public var vendorID: UInt16 { state.withLock { $0.read16(PCIConfigRegister.vendorID) } }

    /// The device ID.
    public var deviceID: UInt16 { state.withLock { $0.read16(PCIConfigRegister.deviceID) } }

    // MARK: Guest access

    /// A guest read of `data.count` bytes at `offset` (any width and alignment). Bytes at or
    /// beyond 256 (or negative offsets) read 0xff.
    public func read(offset: Int, data: UnsafeMutableRawBufferPointer) {
        // Capabilities with a read hook that this read touches: their hooks run outside the lock.
        let hooked: [(PCICapabilityReadHook, Int, [UInt8])] = state.withLock { s in
            for i in 0..<data.count {
                let (o, overflow) = offset.addingReportingOverflow(i)
                data[i] = (!overflow && o >= 0 && o < PCIConfiguration.size) ? s.bytes[o] : 0xff
            }
            guard data.count > 0, s.capabilities.contains(where: { $0.readHook != nil }) else { return [] }
            let end = offset.addingReportingOverflow(data.count)
            let range = end.overflow ? offset..<Int.max : offset..<end.partialValue
            return s.capabilities.compactMap { cap in
                guard let hook = cap.readHook, range.overlaps(cap.offset..<(cap.offset + cap.length)) else { return nil }
                return (hook, cap.offset, Array(s.bytes[cap.offset..<(cap.offset + cap.length)]))
            }
        }
        for (hook, capOffset, stored) in hooked {
            let shown = hook(capOffset, stored)
            guard shown.count == stored.count else { continue } // a hook bug: keep the stored bytes
            for i in 0..<data.count {
                let (o, overflow) = offset.addingReportingOverflow(i)
                if !overflow, o >= capOffset, o < capOffset + shown.count { data[i] = shown[o - capOffset] }
            }
        }
    }

    /// A guest write of `data.count` bytes at `offset`: writable bits change, write-one-to-clear
    /// bits clear, everything else (and anything at or beyond 256) is ignored.
    public func write(offset: Int, data: UnsafeRawBufferPointer) {
        var hooks: [(PCICapabilityWriteHook, Int, [UInt8])] = []
        update { s in
            var touched: Range<Int>? = nil
            for i in 0..<data.count {
                let (o, overflow) = offset.addingReportingOverflow(i)
                guard !overflow, o >= 0, o < PCIConfiguration.size else { continue }
                let v = data[i]
                let w = s.writable[o]
                s.bytes[o] = (s.bytes[o] & ~w) | (v & w)
                s.bytes[o] &= ~(v & s.writeOneToClear[o])
                touched = touched.map { min($0.lowerBound, o)..<max($0.upperBound, o + 1) } ?? o..<(o + 1)
            }
            guard let touched else { return }
            for cap in s.capabilities where cap.hook != nil && touched.overlaps(cap.offset..<(cap.offset + cap.length)) {
                hooks.append((cap.hook!, cap.offset, Array(s.bytes[cap.offset..<(cap.offset + cap.length)])))
            }
        }
        for (hook, o, bytes) in hooks { hook(o, bytes) }
    }

    /// Runs `body` under the lock, keeps the interrupt status bit in step with the INTx level,
    /// and drives the INTx line when its effective level changed. The line is driven under the
    /// lock so that concurrent level changes reach it in order (an `InterruptLine` never calls back).
    private func update(_ body: (inout State) -> Void) {
        state.withLock { s in
            body(&s)
            var status = s.read16(PCIConfigRegister.status) & ~PCIConfigRegister.statusInterrupt
            if s.intxLevel { status |= PCIConfigRegister.statusInterrupt }
            s.store16(PCIConfigRegister.status, status)
            let effective = s.intxEffective
            guard let line = s.intxLine, effective != s.intxDelivered else { return }
            s.intxDelivered = effective
            line.set(level: effective)
        }
    }
}

extension PCIConfiguration {
    /// A configuration space as saved in a snapshot: its 256 bytes and the INTx level.
    public struct SavedConfig: Codable, Sendable, Equatable {
        public var bytes: [UInt8]
        public var intxLevel: Bool
    }

    /// The current configuration bytes and INTx level.
    public func savedConfig() -> SavedConfig {
        state.withLock { SavedConfig(bytes: $0.bytes, intxLevel: $0.intxLevel) }
    }

    /// Puts saved configuration bytes back. The read-only bytes (identity, capability layout, BAR
    /// size bits) must equal this device's: a saved state of another device is refused.
    public func restoreConfig(_ saved: SavedConfig, device: String) throws(DeviceStateError) {
        try state.withLock { (s: inout State) throws(DeviceStateError) in
            guard saved.bytes.count == Self.size else {
                throw DeviceStateError("\(device): \(saved.bytes.count) configuration bytes, expected \(Self.size)")
            }
            for i in 0..<Self.size where s.writable[i] | s.writeOneToClear[i] != 0xff {
                let fixed = ~(s.writable[i] | s.writeOneToClear[i])
                guard saved.bytes[i] & fixed == s.bytes[i] & fixed else {
                    throw DeviceStateError("\(device): read-only configuration byte 0x\(String(i, radix: 16)) differs (saved 0x\(String(saved.bytes[i], radix: 16)), device 0x\(String(s.bytes[i], radix: 16)))")
                }
            }
            s.bytes = saved.bytes
            s.intxLevel = saved.intxLevel
        }
    }
}
