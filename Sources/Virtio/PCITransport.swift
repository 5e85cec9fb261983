import Devices
import GuestMemory
import PCI
import Synchronization

/// The virtio 1.x modern PCI transport (virtio 1.x, section 4.1) for one `VirtioDevice`.
///
/// PCI identity: vendor 0x1af4, device 0x1040 + type, revision 1, subsystem vendor 0x1af4.
/// Everything lives in one 64-bit memory BAR (`bar`, 32 KiB):
///
/// | offset | what |
/// |---|---|
/// | 0x0000 | common configuration (COMMON_CFG) |
/// | 0x1000 | ISR status (ISR_CFG), read-to-clear |
/// | 0x2000 | device configuration (DEVICE_CFG) |
/// | 0x3000 | queue notify (NOTIFY_CFG), queue `q` at 0x3000 + 4 × q (notify_off_multiplier 4) |
/// | 0x4000 | MSI-X table (queues + 1 vectors) |
/// | 0x6000 | MSI-X PBA |
///
/// Queue notifications go to one eventfd per queue: KVM signals it directly when an
/// `IOEventRegistry` is given (ioeventfd, registered whenever the BAR is mapped), and plain MMIO
/// writes to the notify area signal it too. The device's work runs on `eventLoop`. Interrupts use
/// MSI-X when the driver enabled it (no interrupt for VIRTIO_MSI_NO_VECTOR) and INTx with the ISR
/// register otherwise.
public final class VirtioPCITransport: PCIDevice, @unchecked Sendable {
    /// The BAR holding every virtio structure.
    public static let bar = 4
    /// Size of that BAR.
    public static let barSize: UInt64 = 0x8000
    public static let commonOffset: UInt64 = 0x0000
    public static let isrOffset: UInt64 = 0x1000
    public static let deviceConfigOffset: UInt64 = 0x2000
    public static let notifyOffset: UInt64 = 0x3000
    public static let notifyMultiplier: UInt32 = 4
    public static let msixTableOffset: UInt64 = 0x4000
    public static let msixPBAOffset: UInt64 = 0x6000
    /// Size of the common configuration structure.
    public static let commonSize: UInt64 = 0x38
    /// PCI vendor ID of virtio devices.
    public static let vendorID: UInt16 = 0x1af4

    public let configuration: PCIConfiguration
    /// The device model.
    public let device: any VirtioDevice
    /// The MSI-X table (queues + 1 vectors).
    public let msix: MSIXTable
    let memory: GuestMemory
    let log: VirtioLog
    let eventLoop: EventLoop
    let ioEvents: (any IOEventRegistry)?
    let notifyFDs: [EventFD]
    private let queueCount: Int
    private let offeredFeatures: UInt64

    /// Driver-visible transport state, guarded by `state`.
    struct QueueConfig: Codable {
        var size: UInt16
        var msixVector: UInt16 = virtioMSINoVector
        var enabled = false
        var desc: UInt64 = 0
        var driver: UInt64 = 0
        var device: UInt64 = 0
    }
    struct State: Codable {
        var deviceFeatureSelect: UInt32 = 0
        var driverFeatureSelect: UInt32 = 0
        var driverFeatures: UInt64 = 0
        var configVector: UInt16 = virtioMSINoVector
        var status: UInt8 = 0
        var configGeneration: UInt8 = 0
        var queueSelect: UInt16 = 0
        var queues: [QueueConfig]
        var isr: UInt8 = 0
    }
    private let state: Mutex<State>
    /// Serializes activate / reset / processQueue. Never taken while `state` is held.
    private let deviceLock = ConditionLock()
    private var active = false // guarded by deviceLock
    /// The queues handed to the device at activation (guarded by deviceLock).
    private var rings: [Virtqueue?] = []

