import Boot
import Foundation
import GuestMemory
import KVM
import Devices
import Logging
import Testing
@testable import VMM

@Suite("Size and number parsing")
struct SizeParserTests {
    @Test("sizes accept K, M, G and T suffixes in either case")
    func suffixes() throws {
        #expect(try SizeParser.parseSize("512M") == 512 << 20)
        #expect(try SizeParser.parseSize("1g") == 1 << 30)
        #expect(try SizeParser.parseSize("64K") == 64 << 10)
        #expect(try SizeParser.parseSize("2T") == 2 << 40)
        #expect(try SizeParser.parseSize("4096") == 4096)
        #expect(try SizeParser.parseSize("2GiB") == 2 << 30)
        #expect(try SizeParser.parseSize(" 16MB ") == 16 << 20)
    }

    @Test("bad sizes are rejected with a message naming the option and value")
    func badSizes() {
        for bad in ["", "M", "12X", "-1M", "1.5G", "0x10M", "99999999999999999999", "17179869184T"] {
            do {
                _ = try SizeParser.parseSize(bad, what: "--memory")
                Issue.record("'\(bad)' was accepted")
            } catch let e as VMMError {
                #expect(e.description.contains("--memory"))
                #expect(e.isUsageError)
            } catch {
                Issue.record("unexpected error \(error)")
            }
        }
    }

    @Test("integers accept decimal and 0x hex, and enforce a maximum")
    func integers() throws {
        #expect(try SizeParser.parseInteger("0xf4", what: "p") == 0xf4)
        #expect(try SizeParser.parseInteger("244", what: "p") == 244)
        #expect(try SizeParser.parseInteger("0x1_0000", what: "p") == 0x10000)
        #expect(throws: VMMError.self) { try SizeParser.parseInteger("0x10000", what: "p", max: 0xffff) }
        #expect(throws: VMMError.self) { try SizeParser.parseInteger("0xzz", what: "p") }
        #expect(throws: VMMError.self) { try SizeParser.parseInteger("", what: "p") }
    }

    @Test("sizes format in the largest exact binary unit")
    func format() {
        #expect(SizeParser.format(512 << 20) == "512 MiB")
        #expect(SizeParser.format(3 << 30) == "3 GiB")
        #expect(SizeParser.format(1000) == "1000 bytes")
    }
}

@Suite("Configuration")
struct ConfigurationTests {
    func flatConfig() -> VMConfiguration {
        VMConfiguration(payload: .flat(FlatImage(path: "/tmp/x.bin", loadAddress: 0x1000, entry: 0x1000, mode: .real)))
    }

    @Test("a configuration survives a JSON round trip")
    func codable() throws {
        var c = VMConfiguration(payload: .kernel(path: "/k", initrd: "/i", cmdline: "console=ttyS0",
                                                 modules: [ModuleSpec(path: "/m", cmdline: "a b")]))
        c.memorySize = 256 << 20
        c.cpus = 2
        c.cpuidMasks = [CPUIDMask(leaf: 1, register: .ecx, mask: 0x2000)]
        c.onReboot = .restart
        c.debugExitPort = nil
        let data = try JSONEncoder().encode(c)
        #expect(try JSONDecoder().decode(VMConfiguration.self, from: data) == c)
        var f = flatConfig()
        f.showRegs = true
        #expect(try JSONDecoder().decode(VMConfiguration.self, from: JSONEncoder().encode(f)) == f)
    }

    @Test("memory sizes of zero, 1K, unaligned or beyond host RAM are rejected")
    func memoryLimits() {
        for size: UInt64 in [0, 1024, (4 << 20) + 1, 10 << 40] {
            var c = flatConfig()
            c.memorySize = size
            #expect(throws: VMMError.self) { try c.validate(hostMemory: 8 << 30) }
        }
        var ok = flatConfig()
        ok.memorySize = 128 << 20
        #expect(throws: Never.self) { try ok.validate(hostMemory: 8 << 30) }
    }

    @Test("vCPU counts, serial specs and kernel entries are validated")
    func otherValues() {
        var c = flatConfig()
        c.cpus = 0
        #expect(throws: VMMError.self) { try c.validate(hostMemory: nil) }
        c.cpus = 1
        c.serial = "tcp:1234"
        #expect(throws: VMMError.self) { try c.validate(hostMemory: nil) }
        c.serial = "file:/tmp/x"
        c.kernelEntry = "bios"
        #expect(throws: VMMError.self) { try c.validate(hostMemory: nil) }
    }

