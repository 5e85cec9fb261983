import CKVM
import GuestMemory
import KVM
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Fix-ups for KVM provided by `kvm_pvm` (pagetable-based virtualization without VT-x/AMD-V),
/// where guest ring-0 code is emulated (see HOST-KVM.md):
/// - CPUID.1:ECX CX16 is hidden (`lock cmpxchg16b` fails to emulate);
/// - emulation failures on `fwait` (skipped), `int3` (RIP+1 and #BP injected), `ud2` (#UD
///   injected) and `int imm8` (delivered through its gate, or #GP/#NP as hardware raises them) are recovered, and
///   `xgetbv` with CR4.OSXSAVE clear, `invpcid` and `rdpru` where the guest's CPUID says they are absent, and
///   `clac`/`stac` outside ring 0 raise #UD; in ring 0 `clac`/`stac` set RFLAGS.AC and `clwb` is skipped;
///   protected-mode `iret` is emulated (`IRETEmulation`: option ROMs such as iPXE use it)
///   (`Fixup`, `FixupContext`); anything else is reported with its bytes;
/// - the KVM paravirt features whose hypercalls never complete from guest ring 0 here (PV_UNHALT, PV_SEND_IPI,
///   PV_SCHED_YIELD in CPUID 0x40000001) are hidden;
/// - user-mode `syscall` is redirected through a trampoline into the kernel at CPL 0
///   (`SyscallFixup`);
/// - every fix-up is counted.
public final class PVMQuirks: HostQuirks, @unchecked Sendable {
    public var name: String { "pvm" }
    public var hidesCX16: Bool { true }

    private let counts = Mutex<[String: UInt64]>([:])
    private let syscall: SyscallFixup?
    /// What the guest's CPUID says about the instructions the #UD fix-ups decide on (from `filterCPUID`).
    private let guestFeatures = Mutex(FixupContext())

    /// KVM_FEATURE_PV_UNHALT (7), PV_SEND_IPI (11) and PV_SCHED_YIELD (13): each makes a guest use a hypercall
    /// (KVM_HC_KICK_CPU, SEND_IPI, SCHED_YIELD) that never completes from ring 0 on PVM hosts.
    public static let hiddenPVFeatures: UInt32 = (1 << 7) | (1 << 11) | (1 << 13)

    /// Hides `hiddenPVFeatures` in the KVM features leaf and records the instruction features of the table.
    public func filterCPUID(_ entries: [kvm_cpuid_entry2]) -> [kvm_cpuid_entry2] {
        var out = entries
        for i in out.indices where out[i].function == 0x4000_0001 { out[i].eax &= ~Self.hiddenPVFeatures }
        func bit(_ leaf: UInt32, _ reg: KeyPath<kvm_cpuid_entry2, UInt32>, _ b: Int) -> Bool {
            guard let e = out.first(where: { $0.function == leaf && $0.index == 0 }) else { return false }
            return (e[keyPath: reg] >> UInt32(b)) & 1 != 0
        }
        let f = FixupContext(osxsave: true, cpl: 0, invpcid: bit(7, \.ebx, 10), smap: bit(7, \.ebx, 20),
                             clwb: bit(7, \.ebx, 24), rdpru: bit(0x8000_0008, \.ebx, 4))
        guestFeatures.withLock { $0 = f }
        return out
    }

    /// Creates the fix-ups; `syscallFixup` enables the user-mode SYSCALL redirection.
    public init(syscallFixup: Bool = true) {
        syscall = syscallFixup ? try? SyscallFixup() : nil
    }

    public func configure(vm: VirtualMachine, logger: Logger) throws {
        guard let syscall else { return }
        do {
            try syscall.configure(vm: vm)
        } catch {
            logger.warning("pvm: syscall fix-up unavailable: \(error)")
        }
    }

    public func handleMSR(vcpu: VCPU, memory: GuestMemory, index: UInt32, write: UInt64?, logger: Logger) -> Bool {
        guard let syscall, index == SyscallFixup.lstar else { return false }
        do {
            if let value = write {
                try syscall.handleLSTARWrite(vcpu: vcpu, memory: memory, value: value, logger: logger)
                count("LSTAR write")
            } else {
                try syscall.handleLSTARRead(vcpu: vcpu)
                count("LSTAR read")
            }
            return true
        } catch {
            logger.error("pvm: LSTAR \(write == nil ? "read" : "write") fix-up failed: \(error)")
            return false
        }
    }

    public var savedState: [String: UInt64] {
        guard let lstar = syscall?.writtenLSTAR else { return [:] }
        return ["guest LSTAR": lstar]
    }

    public func restore(_ state: [String: UInt64]) {
        if let lstar = state["guest LSTAR"] { syscall?.restoreLSTAR(lstar) }
    }

