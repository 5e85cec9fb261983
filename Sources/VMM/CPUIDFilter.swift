import KVM

/// Builds the CPUID table a vCPU sees from what KVM supports.
public enum CPUIDFilter {
    /// CPUID.1:ECX bit 13, CMPXCHG16B (`lock cmpxchg16b` fails to emulate on PVM hosts).
    public static let cx16Bit: UInt32 = 1 << 13
    /// CPUID.1:ECX bit 31, "running under a hypervisor".
    public static let hypervisorBit: UInt32 = 1 << 31
    /// CPUID.1:EDX bit 28, HTT (the logical-processor count in EBX[23:16] is valid).
    public static let httBit: UInt32 = 1 << 28

    /// Returns `supported` adjusted for vCPU `apicID` of `cpuCount`:
    /// - leaf 1: EBX[31:24] = APIC id, EBX[23:16] = logical processor count, HTT set when > 1,
    ///   the hypervisor bit set, CX16 cleared when `hideCX16`;
    /// - leaves 0xB and 0x1F: EDX = x2APIC id on every subleaf;
    /// - then every mask of `masks` clears its bits.
    public static func filter(_ supported: [kvm_cpuid_entry2], apicID: UInt32, cpuCount: Int,
                              hideCX16: Bool, masks: [CPUIDMask] = []) -> [kvm_cpuid_entry2] {
        var entries = supported
        for i in entries.indices {
            switch entries[i].function {
            case 1:
                var ebx = entries[i].ebx & 0x0000_ffff
                ebx |= (apicID & 0xff) << 24
                ebx |= UInt32(min(max(cpuCount, 1), 255)) << 16
                entries[i].ebx = ebx
                if cpuCount > 1 { entries[i].edx |= httBit } else { entries[i].edx &= ~httBit }
                entries[i].ecx |= hypervisorBit
                if hideCX16 { entries[i].ecx &= ~cx16Bit }
            case 0xB, 0x1F:
                entries[i].edx = apicID
            default:
                break
            }
        }
        for m in masks {
            for i in entries.indices where entries[i].function == m.leaf && (m.subleaf == nil || entries[i].index == m.subleaf) {
                switch m.register {
                case .eax: entries[i].eax &= ~m.mask
                case .ebx: entries[i].ebx &= ~m.mask
                case .ecx: entries[i].ecx &= ~m.mask
                case .edx: entries[i].edx &= ~m.mask
                }
            }
        }
        return entries
    }
}