    @Test("--cpuid-mask parses leaf, optional subleaf, register and mask")
    func cpuidMask() throws {
        let m = try CPUIDMask(parsing: "0x1.ecx=0x2000")
        #expect(m == CPUIDMask(leaf: 1, register: .ecx, mask: 0x2000))
        let s = try CPUIDMask(parsing: "7.0.ebx=512")
        #expect(s == CPUIDMask(leaf: 7, subleaf: 0, register: .ebx, mask: 512))
        for bad in ["1.ecx", "1.exx=1", "x.ecx=1", "1.ecx=0x100000000", "=", "1.2.3.ecx=1"] {
            #expect(throws: VMMError.self) { try CPUIDMask(parsing: bad) }
        }
    }

    @Test("--module splits the file from its command line at the first comma")
    func module() throws {
        #expect(try ModuleSpec(parsing: "/a/b") == ModuleSpec(path: "/a/b"))
        #expect(try ModuleSpec(parsing: "/a,x=1,y") == ModuleSpec(path: "/a", cmdline: "x=1,y"))
        #expect(throws: VMMError.self) { try ModuleSpec(parsing: ",x") }
    }

    @Test("the default cmdline keeps the PVM work-arounds and leaves PCI on")
    func defaultCmdline() {
        #expect(DefaultGuest.cmdline.contains("console=ttyS0"))
        #expect(DefaultGuest.cmdline.contains("noxsave"))
        #expect(DefaultGuest.cmdline.contains("clearcpuid=popcnt"))
        #expect(!DefaultGuest.cmdline.contains("pci=off"))
        // The initramfs loads the virtio/ext4 modules only when the machine has virtio devices.
        #expect(!DefaultGuest.cmdline.contains("swiftkvm.modules"))
        #expect(DefaultGuest.cmdline(withVirtioDevices: true) == DefaultGuest.cmdline + " swiftkvm.modules=1")
        #expect(DefaultGuest.cmdline(withVirtioDevices: false) == DefaultGuest.cmdline)
    }

    @Test("the assets folder comes from SWIFTKVM_ASSETS or is found above the executable")
    func assets() throws {
        #expect(DefaultGuest.assetsDirectory(environment: ["SWIFTKVM_ASSETS": "/x"], executablePath: nil) == "/x")
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("skvm-assets-\(getpid())")
        defer { try? FileManager.default.removeItem(at: root) }
        try FileManager.default.createDirectory(at: root.appendingPathComponent("assets"), withIntermediateDirectories: true)
        try FileManager.default.createDirectory(at: root.appendingPathComponent(".build/debug"), withIntermediateDirectories: true)
        try Data([1]).write(to: root.appendingPathComponent("assets/vmlinuz"))
        let exe = root.appendingPathComponent(".build/debug/swiftkvm").path
        #expect(DefaultGuest.assetsDirectory(environment: [:], executablePath: exe) == root.appendingPathComponent("assets").path)
        #expect(DefaultGuest.assetsDirectory(environment: [:], executablePath: "/nonexistent/bin/swiftkvm") == nil)
    }
}

@Suite("Exit codes")
struct ExitCodeTests {
    @Test("each way a VM ends maps to its documented exit code")
    func mapping() {
        #expect(MachineExit.powerOff.exitCode == 0)
        #expect(MachineExit.userQuit.exitCode == 0)
        #expect(MachineExit.vmmFailure("x").exitCode == 6)
        #expect(MachineExit.usageExitCode == 2)
        #expect(MachineExit.reset.exitCode == 8)
        #expect(MachineExit.internalError("x").exitCode == 4)
        #expect(MachineExit.debugExit(status: 33).exitCode == 33)
        #expect(MachineExit.signal(SIGINT).exitCode == 130)
        #expect(MachineExit.signal(SIGTERM).exitCode == 143)
    }

    @Test("the first stop request wins")
    func firstWins() {
        let c = MachineController()
        c.request(.exit(status: 7))
        c.request(.reset)
        c.stop(.powerOff)
        #expect(c.exit == .debugExit(status: 7))
    }
}

@Suite("CPUID filtering")
struct CPUIDFilterTests {
    func entry(_ function: UInt32, _ index: UInt32 = 0, eax: UInt32 = 0, ebx: UInt32 = 0, ecx: UInt32 = 0, edx: UInt32 = 0) -> kvm_cpuid_entry2 {
        var e = kvm_cpuid_entry2()
        e.function = function; e.index = index
        e.eax = eax; e.ebx = ebx; e.ecx = ecx; e.edx = edx
        return e
    }

