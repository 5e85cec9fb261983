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
/// - every fix-up is counted.
///
/// TODO(pvm-syscall): the user-mode SYSCALL fix-up (HOST-KVM.md quirk 3) is not implemented yet.
/// Plan: in `configure`, enable KVM_CAP_X86_USER_SPACE_MSR (KVM_MSR_EXIT_REASON_FILTER) and
/// set an MSR filter denying writes to LSTAR (0xc0000082) so they reach `handleMSR`, which
/// records the guest's value and writes the trampoline address 0xffffff8000000000 instead; map the
/// trampoline page (`mov %al,0x1000-6(%rip); ud2`) user-accessible in the guest kernel's page
/// table (PML4 slot 511); in `handleMMIO`, on a write to the unbacked page 0xfe000000 from the
/// trampoline, set CS = STAR[47:32], SS = CS+8 at DPL 0 and RIP = the guest's LSTAR.
public final class PVMQuirks: HostQuirks {
    public var name: String { "pvm" }
    public var hidesCX16: Bool { true }

    private let counts = Mutex<[String: UInt64]>([:])

    public init() {}

    /// Whether /dev/kvm on this host is PVM: the `kvm_pvm` module is loaded, or the CPU has
    /// neither the `vmx` nor the `svm` flag.
    public static func detect(sysModule: String = "/sys/module/kvm_pvm", cpuinfo: String = "/proc/cpuinfo") -> Bool {
        if access(sysModule, F_OK) == 0 { return true }
        guard let text = readSmallFile(cpuinfo) else { return false }
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
