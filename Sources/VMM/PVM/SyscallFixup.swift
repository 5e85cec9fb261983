import GuestMemory
import KVM
import Logging
import Synchronization

/// The user-mode SYSCALL fix-up for PVM hosts (HOST-KVM.md, quirk 3).
///
/// On PVM, a guest user-mode `syscall` sets RIP = LSTAR, RCX and R11, but leaves CS at the user
/// selector, so the kernel's entry code faults. The fix-up:
/// 1. an MSR filter sends the guest's writes to LSTAR (0xc0000082) to the VMM, which records the
///    value and sets the real LSTAR to a trampoline at `trampolineVA` (PML4 slot 511, PUD 0, a
///    hole in Linux's layout), mapped user-accessible in the kernel's page tables of that moment
///    (every process copies the kernel half of the top-level table);
/// 2. the trampoline, `mov %al, 0x1000-6(%rip); ud2`, stores to the next virtual page, which maps
///    the unbacked guest-physical page `mmioTargetPhys`, giving a KVM_EXIT_MMIO;
/// 3. on that exit the VMM completes the store, sets CS = STAR[47:32] and SS = CS + 8 at DPL 0,
///    masks RFLAGS with SFMASK, and sets RIP to the guest's LSTAR.
///
/// 32-bit compat entry (CSTAR, `int 0x80`) is not handled.
final class SyscallFixup: @unchecked Sendable {
    static let lstar: UInt32 = 0xc000_0082
    static let star: UInt32 = 0xc000_0081
    static let sfmask: UInt32 = 0xc000_0084
    /// Guest-virtual address of the trampoline code page.
    static let trampolineVA: UInt64 = 0xffff_ff80_0000_0000
    /// Guest-physical page whose access (unbacked) signals a syscall.
    static let mmioTargetPhys: UInt64 = 0xfe00_0000
    /// Guest-physical base of the VMM-owned pages: PMD, PT, trampoline code (just below the target).
    static let pagesPhys: UInt64 = 0xfdff_d000
    /// KVM memory slot for those pages (RAM uses the low slots).
    static let slot: UInt32 = 100
    /// `mov %al, 0xffa(%rip)` (6 bytes) then `ud2`.
    static let trampolineCode: [UInt8] = [0x88, 0x05, 0xfa, 0x0f, 0x00, 0x00, 0x0f, 0x0b]

    let pages: GuestMemory
    private let guestLSTAR = Mutex<UInt64?>(nil)

    init() throws {
        pages = try GuestMemory(regions: [GuestRegion(start: Self.pagesPhys, size: 0x3000)])
        let pmd = Self.pagesPhys, pt = Self.pagesPhys + 0x1000, code = Self.pagesPhys + 0x2000
        // Present | RW | User on the tables; the code page is Present | User (read-only, executable).
        try pages.writeLE(pt | 0x7, at: pmd)
        try pages.writeLE(code | 0x5, at: pt)
        try pages.writeLE(Self.mmioTargetPhys | 0x7, at: pt + 8)
        try pages.write(Self.trampolineCode, at: code)
    }

    /// Registers the pages with KVM and routes guest LSTAR reads and writes to user space.
    func configure(vm: VirtualMachine) throws {
        let region = pages.regions[0]
        // The MSR filter before the memory slot: KVM_X86_SET_MSR_FILTER waits for an SRCU grace period, which is
        // expedited on an idle VM but takes 12-15 ms here right after a memory-slot change.
        try vm.enableCap(.x86UserSpaceMSR, args: [UInt64(KVM_MSR_EXIT_REASON_FILTER)])
        try vm.setMSRFilter(defaultDeny: false, ranges: [
            MSRFilterRange(flags: UInt32(KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE), base: Self.lstar, count: 1, bitmap: [0]),
        ])
        try vm.setUserMemoryRegion(slot: Self.slot, guestPhys: region.start, size: region.size, host: region.host)
    }

    /// The LSTAR the guest wrote (the real one holds the trampoline), if it wrote one.
    var writtenLSTAR: UInt64? { guestLSTAR.withLock { $0 } }

    /// Puts back the guest's LSTAR of a snapshot (the trampoline mapping is in the restored guest
    /// memory, and the real LSTAR comes back with the vCPU's MSRs).
    func restoreLSTAR(_ value: UInt64) { guestLSTAR.withLock { $0 = value } }

    /// A guest write to LSTAR: remember it, map the trampoline, point the real LSTAR at it.
    func handleLSTARWrite(vcpu: VCPU, memory: GuestMemory, value: UInt64, logger: Logger) throws {
        // A non-canonical address raises #GP, as WRMSR to LSTAR does on hardware; LSTAR keeps its value.
        let high = value >> 47
        guard high == 0 || high == 0x1_ffff else {
            vcpu.completeMSR(error: true)
            return
        }
        guestLSTAR.withLock { $0 = value }
        let sregs = try vcpu.getSregs()
        // Redirect only when the trampoline is mapped in these page tables: otherwise a user-mode syscall would take a
        // #PF at the trampoline. Unredirected, the guest's own value stays in LSTAR (the host's quirk applies).
        // Page tables outside guest RAM count as "not mapped".
        let mapped = (try? mapTrampoline(cr3: sregs.cr3, memory: memory, logger: logger)) ?? false
        vcpu.completeMSR(error: false)
        try vcpu.setMSRs([(Self.lstar, mapped ? Self.trampolineVA : value)])
        guard mapped else { return }
        logger.debug("pvm: guest LSTAR 0x\(String(value, radix: 16)) → trampoline 0x\(String(Self.trampolineVA, radix: 16))")
    }

