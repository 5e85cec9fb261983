import Devices
import KVM
import Logging
import PCI
import Synchronization

/// The machine's PCI bus 0: the root (host bridge at 00.0), configuration mechanism #1 on ports
/// 0xCF8–0xCFF, ECAM at 0xE000_0000 (bus 0, 1 MiB), the 32-bit MMIO window
/// 0xC000_0000–0xDFFF_FFFF where BARs are placed (and 0xFE10_0000–0xFEBF_FFFF, where firmware moves them), an I/O-port window 0xC000–0xCFFF for I/O BARs,
/// MSI routing through KVM and the INTx wiring (slot N's INTA# on GSI 16 + ((N - 1) % 8)).
final class MachinePCI: Sendable {
    /// The 32-bit MMIO window where BARs live.
    static let mmioWindowBase: UInt64 = 0xC000_0000
    /// Size of the MMIO window.
    static let mmioWindowSize: UInt64 = 0x2000_0000
    /// The top of the PCI hole, below the I/O APIC, where firmware places BARs (SeaBIOS allocates
    /// down from 0xFEC0_0000); above the PVM fix-up pages and the page whose MMIO exit is the fix-up's
    /// trampoline (0xFE00_0000, which no bus device may claim). Both windows are in the DSDT's `_CRS`.
    static let firmwareWindowBase: UInt64 = 0xFE10_0000
    /// Size of the firmware's window.
    static let firmwareWindowSize: UInt64 = 0xB0_0000
    /// ECAM base (bus 0 only).
    static let ecamBase: UInt64 = 0xE000_0000
    /// The I/O-port window for I/O BARs.
    static let ioWindowBase: UInt64 = 0xC000
    /// Size of the I/O-port window.
    static let ioWindowSize: UInt64 = 0x1000

    /// The IOAPIC GSI of slot `slot`'s INTA#: 16 + ((slot - 1) % 8).
    static func intxGSI(slot: Int) -> UInt32 { UInt32(16 + ((slot - 1) % 8)) }

    let root = PCIRoot()
    /// Ports 0xCF8–0xCFF (its address latch is saved in snapshots).
    let mechanism1: PCIConfigMechanism1
    let msi: KVMMSIController
    private let vm: VirtualMachine
    private let logger: Logger
    private let allocators: Mutex<(memory: PCIAddressAllocator, io: PCIAddressAllocator?)>
    private let intxLines: [SharedInterruptLine]

    /// Builds the bus and inserts its windows on `ioBus` and `mmioBus`.
    init(vm: VirtualMachine, ioBus: Bus, mmioBus: Bus, logger: Logger) throws {
        self.vm = vm
        self.logger = logger
        msi = KVMMSIController(vm: vm, logger: logger)
        mechanism1 = PCIConfigMechanism1(root: root)
        intxLines = (16..<24).map { SharedInterruptLine(wire: KVMInterruptLine(vm: vm, gsi: UInt32($0))) }
        try ioBus.insert(mechanism1, base: PCIConfigMechanism1.base, length: PCIConfigMechanism1.portCount)
        try mmioBus.insert(PCIECAM(root: root), base: Self.ecamBase, length: PCIECAM.busSize)
        try mmioBus.insert(PCIBARWindow(root: root, space: .memory, base: Self.mmioWindowBase),
                           base: Self.mmioWindowBase, length: Self.mmioWindowSize)
        try mmioBus.insert(PCIBARWindow(root: root, space: .memory, base: Self.firmwareWindowBase),
                           base: Self.firmwareWindowBase, length: Self.firmwareWindowSize)
        var io: PCIAddressAllocator? = nil
        do {
            try ioBus.insert(PCIBARWindow(root: root, space: .io, base: Self.ioWindowBase),
                             base: Self.ioWindowBase, length: Self.ioWindowSize)
            io = PCIAddressAllocator(base: Self.ioWindowBase, size: Self.ioWindowSize)
        } catch {
            logger.info("PCI: no I/O window for I/O BARs: \(error)")
        }
        allocators = Mutex((PCIAddressAllocator(base: Self.mmioWindowBase, size: Self.mmioWindowSize), io))
    }