    public func handleMMIO(vcpu: VCPU, memory: GuestMemory, address: UInt64, isWrite: Bool, logger: Logger) -> Bool {
        guard let syscall, syscall.isTrampolineExit(address: address, isWrite: isWrite) else { return false }
        do {
            guard try syscall.enterKernel(vcpu: vcpu, logger: logger) else { return false }
            count("syscall")
            return true
        } catch {
            logger.error("pvm: syscall fix-up failed: \(error)")
            return false
        }
    }

    /// Whether /dev/kvm on this host is PVM: the `kvm_pvm` module is loaded, or the CPU has
    /// neither the `vmx` nor the `svm` flag. Where neither /sys nor /proc is there (a vmm in the
    /// jailer's chroot), CPUID answers the second question.
    public static func detect(sysModule: String = "/sys/module/kvm_pvm", cpuinfo: String = "/proc/cpuinfo") -> Bool {
        if access(sysModule, F_OK) == 0 { return true }
        guard let text = readSmallFile(cpuinfo) else { return ckvm_host_cpuid_has_hw_virt() == 0 }
        guard let flags = text.split(separator: "\n").first(where: { $0.hasPrefix("flags") }) else { return false }
        let words = Set(flags.split(separator: " ").map(String.init))
        return !words.contains("vmx") && !words.contains("svm")
    }

    public var counters: [String: UInt64] { counts.withLock { $0 } }

    func count(_ what: String) { counts.withLock { $0[what, default: 0] += 1 } }

    /// The action for instruction `bytes` that the host failed to emulate.
    public enum Fixup: Equatable, Sendable {
        /// Advance RIP by n.
        case skip(Int)
        /// Advance RIP by `advance` and inject exception `vector`.
        case inject(vector: UInt8, advance: Int)
        /// `int vector` (`length` bytes): delivered through its IDT gate after the privilege check.
        case softwareInterrupt(vector: UInt8, length: Int)
        /// `clac` (false) or `stac` (true) at CPL 0: RFLAGS.AC changed, RIP advanced by 3.
        case setAC(Bool)
        /// `iret` (with an operand-size prefix when `prefixed`) in protected mode (`IRETEmulation`).
        case interruptReturn(prefixed: Bool)
    }

    /// The guest state the #UD decisions depend on.
    public struct FixupContext: Equatable, Sendable {
        /// CR4.OSXSAVE.
        public var osxsave = true
        /// The current privilege level.
        public var cpl: UInt8 = 0
        /// CPUID features of the guest: INVPCID, SMAP (clac/stac), CLWB, RDPRU.
        public var invpcid = true, smap = true, clwb = true, rdpru = true
        public init(osxsave: Bool = true, cpl: UInt8 = 0, invpcid: Bool = true, smap: Bool = true, clwb: Bool = true,
                    rdpru: Bool = true) {
            self.osxsave = osxsave; self.cpl = cpl; self.invpcid = invpcid; self.smap = smap; self.clwb = clwb; self.rdpru = rdpru
        }
    }

    /// Decides the fix-up for the instruction starting with `bytes` in `context`, or nil (then the failure is
    /// reported with its bytes).
    public static func fixup(for bytes: [UInt8], context: FixupContext = FixupContext()) -> Fixup? {
        guard let first = bytes.first else { return nil }
        let ud = Fixup.inject(vector: 6, advance: 0)        // #UD is a fault: RIP stays at the instruction
        func at(_ i: Int) -> UInt8? { i < bytes.count ? bytes[i] : nil }
        switch first {
        case 0x9b: return .skip(1)                          // fwait
        case 0xcc: return .inject(vector: 3, advance: 1)    // int3 → #BP (trap: RIP after int3)
        case 0xcd:                                          // int imm8
            guard let v = at(1) else { return nil }
            return .softwareInterrupt(vector: v, length: 2)
        case 0xcf: return .interruptReturn(prefixed: false) // iret
        case 0x66 where at(1) == 0xcf: return .interruptReturn(prefixed: true)
        case 0x0f:
            switch (at(1), at(2)) {
            case (0x0b, _): return ud                       // ud2
            case (0x01, 0xd0): return context.osxsave ? nil : ud                       // xgetbv
            // clac, stac: #UD outside ring 0; in ring 0 they only change RFLAGS.AC, which is emulated. (On this host
            // the guest's CPUID leaf 7 is not the VMM's table: guests see the host's SMAP and CLWB bits, measured.)
            case (0x01, 0xca), (0x01, 0xcb): return context.cpl == 0 ? .setAC(bytes[2] == 0xcb) : ud
            case (0x01, 0xfd): return context.rdpru ? nil : ud                         // rdpru
            default: return nil
            }
        case 0x66:
            // Operand-size prefix, an optional REX, then invpcid (0f 38 82 /r) or clwb (0f ae /6, memory operand).
            var i = 1
            if let r = at(1), r & 0xf0 == 0x40 { i = 2 }
            switch (at(i), at(i + 1), at(i + 2), at(i + 3)) {
            case (0x0f, 0x38, 0x82, _): return context.invpcid ? nil : ud
            case (0x0f, 0xae, let m?, let sib) where (m >> 3) & 7 == 6 && m >> 6 != 3:
                // clwb: write-back of a cache line, which coherent guest RAM does not need: skipped. Length: the
                // prefix, REX, 0f ae, ModRM, SIB and displacement.
                guard context.clwb else { return ud }
                let mod = m >> 6, rm = m & 7
                var n = i + 3
                if rm == 4 { n += 1 }
                if mod == 1 { n += 1 } else if mod == 2 || (mod == 0 && rm == 5) || (mod == 0 && rm == 4 && (sib ?? 0) & 7 == 5) { n += 4 }
                return .skip(n)
            default: return nil
            }
        default: return nil
        }
    }

