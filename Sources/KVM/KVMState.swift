import CKVM
#if canImport(Glibc)
import Glibc
#endif

// State save and restore (snapshots and migration): the vCPU's extended state and the VM-wide
// interrupt controllers, timer and clock. KVM structs are handed over as they are; `KVMBlob`
// turns one into bytes and back, checking the size.

/// The bytes of a C-imported KVM struct, and back.
public enum KVMBlob {
    /// The raw bytes of `value`.
    public static func bytes<T>(of value: T) -> [UInt8] {
        withUnsafeBytes(of: value) { Array($0) }
    }

    /// A `T` from exactly `MemoryLayout<T>.size` bytes; nil when the size differs.
    public static func value<T>(_ type: T.Type, from bytes: [UInt8], zero: T) -> T? {
        guard bytes.count == MemoryLayout<T>.size else { return nil }
        var v = zero
        withUnsafeMutableBytes(of: &v) { $0.copyMemory(from: UnsafeRawBufferPointer(start: bytes, count: bytes.count)) }
        return v
    }
}

extension VCPU {
    /// `KVM_GET_XSAVE` (the 4 KiB legacy XSAVE area: x87, SSE, AVX state).
    public func getXSAVE() throws -> kvm_xsave {
        var x = kvm_xsave()
        try ioctlStruct(fd, CKVM_GET_XSAVE, &x, "KVM_GET_XSAVE")
        return x
    }

    /// `KVM_SET_XSAVE`.
    public func setXSAVE(_ xsave: kvm_xsave) throws {
        var x = xsave
        try ioctlStruct(fd, CKVM_SET_XSAVE, &x, "KVM_SET_XSAVE")
    }

    /// `KVM_GET_XCRS` (XCR0).
    public func getXCRS() throws -> kvm_xcrs {
        var x = kvm_xcrs()
        try ioctlStruct(fd, CKVM_GET_XCRS, &x, "KVM_GET_XCRS")
        return x
    }

    /// `KVM_SET_XCRS`.
    public func setXCRS(_ xcrs: kvm_xcrs) throws {
        var x = xcrs
        try ioctlStruct(fd, CKVM_SET_XCRS, &x, "KVM_SET_XCRS")
    }

    /// `KVM_GET_DEBUGREGS` (DR0–3, DR6, DR7).
    public func getDebugRegs() throws -> kvm_debugregs {
        var d = kvm_debugregs()
        try ioctlStruct(fd, CKVM_GET_DEBUGREGS, &d, "KVM_GET_DEBUGREGS")
        return d
    }

    /// `KVM_SET_DEBUGREGS`.
    public func setDebugRegs(_ regs: kvm_debugregs) throws {
        var d = regs
        try ioctlStruct(fd, CKVM_SET_DEBUGREGS, &d, "KVM_SET_DEBUGREGS")
    }

    /// `KVM_GET_TSC_KHZ`: the vCPU's TSC rate.
    public func tscKHz() throws -> UInt32 {
        UInt32(try ioctlValue(fd, CKVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ"))
    }
}

extension VirtualMachine {
    /// In-kernel interrupt controller chips for `KVM_GET_IRQCHIP`/`KVM_SET_IRQCHIP`.
    public enum IRQChipID: UInt32, Sendable, CaseIterable {
        case picMaster = 0, picSlave = 1, ioapic = 2
    }

    /// `KVM_GET_IRQCHIP` for one chip.
    public func getIRQChip(_ id: IRQChipID) throws -> kvm_irqchip {
        var c = kvm_irqchip()
        c.chip_id = id.rawValue
        try ioctlStruct(fd, CKVM_GET_IRQCHIP, &c, "KVM_GET_IRQCHIP(\(id))")
        return c
    }

    /// `KVM_SET_IRQCHIP` (the chip is the one named inside `chip`).
    public func setIRQChip(_ chip: kvm_irqchip) throws {
        var c = chip
        try ioctlStruct(fd, CKVM_SET_IRQCHIP, &c, "KVM_SET_IRQCHIP(\(c.chip_id))")
    }

    /// `KVM_GET_PIT2`.
    public func getPIT2() throws -> kvm_pit_state2 {
        var p = kvm_pit_state2()
        try ioctlStruct(fd, CKVM_GET_PIT2, &p, "KVM_GET_PIT2")
        return p
    }

    /// `KVM_SET_PIT2`.
    public func setPIT2(_ state: kvm_pit_state2) throws {
        var p = state
        try ioctlStruct(fd, CKVM_SET_PIT2, &p, "KVM_SET_PIT2")
    }

    /// `KVM_GET_CLOCK` (kvmclock's base).
    public func getClock() throws -> kvm_clock_data {
        var c = kvm_clock_data()
        try ioctlStruct(fd, CKVM_GET_CLOCK, &c, "KVM_GET_CLOCK")
        return c
    }

    /// `KVM_SET_CLOCK` (only the clock value and the flags KVM accepts back are used).
    public func setClock(_ clock: kvm_clock_data) throws {
        var c = kvm_clock_data()
        c.clock = clock.clock
        try ioctlStruct(fd, CKVM_SET_CLOCK, &c, "KVM_SET_CLOCK")
    }
}