    var table: [kvm_cpuid_entry2] {
        [entry(0, eax: 0xd), entry(1, ebx: 0xff00_0800, ecx: 0x7ffa_3203, edx: 0x178b_fbff),
         entry(7, 0, ebx: 0x219c_07ab), entry(0xb, 0, edx: 9), entry(0xb, 1, edx: 9)]
    }

    @Test("CX16 is hidden on PVM hosts and the hypervisor bit is set")
    func cx16() throws {
        let out = CPUIDFilter.filter(table, apicID: 0, cpuCount: 1, hideCX16: true)
        let leaf1 = try #require(out.first { $0.function == 1 })
        #expect(leaf1.ecx & CPUIDFilter.cx16Bit == 0)
        #expect(leaf1.ecx & CPUIDFilter.hypervisorBit != 0)
        let kept = try #require(CPUIDFilter.filter(table, apicID: 0, cpuCount: 1, hideCX16: false).first { $0.function == 1 })
        #expect(kept.ecx & CPUIDFilter.cx16Bit != 0)
    }

    @Test("APIC ids go into leaf 1 EBX[31:24] and every leaf 0xB subleaf's EDX")
    func apicIDs() throws {
        let out = CPUIDFilter.filter(table, apicID: 3, cpuCount: 4, hideCX16: false)
        let leaf1 = try #require(out.first { $0.function == 1 })
        #expect(leaf1.ebx >> 24 == 3)
        #expect((leaf1.ebx >> 16) & 0xff == 4)
        #expect(leaf1.ebx & 0xffff == 0x0800)
        #expect(leaf1.edx & CPUIDFilter.httBit != 0)
        #expect(out.filter { $0.function == 0xb }.allSatisfy { $0.edx == 3 })
    }

    @Test("user masks clear bits in the named leaf, subleaf and register only")
    func masks() throws {
        let masks = [CPUIDMask(leaf: 7, subleaf: 0, register: .ebx, mask: 0x1), CPUIDMask(leaf: 1, register: .edx, mask: 0x1)]
        let out = CPUIDFilter.filter(table, apicID: 0, cpuCount: 1, hideCX16: false, masks: masks)
        #expect(try #require(out.first { $0.function == 7 }).ebx == 0x219c_07aa)
        #expect(try #require(out.first { $0.function == 1 }).edx & 1 == 0)
        #expect(try #require(out.first { $0.function == 0 }).eax == 0xd)
    }
}

@Suite("EntryState conversion")
struct EntryConversionTests {
    @Test("a long-mode entry becomes 64-bit CS, paging registers and EFER")
    func longMode() {
        let e = EntryState.longMode(entry: 0x100000, sp: 0x8ff0, zeroPage: 0x7000)
        let s = EntryConversion.sregs(e, base: kvm_sregs())
        #expect(s.cs.l == 1 && s.cs.db == 0 && s.cs.selector == 0x10 && s.cs.present == 1 && s.cs.s == 1)
        #expect(s.ds.selector == 0x18 && s.ds.db == 1 && s.ds.g == 1)
        #expect(s.cr0 == 0x8005_0033 && s.cr3 == 0x9000 && s.cr4 == 0x20 && s.efer == 0x500)
        #expect(s.gdt.base == 0x500 && s.gdt.limit == 31)
        let r = EntryConversion.regs(e)
        #expect(r.rip == 0x100000 && r.rsp == 0x8ff0 && r.rsi == 0x7000 && r.rflags == 2)
    }

    @Test("a real-mode entry keeps base = selector × 16 and CR0.PE clear, preserving other sregs")
    func realMode() {
        var base = kvm_sregs()
        base.apic_base = 0xfee0_0900
        let e = EntryState.realMode(cs: 0x1000, ip: 0x10, sp: 0xfffe)
        let s = EntryConversion.sregs(e, base: base)
        #expect(s.cs.base == 0x10000 && s.cs.selector == 0x1000 && s.cs.limit == 0xffff && s.cs.type == 0xb)
        #expect(s.cr0 & 1 == 0)
        #expect(s.apic_base == 0xfee0_0900)
        #expect(EntryConversion.regs(e).rip == 0x10)
    }
}