    /// A guest read of LSTAR: the value the guest wrote (the real LSTAR holds the trampoline), or the real value when
    /// the guest has written none.
    func handleLSTARRead(vcpu: VCPU) throws {
        let value: UInt64
        if let written = guestLSTAR.withLock({ $0 }) {
            value = written
        } else {
            value = try vcpu.getMSRs([Self.lstar]).first?.value ?? 0
        }
        vcpu.completeMSR(value: value)
    }

    /// Links PUD 0 of PML4 slot 511 of the page tables at `cr3` to the trampoline tables, when that slot is present and
    /// its PUD 0 is free (or already ours); returns whether the trampoline is mapped. Checked at every LSTAR write
    /// (two guest reads), so page tables that changed since are seen as they are.
    func mapTrampoline(cr3: UInt64, memory: GuestMemory, logger: Logger) throws -> Bool {
        let root = cr3 & 0x000f_ffff_ffff_f000
        let pml4eAddr = root + 511 * 8
        let pml4e: UInt64 = try memory.readLE(at: pml4eAddr)
        guard pml4e & 1 != 0 else {
            logger.debug("pvm: PML4 slot 511 of cr3 0x\(String(root, radix: 16)) is empty; LSTAR not redirected")
            return false
        }
        let pud = pml4e & 0x000f_ffff_ffff_f000
        let pude: UInt64 = try memory.readLE(at: pud)
        if pude & 1 != 0 && pude & 0x000f_ffff_ffff_f000 != Self.pagesPhys {
            logger.warning("pvm: PUD 0 of PML4 slot 511 is in use (0x\(String(pude, radix: 16))); LSTAR not redirected")
            return false
        }
        // Written from user space, so KVM's dirty log misses them: a migration must still send them.
        if pude != Self.pagesPhys | 0x7 {
            try memory.writeLE(Self.pagesPhys | 0x7, at: pud)
            memory.dirtyLog.mark(pud, count: 8)
        }
        if pml4e & 0x4 == 0 {
            try memory.writeLE(pml4e | 0x4, at: pml4eAddr)
            memory.dirtyLog.mark(pml4eAddr, count: 8)
        }
        return true
    }

    /// Whether an MMIO exit at `address` is the trampoline's store.
    func isTrampolineExit(address: UInt64, isWrite: Bool) -> Bool {
        isWrite && address >= Self.mmioTargetPhys && address < Self.mmioTargetPhys + 0x1000
    }

    /// Completes the trampoline's store and enters the guest kernel's syscall entry at CPL 0.
    func enterKernel(vcpu: VCPU, logger: Logger) throws -> Bool {
        guard let entry = guestLSTAR.withLock({ $0 }) else { return false }
        // Let KVM finish the emulated store (RIP moves past it) without running the guest.
        vcpu.immediateExit = true
        let exit = try vcpu.run()
        vcpu.immediateExit = false
        var regs = try vcpu.getRegs()
        if case .interrupted = exit, regs.rip == Self.trampolineVA + 6 || regs.rip == Self.trampolineVA {
            // Either way the store is harmless to skip.
        } else {
            logger.warning("pvm: unexpected state after the syscall trampoline store: exit \(exit.name), rip 0x\(String(regs.rip, radix: 16))")
        }
        let msrs = try vcpu.getMSRs([Self.star, Self.sfmask])
        let star = msrs.first { $0.index == Self.star }?.value ?? 0
        let sfmask = msrs.first { $0.index == Self.sfmask }?.value ?? 0
        let cs = UInt16(truncatingIfNeeded: star >> 32) & 0xfffc
        var sregs = try vcpu.getSregs()
        sregs.cs.selector = cs
        sregs.cs.base = 0; sregs.cs.limit = 0xffff_ffff; sregs.cs.type = 0xb; sregs.cs.present = 1
        sregs.cs.dpl = 0; sregs.cs.db = 0; sregs.cs.s = 1; sregs.cs.l = 1; sregs.cs.g = 1; sregs.cs.unusable = 0
        sregs.ss.selector = cs + 8
        sregs.ss.base = 0; sregs.ss.limit = 0xffff_ffff; sregs.ss.type = 0x3; sregs.ss.present = 1
        sregs.ss.dpl = 0; sregs.ss.db = 1; sregs.ss.s = 1; sregs.ss.l = 0; sregs.ss.g = 1; sregs.ss.unusable = 0
        try vcpu.setSregs(sregs)
        regs.rip = entry
        regs.rflags = (regs.rflags & ~sfmask) | 0x2
        try vcpu.setRegs(regs)
        return true
    }
}
