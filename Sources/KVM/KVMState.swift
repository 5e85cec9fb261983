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


/// `KVM_GET_*` of a struct: a zeroed `T` filled by the kernel.
func ioctlGet<T>(_ fd: Int32, _ request: UInt, _ zero: T, _ name: String) throws -> T {
    var v = zero
    try ioctlStruct(fd, request, &v, name)
    return v
}

/// `KVM_SET_*` of a struct.
func ioctlSet<T>(_ fd: Int32, _ request: UInt, _ value: T, _ name: String) throws {
    var v = value
    try ioctlStruct(fd, request, &v, name)
}

extension VCPU {
    /// `KVM_GET_XSAVE` (the 4 KiB legacy XSAVE area: x87, SSE, AVX state).
    public func getXSAVE() throws -> kvm_xsave { try ioctlGet(fd, CKVM_GET_XSAVE, kvm_xsave(), "KVM_GET_XSAVE") }

    /// `KVM_SET_XSAVE`.
    public func setXSAVE(_ xsave: kvm_xsave) throws { try ioctlSet(fd, CKVM_SET_XSAVE, xsave, "KVM_SET_XSAVE") }

    /// `KVM_GET_XCRS` (XCR0).
    public func getXCRS() throws -> kvm_xcrs { try ioctlGet(fd, CKVM_GET_XCRS, kvm_xcrs(), "KVM_GET_XCRS") }

    /// `KVM_SET_XCRS`.
    public func setXCRS(_ xcrs: kvm_xcrs) throws { try ioctlSet(fd, CKVM_SET_XCRS, xcrs, "KVM_SET_XCRS") }

    /// `KVM_GET_DEBUGREGS` (DR0–3, DR6, DR7).
    public func getDebugRegs() throws -> kvm_debugregs { try ioctlGet(fd, CKVM_GET_DEBUGREGS, kvm_debugregs(), "KVM_GET_DEBUGREGS") }

    /// `KVM_SET_DEBUGREGS`.
    public func setDebugRegs(_ regs: kvm_debugregs) throws { try ioctlSet(fd, CKVM_SET_DEBUGREGS, regs, "KVM_SET_DEBUGREGS") }

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
    public func setIRQChip(_ chip: kvm_irqchip) throws { try ioctlSet(fd, CKVM_SET_IRQCHIP, chip, "KVM_SET_IRQCHIP(\(chip.chip_id))") }

    /// `KVM_GET_PIT2`.
    public func getPIT2() throws -> kvm_pit_state2 { try ioctlGet(fd, CKVM_GET_PIT2, kvm_pit_state2(), "KVM_GET_PIT2") }

    /// `KVM_SET_PIT2`.
    public func setPIT2(_ state: kvm_pit_state2) throws { try ioctlSet(fd, CKVM_SET_PIT2, state, "KVM_SET_PIT2") }

    /// `KVM_GET_CLOCK` (kvmclock's base).
    public func getClock() throws -> kvm_clock_data { try ioctlGet(fd, CKVM_GET_CLOCK, kvm_clock_data(), "KVM_GET_CLOCK") }

    /// `KVM_SET_CLOCK` (only the clock value and the flags KVM accepts back are used).
    public func setClock(_ clock: kvm_clock_data) throws {
        var c = kvm_clock_data()
        c.clock = clock.clock
        try ioctlStruct(fd, CKVM_SET_CLOCK, &c, "KVM_SET_CLOCK")
    }
}