@Suite("PVM fix-ups and diagnostics")
struct PVMTests {
    @Test("fwait is skipped, int3 injects #BP after it, ud2 injects #UD at it, others are not fixed")
    func decode() {
        #expect(PVMQuirks.fixup(for: [0x9b, 0x90]) == .skip(1))
        #expect(PVMQuirks.fixup(for: [0xcc]) == .inject(vector: 3, advance: 1))
        #expect(PVMQuirks.fixup(for: [0x0f, 0x0b]) == .inject(vector: 6, advance: 0))
        #expect(PVMQuirks.fixup(for: [0x0f, 0xc7, 0x0e]) == nil)
        #expect(PVMQuirks.fixup(for: [0x0f]) == nil)
        #expect(PVMQuirks.fixup(for: []) == nil)
    }

    @Test("int imm8 is a software interrupt; #UD for xgetbv without OSXSAVE, absent invpcid/rdpru/clwb and clac/stac outside ring 0; clac/stac set AC and clwb is skipped with its length")
    func decodeMore() {
        typealias C = PVMQuirks.FixupContext
        let ud = PVMQuirks.Fixup.inject(vector: 6, advance: 0)
        #expect(PVMQuirks.fixup(for: [0xcd, 0x80]) == .softwareInterrupt(vector: 0x80, length: 2))
        #expect(PVMQuirks.fixup(for: [0xcd]) == nil)
        #expect(PVMQuirks.fixup(for: [0x0f, 0x01, 0xd0], context: C(osxsave: false)) == ud)
        #expect(PVMQuirks.fixup(for: [0x0f, 0x01, 0xd0], context: C(osxsave: true)) == nil, "a real failure is reported")
        #expect(PVMQuirks.fixup(for: [0x66, 0x0f, 0x38, 0x82, 0x08], context: C(invpcid: false)) == ud)
        #expect(PVMQuirks.fixup(for: [0x66, 0x41, 0x0f, 0x38, 0x82, 0x08], context: C(invpcid: false)) == ud, "with REX")
        #expect(PVMQuirks.fixup(for: [0x66, 0x0f, 0x38, 0x82, 0x08], context: C(invpcid: true)) == nil)
        #expect(PVMQuirks.fixup(for: [0x0f, 0x01, 0xfd], context: C(rdpru: false)) == ud)
        #expect(PVMQuirks.fixup(for: [0x0f, 0x01, 0xca], context: C(cpl: 0)) == .setAC(false))
        #expect(PVMQuirks.fixup(for: [0x0f, 0x01, 0xcb], context: C(cpl: 0)) == .setAC(true))
        #expect(PVMQuirks.fixup(for: [0x0f, 0x01, 0xcb], context: C(cpl: 3)) == ud)
        #expect(PVMQuirks.fixup(for: [0x66, 0x0f, 0xae, 0x30]) == .skip(4), "clwb (%rax)")
        #expect(PVMQuirks.fixup(for: [0x66, 0x0f, 0xae, 0x74, 0x08, 0x40]) == .skip(6), "clwb 0x40(%rax,%rcx)")
        #expect(PVMQuirks.fixup(for: [0x66, 0x0f, 0xae, 0xb0, 0, 0x10, 0, 0]) == .skip(8), "clwb 0x1000(%rax)")
        #expect(PVMQuirks.fixup(for: [0x66, 0x0f, 0xae, 0x35, 1, 2, 3, 4]) == .skip(8), "clwb RIP-relative")
        #expect(PVMQuirks.fixup(for: [0x66, 0x0f, 0xae, 0x30], context: C(clwb: false)) == ud)
        #expect(PVMQuirks.fixup(for: [0x66, 0x0f, 0xae, 0xf0]) == nil, "register form (tpause-like encodings) is not clwb")
    }

    @Test("on PVM hosts CPUID 0x40000001 hides PV_UNHALT, PV_SEND_IPI and PV_SCHED_YIELD, and keeps the other KVM features")
    func hiddenParavirtFeatures() {
        var leaf = kvm_cpuid_entry2()
        leaf.function = 0x4000_0001
        leaf.eax = 0x0100_7eff
        let out = PVMQuirks(syscallFixup: false).filterCPUID([leaf])
        #expect(out[0].eax == 0x0100_7eff & ~PVMQuirks.hiddenPVFeatures)
        #expect(out[0].eax & (1 << 3) != 0, "KVM_FEATURE_CLOCKSOURCE2 stays")
        #expect(NoHostQuirks().filterCPUID([leaf])[0].eax == 0x0100_7eff)
    }