    /// Wraps `device` for PCI. `msiController` makes the MSI-X vectors; `ioEvents` (optional)
    /// registers ioeventfds for queue notifications; device work runs on `eventLoop`.
    public init(device: any VirtioDevice, memory: GuestMemory, msiController: any MSIController,
                eventLoop: EventLoop, ioEvents: (any IOEventRegistry)?, log: VirtioLog = .discard) throws {
        self.device = device
        self.memory = memory
        self.eventLoop = eventLoop
        self.ioEvents = ioEvents
        self.log = log
        let sizes = device.queueMaxSizes
        queueCount = sizes.count
        offeredFeatures = device.deviceFeatures | VirtioFeature.common
        state = Mutex(State(queues: sizes.map { QueueConfig(size: $0) }))
        msix = try MSIXTable(vectorCount: sizes.count + 1, controller: msiController)
        notifyFDs = try sizes.map { _ in try EventFD() }

        let (cls, sub): (UInt8, UInt8) = switch device.deviceType {
        case .net: (0x02, 0x00)
        case .block: (0x01, 0x00)
        case .scsi: (0x01, 0x00)
        case .console: (0x07, 0x80)
        case .entropy: (0xff, 0x00)
        case .balloon: (0xff, 0x00)
        case .vsock: (0x07, 0x80)
        }
        configuration = PCIConfiguration(vendorID: Self.vendorID, deviceID: 0x1040 + device.deviceType.rawValue,
                                         classCode: cls, subclass: sub, progIF: 0, revision: 1,
                                         subsystemVendorID: Self.vendorID, subsystemID: 0x1100)
        configuration.addBAR(PCIBarSpec(index: Self.bar, size: Self.barSize, kind: .memory64, prefetchable: false))
        configuration.addMSIX(msix, tableBAR: Self.bar, tableOffset: UInt32(Self.msixTableOffset),
                              pbaBAR: Self.bar, pbaOffset: UInt32(Self.msixPBAOffset))
        func cap(_ type: UInt8, _ offset: UInt64, _ length: UInt32, extra: [UInt8] = []) {
            var body: [UInt8] = [UInt8(16 + extra.count), type, UInt8(Self.bar), 0, 0, 0]
            body.putLE(UInt32(offset), at: 6)
            body.putLE(length, at: 10)
            body += extra
            configuration.addCapability(id: 0x09, body: body)
        }
        cap(1, Self.commonOffset, UInt32(Self.commonSize))
        var mult = [UInt8](); mult.putLE(Self.notifyMultiplier, at: 0)
        cap(2, Self.notifyOffset, UInt32(max(1, queueCount)) * Self.notifyMultiplier, extra: mult)
        cap(3, Self.isrOffset, 1)
        if device.configSize > 0 { cap(4, Self.deviceConfigOffset, UInt32(device.configSize)) }
        // PCI_CFG access capability (required by the spec; bar/offset/length/data are writable, the
        // window itself is not served: Linux and the guest test drivers use the BAR directly).
        let pciCfgBody: [UInt8] = [20, 5, 0, 0, 0, 0] + [UInt8](repeating: 0, count: 12)
        var pciCfgMask = [UInt8](repeating: 0, count: pciCfgBody.count)
        pciCfgMask[2] = 0xff
        for i in 6..<18 { pciCfgMask[i] = 0xff }
        configuration.addCapability(id: 0x09, body: pciCfgBody, writableMask: pciCfgMask)

        for q in 0..<queueCount {
            try eventLoop.add(notifyFDs[q]) { [weak self] in self?.process(queue: q) }
        }
    }

    // MARK: PCIDevice

    public func barRead(index: Int, offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        for i in 0..<data.count { data[i] = 0 }
        guard index == Self.bar else { return }
        switch offset {
        case Self.commonOffset..<(Self.commonOffset + 0x1000):
            readCommon(offset: offset - Self.commonOffset, data: data)
        case Self.isrOffset..<(Self.isrOffset + 0x1000):
            if offset == Self.isrOffset, data.count >= 1 { data[0] = readISR() }
        case Self.deviceConfigOffset..<(Self.deviceConfigOffset + 0x1000):
            let o = Int(offset - Self.deviceConfigOffset)
            if o + data.count <= device.configSize { device.readConfig(offset: o, data: data) }
        case Self.msixTableOffset..<Self.msixPBAOffset:
            msix.tableRead(offset: offset - Self.msixTableOffset, data: data)
        case Self.msixPBAOffset..<Self.barSize:
            msix.pbaRead(offset: offset - Self.msixPBAOffset, data: data)
        default: break
        }
    }

