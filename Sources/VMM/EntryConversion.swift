import Boot
import KVM

/// Converts a loader's `EntryState` into KVM register state.
public enum EntryConversion {
    /// `kvm_segment` for a segment (`avl` 0, usable).
    public static func segment(_ s: EntryState.Segment) -> kvm_segment {
        var k = kvm_segment()
        k.base = s.base
        k.limit = s.limit
        k.selector = s.selector
        k.type = s.type
        k.present = s.present ? 1 : 0
        k.dpl = s.dpl
        k.db = s.db ? 1 : 0
        k.s = s.s ? 1 : 0
        k.l = s.l ? 1 : 0
        k.g = s.g ? 1 : 0
        k.avl = 0
        k.unusable = s.present ? 0 : 1
        return k
    }

    /// `base` (the vCPU's current special registers, keeping APIC base, TR, LDT…) with the
    /// segments, descriptor tables, control registers and EFER of `entry`.
    public static func sregs(_ entry: EntryState, base: kvm_sregs) -> kvm_sregs {
        var s = base
        s.cs = segment(entry.cs)
        s.ds = segment(entry.ds)
        s.es = segment(entry.es)
        s.fs = segment(entry.fs)
        s.gs = segment(entry.gs)
        s.ss = segment(entry.ss)
        s.gdt.base = entry.gdt.base
        s.gdt.limit = entry.gdt.limit
        s.idt.base = entry.idt.base
        s.idt.limit = entry.idt.limit
        s.cr0 = entry.cr0
        s.cr3 = entry.cr3
        s.cr4 = entry.cr4
        s.efer = entry.efer
        return s
    }

    /// The general-purpose registers of `entry` (bit 1 of RFLAGS forced on).
    public static func regs(_ entry: EntryState) -> kvm_regs {
        var r = kvm_regs()
        r.rax = entry.rax; r.rbx = entry.rbx; r.rcx = entry.rcx; r.rdx = entry.rdx
        r.rsi = entry.rsi; r.rdi = entry.rdi; r.rsp = entry.rsp; r.rbp = entry.rbp
        r.rip = entry.rip
        r.rflags = entry.rflags | 0x2
        return r
    }
}