    public func handleInternalError(vcpu: VCPU, memory: GuestMemory, suberror: UInt32, data: [UInt64], logger: Logger) -> Bool {
        guard suberror == UInt32(KVM_INTERNAL_ERROR_EMULATION) else { return false }
        let bytes = InstructionBytes.fromExitData(suberror: suberror, data: data)
            ?? InstructionBytes.atRIP(vcpu: vcpu, memory: memory, count: 15)?.bytes ?? []
        var context = guestFeatures.withLock { $0 }
        guard let sregs = try? vcpu.getSregs() else { return false }
        context.osxsave = sregs.cr4 & (1 << 18) != 0
        context.cpl = sregs.ss.dpl
        guard let fix = Self.fixup(for: bytes, context: context) else { return false }
        do {
            var regs = try vcpu.getRegs()
            switch fix {
            case .interruptReturn(let prefixed):
                return try emulateIRET(vcpu: vcpu, memory: memory, sregs: sregs, prefixed: prefixed, logger: logger)
            case .setAC(let on):
                regs.rflags = on ? regs.rflags | (1 << 18) : regs.rflags & ~(1 << 18)
                regs.rip &+= 3
                try vcpu.setRegs(regs)
                count(on ? "stac" : "clac")
            case .softwareInterrupt(let vector, let length):
                // The gate: present, and its DPL at least the CPL (else #GP, or #NP, with the IDT error code).
                let long = sregs.efer & (1 << 10) != 0
                let size: UInt64 = long ? 16 : 8
                let error = UInt32(vector) << 3 | 2
                let gate = UInt64(vector) * size
                guard gate + size - 1 <= UInt64(sregs.idt.limit) else {
                    try vcpu.injectException(vector: 13, errorCode: error)
                    count("int n → #GP")
                    return true
                }
                let g = GuestPageWalker.read(sregs.idt.base &+ gate, count: Int(size), cr0: sregs.cr0, cr3: sregs.cr3,
                                             cr4: sregs.cr4, efer: sregs.efer, memory: memory)
                guard g.count == Int(size) else { return false }
                let dpl = (g[5] >> 5) & 3, present = g[5] & 0x80 != 0
                if UInt8(dpl) < context.cpl {
                    try vcpu.injectException(vector: 13, errorCode: error)
                    count("int n → #GP")
                } else if !present {
                    try vcpu.injectException(vector: 11, errorCode: error)
                    count("int n → #NP")
                } else {
                    regs.rip &+= UInt64(length)
                    try vcpu.setRegs(regs)
                    try vcpu.injectInterrupt(vector: vector)
                    count("int n")
                }
            case .skip(let n):
                regs.rip &+= UInt64(n)
                try vcpu.setRegs(regs)
                count(n == 1 ? "fwait skipped" : "clwb skipped")
            case .inject(let vector, let advance):
                if advance > 0 {
                    regs.rip &+= UInt64(advance)
                    try vcpu.setRegs(regs)
                }
                try vcpu.injectException(vector: vector)
                count(vector == 3 ? "int3 → #BP" : "#UD")
            }
            logger.trace("pvm fix-up \(fix) at rip 0x\(String(regs.rip, radix: 16))")
            return true
        } catch {
            logger.error("pvm fix-up \(fix) failed: \(error)")
            return false
        }
    }
}

/// Reads a small text file (≤ 1 MiB), or nil.
func readSmallFile(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 65536)
    while out.count < 1 << 20 {
        let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { break }
        out += buf[0..<n]
    }
    return String(decoding: out, as: UTF8.self)
}
