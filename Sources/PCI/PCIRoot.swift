import Devices
import Synchronization

/// The host bridge at 00.0 (vendor 0x8086, device 0x0d57, class 06/00/00): identity only, no BARs.
public final class PCIHostBridge: PCIDevice {
    public static let vendorID: UInt16 = 0x8086
    public static let deviceID: UInt16 = 0x0d57

    public let configuration = PCIConfiguration(vendorID: PCIHostBridge.vendorID, deviceID: PCIHostBridge.deviceID,
                                                classCode: 0x06, subclass: 0x00, progIF: 0x00, revision: 0,
                                                subsystemVendorID: 0, subsystemID: 0)
    public init() {}
    public func barRead(index: Int, offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        for i in data.indices { data[i] = 0xff }
    }
    public func barWrite(index: Int, offset: UInt64, data: UnsafeRawBufferPointer) {}
}

/// Hands out naturally aligned ranges of a PCI address window (bump allocation).
public struct PCIAddressAllocator: Sendable {
    /// First address of the window.
    public let base: UInt64
    /// Size of the window in bytes.
    public let size: UInt64
    /// Next free address.
    public private(set) var next: UInt64

    public init(base: UInt64, size: UInt64) {
        self.base = base
        self.size = size
        self.next = base
    }

    /// A range of `size` bytes (a power of two) aligned to `size`; `what` names it in the error
    /// when the window is full.
    public mutating func allocate(size: UInt64, what: String) throws -> UInt64 {
        let full = PCIError.windowFull(what: what, size: size, windowBase: base, windowSize: self.size)
        guard size > 0, size & (size - 1) == 0 else { throw full }
        let (rounded, o1) = next.addingReportingOverflow(size - 1)
        guard !o1 else { throw full }
        let start = rounded & ~(size - 1)
        let (end, o2) = start.addingReportingOverflow(size)
        guard !o2, end <= base + self.size else { throw full }
        next = end
        return start
    }
}

/// PCI bus 0: the host bridge and up to 31 devices, configuration access (mechanism #1 and
/// ECAM, through `PCIConfigMechanism1` and `PCIECAM`), and dispatch of MMIO and port accesses
/// to BARs by their current decoded address (through `PCIBARWindow`).
///
/// The lookup table of decoded BARs is rebuilt when the guest writes a command register or a
/// BAR, and devices are told with `barRemapped`. Overlapping or garbage BAR values are
/// tolerated: the first matching BAR (in slot order) wins; an access that hits no BAR is
/// dropped and reads all ones.
public final class PCIRoot: Sendable {
    /// Device slots on bus 0.
    public static let slotCount = 32

    /// Which address space a BAR window serves.
    public enum Space: Sendable, Equatable { case memory, io }

    /// The index a mapping of an expansion ROM carries (after BARs 0–5).
    static let romIndex = 6

    struct Mapping {
        var space: Space
        var base: UInt64
        var size: UInt64
        var slot: Int
        /// BAR 0–5, or `romIndex`.
        var index: Int
        var device: any PCIDevice
    }

    struct State {
        var slots: [(any PCIDevice)?] = Array(repeating: nil, count: PCIRoot.slotCount)
        /// Per slot: the decoded address of BARs 0–5, then of the expansion ROM.
        var decoded: [[UInt64?]] = Array(repeating: Array(repeating: nil, count: 7), count: PCIRoot.slotCount)
        var mappings: [Mapping] = []
        /// Per slot: the expansion ROM's bytes (zero-filled to its size), nil without one.
        var roms: [[UInt8]?] = Array(repeating: nil, count: PCIRoot.slotCount)
    }

    private let state = Mutex(State())
    /// The host bridge in slot 0.
    public let hostBridge = PCIHostBridge()

    /// A bus with the host bridge in slot 0.
    public init() {
        state.withLock { $0.slots[0] = hostBridge }
    }