    @Test("instruction bytes are taken from emulation-failure exit data when flagged")
    func exitData() {
        // flags = 1, insn_size = 2, bytes 0f 0b.
        let data: [UInt64] = [1, 0x0b0f02, 0]
        #expect(InstructionBytes.fromExitData(suberror: 1, data: data) == [0x0f, 0x0b])
        #expect(InstructionBytes.fromExitData(suberror: 1, data: [0, 0x0b0f02, 0]) == nil)
        #expect(InstructionBytes.fromExitData(suberror: 3, data: data) == nil)
        #expect(InstructionBytes.fromExitData(suberror: 1, data: [1, 0xff, 0]) == nil)
        #expect(InstructionBytes.hex([0x0f, 0x0b]) == "0f 0b")
    }

    @Test("PVM detection uses the module directory, else the absence of vmx and svm")
    func detect() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("skvm-pvm-\(getpid())")
        defer { try? FileManager.default.removeItem(at: dir) }
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let vmx = dir.appendingPathComponent("cpuinfo-vmx"), none = dir.appendingPathComponent("cpuinfo-none")
        try "processor : 0\nflags\t\t: fpu vme vmx sse\n".write(to: vmx, atomically: true, encoding: .utf8)
        try "processor : 0\nflags\t\t: fpu vme sse\n".write(to: none, atomically: true, encoding: .utf8)
        #expect(PVMQuirks.detect(sysModule: dir.path, cpuinfo: vmx.path))
        #expect(!PVMQuirks.detect(sysModule: "/nonexistent", cpuinfo: vmx.path))
        #expect(PVMQuirks.detect(sysModule: "/nonexistent", cpuinfo: none.path))
    }

    @Test("the page walker follows the loaders' identity tables and 4 KiB pages")
    func pageWalk() throws {
        let memory = try GuestMemory.allocate(size: 16 << 20)
        let cr3 = try IdentityPageTables.write(into: memory)
        let t = { (a: UInt64) in GuestPageWalker.translate(a, cr0: 0x8000_0011, cr3: cr3, cr4: 0x20, efer: 0x500, memory: memory) }
        #expect(t(0x12_3456) == 0x12_3456)
        #expect(t(0x1_0000_0000) == nil) // beyond the 4 GiB mapped
        // Map linear 0x40_0000_0000 (PML4 0, PDPT 256) → 4 KiB page at 0x200000 through a PD and PT at 0x100000.
        try memory.writeLE(UInt64(0x10_0000 | 3), at: 0xa000 + 256 * 8)
        try memory.writeLE(UInt64(0x10_1000 | 3), at: 0x10_0000)
        try memory.writeLE(UInt64(0x20_0000 | 3), at: 0x10_1000 + 5 * 8)
        #expect(t(0x40_0000_5123) == 0x20_0123)
        try memory.write([0xcc, 0x90], at: 0x20_0ffe)
        try memory.write([0xf4], at: 0x30_0000)
        // A read crossing into an unmapped page stops there.
        #expect(GuestPageWalker.read(0x40_0000_5ffe, count: 4, cr0: 0x8000_0011, cr3: cr3, cr4: 0x20, efer: 0x500, memory: memory) == [0xcc, 0x90])
        // No paging: linear = physical.
        #expect(GuestPageWalker.translate(0x1234, cr0: 0x11, cr3: 0, cr4: 0, efer: 0, memory: memory) == 0x1234)
    }
}

@Suite("Register dump")
struct RegisterDumpTests {
    @Test("the dump shows general registers, RIP and control registers in hex")
    func format() {
        var r = kvm_regs()
        r.rbx = 0x1234
        r.rip = 0x100e
        var s = kvm_sregs()
        s.cr0 = 0x10
        let text = RegisterDump.format(regs: r, sregs: s, id: 0)
        #expect(text.contains("RBX=0000000000001234"))
        #expect(text.contains("RIP=000000000000100e"))
        #expect(text.contains("CR0=0000000000000010"))
    }
}

/// Collects serial output in memory.
final class CollectedOutput: SerialOutput, @unchecked Sendable {
    private let lock = NSLock()
    private var bytes: [UInt8] = []
    func write(_ b: [UInt8]) { lock.lock(); bytes += b; lock.unlock() }
    var text: String { lock.lock(); defer { lock.unlock() }; return String(decoding: bytes, as: UTF8.self) }
}

