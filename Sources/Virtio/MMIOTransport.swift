import Devices
import GuestMemory
import Synchronization

/// The virtio-mmio transport, version 2 (virtio 1.x, section 4.2) for one `VirtioDevice`: one
/// 4 KiB window of 32-bit registers, found by the driver through the DSDT (`LNRO0005`) or the
/// kernel command line (`virtio_mmio.device=4K@ADDR:IRQ`), as Firecracker's devices are.
///
/// | offset | register | access |
/// |---|---|---|
/// | 0x000 | MagicValue "virt" | R |
/// | 0x004 | Version (2) | R |
/// | 0x008 | DeviceID (the virtio type) | R |
/// | 0x00c | VendorID (0x1af4) | R |
/// | 0x010 / 0x014 | DeviceFeatures / DeviceFeaturesSel | R / W |
/// | 0x020 / 0x024 | DriverFeatures / DriverFeaturesSel | W / W |
/// | 0x030 / 0x034 / 0x038 | QueueSel / QueueNumMax / QueueNum | W / R / W |
/// | 0x044 | QueueReady | RW |
/// | 0x050 | QueueNotify (value: queue index) | W |
/// | 0x060 / 0x064 | InterruptStatus / InterruptACK | R / W |
/// | 0x070 | Status | RW |
/// | 0x080–0x0a4 | QueueDesc, QueueDriver, QueueDevice (low, high) | W |
/// | 0x0ac / 0x0b0–0x0bc | SHMSel / SHMLen, SHMBase (no regions: all ones) | W / R |
/// | 0x0fc | ConfigGeneration | R |
/// | 0x100… | device configuration | RW |
///
/// Registers below 0x100 take only aligned 32-bit accesses (section 4.2.2.2); any other access
/// reads zero and writes nothing, as do reads of write-only and writes of read-only registers (all
/// logged, rate-limited). Queue notifications go to one eventfd per queue: KVM signals it directly
/// when an `IOEventRegistry` is given (an ioeventfd at QueueNotify with the queue index as datamatch),
/// and plain writes to QueueNotify signal it too, so device work always runs on `eventLoop`. The
/// interrupt is edge-triggered: InterruptStatus gets its bit (1: used buffers, 2: configuration
/// change) and `interrupt` is pulsed (`trigger()`, an irqfd in the VMM); the driver clears bits through
/// InterruptACK.
public final class VirtioMMIOTransport: BusDevice, @unchecked Sendable {
    /// Bytes of guest-physical address space per device.
    public static let windowSize: UInt64 = 0x1000
    /// "virt", little-endian.
    public static let magic: UInt32 = 0x7472_6976
    /// The modern (virtio 1.x) register layout.
    public static let version: UInt32 = 2
    /// VendorID (the PCI transport's vendor).
    public static let vendorID: UInt32 = 0x1af4
    /// Offset of the device configuration.
    public static let configOffset: UInt64 = 0x100

    /// Register offsets (section 4.2.2).
    public enum Register {
        public static let magicValue: UInt64 = 0x000
        public static let version: UInt64 = 0x004
        public static let deviceID: UInt64 = 0x008
        public static let vendorID: UInt64 = 0x00c
        public static let deviceFeatures: UInt64 = 0x010
        public static let deviceFeaturesSel: UInt64 = 0x014
        public static let driverFeatures: UInt64 = 0x020
        public static let driverFeaturesSel: UInt64 = 0x024
        public static let queueSel: UInt64 = 0x030
        public static let queueNumMax: UInt64 = 0x034
        public static let queueNum: UInt64 = 0x038
        public static let queueReady: UInt64 = 0x044
        public static let queueNotify: UInt64 = 0x050
        public static let interruptStatus: UInt64 = 0x060
        public static let interruptACK: UInt64 = 0x064
        public static let status: UInt64 = 0x070
        public static let queueDescLow: UInt64 = 0x080
        public static let queueDescHigh: UInt64 = 0x084
        public static let queueDriverLow: UInt64 = 0x090
        public static let queueDriverHigh: UInt64 = 0x094
        public static let queueDeviceLow: UInt64 = 0x0a0
        public static let queueDeviceHigh: UInt64 = 0x0a4
        public static let shmSel: UInt64 = 0x0ac
        public static let shmLenLow: UInt64 = 0x0b0
        public static let shmLenHigh: UInt64 = 0x0b4
        public static let shmBaseLow: UInt64 = 0x0b8
        public static let shmBaseHigh: UInt64 = 0x0bc
        public static let configGeneration: UInt64 = 0x0fc
    }

