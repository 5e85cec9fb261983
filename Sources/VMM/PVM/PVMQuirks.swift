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
/// - emulation failures on `fwait` (skipped), `int3` (RIP+1 and #BP injected) and `ud2` (#UD
///   injected) are recovered;
/// - user-mode `syscall` is redirected through a trampoline into the kernel at CPL 0
///   (`SyscallFixup`);
/// - every fix-up is counted.
public final class PVMQuirks: HostQuirks, @unchecked Sendable {
    public var name: String { "pvm" }
    public var hidesCX16: Bool { true }

    private let counts = Mutex<[String: UInt64]>([:])
    private let syscall: SyscallFixup?

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
    }

    /// Decides the fix-up for an instruction (after legacy/REX prefixes are skipped), or nil.
    public static func fixup(for bytes: [UInt8]) -> Fixup? {
        guard let first = bytes.first else { return nil }
        switch first {
        case 0x9b: return .skip(1)                          // fwait
        case 0xcc: return .inject(vector: 3, advance: 1)    // int3 → #BP (trap: RIP after int3)
        case 0x0f where bytes.count >= 2 && bytes[1] == 0x0b:
            return .inject(vector: 6, advance: 0)           // ud2 → #UD (fault: RIP at ud2)
        default: return nil
        }
    }

    public func handleInternalError(vcpu: VCPU, memory: GuestMemory, suberror: UInt32, data: [UInt64], logger: Logger) -> Bool {
        guard suberror == UInt32(KVM_INTERNAL_ERROR_EMULATION) else { return false }
        let bytes = InstructionBytes.fromExitData(suberror: suberror, data: data)
            ?? InstructionBytes.atRIP(vcpu: vcpu, memory: memory, count: 2)?.bytes ?? []
        guard let fix = Self.fixup(for: bytes) else { return false }
        do {
            var regs = try vcpu.getRegs()
            switch fix {
            case .skip(let n):
                regs.rip &+= UInt64(n)
                try vcpu.setRegs(regs)
                count("fwait skipped")
            case .inject(let vector, let advance):
                if advance > 0 {
                    regs.rip &+= UInt64(advance)
                    try vcpu.setRegs(regs)
                }
                try vcpu.injectException(vector: vector)
                count(vector == 3 ? "int3 → #BP" : "ud2 → #UD")
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