@Suite("Machine on /dev/kvm", .enabled(if: FileManager.default.fileExists(atPath: "/dev/kvm"), "needs /dev/kvm"), .serialized)
struct MachineTests {
    func machine(_ program: [UInt8], mode: FlatLoader.Mode = .real, load: UInt64 = 0x1000,
                 configure: (inout VMConfiguration) -> Void = { _ in }) throws -> (Machine, CollectedOutput, String) {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("vmm-flat-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).bin").path
        try Data(program).write(to: URL(fileURLWithPath: path))
        var config = VMConfiguration(payload: .flat(FlatImage(path: path, loadAddress: load, entry: load, mode: mode)))
        config.memorySize = 8 << 20
        configure(&config)
        let out = CollectedOutput()
        return (try Machine(config: config, serialOutput: out, logger: Logger(label: "test")), out, path)
    }

    @Test("a flat program's serial output and debug-exit status come back from run()")
    func debugExit() throws {
        // mov dx, 0x3f8 ; mov al, 'o' ; out dx, al ; mov al, 'k' ; out dx, al ; mov al, 3 ; out 0xf4, al ; hlt
        let (m, out, path) = try machine([0xba, 0xf8, 0x03, 0xb0, 0x6f, 0xee, 0xb0, 0x6b, 0xee, 0xb0, 0x03, 0xe6, 0xf4, 0xf4])
        defer { try? FileManager.default.removeItem(atPath: path) }
        #expect(m.run(handleSignals: false) == .debugExit(status: 7))
        #expect(out.text == "ok")
        #expect(m.statistics.snapshot["io"] == 3)
    }

    @Test("cli; hlt powers off, and an unknown port access is counted, not fatal")
    func powerOff() throws {
        // mov dx, 0x1234 ; in al, dx (nothing there) ; cli ; hlt
        let (m, _, path) = try machine([0xba, 0x34, 0x12, 0xec, 0xfa, 0xf4])
        defer { try? FileManager.default.removeItem(atPath: path) }
        #expect(m.run(handleSignals: false) == .powerOff)
        #expect(m.statistics.snapshot["unhandled io"] == 1)
        #expect(m.registerDump().contains("RIP=0000000000001006"))
    }

    @Test("stop() from another thread ends a spinning guest")
    func stopFromOutside() throws {
        let (m, _, path) = try machine([0xeb, 0xfe])
        defer { try? FileManager.default.removeItem(atPath: path) }
        let t = Thread { Thread.sleep(forTimeInterval: 0.3); m.stop(.userQuit) }
        t.start()
        #expect(m.run(handleSignals: false) == .userQuit)
    }

    @Test("a debug-exit port on top of the UART is rejected as a usage error")
    func portCollision() throws {
        #expect(throws: VMMError.self) { _ = try machine([0xf4]) { $0.debugExitPort = 0x3f8 } }
    }
}

/// `iret` in protected mode, emulated for PVM hosts (`IRETEmulation`), without /dev/kvm.
@Suite("PVM: protected-mode iret")
struct IRETEmulationTests {
    /// A flat 32-bit ring-0 code descriptor (0x08) and data descriptor (0x10), and ring-3 ones (0x1b, 0x23).
    static let gdt: [UInt16: [UInt8]] = [
        0x08: [0xff, 0xff, 0, 0, 0, 0x9a, 0xcf, 0], 0x10: [0xff, 0xff, 0, 0, 0, 0x92, 0xcf, 0],
        0x18: [0xff, 0xff, 0, 0, 0, 0xfa, 0xcf, 0], 0x20: [0xff, 0xff, 0, 0, 0, 0xf2, 0xcf, 0],
        0x28: [0xff, 0xff, 0, 0, 0, 0x1a, 0xcf, 0],   // not present
        0x30: [0xff, 0xff, 0, 0, 0, 0x9a, 0x00, 0],   // 16-bit code, limit 0xffff
    ]
    static func descriptor(_ sel: UInt16) -> [UInt8]? { gdt[sel & 0xfff8] }
    static func words(_ w: [UInt32]) -> [UInt8] { w.flatMap { v in (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } } }
    static let data = [IRETEmulation.decode(gdt[0x10]!, selector: 0x10)]