    /// Puts `device` in the first free slot from 1 and returns the slot.
    public func attach(_ device: any PCIDevice) throws -> Int {
        let slot = try state.withLock { s -> Int in
            guard let free = s.slots.indices.first(where: { $0 > 0 && s.slots[$0] == nil }) else {
                throw PCIError.busFull(slots: PCIRoot.slotCount - 1)
            }
            s.slots[free] = device
            return free
        }
        refresh(slot: slot)
        return slot
    }

    /// Puts `device` in `slot` (1–31, must be free).
    public func attach(_ device: any PCIDevice, slot: Int) throws {
        try state.withLock { s in
            guard slot > 0, slot < PCIRoot.slotCount else {
                throw PCIError.slotUnavailable(slot: slot, reason: "slots are 1–\(PCIRoot.slotCount - 1) (0 is the host bridge)")
            }
            guard s.slots[slot] == nil else { throw PCIError.slotUnavailable(slot: slot, reason: "it is in use") }
            s.slots[slot] = device
        }
        refresh(slot: slot)
    }

    /// Gives the device in `slot` an expansion ROM holding `image` (QEMU's `romfile`): the
    /// device's configuration gets a ROM BAR of the next power of two (at least 2 KiB), and reads
    /// where the guest maps it return the image, zeros after it; writes are dropped. Call before
    /// the guest runs.
    public func setExpansionROM(slot: Int, image: [UInt8]) throws {
        guard let device = device(slot: slot) else { throw PCIError.slotUnavailable(slot: slot, reason: "it is empty") }
        guard !image.isEmpty, image.count <= 16 << 20 else {
            throw PCIError.romTooLarge(slot: slot, size: image.count)
        }
        var size: UInt64 = 2048
        while size < UInt64(image.count) { size <<= 1 }
        let cfg = device.configuration
        let patched = Self.patchingIDs(image, vendorID: cfg.vendorID, deviceID: cfg.deviceID)
        cfg.addExpansionROM(size: size)
        state.withLock { $0.roms[slot] = patched + [UInt8](repeating: 0, count: Int(size) - patched.count) }
        refresh(slot: slot)
    }

    /// `image` with the vendor and device IDs of its first PCI data structure ("PCIR") set to the
    /// device's, as QEMU patches a `romfile` (SeaBIOS runs a ROM only when they match the device):
    /// one iPXE ROM serves every device its driver knows. When the image's checksum was valid, byte 6
    /// (iPXE's checksum byte) keeps it valid. Anything that is not an option ROM is returned as is.
    public static func patchingIDs(_ image: [UInt8], vendorID: UInt16, deviceID: UInt16) -> [UInt8] {
        guard image.count >= 0x1a, image[0] == 0x55, image[1] == 0xaa else { return image }
        let pcir = Int(image[0x18]) | Int(image[0x19]) << 8
        guard pcir >= 0x1a, pcir + 8 <= image.count, Array(image[pcir..<(pcir + 4)]) == Array("PCIR".utf8) else { return image }
        let length = min(image.count, Int(image[2]) * 512)
        let checksumValid = length >= pcir + 8 && image[0..<length].reduce(0, &+) == 0
        var out = image
        out[pcir + 4] = UInt8(vendorID & 0xff); out[pcir + 5] = UInt8(vendorID >> 8)
        out[pcir + 6] = UInt8(deviceID & 0xff); out[pcir + 7] = UInt8(deviceID >> 8)
        if checksumValid { out[6] &-= out[0..<length].reduce(0, &+) }
        return out
    }

    /// The device in `slot`, if any.
    public func device(slot: Int) -> (any PCIDevice)? {
        guard slot >= 0, slot < PCIRoot.slotCount else { return nil }
        return state.withLock { $0.slots[slot] }
    }

    /// Occupied slots and their devices, in slot order (host bridge included).
    public var devices: [(slot: Int, device: any PCIDevice)] {
        state.withLock { s in s.slots.enumerated().compactMap { i, d in d.map { (i, $0) } } }
    }

