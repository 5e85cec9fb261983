import GuestMemory
import KVM
import Logging

/// Host-specific fix-ups the VMM consults around KVM exits. Every method has a do-nothing default,
/// so a host without quirks (`NoHostQuirks`) changes nothing. Handlers run on vCPU threads.
public protocol HostQuirks: Sendable {
    /// A short name for logs ("pvm").
    var name: String { get }
    /// Whether CPUID.1:ECX CX16 must be hidden.
    var hidesCX16: Bool { get }
    /// Adjusts the CPUID table after the generic filter.
    func filterCPUID(_ entries: [kvm_cpuid_entry2]) -> [kvm_cpuid_entry2]
    /// VM-wide setup after the VM is created (capabilities, MSR filters…).
    func configure(vm: VirtualMachine, logger: Logger) throws
    /// A KVM internal error: return true when fixed up (the vCPU may run again).
    func handleInternalError(vcpu: VCPU, memory: GuestMemory, suberror: UInt32, data: [UInt64], logger: Logger) -> Bool
    /// A filtered MSR access (`write` nil for RDMSR): return true when handled (the handler
    /// completed the exit with `VCPU.completeMSR`).
    func handleMSR(vcpu: VCPU, memory: GuestMemory, index: UInt32, write: UInt64?, logger: Logger) -> Bool
    /// An MMIO exit no device claimed yet: return true when handled.
    func handleMMIO(vcpu: VCPU, memory: GuestMemory, address: UInt64, isWrite: Bool, logger: Logger) -> Bool
    /// Fix-up counters by name, for the exit statistics.
    var counters: [String: UInt64] { get }
    /// State a snapshot must carry (e.g. the guest's LSTAR behind the PVM SYSCALL fix-up).
    var savedState: [String: UInt64] { get }
    /// Puts back `savedState` of a snapshot.
    func restore(_ state: [String: UInt64])
}

extension HostQuirks {
    public var hidesCX16: Bool { false }
    public func filterCPUID(_ entries: [kvm_cpuid_entry2]) -> [kvm_cpuid_entry2] { entries }
    public func configure(vm: VirtualMachine, logger: Logger) throws {}
    public func handleInternalError(vcpu: VCPU, memory: GuestMemory, suberror: UInt32, data: [UInt64], logger: Logger) -> Bool { false }
    public func handleMSR(vcpu: VCPU, memory: GuestMemory, index: UInt32, write: UInt64?, logger: Logger) -> Bool { false }
    public func handleMMIO(vcpu: VCPU, memory: GuestMemory, address: UInt64, isWrite: Bool, logger: Logger) -> Bool { false }
    public var counters: [String: UInt64] { [:] }
    public var savedState: [String: UInt64] { [:] }
    public func restore(_ state: [String: UInt64]) {}
}

/// A hardware KVM host: no fix-ups.
public struct NoHostQuirks: HostQuirks {
    public init() {}
    public var name: String { "none" }
}

/// Reads the instruction bytes at a vCPU's RIP, for diagnostics and fix-ups.
public enum InstructionBytes {
    /// `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES` in the first data word of an emulation failure.
    static let instructionBytesFlag: UInt64 = 1

    /// The bytes KVM reported with an emulation failure (suberror 1), when it did.
    public static func fromExitData(suberror: UInt32, data: [UInt64]) -> [UInt8]? {
        // struct emulation_failure: flags (data[0]), insn_size (low byte of data[1]), insn_bytes[15].
        guard suberror == UInt32(KVM_INTERNAL_ERROR_EMULATION), data.count >= 3,
              data[0] & instructionBytesFlag != 0 else { return nil }
        var raw: [UInt8] = []
        for w in data.dropFirst() { for i in 0..<8 { raw.append(UInt8(truncatingIfNeeded: w >> (8 * UInt64(i)))) } }
        let size = Int(raw[0])
        guard size > 0, size <= 15, raw.count >= 1 + size else { return nil }
        return Array(raw[1...size])
    }

    /// Up to `count` bytes at CS.base + RIP, read through the guest's page tables.
    public static func atRIP(vcpu: VCPU, memory: GuestMemory, count: Int = 15) -> (rip: UInt64, bytes: [UInt8])? {
        guard let regs = try? vcpu.getRegs(), let s = try? vcpu.getSregs() else { return nil }
        let linear = s.cs.base &+ regs.rip
        let bytes = GuestPageWalker.read(linear, count: count, cr0: s.cr0, cr3: s.cr3, cr4: s.cr4, efer: s.efer, memory: memory)
        return (regs.rip, bytes)
    }

    /// Hex text of bytes ("0f 0b").
    public static func hex(_ bytes: [UInt8]) -> String {
        bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: " ")
    }
}
