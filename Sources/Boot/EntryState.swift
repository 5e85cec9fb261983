/// The CPU state a loader asks for at the guest's first instruction, independent of KVM.
///
/// Loaders (bzImage, ELF, multiboot, flat) write their image, tables, GDT and page tables into
/// guest memory and return one of these; the VMM turns it into `kvm_regs`/`kvm_sregs`.
public struct EntryState: Sendable, Equatable {
    /// A segment register, in the same terms as `struct kvm_segment`.
    public struct Segment: Sendable, Equatable {
        public var base: UInt64
        public var limit: UInt32
        public var selector: UInt16
        /// Descriptor type (e.g. 0xb code execute/read accessed, 0x3 data read/write accessed).
        public var type: UInt8
        public var present: Bool
        public var dpl: UInt8
        /// Default operation size: 1 = 32-bit.
        public var db: Bool
        /// 1 = code/data segment (not system).
        public var s: Bool
        /// 64-bit code segment.
        public var l: Bool
        /// Granularity: limit in 4 KiB units.
        public var g: Bool

        public init(base: UInt64, limit: UInt32, selector: UInt16, type: UInt8, present: Bool = true,
                    dpl: UInt8 = 0, db: Bool, s: Bool = true, l: Bool, g: Bool) {
            self.base = base; self.limit = limit; self.selector = selector; self.type = type
            self.present = present; self.dpl = dpl; self.db = db; self.s = s; self.l = l; self.g = g
        }
    }

    /// A descriptor-table register (GDTR/IDTR).
    public struct Table: Sendable, Equatable {
        public var base: UInt64
        public var limit: UInt16
        public init(base: UInt64, limit: UInt16) { self.base = base; self.limit = limit }
    }

    public var rax: UInt64 = 0, rbx: UInt64 = 0, rcx: UInt64 = 0, rdx: UInt64 = 0
    public var rsi: UInt64 = 0, rdi: UInt64 = 0, rsp: UInt64 = 0, rbp: UInt64 = 0
    public var rip: UInt64 = 0
    /// Bit 1 is always set.
    public var rflags: UInt64 = 0x2

    public var cs: Segment, ds: Segment, es: Segment, fs: Segment, gs: Segment, ss: Segment
    public var gdt: Table = Table(base: 0, limit: 0xffff)
    public var idt: Table = Table(base: 0, limit: 0xffff)
    public var cr0: UInt64 = 0x10
    public var cr3: UInt64 = 0
    public var cr4: UInt64 = 0
    public var efer: UInt64 = 0

    public init(cs: Segment, ds: Segment, es: Segment, fs: Segment, gs: Segment, ss: Segment) {
        self.cs = cs; self.ds = ds; self.es = es; self.fs = fs; self.gs = gs; self.ss = ss
    }
}