    /// Assigns every BAR of the device in `slot` from the allocators (memory BARs, 32- and
    /// 64-bit, from `memory`; I/O BARs from `io`, left unassigned when nil) and enables
    /// decoding of the spaces used, as firmware would.
    public func placeBARs(slot: Int, memory: inout PCIAddressAllocator, io: inout PCIAddressAllocator?) throws {
        guard let device = device(slot: slot) else { throw PCIError.slotUnavailable(slot: slot, reason: "it is empty") }
        let cfg = device.configuration
        var command: UInt16 = 0
        for bar in cfg.bars {
            let what = "BAR \(bar.index) of PCI device 00:\(String(slot, radix: 16)).0"
            if bar.kind == .io {
                guard io != nil else { continue }
                cfg.setBARAddress(bar.index, try io!.allocate(size: bar.size, what: what))
                command |= PCIConfigRegister.commandIO
            } else {
                cfg.setBARAddress(bar.index, try memory.allocate(size: bar.size, what: what))
                command |= PCIConfigRegister.commandMemory
            }
        }
        cfg.setCommandBits(command)
        refresh(slot: slot)
    }

    /// Re-reads the decoded BAR addresses of `slot`, rebuilds the lookup table and tells the
    /// device about BARs that moved (called after configuration writes and VMM placement).
    public func refresh(slot: Int) {
        guard slot >= 0, slot < PCIRoot.slotCount else { return }
        let changes: [(any PCIDevice, Int, UInt64?, UInt64?)] = state.withLock { s in
            guard let device = s.slots[slot] else { return [] }
            let now = device.configuration.barAddresses + [device.configuration.expansionROMAddress]
            guard now != s.decoded[slot] else { return [] }
            // Devices hear of their BARs; the ROM is served here.
            let changes = (0..<6).filter { now[$0] != s.decoded[slot][$0] }.map { (device, $0, s.decoded[slot][$0], now[$0]) }
            s.decoded[slot] = now
            s.mappings = Self.buildMappings(s)
            return changes
        }
        for (device, index, old, new) in changes { device.barRemapped(index: index, from: old, to: new) }
    }

    private static func buildMappings(_ s: State) -> [Mapping] {
        var out: [Mapping] = []
        for (slot, device) in s.slots.enumerated() {
            guard let device else { continue }
            for bar in device.configuration.bars {
                guard let base = s.decoded[slot][bar.index] else { continue }
                out.append(Mapping(space: bar.kind == .io ? .io : .memory, base: base, size: bar.size,
                                   slot: slot, index: bar.index, device: device))
            }
            if let base = s.decoded[slot][romIndex], let rom = s.roms[slot] {
                out.append(Mapping(space: .memory, base: base, size: UInt64(rom.count), slot: slot, index: romIndex, device: device))
            }
        }
        return out
    }

    /// Where a BAR of the device in `slot` currently decodes, and its size.
    public func decodedBARs(slot: Int) -> [(index: Int, address: UInt64, size: UInt64)] {
        state.withLock { s in
            s.mappings.filter { $0.slot == slot && $0.index != Self.romIndex }.map { ($0.index, $0.base, $0.size) }
        }
    }

    // MARK: Configuration access

    /// Reads configuration space of bus/device/function at `offset`. Nonexistent functions
    /// (another bus, function ≠ 0, empty slot) read all ones.
    public func configRead(bus: Int, device: Int, function: Int, offset: Int, data: UnsafeMutableRawBufferPointer) {
        guard bus == 0, function == 0, let d = self.device(slot: device) else {
            for i in data.indices { data[i] = 0xff }
            return
        }
        d.configuration.read(offset: offset, data: data)
    }

