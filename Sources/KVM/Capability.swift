import CKVM

/// KVM capabilities SwiftKVM queries with `KVM_CHECK_EXTENSION` (numbers from `<linux/kvm.h>`).
public enum Capability: CaseIterable, Sendable, CustomStringConvertible {
    case irqchip
    case hlt
    case userMemory
    case setTSSAddress
    case extCPUID
    case nrVCPUs
    case nrMemslots
    case pit
    case syncMMU
    case coalescedMMIO
    case pit2
    case setIdentityMapAddress
    case irqfd
    case ioeventfd
    case pitState2
    case vcpuEvents
    case xsave
    case tscDeadlineTimer
    case maxVCPUs
    case signalMSI
    case readonlyMem
    case immediateExit
    case splitIRQChip
    case x86UserSpaceMSR
    case x86MSRFilter
    case syncRegs
    case internalErrorData
    case maxVCPUID

    /// The `KVM_CAP_*` number.
    public var rawValue: Int32 {
        switch self {
        case .irqchip: return KVM_CAP_IRQCHIP
        case .hlt: return KVM_CAP_HLT
        case .userMemory: return KVM_CAP_USER_MEMORY
        case .setTSSAddress: return KVM_CAP_SET_TSS_ADDR
        case .extCPUID: return KVM_CAP_EXT_CPUID
        case .nrVCPUs: return KVM_CAP_NR_VCPUS
        case .nrMemslots: return KVM_CAP_NR_MEMSLOTS
        case .pit: return KVM_CAP_PIT
        case .syncMMU: return KVM_CAP_SYNC_MMU
        case .coalescedMMIO: return KVM_CAP_COALESCED_MMIO
        case .pit2: return KVM_CAP_PIT2
        case .setIdentityMapAddress: return KVM_CAP_SET_IDENTITY_MAP_ADDR
        case .irqfd: return KVM_CAP_IRQFD
        case .ioeventfd: return KVM_CAP_IOEVENTFD
        case .pitState2: return KVM_CAP_PIT_STATE2
        case .vcpuEvents: return KVM_CAP_VCPU_EVENTS
        case .xsave: return KVM_CAP_XSAVE
        case .tscDeadlineTimer: return KVM_CAP_TSC_DEADLINE_TIMER
        case .maxVCPUs: return KVM_CAP_MAX_VCPUS
        case .signalMSI: return KVM_CAP_SIGNAL_MSI
        case .readonlyMem: return KVM_CAP_READONLY_MEM
        case .immediateExit: return KVM_CAP_IMMEDIATE_EXIT
        case .splitIRQChip: return KVM_CAP_SPLIT_IRQCHIP
        case .x86UserSpaceMSR: return KVM_CAP_X86_USER_SPACE_MSR
        case .x86MSRFilter: return KVM_CAP_X86_MSR_FILTER
        case .syncRegs: return KVM_CAP_SYNC_REGS
        case .internalErrorData: return KVM_CAP_INTERNAL_ERROR_DATA
        case .maxVCPUID: return KVM_CAP_MAX_VCPU_ID
        }
    }

    /// The `KVM_CAP_*` name.
    public var description: String {
        switch self {
        case .irqchip: return "KVM_CAP_IRQCHIP"
        case .hlt: return "KVM_CAP_HLT"
        case .userMemory: return "KVM_CAP_USER_MEMORY"
        case .setTSSAddress: return "KVM_CAP_SET_TSS_ADDR"
        case .extCPUID: return "KVM_CAP_EXT_CPUID"
        case .nrVCPUs: return "KVM_CAP_NR_VCPUS"
        case .nrMemslots: return "KVM_CAP_NR_MEMSLOTS"
        case .pit: return "KVM_CAP_PIT"
        case .syncMMU: return "KVM_CAP_SYNC_MMU"
        case .coalescedMMIO: return "KVM_CAP_COALESCED_MMIO"
        case .pit2: return "KVM_CAP_PIT2"
        case .setIdentityMapAddress: return "KVM_CAP_SET_IDENTITY_MAP_ADDR"
        case .irqfd: return "KVM_CAP_IRQFD"
        case .ioeventfd: return "KVM_CAP_IOEVENTFD"
        case .pitState2: return "KVM_CAP_PIT_STATE2"
        case .vcpuEvents: return "KVM_CAP_VCPU_EVENTS"
        case .xsave: return "KVM_CAP_XSAVE"
        case .tscDeadlineTimer: return "KVM_CAP_TSC_DEADLINE_TIMER"
        case .maxVCPUs: return "KVM_CAP_MAX_VCPUS"
        case .signalMSI: return "KVM_CAP_SIGNAL_MSI"
        case .readonlyMem: return "KVM_CAP_READONLY_MEM"
        case .immediateExit: return "KVM_CAP_IMMEDIATE_EXIT"
        case .splitIRQChip: return "KVM_CAP_SPLIT_IRQCHIP"
        case .x86UserSpaceMSR: return "KVM_CAP_X86_USER_SPACE_MSR"
        case .x86MSRFilter: return "KVM_CAP_X86_MSR_FILTER"
        case .syncRegs: return "KVM_CAP_SYNC_REGS"
        case .internalErrorData: return "KVM_CAP_INTERNAL_ERROR_DATA"
        case .maxVCPUID: return "KVM_CAP_MAX_VCPU_ID"
        }
    }
}
