import Boot
import Devices
import KVM
import Virtio

/// The transport that carries a machine's virtio devices.
public enum VirtioTransportKind: String, Codable, Sendable, CaseIterable {
    /// The modern virtio-pci transport (`swiftkvm run`'s default, the vmm's with `--enable-pci`).
    case pci
    /// The virtio-mmio transport, version 2 (the vmm's default, as Firecracker's).
    case mmio
}

/// Where a machine's virtio-mmio devices are: one 4 KiB register window each from `base`, in attach
/// order, each with its own edge-triggered interrupt from `irqs`. A pure function of the device
/// count, so the kernel command line (written by the loader) and the devices (made after it) agree.
///
/// Firecracker puts its windows in the PCI hole too; ours start at 0xF000_0000, above the PCI BAR
/// window (0xC000_0000–0xDFFF_FFFF) and ECAM (0xE000_0000), below the PVM fix-up pages (0xFDFF_D000)
/// and the I/O APIC.
public enum VirtioMMIOLayout {
    /// Guest-physical address of the first window.
    public static let base: UInt64 = 0xf000_0000
    /// Bytes per device.
    public static let windowSize: UInt64 = VirtioMMIOTransport.windowSize
    /// The interrupts, in allocation order: the ISA IRQs no device of ours uses (not 0 PIT, 1 i8042,
    /// 2 cascade, 3 COM2, 4 COM1, 8 RTC, 9 SCI, 12 i8042 aux, 13 FPU), then GSIs 16–23 (PCI INTx, which
    /// no device uses when the virtio devices are on MMIO).
    public static let irqs: [UInt32] = [5, 6, 7, 10, 11, 14, 15] + Array(16...23)
    /// The most virtio-mmio devices a machine can have.
    public static var maximumDevices: Int { irqs.count }

    /// One device's register window and interrupt.
    public struct Slot: Sendable, Equatable {
        /// Guest-physical base of the register window.
        public var base: UInt64
        /// Its GSI (ISA IRQ below 16).
        public var irq: UInt32
        /// Linux's `virtio_mmio.device=<size>@<base>:<irq>` for it (Firecracker's form: `4K@0xf0000000:5`).
        public var cmdlineItem: String {
            "virtio_mmio.device=\(windowSize / 1024)K@0x\(String(base, radix: 16)):\(irq)"
        }
        /// How the DSDT describes it.
        public var acpi: ACPIConfiguration.VirtioMMIODevice {
            ACPIConfiguration.VirtioMMIODevice(base: UInt32(base), size: UInt32(windowSize), gsi: irq)
        }
    }

    /// The slot of device `index` (attach order); an error past `maximumDevices`.
    public static func slot(_ index: Int) throws -> Slot {
        guard index >= 0, index < irqs.count else {
            throw VMMError.invalidConfiguration("virtio-mmio: \(index + 1) devices, at most \(irqs.count) have an interrupt (use --transport pci)")
        }
        return Slot(base: base + UInt64(index) * windowSize, irq: irqs[index])
    }

    /// The kernel command line items announcing `count` devices (empty for none).
    public static func cmdline(count: Int) throws -> String {
        try (0..<count).map { try slot($0).cmdlineItem }.joined(separator: " ")
    }
}

extension VMConfiguration {
    /// The transport used for the virtio devices (`transport`, PCI when unset).
    public var virtioTransport: VirtioTransportKind { transport ?? .pci }

    /// How many virtio devices the machine gets: disks, NICs, vsock, console, rng.
    public var virtioDeviceCount: Int {
        disks.filter { !$0.isSCSI }.count + (disks.contains(where: \.isSCSI) ? 1 : 0) + nets.count + (vsock == nil ? 0 : 1)
            + (virtioConsole ? 1 : 0) + (rng ? 1 : 0) + (balloon == nil ? 0 : 1)
    }

    /// `cmdline` with the `virtio_mmio.device=` items of this machine's devices appended when they are on
    /// MMIO (as Firecracker does on x86, for kernels without ACPI); `cmdline` itself otherwise.
    public func cmdlineWithVirtioMMIODevices(_ cmdline: String) throws -> String {
        guard virtioTransport == .mmio, virtioDeviceCount > 0 else { return cmdline }
        let items = try VirtioMMIOLayout.cmdline(count: virtioDeviceCount)
        return cmdline.isEmpty ? items : cmdline + " " + items
    }
}

/// A virtio-mmio device's interrupt: an irqfd on its GSI, pulsed (KVM asserts and deasserts the GSI)
/// for each interrupt.
struct IRQFDInterruptLine: InterruptLine {
    let event: EventFD
    func set(level: Bool) { if level { event.signal() } }
    func trigger() { event.signal() }
}

extension Machine {
    /// Attaches `device` (whose work runs on `loop`) on the configured transport: a PCI function in the next
    /// slot, or the next virtio-mmio window on the MMIO bus with an irqfd on its GSI (`VirtioMMIOLayout`).
    /// The transport is registered with `virtio` before it is put on a bus, so a later failure still shuts
    /// it down. A PCI transport's state is saved in snapshots under `id`; a device on virtio-mmio is not
    /// snapshottable yet (`id` is marked unsupported, so a snapshot is refused naming it). Returns where the
    /// device is, for the log.
    func attachVirtio(_ device: any VirtioDevice, id: String, loop: EventLoop, log: VirtioLog) throws -> VirtioPlacement {
        let ioEvents = KVMIOEventRegistry(vm: vm)
        switch config.virtioTransport {
        case .pci:
            let transport = try VirtioPCITransport(device: device, memory: memory, msiController: msiController,
                                                   eventLoop: loop, ioEvents: ioEvents, log: log)
            virtio.add(transport: transport)
            devices.register(transport, id: id)
            let slot = try attachPCIDevice(transport).slot
            return VirtioPlacement(pciSlot: slot, description: "PCI slot \(slot)")
        case .mmio:
            let slot = try VirtioMMIOLayout.slot(virtio.mmioDevices.count)
            let event = try EventFD()
            try vm.registerIRQFD(fd: event.fd, gsi: slot.irq)
            let transport = try VirtioMMIOTransport(device: device, base: slot.base, memory: memory,
                                                    interrupt: IRQFDInterruptLine(event: event),
                                                    eventLoop: loop, ioEvents: ioEvents, log: log)
            virtio.add(mmio: transport, slot: slot)
            devices.register(transport, id: id)
            try mmioBus.insert(transport, base: slot.base, length: VirtioMMIOLayout.windowSize)
            return VirtioPlacement(pciSlot: nil, description: "MMIO 0x\(String(slot.base, radix: 16)) IRQ \(slot.irq)")
        }
    }
}

/// Where `attachVirtio` put a device: a PCI slot or a virtio-mmio window (as text for logs).
struct VirtioPlacement: CustomStringConvertible {
    /// The PCI slot, nil on virtio-mmio.
    var pciSlot: Int?
    var description: String
}