    /// InterruptStatus bits.
    public enum InterruptBit {
        /// The device used buffers in a queue.
        public static let usedBuffer: UInt32 = 1
        /// The device configuration changed (or the device needs a reset).
        public static let configChange: UInt32 = 2
    }

    /// The device model.
    public let device: any VirtioDevice
    /// Guest-physical base of the register window (for the ioeventfds and diagnostics).
    public let base: UInt64
    let memory: GuestMemory
    let log: VirtioLog
    let eventLoop: EventLoop
    let interrupt: any InterruptLine
    let notifyFDs: [EventFD]
    private let queueCount: Int
    private let offeredFeatures: UInt64

    /// One queue's driver-visible registers, guarded by `state`.
    struct QueueRegisters: Equatable, Codable {
        /// QueueNum as written (checked against QueueNumMax when the driver sets DRIVER_OK).
        var size: UInt16
        var ready = false
        var desc: UInt64 = 0
        var driver: UInt64 = 0
        var device: UInt64 = 0
    }
    /// The transport's driver-visible state, guarded by `state`.
    struct State: Equatable, Codable {
        var deviceFeatureSelect: UInt32 = 0
        var driverFeatureSelect: UInt32 = 0
        var driverFeatures: UInt64 = 0
        var status: UInt8 = 0
        var configGeneration: UInt32 = 0
        var queueSelect: UInt32 = 0
        var interruptStatus: UInt32 = 0
        var queues: [QueueRegisters]
    }
    private let state: Mutex<State>
    /// Serializes activate / reset / processQueue. Never taken while `state` is held.
    private let deviceLock = ConditionLock()
    private var active = false // guarded by deviceLock
    /// The queues handed to the device at activation (guarded by deviceLock).
    private var rings: [Virtqueue?] = []

    /// Wraps `device` in the register window at `base`. `interrupt` is pulsed for every interrupt;
    /// `ioEvents` (optional) registers the queue-notify ioeventfds; device work runs on `eventLoop`.
    public init(device: any VirtioDevice, base: UInt64, memory: GuestMemory, interrupt: any InterruptLine,
                eventLoop: EventLoop, ioEvents: (any IOEventRegistry)?, log: VirtioLog = .discard) throws {
        self.device = device
        self.base = base
        self.memory = memory
        self.interrupt = interrupt
        self.eventLoop = eventLoop
        self.log = log
        let sizes = device.queueMaxSizes
        queueCount = sizes.count
        offeredFeatures = device.deviceFeatures | VirtioFeature.common
        state = Mutex(State(queues: sizes.map { _ in QueueRegisters(size: 0) }))
        notifyFDs = try sizes.map { _ in try EventFD() }
        for q in 0..<queueCount {
            try eventLoop.add(notifyFDs[q]) { [weak self] in self?.process(queue: q) }
        }
        if let ioEvents {
            let address = base + Register.queueNotify
            for (q, fd) in notifyFDs.enumerated() {
                do { try ioEvents.register(address: address, length: 4, datamatch: UInt64(q), eventFD: fd, pio: false) }
                catch { log.error("virtio-mmio: ioeventfd for queue \(q) at 0x\(String(address, radix: 16)) failed (QueueNotify still works): \(error)") }
            }
        }
    }