    public func barWrite(index: Int, offset: UInt64, data: UnsafeRawBufferPointer) {
        guard index == Self.bar else { return }
        switch offset {
        case Self.commonOffset..<(Self.commonOffset + 0x1000):
            writeCommon(offset: offset - Self.commonOffset, data: data)
        case Self.deviceConfigOffset..<(Self.deviceConfigOffset + 0x1000):
            let o = Int(offset - Self.deviceConfigOffset)
            if o + data.count <= device.configSize { device.writeConfig(offset: o, data: data) }
        case Self.notifyOffset..<(Self.notifyOffset + 0x1000):
            let rel = offset - Self.notifyOffset
            let q = Int(rel / UInt64(Self.notifyMultiplier))
            if rel % UInt64(Self.notifyMultiplier) == 0, q < queueCount { notifyFDs[q].signal() }
        case Self.msixTableOffset..<Self.msixPBAOffset:
            msix.tableWrite(offset: offset - Self.msixTableOffset, data: data)
        case Self.msixPBAOffset..<Self.barSize:
            msix.pbaWrite(offset: offset - Self.msixPBAOffset, data: data)
        default: break
        }
    }

    public func barRemapped(index: Int, from old: UInt64?, to new: UInt64?) {
        guard index == Self.bar, let ioEvents else { return }
        for (q, fd) in notifyFDs.enumerated() {
            let off = Self.notifyOffset + UInt64(q) * UInt64(Self.notifyMultiplier)
            if let old {
                do { try ioEvents.unregister(address: old + off, length: 2, datamatch: nil, eventFD: fd, pio: false) }
                catch { log.error("virtio: ioeventfd unregister of queue \(q) at 0x\(String(old + off, radix: 16)) failed: \(error)") }
            }
            if let new {
                do { try ioEvents.register(address: new + off, length: 2, datamatch: nil, eventFD: fd, pio: false) }
                catch { log.error("virtio: ioeventfd for queue \(q) at 0x\(String(new + off, radix: 16)) failed (MMIO notify still works): \(error)") }
            }
        }
    }

    // MARK: Common configuration

    /// The common configuration structure as the driver sees it now.
    private func commonImage(_ s: State) -> [UInt8] {
        var c = [UInt8](repeating: 0, count: Int(Self.commonSize))
        let featureWord: UInt32 = s.deviceFeatureSelect < 2 ? UInt32(truncatingIfNeeded: offeredFeatures >> (32 * UInt64(s.deviceFeatureSelect))) : 0
        c.putLE(s.deviceFeatureSelect, at: 0x00)
        c.putLE(featureWord, at: 0x04)
        c.putLE(s.driverFeatureSelect, at: 0x08)
        let driverWord: UInt32 = s.driverFeatureSelect < 2 ? UInt32(truncatingIfNeeded: s.driverFeatures >> (32 * UInt64(s.driverFeatureSelect))) : 0
        c.putLE(driverWord, at: 0x0c)
        c.putLE(s.configVector, at: 0x10)
        c.putLE(UInt16(queueCount), at: 0x12)
        c[0x14] = s.status
        c[0x15] = s.configGeneration
        c.putLE(s.queueSelect, at: 0x16)
        if Int(s.queueSelect) < queueCount {
            let q = s.queues[Int(s.queueSelect)]
            c.putLE(q.size, at: 0x18)
            c.putLE(q.msixVector, at: 0x1a)
            c.putLE(UInt16(q.enabled ? 1 : 0), at: 0x1c)
            c.putLE(s.queueSelect, at: 0x1e) // queue_notify_off
            c.putLE(q.desc, at: 0x20)
            c.putLE(q.driver, at: 0x28)
            c.putLE(q.device, at: 0x30)
        }
        return c
    }

    private func readCommon(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        let img = state.withLock { commonImage($0) }
        copyConfig(img, offset: Int(offset), into: data)
    }

    private enum StatusAction { case none, reset, activate }

