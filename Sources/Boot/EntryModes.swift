import GuestMemory

/// The GDT the loaders install at `BootLayout.gdtAddress`.
///
/// | selector | descriptor |
/// |---|---|
/// | 0x00 | null |
/// | 0x08 | flat 32-bit code (0x00cf9b000000ffff), for guests that switch modes |
/// | 0x10 | code: 64-bit (0x00af9b000000ffff) in long mode, flat 32-bit (0x00cf9b000000ffff) otherwise |
/// | 0x18 | flat data (0x00cf93000000ffff) |
public enum BootGDT {
    /// Flat 32-bit code, execute/read, accessed, 4 GiB.
    public static let code32: UInt64 = 0x00cf_9b00_0000_ffff
    /// 64-bit code (L=1), execute/read, accessed.
    public static let code64: UInt64 = 0x00af_9b00_0000_ffff
    /// Flat data, read/write, accessed, 4 GiB.
    public static let data: UInt64 = 0x00cf_9300_0000_ffff
    /// Code selector (`__BOOT_CS`).
    public static let codeSelector: UInt16 = 0x10
    /// Data selector (`__BOOT_DS`).
    public static let dataSelector: UInt16 = 0x18

    /// The four descriptors for a 64-bit (`long == true`) or 32-bit entry.
    public static func entries(long: Bool) -> [UInt64] {
        [0, code32, long ? code64 : code32, data]
    }

    /// Writes the GDT (at `at`, default `BootLayout.gdtAddress`) and an empty one-entry IDT (at `idt`) into guest memory.
    public static func write(long: Bool, into memory: GuestMemory, at: UInt64 = BootLayout.gdtAddress,
                             idt: UInt64 = BootLayout.idtAddress) throws {
        var bytes: [UInt8] = []
        for (i, e) in entries(long: long).enumerated() { bytes.putLE(e, at: i * 8) }
        try guarded("GDT", at: at) {
            try memory.write(bytes, at: at)
            try memory.writeLE(UInt64(0), at: idt)
        }
    }

    /// The GDTR value for the table written by `write`.
    public static var table: EntryState.Table { .init(base: BootLayout.gdtAddress, limit: 4 * 8 - 1) }
    /// The IDTR value for the empty IDT.
    public static var idtTable: EntryState.Table { .init(base: BootLayout.idtAddress, limit: 7) }
}

/// The identity page tables for long-mode entries: the first 4 GiB mapped with 2 MiB pages.
public enum IdentityPageTables {
    /// Present | writable.
    static let tableFlags: UInt64 = 0x3
    /// Present | writable | page size (2 MiB).
    static let largePageFlags: UInt64 = 0x83

    /// Writes PML4 (`BootLayout.pml4Address`), PDPT and four page directories.
    /// Returns the PML4 address for CR3.
    @discardableResult
    public static func write(into memory: GuestMemory) throws -> UInt64 {
        let pdCount = Int(BootLayout.identityMappedSize >> 30)
        var pml4 = [UInt8](repeating: 0, count: 4096)
        pml4.putLE(BootLayout.pdptAddress | tableFlags, at: 0)
        var pdpt = [UInt8](repeating: 0, count: 4096)
        var pds = [UInt8](repeating: 0, count: 4096 * pdCount)
        for d in 0..<pdCount {
            pdpt.putLE((BootLayout.pdAddress + UInt64(d) * 4096) | tableFlags, at: d * 8)
            for e in 0..<512 {
                let phys = (UInt64(d) << 30) | (UInt64(e) << 21)
                pds.putLE(phys | largePageFlags, at: (d * 512 + e) * 8)
            }
        }
        try guarded("identity page tables", at: BootLayout.pml4Address) {
            try memory.write(pml4, at: BootLayout.pml4Address)
            try memory.write(pdpt, at: BootLayout.pdptAddress)
            try memory.write(pds, at: BootLayout.pdAddress)
        }
        return BootLayout.pml4Address
    }
}

/// Runs a guest-memory write and turns a GuestMemory failure into a `BootError` naming `what`.
func guarded<R>(_ what: String, at address: UInt64, _ body: () throws -> R) throws -> R {
    do { return try body() } catch let e as BootError { throw e } catch {
        throw BootError.memory("cannot write \(what) at \(hex(address)): \(error)")
    }
}

extension EntryState {
    /// Real mode at `cs:ip` with stack `ss = cs`, `sp`: every segment has base `selector << 4`
    /// and limit 0xffff; CR0 has only ET set.
    public static func realMode(cs: UInt16, ip: UInt16, sp: UInt16) -> EntryState {
        let code = Segment(base: UInt64(cs) << 4, limit: 0xffff, selector: cs, type: 0xb, db: false, l: false, g: false)
        let data = Segment(base: UInt64(cs) << 4, limit: 0xffff, selector: cs, type: 0x3, db: false, l: false, g: false)
        var s = EntryState(cs: code, ds: data, es: data, fs: data, gs: data, ss: data)
        s.rip = UInt64(ip)
        s.rsp = UInt64(sp)
        s.cr0 = 0x10
        s.gdt = .init(base: 0, limit: 0xffff)
        s.idt = .init(base: 0, limit: 0x3ff)
        return s
    }

    /// 32-bit protected mode with flat 4 GiB segments (CS 0x10, data 0x18), paging off, CR0 = PE|ET.
    /// The GDT must be written with `BootGDT.write(long: false, into:)`.
    public static func protectedMode(entry: UInt32, sp: UInt32 = UInt32(BootLayout.bootStackTop)) -> EntryState {
        let code = Segment(base: 0, limit: 0xffff_ffff, selector: BootGDT.codeSelector, type: 0xb, db: true, l: false, g: true)
        let data = Segment(base: 0, limit: 0xffff_ffff, selector: BootGDT.dataSelector, type: 0x3, db: true, l: false, g: true)
        var s = EntryState(cs: code, ds: data, es: data, fs: data, gs: data, ss: data)
        s.rip = UInt64(entry)
        s.rsp = UInt64(sp)
        s.cr0 = 0x11
        s.gdt = BootGDT.table
        s.idt = BootGDT.idtTable
        return s
    }

    /// 64-bit long mode: CR0 0x80050033 (PG|AM|WP|NE|ET|MP|PE), CR4 PAE, EFER LME|LMA, CR3 = `pml4`,
    /// CS 0x10 64-bit, data 0x18. The GDT (`BootGDT.write(long: true, …)`) and page tables
    /// (`IdentityPageTables.write`) must be in guest memory.
    public static func longMode(entry: UInt64, pml4: UInt64 = BootLayout.pml4Address,
                                sp: UInt64 = 0, zeroPage: UInt64? = nil) -> EntryState {
        let code = Segment(base: 0, limit: 0xffff_ffff, selector: BootGDT.codeSelector, type: 0xb, db: false, l: true, g: true)
        let data = Segment(base: 0, limit: 0xffff_ffff, selector: BootGDT.dataSelector, type: 0x3, db: true, l: false, g: true)
        var s = EntryState(cs: code, ds: data, es: data, fs: data, gs: data, ss: data)
        s.rip = entry
        s.rsp = sp
        if let zeroPage { s.rsi = zeroPage }
        s.cr0 = 0x8005_0033
        s.cr3 = pml4
        s.cr4 = 0x20
        s.efer = 0x500
        s.gdt = BootGDT.table
        s.idt = BootGDT.idtTable
        return s
    }
}
