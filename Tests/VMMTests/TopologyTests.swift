import KVM
import Testing
@testable import VMM

@Suite("CPU topology in CPUID")
struct CPUTopologyTests {
    func entry(_ function: UInt32, _ index: UInt32 = 0, eax: UInt32 = 0, ebx: UInt32 = 0, ecx: UInt32 = 0, edx: UInt32 = 0) -> kvm_cpuid_entry2 {
        var e = kvm_cpuid_entry2()
        e.function = function; e.index = index
        e.eax = eax; e.ebx = ebx; e.ecx = ecx; e.edx = edx
        return e
    }

    /// An AMD-like table: vendor "AuthenticAMD", leaf 0xB, cache leaves, extended leaves.
    var amd: [kvm_cpuid_entry2] {
        [entry(0, eax: 0x10, ebx: 0x6874_7541, ecx: 0x444d_4163, edx: 0x6974_6e65),
         entry(1, ebx: 0x0010_0800),
         entry(4, 0, eax: 0x121), entry(4, 3, eax: 0x163 | (15 << 14)),
         entry(0xb, 0, eax: 1, ebx: 2, ecx: 0x100, edx: 7), entry(0xb, 1, eax: 7, ebx: 64, ecx: 0x201, edx: 7),
         entry(0x8000_0001, ecx: 0x1), entry(0x8000_0008, ecx: 0x3_707f),
         entry(0x8000_001d, 0, eax: 0x121 | (1 << 14)), entry(0x8000_001d, 3, eax: 0x163 | (15 << 14)),
         entry(0x8000_001e, eax: 9, ebx: 0x109, ecx: 0x300)]
    }

    @Test("leaf 0xB describes one package of N single-thread cores with the vCPU's x2APIC ID", arguments: [1, 2, 3, 4, 32])
    func leafB(cpus: Int) throws {
        let out = CPUIDFilter.filter(amd, apicID: UInt32(cpus - 1), cpuCount: cpus, hideCX16: false)
        let b = out.filter { $0.function == 0xb }.sorted { $0.index < $1.index }
        try #require(b.count == 3)
        #expect(b.allSatisfy { $0.edx == UInt32(cpus - 1) && $0.flags & UInt32(KVM_CPUID_FLAG_SIGNIFCANT_INDEX) != 0 })
        #expect(b[0].ebx == 1 && b[0].eax == 0 && (b[0].ecx >> 8) & 0xff == 1, "SMT level: 1 thread")
        #expect(b[1].ebx == UInt32(cpus) && (b[1].ecx >> 8) & 0xff == 2, "core level: N cores")
        #expect(1 << b[1].eax >= cpus && (cpus == 1 || 1 << (b[1].eax - 1) < cpus), "shift is ceil(log2(N))")
        #expect(b[2].ebx == 0 && (b[2].ecx >> 8) & 0xff == 0, "terminating subleaf")
    }

    @Test("cache leaves: N cores per package, L1/L2 private, L3 shared by all N")
    func caches() throws {
        let out = CPUIDFilter.filter(amd, apicID: 2, cpuCount: 4, hideCX16: false)
        let l1 = try #require(out.first { $0.function == 4 && $0.index == 0 })
        let l3 = try #require(out.first { $0.function == 4 && $0.index == 3 })
        #expect(l1.eax >> 26 == 3 && (l1.eax >> 14) & 0xfff == 0 && l1.eax & 0x3fff == 0x121)
        #expect(l3.eax >> 26 == 3 && (l3.eax >> 14) & 0xfff == 3)
        let amdL1 = try #require(out.first { $0.function == 0x8000_001d && $0.index == 0 })
        let amdL3 = try #require(out.first { $0.function == 0x8000_001d && $0.index == 3 })
        #expect((amdL1.eax >> 14) & 0xfff == 0 && (amdL3.eax >> 14) & 0xfff == 3)
    }

