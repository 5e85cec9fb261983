import Foundation
import KVM
import Testing
@testable import VMM

/// A scripted host for `HostCheck`: no /dev/kvm needed.
final class FakeHostFacts: HostFacts {
    var devicePath = "/dev/kvm"
    var state: KVMDeviceState = .accessible
    var version: Int32 = 12
    var caps: [Capability: Int32] = [:]
    var failingCap: Capability?
    var flags: Set<String>? = ["fpu", "sse2", "vmx"]
    var pvmModule = false
    var libs: [(name: String, version: String?)] = [("zlib (gzip)", "1.2.13"), ("libzstd (zstd)", "1.5.4")]
    var probeWithout = UserModeProbeOutcome(userCS: 0x2b, syscallCS: 0x10)
    var probeWith = UserModeProbeOutcome(userCS: 0x2b, syscallCS: 0x10)
    private(set) var probeRuns: [Bool] = []

    init() {
        for c in HostCheck.required + HostCheck.recommended { caps[c] = 1 }
        caps[.nrVCPUs] = 8; caps[.maxVCPUs] = 1024; caps[.nrMemslots] = 32764
    }

    func deviceState() -> KVMDeviceState { state }
    func apiVersion() throws -> Int32 { version }
    func capability(_ cap: Capability) throws -> Int32 {
        if cap == failingCap { throw KVMError(operation: "KVM_CHECK_EXTENSION(\(cap))", errno: 25) }
        return caps[cap] ?? 0
    }
    func cpuFlags() -> Set<String>? { flags }
    func pvmModuleLoaded() -> Bool { pvmModule }
    func decompressionLibraries() -> [(name: String, version: String?)] { libs }
    func runUserModeProbe(syscallFixup: Bool) -> UserModeProbeOutcome {
        probeRuns.append(syscallFixup)
        return syscallFixup ? probeWith : probeWithout
    }

    /// A PVM host as measured here: kvm_pvm, no vmx/svm, syscall stays at CPL3 without the fix-up.
    static func pvmHost() -> FakeHostFacts {
        let f = FakeHostFacts()
        f.flags = ["fpu", "sse2"]
        f.pvmModule = true
        f.probeWithout = UserModeProbeOutcome(userCS: 0x33, syscallCS: 0x33)
        f.probeWith = UserModeProbeOutcome(userCS: 0x33, syscallCS: 0x10)
        return f
    }
}

private func item(_ r: HostCheckReport, _ what: String) -> CheckItem? { r.items.first { $0.what == what } }

@Suite("HostCheck report logic (fake host)")
struct HostCheckTests {
    @Test("a hardware host passes everything, user mode is native and the probe runs without and with the fix-up")
    func hardwareHost() throws {
        let f = FakeHostFacts()
        let r = HostCheck.evaluate(f)
        #expect(r.canRunGuests)
        #expect(r.virtualization == "hardware (vmx)")
        #expect(!r.pvmFixupsActive && r.fixups.isEmpty)
        #expect(r.userMode == .native)
        #expect(f.probeRuns == [false, true])
        #expect(r.items.allSatisfy { $0.status == .pass }, "\(r.items.filter { $0.status != .pass })")
        let cpus = try #require(item(r, "vCPUs"))
        #expect(cpus.detail == "max 1024, recommended 8")
        #expect(item(r, "memory slots")?.detail == "max 32764")
        #expect(r.text.contains("SwiftKVM: PVM fix-ups: none (hardware KVM)"))
    }

    @Test("a PVM host reports PVM, runs the probe twice and says user mode works only through the fix-up")
    func pvmHost() throws {
        let f = FakeHostFacts.pvmHost()
        let r = HostCheck.evaluate(f)
        #expect(r.canRunGuests)
        #expect(r.virtualization == "pvm")
        #expect(r.pvmFixupsActive)
        #expect(r.fixups == HostCheck.pvmFixupList)
        #expect(f.probeRuns == [false, true])
        #expect(r.userMode == .pvmFixup)
        #expect(item(r, "for hardware virtualization")?.status == .warn)
        #expect(item(r, "guest syscall without fix-up (probe)")?.status == .warn)
        #expect(item(r, "guest syscall without fix-up (probe)")?.detail.contains("CPL3") == true)
        #expect(item(r, "guest syscall with PVM fix-up (probe)")?.status == .pass)
        #expect(item(r, "guest user mode")?.detail.contains("only through the PVM SYSCALL fix-up") == true)
        #expect(r.text.contains("SwiftKVM:   - user-mode SYSCALL"))
    }