    func run(_ stack: [UInt8], cpl: UInt8 = 0, rflags: UInt64 = 0x2, operand32: Bool = true, rsp: UInt64 = 0x1000) -> IRETEmulation.Outcome {
        IRETEmulation.emulate(operand32: operand32, cpl: cpl, rflags: rflags, rsp: rsp, stackIs32: true, stack: stack,
                              dataSegments: Self.data, descriptor: Self.descriptor)
    }

    @Test("the same level: EIP, CS and EFLAGS popped, ESP + 12; a 16-bit iret pops words and keeps the high flags")
    func sameLevel() throws {
        guard case .load(let rip, let rsp, let flags, let cs, let ss, _) = run(Self.words([0x1234, 0x08, 0x246, 0, 0])) else {
            Issue.record("not a load"); return
        }
        #expect(rip == 0x1234 && rsp == 0x100c && flags == 0x246 && cs.selector == 0x08 && cs.db && cs.limit == 0xffff_ffff && ss == nil)
        let w16: [UInt8] = [0x78, 0x56, 0x08, 0x00, 0x02, 0x02, 0, 0, 0, 0]
        guard case .load(let rip16, let rsp16, let flags16, _, _, _) = run(w16, rflags: 0x4_0002, operand32: false) else {
            Issue.record("not a load"); return
        }
        #expect(rip16 == 0x5678 && rsp16 == 0x1006 && flags16 == 0x4_0202, "AC (bit 18) kept by a 16-bit iret")
    }

    @Test("EFLAGS: IOPL only at CPL 0, IF only where CPL ≤ IOPL; VM never set by a same-level return")
    func flagRules() {
        #expect(IRETEmulation.flags(current: 0x2, popped: 0x3202, cpl: 0, operand32: true) == 0x3202)
        #expect(IRETEmulation.flags(current: 0x2, popped: 0x3202, cpl: 3, operand32: true) == 0x2, "ring 3 with IOPL 0: neither IOPL nor IF")
        #expect(IRETEmulation.flags(current: 0x3002, popped: 0x0202, cpl: 3, operand32: true) == 0x3202, "IOPL 3 lets ring 3 change IF")
        #expect(IRETEmulation.flags(current: 0x2, popped: 0xffff_ffff, cpl: 0, operand32: true) & (1 << 17) == 0)
    }

    @Test("to ring 3: ESP and SS from the stack too, and ring-0 data segments become null")
    func outerLevel() throws {
        guard case .load(let rip, let rsp, _, let cs, let ss?, let nulls) = run(Self.words([0x4000, 0x1b, 0x202, 0x8000, 0x23])) else {
            Issue.record("not a load"); return
        }
        #expect(rip == 0x4000 && rsp == 0x8000 && cs.selector == 0x1b && cs.dpl == 3 && ss.selector == 0x23 && nulls == [true])
    }

    @Test("bad selectors raise #GP(selector); NT, virtual-8086 returns and LDT selectors are not emulated; an inner level is #GP")
    func refused() {
        #expect(run(Self.words([0x1, 0x38, 0x2])) == .generalProtection(0x38), "outside the GDT")
        #expect(run(Self.words([0x1, 0x10, 0x2])) == .generalProtection(0x10), "a data segment")
        #expect(run(Self.words([0x1, 0x28, 0x2])) == .fault(vector: 11, code: 0x28), "not present: #NP")
        #expect(run(Self.words([0x1_0000, 0x30, 0x2])) == .generalProtection(0), "EIP beyond a 64 KiB code segment's limit")
        #expect(run(Self.words([0x1, 0x00, 0x2])) == .generalProtection(0))
        #expect(run(Self.words([0x1, 0x08, 0x2]), cpl: 3) == .generalProtection(0x08), "ring 3 cannot return to ring 0")
        #expect(run(Self.words([0x1, 0x1b, 0x2, 0x8000, 0x10])) == .generalProtection(0x10), "SS RPL must be the new CPL")
        if case .unsupported = run(Self.words([0x1, 0x08, 0x2]), rflags: 0x4002) {} else { Issue.record("NT") }
        if case .unsupported = run(Self.words([0x1, 0x08, 0x2_0002])) {} else { Issue.record("VM") }
        if case .unsupported = run(Self.words([0x1, 0x0c, 0x2])) {} else { Issue.record("LDT") }
        if case .unsupported = run([1, 2, 3]) {} else { Issue.record("short stack") }
    }