    /// Puts `device` in the next slot, places its BARs, wires its INTA#.
    func attach(_ device: any PCIDevice) throws -> (slot: Int, intx: any InterruptLine) {
        let slot = try root.attach(device)
        try allocators.withLock { a in try root.placeBARs(slot: slot, memory: &a.memory, io: &a.io) }
        let gsi = Self.intxGSI(slot: slot)
        let cfg = device.configuration
        cfg.setInterrupt(line: UInt8(gsi), pin: 1)
        cfg.attachINTx(intxLines[Int(gsi) - 16].member())
        let bars = root.decodedBARs(slot: slot).map { "BAR\($0.index) 0x\(String($0.address, radix: 16))+0x\(String($0.size, radix: 16))" }
        logger.debug("PCI 00:\(String(format2: slot)).0 \(String(cfg.vendorID, radix: 16)):\(String(cfg.deviceID, radix: 16)) INTA# GSI \(gsi) \(bars.joined(separator: " "))")
        return (slot, PCIINTxLine(configuration: cfg))
    }
}

private extension String {
    init(format2 v: Int) { self = v < 16 ? "0" + String(v, radix: 16) : String(v, radix: 16) }
}

/// MSI delivery through KVM: each vector gets a GSI from 24 up with an irqfd on its own
/// eventfd; programming a vector rewrites the whole routing table (the default PIC/IOAPIC
/// routes for GSI 0–23 plus one MSI route per programmed vector). `fire()` is an eventfd write.
final class KVMMSIController: MSIController {
    /// First GSI used for MSI routes.
    static let firstGSI: UInt32 = 24
    /// Number of MSI GSIs available (KVM allows 4096 routes in all).
    static let maxVectors = 2048

    private let vm: VirtualMachine
    private let logger: Logger
    private let state = Mutex<(next: UInt32, routes: [UInt32: GSIRoute])>((next: KVMMSIController.firstGSI, routes: [:]))

    init(vm: VirtualMachine, logger: Logger) {
        self.vm = vm
        self.logger = logger
    }

    func makeVector() throws -> any MSIVector {
        let gsi = try state.withLock { s -> UInt32 in
            guard s.next < Self.firstGSI + UInt32(Self.maxVectors) else {
                throw VMMError.invalidValue(what: "MSI vectors", value: "\(Self.maxVectors + 1)",
                                            reason: "at most \(Self.maxVectors) MSI-X vectors are routed")
            }
            defer { s.next += 1 }
            return s.next
        }
        let event = try EventFD()
        try vm.registerIRQFD(fd: event.fd, gsi: gsi)
        return KVMMSIVector(controller: self, gsi: gsi, event: event)
    }

    /// Sets `gsi`'s MSI route and installs the table.
    func program(gsi: UInt32, address: UInt64, data: UInt32) {
        state.withLock { s in
            s.routes[gsi] = .msi(gsi: gsi, address: address, data: data)
            let table = GSIRoute.defaultIRQChipRoutes + s.routes.keys.sorted().compactMap { s.routes[$0] }
            do {
                try vm.setGSIRouting(table)
            } catch {
                logger.error("MSI route for GSI \(gsi) (address 0x\(String(address, radix: 16)), data 0x\(String(data, radix: 16))) not installed: \(error)")
            }
        }
    }

    /// The MSI routes installed, by GSI.
    var routes: [UInt32: GSIRoute] { state.withLock { $0.routes } }
}

/// One MSI vector: a GSI with an irqfd.
final class KVMMSIVector: MSIVector {
    let gsi: UInt32
    private let controller: KVMMSIController
    private let event: EventFD

    init(controller: KVMMSIController, gsi: UInt32, event: EventFD) {
        self.controller = controller
        self.gsi = gsi
        self.event = event
    }

    func program(address: UInt64, data: UInt32) { controller.program(gsi: gsi, address: address, data: data) }
    func fire() { event.signal() }
    // Closing the eventfd (when this vector is freed) makes KVM detach the irqfd.
}

extension Machine {
    /// Attaches a PCI device during `init` (before the vCPUs run): next free slot from 1, BARs
    /// placed naturally aligned in 0xC000_0000–0xDFFF_FFFF (I/O BARs in 0xC000–0xCFFF),
    /// Interrupt Line = GSI 16 + ((slot - 1) % 8), Interrupt Pin = INTA#. Returns the slot and the
    /// INTx line the device drives (level; gated by the guest's Interrupt Disable bit).
    public func attachPCIDevice(_ d: any PCIDevice) throws -> (slot: Int, intx: any InterruptLine) {
        try pci.attach(d)
    }

    /// The MSI controller devices use for their MSI-X tables (GSI routes from 24 + irqfd).
    public var msiController: any MSIController { pci.msi }

    /// The PCI root (for inspection and tests).
    public var pciRoot: PCIRoot { pci.root }
}