    private func writeCommon(offset: UInt64, data: UnsafeRawBufferPointer) {
        guard offset < Self.commonSize, offset + UInt64(data.count) <= Self.commonSize else {
            log.error("virtio-pci \(device.deviceType): write of \(data.count) bytes at common config offset 0x\(String(offset, radix: 16)) ignored")
            return
        }
        let o = Int(offset), n = data.count
        let action: StatusAction = state.withLock { s in
            var img = commonImage(s)
            for i in 0..<n { img[o + i] = data[i] }
            func touched(_ field: Int, _ size: Int) -> Bool { o < field + size && field < o + n }
            let frozen = s.status & VirtioStatus.featuresOK != 0
            if touched(0x00, 4) { s.deviceFeatureSelect = img.getLE(UInt32.self, at: 0x00)! }
            if touched(0x08, 4) { s.driverFeatureSelect = img.getLE(UInt32.self, at: 0x08)! }
            if touched(0x0c, 4), !frozen, s.driverFeatureSelect < 2 {
                let shift = 32 * UInt64(s.driverFeatureSelect)
                let word = UInt64(img.getLE(UInt32.self, at: 0x0c)!)
                s.driverFeatures = (s.driverFeatures & ~(0xffff_ffff << shift)) | (word << shift)
            }
            if touched(0x10, 2) { s.configVector = img.getLE(UInt16.self, at: 0x10)! }
            if touched(0x16, 2) { s.queueSelect = img.getLE(UInt16.self, at: 0x16)! }
            let qs = Int(s.queueSelect)
            let live = s.status & VirtioStatus.driverOK != 0
            if qs < queueCount {
                if touched(0x1a, 2) { s.queues[qs].msixVector = img.getLE(UInt16.self, at: 0x1a)! }
                if !live {
                    if touched(0x18, 2) {
                        let v = img.getLE(UInt16.self, at: 0x18)!
                        // Larger than offered: keep the maximum (the queue check at DRIVER_OK catches the rest).
                        s.queues[qs].size = min(v, device.queueMaxSizes[qs])
                    }
                    if touched(0x1c, 2), img.getLE(UInt16.self, at: 0x1c)! == 1 { s.queues[qs].enabled = true }
                    if touched(0x20, 8) { s.queues[qs].desc = img.getLE(UInt64.self, at: 0x20)! }
                    if touched(0x28, 8) { s.queues[qs].driver = img.getLE(UInt64.self, at: 0x28)! }
                    if touched(0x30, 8) { s.queues[qs].device = img.getLE(UInt64.self, at: 0x30)! }
                }
            }
            guard touched(0x14, 1) else { return .none }
            return statusWrite(&s, img[0x14])
        }
        switch action {
        case .none: break
        case .reset: resetDevice()
        case .activate: activateDevice()
        }
    }