    @Test("no vmx/svm flag without the kvm_pvm module is still detected as PVM")
    func pvmFromFlags() {
        let f = FakeHostFacts.pvmHost()
        f.pvmModule = false
        let r = HostCheck.evaluate(f)
        #expect(r.virtualization == "pvm")
        #expect(item(r, "for hardware virtualization")?.detail.contains("no vmx/svm") == true)
    }

    @Test("a missing /dev/kvm fails, skips KVM queries and the probe, and the host cannot run guests")
    func missingDevice() {
        let f = FakeHostFacts()
        f.state = .missing
        let r = HostCheck.evaluate(f)
        #expect(!r.canRunGuests)
        #expect(item(r, "/dev/kvm exists")?.status == .fail)
        #expect(item(r, "KVM API version") == nil)
        #expect(f.probeRuns.isEmpty)
        #expect(r.text.contains("SwiftKVM: Checking /dev/kvm exists") && r.text.contains(": FAIL (not found"))
    }

    @Test("a /dev/kvm that cannot be opened read-write fails with the reason")
    func inaccessibleDevice() {
        let f = FakeHostFacts()
        f.state = .notAccessible("open read-write: Permission denied")
        let r = HostCheck.evaluate(f)
        #expect(!r.canRunGuests)
        #expect(item(r, "/dev/kvm exists")?.status == .pass)
        #expect(item(r, "/dev/kvm is accessible") == CheckItem("/dev/kvm is accessible", .fail, "open read-write: Permission denied"))
    }

    @Test("a wrong API version fails and names both versions")
    func wrongAPIVersion() {
        let f = FakeHostFacts()
        f.version = 11
        let r = HostCheck.evaluate(f)
        #expect(!r.canRunGuests)
        #expect(item(r, "KVM API version")?.detail == "11, SwiftKVM needs 12")
        #expect(f.probeRuns.isEmpty)
    }

    @Test("a missing required capability fails; a missing optional one only warns")
    func capabilities() {
        let f = FakeHostFacts()
        f.caps[.irqfd] = 0
        var r = HostCheck.evaluate(f)
        #expect(r.canRunGuests)
        #expect(item(r, "capability IRQFD")?.status == .warn)
        f.caps[.irqchip] = 0
        r = HostCheck.evaluate(f)
        #expect(!r.canRunGuests)
        #expect(item(r, "capability IRQCHIP") == CheckItem("capability IRQCHIP", .fail, "missing: SwiftKVM needs it"))
    }

    @Test("on PVM a missing MSR filter capability warns that the SYSCALL fix-up needs it")
    func pvmMissingMSRFilter() {
        let f = FakeHostFacts.pvmHost()
        f.caps[.x86MSRFilter] = 0
        let r = HostCheck.evaluate(f)
        #expect(item(r, "capability X86_MSR_FILTER")?.status == .warn)
        #expect(item(r, "capability X86_MSR_FILTER")?.detail.contains("SYSCALL fix-up") == true)
    }

    @Test("a capability query that errors is reported with the ioctl name")
    func capabilityError() {
        let f = FakeHostFacts()
        f.failingCap = .pit2
        let r = HostCheck.evaluate(f)
        #expect(!r.canRunGuests)
        #expect(item(r, "capability PIT2")?.detail.contains("KVM_CHECK_EXTENSION") == true)
    }

    @Test("NR_VCPUS of 0 gives KVM's documented default of 4 recommended vCPUs")
    func defaultRecommendedCPUs() {
        let f = FakeHostFacts()
        f.caps[.nrVCPUs] = 0
        f.caps[.maxVCPUs] = 0
        let r = HostCheck.evaluate(f)
        #expect(item(r, "vCPUs")?.detail == "max 4, recommended 4")
    }

    @Test("a missing decompression library warns and names it")
    func missingLibrary() {
        let f = FakeHostFacts()
        f.libs = [("zlib (gzip)", "1.2.13"), ("liblz4 (lz4)", nil)]
        let r = HostCheck.evaluate(f)
        let lib = item(r, "host-side kernel decompression libraries")
        #expect(lib?.status == .warn)
        #expect(lib?.detail == "zlib (gzip) 1.2.13, liblz4 (lz4) missing")
    }