    @Test("iret and o16 iret are the fix-up's; iretq (REX.W) is not")
    func decode() {
        #expect(PVMQuirks.fixup(for: [0xcf, 0x90]) == .interruptReturn(prefixed: false))
        #expect(PVMQuirks.fixup(for: [0x66, 0xcf]) == .interruptReturn(prefixed: true))
        #expect(PVMQuirks.fixup(for: [0x48, 0xcf]) == nil)
    }
}

@Suite("PVM: host-safe kernel command-line items")
struct HostSafeCmdlineTests {
    @Test("a client's line gets every missing item; its console, reboot and panic stay; its own clearcpuid wins; the default line needs none")
    func adding() {
        let (line, added) = DefaultGuest.addingHostSafeItems(to: "console=ttyS0 reboot=k panic=1 pci=off")
        #expect(line.hasPrefix("console=ttyS0 reboot=k panic=1 pci=off noxsave") || line.hasPrefix("console=ttyS0 reboot=k panic=1 pci=off tsc=reliable"))
        #expect(added.contains("noxsave") && added.contains { $0.hasPrefix("clearcpuid=") } && added.contains { $0.hasPrefix("initcall_blacklist=") })
        #expect(!added.contains { $0.hasPrefix("console=") || $0.hasPrefix("panic=") || $0.hasPrefix("reboot=") })
        #expect(!line.contains("panic=-1"))
        let own = DefaultGuest.addingHostSafeItems(to: "clearcpuid=popcnt,avx noxsave mitigations=auto")
        #expect(own.line.hasPrefix("clearcpuid=popcnt,avx,fsgsbase,smap,"), "the guest's list extended: \(own.line)")
        #expect(own.added.contains { $0.hasPrefix("clearcpuid+=fsgsbase,") } && !own.added.contains("noxsave"))
        #expect(own.line.contains("mitigations=auto") && !own.line.contains("mitigations=off"), "the guest's own value wins")
        let initArgs = DefaultGuest.addingHostSafeItems(to: "console=ttyS0 -- single noxsave")
        #expect(initArgs.line.hasPrefix("console=ttyS0 tsc=reliable noxsave") && initArgs.line.hasSuffix(" -- single noxsave"),
                "inserted before init's arguments: \(initArgs.line)")
        #expect(DefaultGuest.addingHostSafeItems(to: DefaultGuest.cmdline).added.isEmpty)
        #expect(DefaultGuest.addingHostSafeItems(to: "").line == DefaultGuest.hostSafeItems.joined(separator: " "))
    }
}

@Suite("CPU templates (cpu-config)")
struct CPUTemplateTests {
    @Test("bitmaps: 1 sets, 0 clears, x and the bits left of a short bitmap keep; bad digits and lengths are refused")
    func bitmaps() throws {
        let b = try CPUTemplate.Bits(bitmap: "0b1x0", width: 32, what: "t")
        #expect(b.set == 0b100 && b.clear == 0b001)
        #expect(b.apply(0xff) == 0xfe && b.apply(0x0) == 0x4)
        #expect(try CPUTemplate.Bits(bitmap: "0b" + String(repeating: "1", count: 64), width: 64, what: "t").set == UInt64.max)
        #expect(try CPUTemplate.Bits(bitmap: "0b1x_0000", width: 32, what: "t") == CPUTemplate.Bits(set: 0x20, clear: 0xf), "'_' separates groups")
        for bad in ["1x0", "0b", "0b102", "0b" + String(repeating: "x", count: 33)] {
            #expect(throws: VMMError.self) { try CPUTemplate.Bits(bitmap: bad, width: 32, what: "t") }
        }
    }

    @Test("CPUID modifiers change the register of the matching leaf and subleaf; a missing leaf is an error naming it")
    func cpuid() throws {
        var e1 = kvm_cpuid_entry2(); e1.function = 7; e1.index = 1; e1.ebx = 0xf0
        var e0 = kvm_cpuid_entry2(); e0.function = 7; e0.index = 0; e0.ebx = 0xf0
        var entries = [e0, e1]
        let t = CPUTemplate(cpuid: [.init(leaf: 7, subleaf: 1, register: .ebx, bits: .init(set: 0x1, clear: 0x10))])
        try t.apply(to: &entries)
        #expect(entries[0].ebx == 0xf0 && entries[1].ebx == 0xe1)
        let missing = CPUTemplate(cpuid: [.init(leaf: 0x99, subleaf: 0, register: .eax, bits: .init(set: 1, clear: 0))])
        #expect { try missing.apply(to: &entries) } throws: { "\($0)".contains("leaf 0x99 subleaf 0x0") }
    }
}