    /// Applies a device_status write; returns what to do outside the state lock.
    private func statusWrite(_ s: inout State, _ new: UInt8) -> StatusAction {
        if new == 0 {
            let queues = device.queueMaxSizes.map { QueueConfig(size: $0) }
            s = State(queues: queues)
            return .reset
        }
        let old = s.status
        guard new & old == old else {
            log.error("virtio-pci \(device.deviceType): driver cleared status bits (0x\(String(old, radix: 16)) → 0x\(String(new, radix: 16))); ignored")
            return .none
        }
        var accepted = new
        if new & VirtioStatus.featuresOK != 0, old & VirtioStatus.featuresOK == 0 {
            let unknown = s.driverFeatures & ~offeredFeatures
            if unknown != 0 || s.driverFeatures & VirtioFeature.version1 == 0 {
                log.error("virtio-pci \(device.deviceType): features 0x\(String(s.driverFeatures, radix: 16)) refused (offered 0x\(String(offeredFeatures, radix: 16)), VERSION_1 required)")
                accepted &= ~VirtioStatus.featuresOK
            }
        }
        s.status = accepted
        if accepted & VirtioStatus.driverOK != 0, old & VirtioStatus.driverOK == 0 {
            guard accepted & VirtioStatus.featuresOK != 0 else {
                log.error("virtio-pci \(device.deviceType): DRIVER_OK without FEATURES_OK")
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
        setINTx(isr: nil)
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

    /// The enabled queues of `s`, checked against guest memory.
    private func makeQueues(_ s: State) throws(VirtioError) -> [Virtqueue?] {
        let eventIdx = s.driverFeatures & VirtioFeature.ringEventIdx != 0
        let indirect = s.driverFeatures & VirtioFeature.ringIndirectDesc != 0
        var queues: [Virtqueue?] = []
        for (i, qc) in s.queues.enumerated() {
            guard qc.enabled else { queues.append(nil); continue }
            queues.append(try Virtqueue(index: i, layout: VirtqueueLayout(size: qc.size, descriptorTable: qc.desc,
                                                                          availableRing: qc.driver, usedRing: qc.device),
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
        log.error("virtio-pci \(device.deviceType): \(error); device needs reset")
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

    private func readISR() -> UInt8 {
        let v = state.withLock { s -> UInt8 in
            let v = s.isr
            s.isr = 0
            return v
        }
        if v != 0 { configuration.setINTx(level: false) }
        return v
    }

    private func setINTx(isr bits: UInt8?) {
        if let bits {
            state.withLock { $0.isr |= bits }
            configuration.setINTx(level: true)
        } else {
            state.withLock { $0.isr = 0 }
            configuration.setINTx(level: false)
        }
    }

    func signalQueue(_ q: Int) {
        if msix.isEnabled {
            let v = state.withLock { s in q < s.queues.count ? s.queues[q].msixVector : virtioMSINoVector }
            msix.signal(Int(v))
        } else {
            setINTx(isr: 1)
        }
    }

    func signalConfigChange() {
        if msix.isEnabled {
            let v = state.withLock { s in
                s.configGeneration &+= 1
                return s.configVector
            }
            msix.signal(Int(v))
        } else {
            state.withLock { $0.configGeneration &+= 1 }
            setINTx(isr: 2)
        }
    }

    /// Weak, so that device → activation → interrupt does not keep the transport alive.
    private final class Interrupt: VirtioInterrupt, @unchecked Sendable {
        weak var transport: VirtioPCITransport?
        init(transport: VirtioPCITransport) { self.transport = transport }
        func signalQueue(_ queue: Int) { transport?.signalQueue(queue) }
        func signalConfigChange() { transport?.signalConfigChange() }
    }

    /// Stops the device for good (the VM is shutting down): resets it so it drops its queues.
    /// Call after the event loop stopped.
    public func shutdown() {
        deviceLock.withLock {
            device.shutdown()
            active = false
        }
    }
}

extension VirtioPCITransport: StatefulDevice {
    public static let stateVersion: UInt32 = 1

    /// The transport as a snapshot saves it: PCI configuration space, the MSI-X table, the
    /// driver-visible registers, and, for a live device, where each queue's device side stands.
    /// The device model itself keeps nothing else that must survive: its requests in flight are
    /// finished by `quiesce()` first, and the chains it holds are given back to the rings.
    public struct SavedState: Codable, Sendable {
        var config: PCIConfiguration.SavedConfig
        var msix: MSIXTable.SavedState
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
            return SavedState(config: configuration.savedConfig(), msix: msix.saveState(),
                              registers: state.withLock { $0 }, rings: rings, device: device.savedDeviceState())
        }
    }

    /// Puts the saved transport back and, when the device was live, activates it on queues that
    /// continue from the saved indices (guest memory must already hold the snapshot's RAM).
    public func restoreState(_ saved: SavedState) throws(DeviceStateError) {
        let name = "virtio-pci \(device.deviceType)"
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
            for (i, q) in r.queues.enumerated() where q.enabled != (rings[i] != nil) {
                throw DeviceStateError("\(name): queue \(i) is \(q.enabled ? "enabled without a saved position" : "disabled with a saved position")")
            }
        }
        try configuration.restoreConfig(saved.config, device: name)
        try msix.restoreState(saved.msix)
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
        configuration.setINTx(level: saved.config.intxLevel)
        if saved.rings != nil { for fd in notifyFDs { fd.signal() } }
    }
}