    private var name: String { "virtio-mmio \(device.deviceType) at 0x\(String(base, radix: 16))" }

    // MARK: BusDevice

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        for i in 0..<data.count { data[i] = 0 }
        if offset >= Self.configOffset {
            let o = offset - Self.configOffset
            guard [1, 2, 4, 8].contains(data.count), o + UInt64(data.count) <= UInt64(device.configSize) else {
                log.error("\(name): read of \(data.count) bytes at configuration offset 0x\(String(o, radix: 16)) ignored")
                return
            }
            device.readConfig(offset: Int(o), data: data)
            return
        }
        guard data.count == 4, offset % 4 == 0 else {
            log.error("\(name): \(data.count)-byte read at 0x\(String(offset, radix: 16)) ignored (registers are 32-bit)")
            return
        }
        let value = readRegister(offset)
        for i in 0..<4 { data[i] = UInt8(truncatingIfNeeded: value >> (8 * UInt32(i))) }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        if offset >= Self.configOffset {
            let o = offset - Self.configOffset
            guard [1, 2, 4, 8].contains(data.count), o + UInt64(data.count) <= UInt64(device.configSize) else {
                log.error("\(name): write of \(data.count) bytes at configuration offset 0x\(String(o, radix: 16)) ignored")
                return
            }
            device.writeConfig(offset: Int(o), data: data)
            return
        }
        guard data.count == 4, offset % 4 == 0 else {
            log.error("\(name): \(data.count)-byte write at 0x\(String(offset, radix: 16)) ignored (registers are 32-bit)")
            return
        }
        var value: UInt32 = 0
        for i in 0..<4 { value |= UInt32(data[i]) << (8 * UInt32(i)) }
        writeRegister(offset, value)
    }

    // MARK: Registers

    /// The value of the 32-bit register at `offset` (0 for write-only and unknown registers).
    func readRegister(_ offset: UInt64) -> UInt32 {
        switch offset {
        case Register.magicValue: return Self.magic
        case Register.version: return Self.version
        case Register.deviceID: return UInt32(device.deviceType.rawValue)
        case Register.vendorID: return Self.vendorID
        case Register.shmLenLow, Register.shmLenHigh, Register.shmBaseLow, Register.shmBaseHigh:
            return 0xffff_ffff // no shared memory regions
        default: break
        }
        return state.withLock { s -> UInt32 in
            let q = Int(s.queueSelect) < queueCount ? Int(s.queueSelect) : nil
            switch offset {
            case Register.deviceFeatures:
                return s.deviceFeatureSelect < 2 ? UInt32(truncatingIfNeeded: offeredFeatures >> (32 * UInt64(s.deviceFeatureSelect))) : 0
            case Register.queueNumMax:
                return q.map { UInt32(device.queueMaxSizes[$0]) } ?? 0
            case Register.queueReady:
                return q.map { s.queues[$0].ready ? 1 : 0 } ?? 0
            case Register.interruptStatus: return s.interruptStatus
            case Register.status: return UInt32(s.status)
            case Register.configGeneration: return s.configGeneration
            default:
                log.error("\(name): read of write-only or reserved register 0x\(String(offset, radix: 16)) reads 0")
                return 0
            }
        }
    }

    private enum StatusAction { case none, reset, activate }

    /// A driver write of `value` to the 32-bit register at `offset`.
    func writeRegister(_ offset: UInt64, _ value: UInt32) {
        switch offset {
        case Register.queueNotify:
            if value < UInt32(queueCount) { notifyFDs[Int(value)].signal() }
            else { log.error("\(name): notify of queue \(value) ignored (\(queueCount) queues)") }
            return
        case Register.interruptACK:
            state.withLock { $0.interruptStatus &= ~value }
            return
        default: break
        }
        let action: StatusAction = state.withLock { s in
            let frozen = s.status & VirtioStatus.featuresOK != 0
            let live = s.status & VirtioStatus.driverOK != 0
            let q = Int(s.queueSelect) < queueCount ? Int(s.queueSelect) : nil
            /// Applies `change` to the selected queue while the device is not live; logs otherwise.
            func queueWrite(_ what: String, _ change: (inout QueueRegisters) -> Void) {
                guard let q else {
                    log.error("\(name): \(what) write for queue \(s.queueSelect) ignored (\(queueCount) queues)")
                    return
                }
                guard !live else {
                    log.error("\(name): \(what) write for queue \(q) after DRIVER_OK ignored")
                    return
                }
                change(&s.queues[q])
            }
            func low(_ v: UInt64) -> UInt64 { (v & 0xffff_ffff_0000_0000) | UInt64(value) }
            func high(_ v: UInt64) -> UInt64 { (v & 0xffff_ffff) | UInt64(value) << 32 }
            switch offset {
            case Register.deviceFeaturesSel: s.deviceFeatureSelect = value
            case Register.driverFeaturesSel: s.driverFeatureSelect = value
            case Register.driverFeatures:
                if frozen || s.driverFeatureSelect >= 2 {
                    log.error("\(name): DriverFeatures write (select \(s.driverFeatureSelect)) ignored\(frozen ? " after FEATURES_OK" : "")")
                } else {
                    let shift = 32 * UInt64(s.driverFeatureSelect)
                    s.driverFeatures = (s.driverFeatures & ~(0xffff_ffff << shift)) | (UInt64(value) << shift)
                }
            case Register.queueSel: s.queueSelect = value
            case Register.queueNum:
                queueWrite("QueueNum") { $0.size = UInt16(truncatingIfNeeded: min(value, UInt32(UInt16.max))) }
            case Register.queueReady:
                queueWrite("QueueReady") { $0.ready = value & 1 != 0 }
            case Register.queueDescLow: queueWrite("QueueDescLow") { $0.desc = low($0.desc) }
            case Register.queueDescHigh: queueWrite("QueueDescHigh") { $0.desc = high($0.desc) }
            case Register.queueDriverLow: queueWrite("QueueDriverLow") { $0.driver = low($0.driver) }
            case Register.queueDriverHigh: queueWrite("QueueDriverHigh") { $0.driver = high($0.driver) }
            case Register.queueDeviceLow: queueWrite("QueueDeviceLow") { $0.device = low($0.device) }
            case Register.queueDeviceHigh: queueWrite("QueueDeviceHigh") { $0.device = high($0.device) }
            case Register.shmSel: break // no regions: every selector reads all ones
            case Register.status:
                guard value <= 0xff else {
                    log.error("\(name): status 0x\(String(value, radix: 16)) ignored (8-bit register)")
                    return .none
                }
                return statusWrite(&s, UInt8(value))
            default:
                log.error("\(name): write of 0x\(String(value, radix: 16)) to read-only or reserved register 0x\(String(offset, radix: 16)) ignored")
            }
            return .none
        }
        switch action {
        case .none: break
        case .reset: resetDevice()
        case .activate: activateDevice()
        }
    }

    /// Applies a Status write; returns what to do outside the state lock.
    private func statusWrite(_ s: inout State, _ new: UInt8) -> StatusAction {
        if new == 0 {
            s = State(queues: device.queueMaxSizes.map { _ in QueueRegisters(size: 0) })
            return .reset
        }
        let old = s.status
        guard new & old == old else {
            log.error("\(name): driver cleared status bits (0x\(String(old, radix: 16)) → 0x\(String(new, radix: 16))); ignored")
            return .none
        }
        var accepted = new
        if new & VirtioStatus.featuresOK != 0, old & VirtioStatus.featuresOK == 0 {
            let unknown = s.driverFeatures & ~offeredFeatures
            if unknown != 0 || s.driverFeatures & VirtioFeature.version1 == 0 {
                log.error("\(name): features 0x\(String(s.driverFeatures, radix: 16)) refused (offered 0x\(String(offeredFeatures, radix: 16)), VERSION_1 required)")
                accepted &= ~VirtioStatus.featuresOK
            }
        }
        s.status = accepted
        if accepted & VirtioStatus.driverOK != 0, old & VirtioStatus.driverOK == 0 {
            guard accepted & VirtioStatus.featuresOK != 0 else {
                log.error("\(name): DRIVER_OK without FEATURES_OK")
                s.status |= VirtioStatus.deviceNeedsReset
                return .none
            }
            return .activate
        }
        return .none
    }

    private func resetDevice() {
        deviceLock.withLock {
            if active { device.reset() }
            active = false
            rings = []
        }
    }

    private func activateDevice() {
        let s = state.withLock { $0 }
        var queues: [Virtqueue?] = []
        do throws(VirtioError) {
            queues = try makeQueues(s)
            deviceLock.lock()
            defer { deviceLock.unlock() }
            try device.activate(activation(s, queues))
            active = true
            rings = queues
        } catch {
            needsReset(error)
            return
        }
        for q in 0..<queueCount where queues[q] != nil { notifyFDs[q].signal() }
    }

    /// The ready queues of `s`, checked against the device's maxima and guest memory.
    private func makeQueues(_ s: State) throws(VirtioError) -> [Virtqueue?] {
        let eventIdx = s.driverFeatures & VirtioFeature.ringEventIdx != 0
        let indirect = s.driverFeatures & VirtioFeature.ringIndirectDesc != 0
        var queues: [Virtqueue?] = []
        for (i, qr) in s.queues.enumerated() {
            guard qr.ready else { queues.append(nil); continue }
            guard qr.size <= device.queueMaxSizes[i] else {
                throw VirtioError.queueConfiguration(queue: i, reason: "QueueNum \(qr.size) is larger than QueueNumMax \(device.queueMaxSizes[i])")
            }
            queues.append(try Virtqueue(index: i, layout: VirtqueueLayout(size: qr.size, descriptorTable: qr.desc,
                                                                          availableRing: qr.driver, usedRing: qr.device),
                                        memory: memory, eventIdx: eventIdx, indirect: indirect))
        }
        return queues
    }

    private func activation(_ s: State, _ queues: [Virtqueue?]) -> VirtioActivation {
        VirtioActivation(memory: memory, queues: queues, features: s.driverFeatures, interrupt: Interrupt(transport: self),
                         schedule: { [weak self] q in self?.schedule(queue: q) })
    }

    /// Marks the device broken (DEVICE_NEEDS_RESET) after `error` and tells the driver.
    private func needsReset(_ error: VirtioError) {
        log.error("\(name): \(error); device needs reset")
        deviceLock.withLock {
            if active { device.reset() }
            active = false
            rings = []
        }
        state.withLock { $0.status |= VirtioStatus.deviceNeedsReset }
        signalConfigChange()
    }

    /// Asks the event loop to process queue `q` (from any thread).
    func schedule(queue q: Int) {
        guard q >= 0, q < queueCount else { return }
        notifyFDs[q].signal()
    }

    /// Runs on the event loop: processes queue `q` if the device is live.
    func process(queue q: Int) {
        var failure: VirtioError?
        deviceLock.withLock {
            guard active else { return }
            do throws(VirtioError) { try device.processQueue(q) } catch { failure = error }
        }
        if let failure { needsReset(failure) }
    }

    // MARK: Interrupts

    /// Current device status (for tests and diagnostics).
    public var status: UInt8 { state.withLock { $0.status } }

    func signalQueue(_ q: Int) {
        state.withLock { $0.interruptStatus |= InterruptBit.usedBuffer }
        interrupt.trigger()
    }

    func signalConfigChange() {
        state.withLock { s in
            s.configGeneration &+= 1
            s.interruptStatus |= InterruptBit.configChange
        }
        interrupt.trigger()
    }

    /// Weak, so that device → activation → interrupt does not keep the transport alive.
    private final class Interrupt: VirtioInterrupt, @unchecked Sendable {
        weak var transport: VirtioMMIOTransport?
        init(transport: VirtioMMIOTransport) { self.transport = transport }
        func signalQueue(_ queue: Int) { transport?.signalQueue(queue) }
        func signalConfigChange() { transport?.signalConfigChange() }
    }

    /// Stops the device for good (the VM is shutting down). Call after the event loop stopped.
    public func shutdown() {
        deviceLock.withLock {
            device.shutdown()
            active = false
        }
    }
}