    @Test("user mode that works in neither run warns; a probe that never reaches ring 3 fails")
    func brokenUserMode() {
        let f = FakeHostFacts.pvmHost()
        f.probeWith = UserModeProbeOutcome(userCS: 0x33, syscallCS: 0x33)
        var r = HostCheck.evaluate(f)
        #expect(r.userMode == .broken)
        #expect(item(r, "guest user mode")?.status == .warn)
        #expect(item(r, "guest syscall with PVM fix-up (probe)")?.status == .fail)
        f.probeWithout = UserModeProbeOutcome(problem: "timed out after 20 s")
        r = HostCheck.evaluate(f)
        #expect(item(r, "guest ring 0 → ring 3 (probe)")?.status == .fail)
        #expect(item(r, "guest ring 0 → ring 3 (probe)")?.detail.contains("timed out") == true)
        #expect(!r.canRunGuests)
    }

    @Test("classify: native, PVM fix-up only, broken")
    func classify() {
        let cpl0 = UserModeProbeOutcome(userCS: 0x2b, syscallCS: 0x10)
        let cpl3 = UserModeProbeOutcome(userCS: 0x33, syscallCS: 0x33)
        #expect(UserModeSupport.classify(withoutFixup: cpl0, withFixup: nil) == .native)
        #expect(UserModeSupport.classify(withoutFixup: cpl3, withFixup: cpl0) == .pvmFixup)
        #expect(UserModeSupport.classify(withoutFixup: cpl3, withFixup: cpl3) == .broken)
        #expect(UserModeSupport.classify(withoutFixup: UserModeProbeOutcome(problem: "x"), withFixup: nil) == .broken)
    }

    @Test("--no-probe skips the probe with a warning")
    func skipProbe() {
        let f = FakeHostFacts()
        let r = HostCheck.evaluate(f, runProbe: false)
        #expect(f.probeRuns.isEmpty)
        #expect(item(r, "guest user mode (probe)")?.status == .warn)
        #expect(r.userMode == nil)
    }

    @Test("lines follow the virt-host-validate layout with aligned columns")
    func lineFormat() {
        #expect(CheckItem("KVM API version", .pass, "12").line() == "SwiftKVM: Checking KVM API version ... : PASS (12)")
        #expect(CheckItem("x", .fail, "").line(width: 12) == "SwiftKVM: Checking x   ... : FAIL")
        let r = HostCheck.evaluate(FakeHostFacts())
        let columns = Set(r.text.split(separator: "\n").filter { $0.contains(" ... : ") }.map { $0.range(of: " ... : ")!.lowerBound.utf16Offset(in: $0) })
        #expect(columns.count == 1)
    }

    @Test("probe outcome summary names both CS values and the CPL")
    func outcomeSummary() {
        #expect(UserModeProbeOutcome(userCS: 0x33, syscallCS: 0x10).summary == "ring3 cs=0x33, syscall entry cs=0x10 (CPL0)")
        #expect(UserModeProbeOutcome(userCS: 0x33).summary == "ring3 cs=0x33, syscall entry not reached")
        #expect(UserModeProbeOutcome(problem: "guest faulted (triple fault)").summary == "ring 3 not reached, guest faulted (triple fault)")
    }

    @Test("the embedded probe image is a small flat program that ends in its GDT pointer")
    func probeImage() {
        #expect(UserModeProbe.image.count > 64 && UserModeProbe.image.count < 4096)
        // gdtr: limit 0x2f (6 descriptors), base inside the image.
        let tail = Array(UserModeProbe.image.suffix(10))
        #expect(tail[0] == 0x2f && tail[1] == 0x00)
        let base = tail[2..<10].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        #expect(base >= UserModeProbe.loadAddress && base < UserModeProbe.loadAddress + UInt64(UserModeProbe.image.count))
    }
}

@Suite("User-mode probe on /dev/kvm", .enabled(if: FileManager.default.fileExists(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct UserModeProbeKVMTests {
    @Test("the probe reaches ring 3 and, with the fix-up, the SYSCALL entry at CPL0")
    func probeRuns() {
        let on = UserModeProbe.run(syscallFixup: true)
        #expect(on.reachedUserMode, "\(on.summary)")
        #expect(on.syscallCPL == 0, "\(on.summary)")
        let off = UserModeProbe.run(syscallFixup: false)
        #expect(off.reachedUserMode, "\(off.summary)")
        #expect(off.syscallCPL != nil, "\(off.summary)")
    }
}
