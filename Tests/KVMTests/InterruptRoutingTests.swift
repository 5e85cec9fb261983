import CKVM
import Foundation
import Testing
@testable import KVM

@Suite("GSI routing tables without /dev/kvm")
struct GSIRouteTableTests {
    @Test("the default table routes GSI 0–15 to the PICs and 0–23 to the IOAPIC, like KVM's own")
    func defaultTable() {
        let routes = GSIRoute.defaultIRQChipRoutes
        #expect(routes.count == 16 + 24)
        #expect(routes.contains(.irqchip(gsi: 0, chip: GSIRoute.picMaster, pin: 0)))
        #expect(routes.contains(.irqchip(gsi: 9, chip: GSIRoute.picSlave, pin: 1)))
        #expect(routes.contains(.irqchip(gsi: 23, chip: GSIRoute.ioapic, pin: 23)))
        #expect(!routes.contains { $0.gsi >= 24 })
        #expect(Set(routes.filter { if case .irqchip(_, 2, _) = $0 { true } else { false } }.map(\.gsi)) == Set(0..<24))
        #expect(GSIRoute.msi(gsi: 30, address: 0xfee0_0000, data: 0x41).gsi == 30)
    }
}

@Suite("GSI routing, irqfd and MSI injection on /dev/kvm", .enabled(if: hasKVM, "needs /dev/kvm"))
struct InterruptRoutingKVMTests {
    func vmWithIRQChip() throws -> VirtualMachine {
        let vm = try KVMSystem().createVM()
        try vm.createIRQChip()
        return vm
    }

    @Test("KVM accepts the default table plus MSI routes, and an irqfd on an MSI GSI")
    func routingAndIRQFD() throws {
        let vm = try vmWithIRQChip()
        try vm.setGSIRouting(GSIRoute.defaultIRQChipRoutes + [.msi(gsi: 24, address: 0xfee0_0000, data: 0x4041),
                                                               .msi(gsi: 25, address: 0xfee0_1000, data: 0x22)])
        let efd = ckvm_eventfd(0, O_NONBLOCK | O_CLOEXEC)
        try #require(efd >= 0)
        defer { close(efd) }
        try vm.registerIRQFD(fd: efd, gsi: 24)
        // The same eventfd cannot be attached twice.
        #expect(throws: KVMError.self) { try vm.registerIRQFD(fd: efd, gsi: 25) }
        try vm.unregisterIRQFD(fd: efd, gsi: 24)
        try vm.registerIRQFD(fd: efd, gsi: 25)
        try vm.unregisterIRQFD(fd: efd, gsi: 25)
        // A level-triggered irqfd with a resample fd on an IOAPIC GSI.
        let rfd = ckvm_eventfd(0, O_NONBLOCK | O_CLOEXEC)
        try #require(rfd >= 0)
        defer { close(rfd) }
        try vm.registerIRQFD(fd: efd, gsi: 16, resampleFD: rfd)
        try vm.unregisterIRQFD(fd: efd, gsi: 16)
    }

    @Test("bad input fails with a KVMError naming the ioctl")
    func badInput() throws {
        let vm = try vmWithIRQChip()
        do {
            try vm.registerIRQFD(fd: -1, gsi: 24)
            Issue.record("irqfd on fd -1 succeeded")
        } catch let e as KVMError {
            #expect(e.operation.hasPrefix("KVM_IRQFD"))
            #expect(e.errno == EBADF)
        }
        let tooMany = (0..<5000).map { GSIRoute.msi(gsi: UInt32($0), address: 0xfee0_0000, data: 0) }
        #expect(throws: KVMError.self) { try vm.setGSIRouting(tooMany) }
        // An IOAPIC pin that does not exist.
        #expect(throws: KVMError.self) { try vm.setGSIRouting([.irqchip(gsi: 0, chip: 2, pin: 99)]) }
    }

    @Test("KVM_SIGNAL_MSI delivers a message without a route: its vector shows in the target LAPIC's IRR")
    func signalMSI() throws {
        let vm = try vmWithIRQChip()
        let vcpu = try vm.createVCPU(id: 0)
        let vector = 0x30
        func irrBit(_ state: kvm_lapic_state) -> Bool {
            // IRR: eight 32-bit registers at 0x200, 0x210, …; vector v is bit v % 32 of register v / 32.
            withUnsafeBytes(of: state.regs) { $0.load(fromByteOffset: 0x200 + (vector / 32) * 0x10, as: UInt32.self) } &
                (1 << UInt32(vector % 32)) != 0
        }
        // A software-disabled LAPIC (SVR bit 8 clear, as after reset) accepts no fixed interrupt.
        #expect(try vm.signalMSI(address: 0xfee0_0000, data: UInt32(vector)) == false)
        #expect(!irrBit(try vcpu.getLAPIC()))
        // Enable it (SVR = 0x1ff: enabled, spurious vector 0xff); the message to APIC ID 0 is delivered.
        var lapic = try vcpu.getLAPIC()
        withUnsafeMutableBytes(of: &lapic.regs) { $0.storeBytes(of: UInt32(0x1ff), toByteOffset: 0xf0, as: UInt32.self) }
        try vcpu.setLAPIC(lapic)
        #expect(try vm.signalMSI(address: 0xfee0_0000, data: UInt32(vector)) == true)
        #expect(irrBit(try vcpu.getLAPIC()), "vector 0x30 not pending in the LAPIC's IRR after KVM_SIGNAL_MSI")
    }
}