extension VirtioMMIOTransport: StatefulDevice {
    public static let stateVersion: UInt32 = 1

    /// The transport as a snapshot saves it: the driver-visible registers and, for a live device,
    /// where each queue's device side stands (as `VirtioPCITransport.SavedState`).
    public struct SavedState: Codable, Sendable {
        var registers: State
        /// One entry per queue while the device is live (nil: not activated).
        var rings: [Virtqueue.SavedIndices?]?
        /// The device model's own state (`VirtioDevice.savedDeviceState`); nil: none.
        var device: [UInt8]?
    }

    /// Finishes the device's requests in flight (call with its event loop paused, before `saveState`).
    public func quiesce() {
        deviceLock.withLock { if active { device.quiesce() } }
    }

    public func saveState() -> SavedState {
        deviceLock.withLock {
            let rings: [Virtqueue.SavedIndices?]? = active
                ? self.rings.enumerated().map { i, q in q?.savedIndices(unconsumed: device.unconsumedChains(queue: i)) }
                : nil
            return SavedState(registers: state.withLock { $0 }, rings: rings, device: device.savedDeviceState())
        }
    }

    /// Puts the saved registers back and, when the device was live, activates it on queues that
    /// continue from the saved indices (guest memory must already hold the snapshot's RAM).
    public func restoreState(_ saved: SavedState) throws(DeviceStateError) {
        let r = saved.registers
        guard r.queues.count == queueCount else {
            throw DeviceStateError("\(name): \(r.queues.count) saved queues, the device has \(queueCount)")
        }
        for (i, q) in r.queues.enumerated() where q.size > device.queueMaxSizes[i] {
            throw DeviceStateError("\(name): queue \(i) size \(q.size) is larger than the device's \(device.queueMaxSizes[i])")
        }
        if let rings = saved.rings {
            guard rings.count == queueCount else {
                throw DeviceStateError("\(name): \(rings.count) saved queue positions, the device has \(queueCount) queues")
            }
            guard r.status & VirtioStatus.driverOK != 0 else {
                throw DeviceStateError("\(name): saved as live without DRIVER_OK in status 0x\(String(r.status, radix: 16))")
            }
            for (i, q) in r.queues.enumerated() where q.ready != (rings[i] != nil) {
                throw DeviceStateError("\(name): queue \(i) is \(q.ready ? "ready without a saved position" : "not ready with a saved position")")
            }
        }
        try deviceLock.withLock { () throws(DeviceStateError) in
            if active { device.reset() }
            active = false
            rings = []
            state.withLock { $0 = r }
            do throws(VirtioError) {
                try device.restoreDeviceState(saved.device ?? [])
            } catch {
                throw DeviceStateError("\(name): \(error)")
            }
            guard let savedRings = saved.rings else { return }
            do throws(VirtioError) {
                let queues = try makeQueues(r)
                for (q, s) in zip(queues, savedRings) { if let q, let s { q.restoreIndices(s) } }
                try device.activate(activation(r, queues))
                active = true
                rings = queues
            } catch {
                throw DeviceStateError("\(name): \(error)")
            }
            device.restored()
        }
        // An interrupt the driver had not acknowledged is raised again (edge-triggered: the saved
        // irqchip may not hold it).
        if r.interruptStatus != 0 { interrupt.trigger() }
        if saved.rings != nil { for fd in notifyFDs { fd.signal() } }
    }
}
