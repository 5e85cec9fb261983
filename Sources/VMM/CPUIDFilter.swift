import KVM

/// Builds the CPUID table a vCPU sees from what KVM supports.
public enum CPUIDFilter {
    /// CPUID.1:ECX bit 13, CMPXCHG16B (`lock cmpxchg16b` fails to emulate on PVM hosts).
    public static let cx16Bit: UInt32 = 1 << 13
    /// CPUID.1:ECX bit 31, "running under a hypervisor".
    public static let hypervisorBit: UInt32 = 1 << 31
    /// CPUID.1:EDX bit 28, HTT (the logical-processor count in EBX[23:16] is valid).
    public static let httBit: UInt32 = 1 << 28

    /// Returns `supported` adjusted for vCPU `apicID` of `cpuCount` (one package of `cpuCount`
    /// cores with one thread each, APIC ID = core number):
    /// - leaf 1: EBX[31:24] = APIC id, EBX[23:16] = logical processor count, HTT set when > 1,
    ///   the hypervisor bit set, CX16 cleared when `hideCX16`;
    /// - leaf 4 (Intel caches) and 0x8000001D (AMD caches): cores per package - 1 in EAX[31:26]
    ///   (leaf 4), and one thread per L1/L2 cache, all cores sharing the L3;
    /// - leaves 0xB and 0x1F (when KVM reports them): an SMT level of 1 thread and a core level
    ///   of `cpuCount` cores, EDX = x2APIC id on every subleaf;
    /// - 0x80000001 ECX CmpLegacy (AMD) when > 1 core, 0x80000008 ECX NC = count - 1 and
    ///   ApicIdSize, 0x8000001E: extended APIC id, core id = APIC id, one thread per core, node 0;
    /// - then every mask of `masks` clears its bits.
    public static func filter(_ supported: [kvm_cpuid_entry2], apicID: UInt32, cpuCount: Int,
                              hideCX16: Bool, masks: [CPUIDMask] = []) -> [kvm_cpuid_entry2] {
        let count = UInt32(min(max(cpuCount, 1), 255))
        let coreBits = UInt32(count <= 1 ? 0 : 32 - (count - 1).leadingZeroBitCount)   // ceil(log2(count))
        let isAMD = supported.first(where: { $0.function == 0 })?.ebx == 0x6874_7541        // "Auth"
        var entries: [kvm_cpuid_entry2] = []
        var topologyLeaves: Set<UInt32> = []
        for var e in supported {
            switch e.function {
            case 1:
                var ebx = e.ebx & 0x0000_ffff
                ebx |= (apicID & 0xff) << 24
                ebx |= count << 16
                e.ebx = ebx
                if count > 1 { e.edx |= httBit } else { e.edx &= ~httBit }
                e.ecx |= hypervisorBit
                if hideCX16 { e.ecx &= ~cx16Bit }
            case 4, 0x8000_001d:
                let type = e.eax & 0x1f, level = (e.eax >> 5) & 0x7
                if type != 0 {
                    let sharing: UInt32 = level >= 3 ? count - 1 : 0
                    e.eax = (e.eax & ~(0xfff << 14)) | (sharing << 14)
                    if e.function == 4 { e.eax = (e.eax & 0x03ff_ffff) | ((count - 1) << 26) }
                }
            case 0xB, 0x1F:
                // Replaced below by a synthesized topology.
                topologyLeaves.insert(e.function)
                continue
            case 0x8000_0001:
                if isAMD { if count > 1 { e.ecx |= 1 << 1 } else { e.ecx &= ~(1 << 1) } }
            case 0x8000_0008:
                e.ecx = (e.ecx & ~0xf0ff) | (coreBits << 12) | (count - 1)
            case 0x8000_001e:
                e.eax = apicID
                e.ebx = apicID & 0xff                      // core id; threads per core - 1 = 0
                e.ecx = 0                                  // node 0, one node per package
            default:
                break
            }
            entries.append(e)
        }
        for leaf in topologyLeaves.sorted() {
            entries += extendedTopology(leaf: leaf, apicID: apicID, count: count, coreBits: coreBits)
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

    /// Leaf 0xB/0x1F subleaves: 0 = SMT (1 thread, shift 0), 1 = core (`count` cores, shift
    /// `coreBits`), 2 = invalid (end of the list).
    static func extendedTopology(leaf: UInt32, apicID: UInt32, count: UInt32, coreBits: UInt32) -> [kvm_cpuid_entry2] {
        func entry(_ index: UInt32, eax: UInt32, ebx: UInt32, levelType: UInt32) -> kvm_cpuid_entry2 {
            var e = kvm_cpuid_entry2()
            e.function = leaf
            e.index = index
            e.flags = UInt32(KVM_CPUID_FLAG_SIGNIFCANT_INDEX)
            e.eax = eax
            e.ebx = ebx
            e.ecx = (levelType << 8) | index
            e.edx = apicID
            return e
        }
        return [entry(0, eax: 0, ebx: 1, levelType: 1),
                entry(1, eax: coreBits, ebx: count, levelType: 2),
                entry(2, eax: 0, ebx: 0, levelType: 0)]
    }
}
