import GuestMemory

/// Translates guest-virtual (linear) addresses through the guest's own page tables, read from
/// guest memory. Used for diagnostics (instruction bytes at RIP) and fix-ups.
public enum GuestPageWalker {
    /// The physical address for `linear`, or nil when unmapped or a table lies outside RAM.
    /// Supports no paging, 32-bit, PAE and 4-level paging (CR4.LA57 is not supported).
    public static func translate(_ linear: UInt64, cr0: UInt64, cr3: UInt64, cr4: UInt64, efer: UInt64,
                                 memory: GuestMemory) -> UInt64? {
        guard cr0 & (1 << 31) != 0 else { return linear & 0xffff_ffff_ffff }
        let pae = cr4 & (1 << 5) != 0
        let long = efer & (1 << 10) != 0
        func entry64(_ addr: UInt64) -> UInt64? { try? memory.readLE(UInt64.self, at: addr) }
        let addrMask: UInt64 = 0x000f_ffff_ffff_f000
        if long {
            guard cr4 & (1 << 12) == 0 else { return nil }
            var table = cr3 & addrMask
            for (level, shift) in [(4, 39), (3, 30), (2, 21), (1, 12)] as [(Int, UInt64)] {
                guard let e = entry64(table + ((linear >> shift) & 0x1ff) * 8), e & 1 != 0 else { return nil }
                if (level == 3 || level == 2) && e & 0x80 != 0 {
                    let pageMask: UInt64 = (1 << shift) - 1
                    return (e & addrMask & ~pageMask) | (linear & pageMask)
                }
                table = e & addrMask
            }
            return table | (linear & 0xfff)
        }
        if pae {
            guard let pdpte = entry64((cr3 & 0xffff_ffe0) + ((linear >> 30) & 3) * 8), pdpte & 1 != 0,
                  let pde = entry64((pdpte & addrMask) + ((linear >> 21) & 0x1ff) * 8), pde & 1 != 0 else { return nil }
            if pde & 0x80 != 0 { return (pde & addrMask & ~0x1f_ffff) | (linear & 0x1f_ffff) }
            guard let pte = entry64((pde & addrMask) + ((linear >> 12) & 0x1ff) * 8), pte & 1 != 0 else { return nil }
            return (pte & addrMask) | (linear & 0xfff)
        }
        guard let pde = try? memory.readLE(UInt32.self, at: (cr3 & 0xffff_f000) + ((linear >> 22) & 0x3ff) * 4),
              pde & 1 != 0 else { return nil }
        if pde & 0x80 != 0, cr4 & (1 << 4) != 0 { return UInt64(pde & 0xffc0_0000) | (linear & 0x3f_ffff) }
        guard let pte = try? memory.readLE(UInt32.self, at: UInt64(pde & 0xffff_f000) + ((linear >> 12) & 0x3ff) * 4),
              pte & 1 != 0 else { return nil }
        return UInt64(pte & 0xffff_f000) | (linear & 0xfff)
    }

    /// Up to `count` bytes at linear address `linear`, stopping at the first unmapped page.
    public static func read(_ linear: UInt64, count: Int, cr0: UInt64, cr3: UInt64, cr4: UInt64, efer: UInt64,
                            memory: GuestMemory) -> [UInt8] {
        var out: [UInt8] = []
        var addr = linear
        while out.count < count {
            guard let phys = translate(addr, cr0: cr0, cr3: cr3, cr4: cr4, efer: efer, memory: memory) else { break }
            let chunk = min(count - out.count, Int(0x1000 - (addr & 0xfff)))
            guard let bytes = try? memory.read(at: phys, count: chunk) else { break }
            out += bytes
            addr &+= UInt64(chunk)
        }
        return out
    }
}