    /// Writes configuration space; writes to nonexistent functions are dropped. BAR or command
    /// changes update the BAR lookup.
    public func configWrite(bus: Int, device: Int, function: Int, offset: Int, data: UnsafeRawBufferPointer) {
        guard bus == 0, function == 0, let d = self.device(slot: device) else { return }
        d.configuration.write(offset: offset, data: data)
        // Command (0x04–0x05), BARs (0x10–0x27) or the ROM BAR (0x30–0x33) touched: rebuild the lookup.
        let end = offset.addingReportingOverflow(data.count)
        let touched = end.overflow ? offset..<Int.max : offset..<end.partialValue
        if touched.overlaps(PCIConfigRegister.command..<(PCIConfigRegister.command + 2))
            || touched.overlaps(PCIConfigRegister.bar0..<(PCIConfigRegister.bar0 + 24))
            || touched.overlaps(PCIConfigRegister.expansionROM..<(PCIConfigRegister.expansionROM + 4)) {
            refresh(slot: device)
        }
    }

    // MARK: BAR dispatch

    private func find(_ space: Space, _ address: UInt64, _ count: Int) -> (Mapping, UInt64)? {
        let mappings = state.withLock { $0.mappings }
        for m in mappings where m.space == space && address >= m.base {
            let offset = address - m.base
            if offset < m.size && UInt64(count) <= m.size - offset { return (m, offset) }
        }
        return nil
    }

    /// Copies ROM bytes of `slot` from `offset` into `data` (the caller checked the range).
    private func readROM(slot: Int, offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        state.withLock { s in
            guard let rom = s.roms[slot] else { for i in data.indices { data[i] = 0xff }; return }
            for i in data.indices { data[i] = rom[Int(offset) + i] }
        }
    }

    /// Dispatches a read at absolute `address` in `space` to the BAR that decodes it. Returns
    /// false (data all ones) when no BAR holds the whole access.
    @discardableResult
    public func barRead(space: Space, address: UInt64, data: UnsafeMutableRawBufferPointer) -> Bool {
        guard let (m, offset) = find(space, address, data.count) else {
            for i in data.indices { data[i] = 0xff }
            return false
        }
        if m.index == Self.romIndex {
            readROM(slot: m.slot, offset: offset, data: data)
        } else {
            m.device.barRead(index: m.index, offset: offset, data: data)
        }
        return true
    }

    /// Dispatches a write at absolute `address` in `space`. Returns false (dropped) when no BAR
    /// holds the whole access.
    @discardableResult
    public func barWrite(space: Space, address: UInt64, data: UnsafeRawBufferPointer) -> Bool {
        guard let (m, offset) = find(space, address, data.count) else { return false }
        if m.index != Self.romIndex { m.device.barWrite(index: m.index, offset: offset, data: data) }   // a ROM ignores writes
        return true
    }
}

/// Configuration mechanism #1 on ports 0xCF8–0xCFF (insert at 0xCF8, length 8).
///
/// A 32-bit write to 0xCF8 latches the address (bit 31 enable, bus 23:16, device 15:11,
/// function 10:8, register 7:2); accesses of any width to 0xCFC–0xCFF then reach that
/// register plus the port's byte offset. With the enable bit clear, data reads are all ones.
/// Narrower accesses to 0xCF8–0xCFB are not config cycles and are ignored (read all ones).
public final class PCIConfigMechanism1: BusDevice {
    /// First port.
    public static let base: UInt64 = 0xCF8
    /// Number of ports.
    public static let portCount: UInt64 = 8

    private let root: PCIRoot
    private let address = Mutex<UInt32>(0)

    public init(root: PCIRoot) { self.root = root }

    /// The latched address register.
    public var addressRegister: UInt32 { address.withLock { $0 } }