    @Test("AMD extended leaves: CmpLegacy, NC and ApicIdSize, and 0x8000001E core ID = APIC ID")
    func amdLeaves() throws {
        let out = CPUIDFilter.filter(amd, apicID: 2, cpuCount: 3, hideCX16: false)
        let e1 = try #require(out.first { $0.function == 0x8000_0001 })
        #expect(e1.ecx & 0x2 != 0 && e1.ecx & 0x1 != 0)
        let e8 = try #require(out.first { $0.function == 0x8000_0008 })
        #expect(e8.ecx & 0xff == 2 && (e8.ecx >> 12) & 0xf == 2 && e8.ecx >> 16 == 3, "NC = 2, ApicIdSize = 2, other bits kept")
        let e1e = try #require(out.first { $0.function == 0x8000_001e })
        #expect(e1e.eax == 2 && e1e.ebx == 2 && e1e.ecx == 0)
        let single = CPUIDFilter.filter(amd, apicID: 0, cpuCount: 1, hideCX16: false)
        #expect(try #require(single.first { $0.function == 0x8000_0001 }).ecx & 0x2 == 0)
    }

    @Test("without leaf 0xB from KVM none is invented")
    func noLeafB() {
        let table = amd.filter { $0.function != 0xb }
        #expect(!CPUIDFilter.filter(table, apicID: 0, cpuCount: 2, hideCX16: false).contains { $0.function == 0xb })
    }
}

@Suite("Power-off by halt across vCPUs")
struct HaltTrackerTests {
    @Test("one vCPU halted for good powers off after two complete rounds")
    func single() {
        let t = HaltTracker()
        var r = t.beginRound(vcpuCount: 1)
        #expect(!t.report(vcpu: 0, round: r, state: .haltedForGood))
        r = t.beginRound(vcpuCount: 1)
        #expect(t.report(vcpu: 0, round: r, state: .haltedForGood))
    }

    @Test("an AP halted with IF=0 while the BSP runs never powers off")
    func apHaltedBSPRunning() {
        let t = HaltTracker()
        for _ in 0..<5 {
            let r = t.beginRound(vcpuCount: 2)
            #expect(!t.report(vcpu: 1, round: r, state: .haltedForGood))
            #expect(!t.report(vcpu: 0, round: r, state: .running))
        }
    }

    @Test("APs that never got a SIPI do not prevent a power-off, but cannot cause one alone")
    func notStarted() {
        let u = HaltTracker()
        var last = false
        for _ in 0..<3 {
            let r = u.beginRound(vcpuCount: 3)
            _ = u.report(vcpu: 1, round: r, state: .notStarted)
            _ = u.report(vcpu: 2, round: r, state: .notStarted)
            last = u.report(vcpu: 0, round: r, state: .notStarted)
            #expect(!last, "no vCPU halted: nothing decided")
        }
        let v = HaltTracker()
        var decided = false
        for _ in 0..<2 {
            let r = v.beginRound(vcpuCount: 3)
            _ = v.report(vcpu: 1, round: r, state: .notStarted)
            _ = v.report(vcpu: 2, round: r, state: .notStarted)
            decided = v.report(vcpu: 0, round: r, state: .haltedForGood)
        }
        #expect(decided)
    }

    @Test("a round not answered by every vCPU, a stale round or a running vCPU resets the count")
    func resets() {
        let t = HaltTracker()
        var r = t.beginRound(vcpuCount: 2)
        _ = t.report(vcpu: 0, round: r, state: .haltedForGood)
        _ = t.report(vcpu: 1, round: r, state: .haltedForGood)   // 1 complete round
        r = t.beginRound(vcpuCount: 2)
        _ = t.report(vcpu: 0, round: r, state: .haltedForGood)   // incomplete
        r = t.beginRound(vcpuCount: 2)
        #expect(!t.report(vcpu: 0, round: r - 1, state: .haltedForGood), "stale round ignored")
        _ = t.report(vcpu: 0, round: r, state: .haltedForGood)
        #expect(!t.report(vcpu: 1, round: r, state: .haltedForGood), "the incomplete round reset the count")
        r = t.beginRound(vcpuCount: 2)
        _ = t.report(vcpu: 0, round: r, state: .haltedForGood)
        #expect(t.report(vcpu: 1, round: r, state: .haltedForGood))
    }
}
