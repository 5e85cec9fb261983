import GuestMemory

/// Loads flat binaries (raw code bytes) the way the classic KVM test harness ran test programs.
public enum FlatLoader {
    /// CPU mode at the entry point.
    public enum Mode: String, Sendable, Codable, CaseIterable {
        case real, protected, long
    }

    /// Reads a flat image from `source` (a file path or bytes; at most guest RAM in size) and loads it
    /// as `load(image:at:entry:mode:memory:)` does.
    public static func load(source: BootSource, at loadAddress: UInt64, entry: UInt64, mode: Mode,
                            memory: GuestMemory) throws -> LoadedKernel {
        try load(image: source.readAll(limit: memory.totalSize), at: loadAddress, entry: entry, mode: mode, memory: memory)
    }

    /// Copies `image` to `loadAddress` and returns the entry state for `entry` in `mode`:
    /// - `.real`: when `entry` < 64 KiB, CS = 0 and IP = entry; below 1 MiB, CS = (entry >> 4) & 0xf000
    ///   and IP = entry - CS × 16; in the high memory area (1 MiB to 0x10ffef), CS = 0xffff. All segments equal CS;
    ///   SP = 0x8ff0 (`BootLayout.bootStackTop`) when CS = 0, else 0xfffe. Nothing else is written.
    /// - `.protected`: flat 32-bit segments (GDT written at 0x500), paging off, ESP = 0x8ff0.
    /// - `.long`: GDT and identity page tables (4 GiB) written, 64-bit code segment, RSP = 0x8ff0.
    ///
    /// The image must fit in guest RAM and, in protected and long mode, must not overlap the GDT
    /// and page tables (0x500-0xefff).
    public static func load(image: [UInt8], at loadAddress: UInt64, entry: UInt64, mode: Mode,
                            memory: GuestMemory) throws -> LoadedKernel {
        guard !image.isEmpty else { throw BootError.invalidImage("flat image is empty") }
        let size = UInt64(image.count)
        guard loadAddress.addingReportingOverflow(size).overflow == false, memory.contains(loadAddress, count: size) else {
            throw BootError.doesNotFit("flat image of \(size) bytes at \(hex(loadAddress)) is outside guest RAM (\(sizeText(memory.totalSize)))")
        }
        var result = LoadedKernel(format: .flat)
        let imageRange = LoadRange(start: loadAddress, size: size, what: "flat image")
        switch mode {
        case .real:
            guard entry < 0x10_fff0 else {
                throw BootError.invalidImage("flat real-mode entry \(hex(entry)) is not reachable from real mode (must be below 0x10fff0)")
            }
            let cs: UInt64 = entry < 0x10000 ? 0 : entry < 0x10_0000 ? (entry >> 4) & 0xf000 : 0xffff
            guard let ip = UInt16(exactly: entry - (cs << 4)) else {
                throw BootError.invalidImage("flat real-mode entry \(hex(entry)) is not reachable from real mode")
            }
            result.entry = .realMode(cs: UInt16(cs), ip: ip, sp: cs == 0 ? UInt16(BootLayout.bootStackTop) : 0xfffe)
        case .protected, .long:
            guard entry <= (mode == .protected ? UInt64(UInt32.max) : BootLayout.identityMappedSize - 1) else {
                throw BootError.invalidImage("flat \(mode.rawValue)-mode entry \(hex(entry)) is outside the flat 4 GiB")
            }
            let boot = LoadRange(start: BootLayout.bootDataStart,
                                 size: (mode == .long ? BootLayout.pageTablesEnd : BootLayout.idtAddress + 8) - BootLayout.bootDataStart,
                                 what: mode == .long ? "GDT and page tables" : "GDT")
            if boot.overlaps(imageRange.start, imageRange.size) {
                throw BootError.doesNotFit("flat image at \(hex(loadAddress))+\(hex(size)) overlaps the \(boot.what) at \(hex(boot.start))-\(hex(boot.end))")
            }
            try BootGDT.write(long: mode == .long, into: memory)
            if mode == .long {
                try IdentityPageTables.write(into: memory)
                result.entry = .longMode(entry: entry, sp: BootLayout.bootStackTop)
            } else {
                result.entry = .protectedMode(entry: UInt32(entry))
            }
            result.ranges.append(boot)
        }
        try guarded("flat image", at: loadAddress) { try memory.write(image, at: loadAddress) }
        result.ranges.append(imageRange)
        return result
    }
}