    private func target(_ port: UInt64) -> (bus: Int, device: Int, function: Int, offset: Int)? {
        let a = addressRegister
        guard a & 0x8000_0000 != 0 else { return nil }
        return (Int((a >> 16) & 0xff), Int((a >> 11) & 0x1f), Int((a >> 8) & 0x7), Int(a & 0xfc) + Int(port - 4))
    }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        if offset == 0 && data.count == 4 {
            data.storeBytes(of: addressRegister.littleEndian, as: UInt32.self)
            return
        }
        // Data port: only the bytes within 0xCFC–0xCFF.
        guard offset >= 4, offset < 8, let t = target(offset) else {
            for i in data.indices { data[i] = 0xff }
            return
        }
        let n = min(data.count, Int(8 - offset))
        for i in data.indices { data[i] = 0xff }
        root.configRead(bus: t.bus, device: t.device, function: t.function, offset: t.offset,
                        data: UnsafeMutableRawBufferPointer(rebasing: data[0..<n]))
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        if offset == 0 && data.count == 4 {
            let v = UInt32(littleEndian: data.loadUnaligned(as: UInt32.self))
            address.withLock { $0 = v & 0x80ff_fffc }
            return
        }
        guard offset >= 4, offset < 8, let t = target(offset) else { return }
        let n = min(data.count, Int(8 - offset))
        root.configWrite(bus: t.bus, device: t.device, function: t.function, offset: t.offset,
                         data: UnsafeRawBufferPointer(rebasing: data[0..<n]))
    }
}

/// PCIe enhanced configuration access (ECAM/MMCONFIG): 4 KiB of configuration space per
/// function at `bus << 20 | device << 15 | function << 12`. Insert with length
/// `busCount << 20` (1 MiB for bus 0 only). Offsets 256–4095 read all ones (conventional
/// functions); an access crossing a function's 4 KiB is cut at the boundary.
public final class PCIECAM: BusDevice {
    /// Size of the ECAM region for bus 0.
    public static let busSize: UInt64 = 1 << 20

    private let root: PCIRoot
    public init(root: PCIRoot) { self.root = root }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        for i in data.indices { data[i] = 0xff }
        let reg = Int(offset & 0xfff)
        let n = min(data.count, 0x1000 - reg)
        root.configRead(bus: Int(offset >> 20), device: Int((offset >> 15) & 0x1f), function: Int((offset >> 12) & 0x7),
                        offset: reg, data: UnsafeMutableRawBufferPointer(rebasing: data[0..<n]))
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        let reg = Int(offset & 0xfff)
        let n = min(data.count, 0x1000 - reg)
        root.configWrite(bus: Int(offset >> 20), device: Int((offset >> 15) & 0x1f), function: Int((offset >> 12) & 0x7),
                         offset: reg, data: UnsafeRawBufferPointer(rebasing: data[0..<n]))
    }
}

/// A window of the MMIO or port address space (inserted on a `Bus` at `base`) whose accesses
/// go to whichever BAR currently decodes the address. Accesses hitting no BAR read all ones
/// and are otherwise dropped.
public final class PCIBARWindow: BusDevice {
    /// The window's first address (where it is inserted on the bus).
    public let base: UInt64
    /// The address space served.
    public let space: PCIRoot.Space
    private let root: PCIRoot
    private let missCount = Atomic<UInt64>(0)

    public init(root: PCIRoot, space: PCIRoot.Space, base: UInt64) {
        self.root = root
        self.space = space
        self.base = base
    }

    /// Accesses that hit no BAR.
    public var misses: UInt64 { missCount.load(ordering: .relaxed) }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        let (address, overflow) = base.addingReportingOverflow(offset)
        if overflow || !root.barRead(space: space, address: address, data: data) {
            for i in data.indices { data[i] = 0xff }
            missCount.add(1, ordering: .relaxed)
        }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        let (address, overflow) = base.addingReportingOverflow(offset)
        if overflow || !root.barWrite(space: space, address: address, data: data) {
            missCount.add(1, ordering: .relaxed)
        }
    }
}

extension PCIConfigMechanism1: StatefulDevice {
    public static let stateVersion: UInt32 = 1
    /// The latched CONFIG_ADDRESS.
    public func saveState() -> UInt32 { addressRegister }
    public func restoreState(_ saved: UInt32) throws(DeviceStateError) { address.withLock { $0 = saved } }
}

extension PCIHostBridge: StatefulDevice {
    public static let stateVersion: UInt32 = 1
    public func saveState() -> PCIConfiguration.SavedConfig { configuration.savedConfig() }
    public func restoreState(_ saved: PCIConfiguration.SavedConfig) throws(DeviceStateError) {
        try configuration.restoreConfig(saved, device: "PCI host bridge")
    }
}
