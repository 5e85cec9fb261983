import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// One entry of the VM's GSI routing table (`KVM_SET_GSI_ROUTING`).
public enum GSIRoute: Sendable, Equatable {
    /// In-kernel interrupt controller `chip` (0 = PIC master, 1 = PIC slave, 2 = IOAPIC), `pin`.
    case irqchip(gsi: UInt32, chip: UInt32, pin: UInt32)
    /// An MSI message: writing `data` to `address`.
    case msi(gsi: UInt32, address: UInt64, data: UInt32)

    /// The PIC master chip number.
    public static let picMaster: UInt32 = 0
    /// The PIC slave chip number.
    public static let picSlave: UInt32 = 1
    /// The IOAPIC chip number.
    public static let ioapic: UInt32 = 2
    /// Number of IOAPIC pins of KVM's in-kernel IOAPIC.
    public static let ioapicPins: UInt32 = 24

    /// The GSI this entry routes.
    public var gsi: UInt32 {
        switch self {
        case .irqchip(let g, _, _), .msi(let g, _, _): return g
        }
    }

    /// The table KVM installs by default with `KVM_CREATE_IRQCHIP`: GSI 0–7 to PIC master pins
    /// 0–7, GSI 8–15 to PIC slave pins 0–7, and GSI 0–23 to IOAPIC pins 0–23. Since
    /// `KVM_SET_GSI_ROUTING` replaces the whole table, every table set must start with these or
    /// legacy interrupts stop working.
    public static var defaultIRQChipRoutes: [GSIRoute] {
        var routes: [GSIRoute] = []
        for gsi in UInt32(0)..<ioapicPins {
            if gsi < 8 { routes.append(.irqchip(gsi: gsi, chip: picMaster, pin: gsi)) }
            else if gsi < 16 { routes.append(.irqchip(gsi: gsi, chip: picSlave, pin: gsi - 8)) }
            routes.append(.irqchip(gsi: gsi, chip: ioapic, pin: gsi))
        }
        return routes
    }
}

extension VirtualMachine {
    /// Largest routing table accepted here (KVM's own limit is `KVM_MAX_IRQ_ROUTES`, 4096).
    public static let maxGSIRoutes = 4096

    /// `KVM_SET_GSI_ROUTING`: replaces the VM's whole GSI routing table with `routes`
    /// (include `GSIRoute.defaultIRQChipRoutes`).
    public func setGSIRouting(_ routes: [GSIRoute]) throws {
        guard routes.count <= Self.maxGSIRoutes else {
            throw KVMError(operation: "KVM_SET_GSI_ROUTING", errno: EINVAL,
                           detail: "\(routes.count) routes, at most \(Self.maxGSIRoutes)")
        }
        let header = MemoryLayout<kvm_irq_routing>.size
        let stride = MemoryLayout<kvm_irq_routing_entry>.stride
        let size = header + stride * max(routes.count, 1)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        // SAFETY: `buffer` holds a kvm_irq_routing header followed by `routes.count` entries
        // (the C flexible array member); it is zeroed and outlives the ioctl.
        var routing = kvm_irq_routing()
        routing.nr = UInt32(routes.count)
        routing.flags = 0
        buffer.storeBytes(of: routing, as: kvm_irq_routing.self)
        for (i, route) in routes.enumerated() {
            var e = kvm_irq_routing_entry()
            switch route {
            case .irqchip(let gsi, let chip, let pin):
                e.gsi = gsi
                e.type = UInt32(KVM_IRQ_ROUTING_IRQCHIP)
                e.u.irqchip.irqchip = chip
                e.u.irqchip.pin = pin
            case .msi(let gsi, let address, let data):
                e.gsi = gsi
                e.type = UInt32(KVM_IRQ_ROUTING_MSI)
                e.u.msi.address_lo = UInt32(truncatingIfNeeded: address)
                e.u.msi.address_hi = UInt32(truncatingIfNeeded: address >> 32)
                e.u.msi.data = data
            }
            (buffer + header + i * stride).storeBytes(of: e, as: kvm_irq_routing_entry.self)
        }
        try ioctlPointer(fd, CKVM_SET_GSI_ROUTING, buffer, "KVM_SET_GSI_ROUTING(\(routes.count) routes)")
    }

    /// `KVM_IRQFD`: a write to eventfd `fd` injects GSI `gsi`. With `resampleFD`, the GSI is
    /// treated as level-triggered: KVM deasserts it on the guest's EOI and signals `resampleFD`.
    public func registerIRQFD(fd eventFD: Int32, gsi: UInt32, resampleFD: Int32? = nil) throws {
        var irqfd = kvm_irqfd()
        irqfd.fd = UInt32(bitPattern: eventFD)
        irqfd.gsi = gsi
        if let resampleFD {
            irqfd.flags = UInt32(KVM_IRQFD_FLAG_RESAMPLE)
            irqfd.resamplefd = UInt32(bitPattern: resampleFD)
        }
        try ioctlStruct(fd, CKVM_IRQFD, &irqfd, "KVM_IRQFD(fd \(eventFD), gsi \(gsi))")
    }

    /// `KVM_IRQFD` with `KVM_IRQFD_FLAG_DEASSIGN`: detaches eventfd `fd` from GSI `gsi`.
    public func unregisterIRQFD(fd eventFD: Int32, gsi: UInt32) throws {
        var irqfd = kvm_irqfd()
        irqfd.fd = UInt32(bitPattern: eventFD)
        irqfd.gsi = gsi
        irqfd.flags = UInt32(KVM_IRQFD_FLAG_DEASSIGN)
        try ioctlStruct(fd, CKVM_IRQFD, &irqfd, "KVM_IRQFD deassign (fd \(eventFD), gsi \(gsi))")
    }

    /// `KVM_SIGNAL_MSI`: injects one MSI message directly. Returns false when the guest
    /// blocked it (e.g. the destination's LAPIC is disabled).
    @discardableResult
    public func signalMSI(address: UInt64, data: UInt32) throws -> Bool {
        var msi = kvm_msi()
        msi.address_lo = UInt32(truncatingIfNeeded: address)
        msi.address_hi = UInt32(truncatingIfNeeded: address >> 32)
        msi.data = data
        return try ioctlStruct(fd, CKVM_SIGNAL_MSI, &msi, "KVM_SIGNAL_MSI(0x\(String(address, radix: 16)), 0x\(String(data, radix: 16)))") > 0
    }
}
