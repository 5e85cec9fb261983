import GuestMemory

/// A multiboot v1 header found in a kernel image (Multiboot Specification 0.6.96, section 3.1).
public struct MultibootHeader: Sendable, Equatable {
    /// Header magic.
    public static let magic: UInt32 = 0x1bad_b002
    /// Value in EAX at entry.
    public static let bootloaderMagic: UInt32 = 0x2bad_b002
    /// The header must lie in the first 8192 bytes, 4-byte aligned.
    public static let searchLimit = 8192
    /// Flag bits: 0 page-align modules, 1 memory information, 2 video mode (optional), 16 a.out kludge.
    public static let supportedRequiredFlags: UInt32 = 0x3
    public static let videoFlag: UInt32 = 1 << 2
    public static let aoutKludgeFlag: UInt32 = 1 << 16

    /// File offset of the header.
    public var offset: Int
    public var flags: UInt32
    /// a.out kludge fields (valid when bit 16 is set).
    public var headerAddr: UInt32 = 0, loadAddr: UInt32 = 0, loadEndAddr: UInt32 = 0, bssEndAddr: UInt32 = 0, entryAddr: UInt32 = 0

    /// Finds the first header with a valid checksum (magic + flags + checksum == 0) in the first
    /// 8 KiB at a 4-byte aligned offset; nil when there is none.
    public static func find(in bytes: [UInt8]) -> MultibootHeader? {
        var o = 0
        let end = min(bytes.count, searchLimit)
        while o + 12 <= end {
            if bytes.getLE(UInt32.self, at: o) == magic {
                let flags = bytes.getLE(UInt32.self, at: o + 4)!
                let sum = bytes.getLE(UInt32.self, at: o + 8)!
                if magic &+ flags &+ sum == 0 {
                    var h = MultibootHeader(offset: o, flags: flags)
                    if o + 32 <= bytes.count {
                        h.headerAddr = bytes.getLE(UInt32.self, at: o + 12)!
                        h.loadAddr = bytes.getLE(UInt32.self, at: o + 16)!
                        h.loadEndAddr = bytes.getLE(UInt32.self, at: o + 20)!
                        h.bssEndAddr = bytes.getLE(UInt32.self, at: o + 24)!
                        h.entryAddr = bytes.getLE(UInt32.self, at: o + 28)!
                    }
                    return h
                }
            }
            o += 4
        }
        return nil
    }
}

/// Layout of the multiboot boot area, which the loader puts page-aligned above the highest loaded segment, as
/// QEMU does (so a kernel may load anywhere from 0x500 up, e.g. at 0x8000): the GDT and an empty IDT, the information
/// structure, the boot loader name, the memory map, the module list, the strings (command lines), then a stack.
/// Offsets are from the area's base.
public enum MultibootInfo {
    /// GDT (4 descriptors) and the empty IDT (8 bytes).
    public static let gdtOffset: UInt64 = 0, idtOffset: UInt64 = 0x20
    /// The information structure itself (88 bytes up to the VBE fields).
    public static let infoOffset: UInt64 = 0x40
    public static let infoSize = 88
    /// "swiftkvm\0".
    public static let loaderNameOffset: UInt64 = 0xa0
    /// Memory map (24-byte entries incl. the size field).
    public static let mmapOffset: UInt64 = 0xc0, mmapEnd: UInt64 = 0x500
    /// Module list (16-byte entries).
    public static let modsOffset: UInt64 = 0x500, modsEnd: UInt64 = 0x1000
    /// The kernel's and the modules' command lines.
    public static let stringsOffset: UInt64 = 0x1000
    /// Longest strings area (the kernel's and the modules' command lines, NUL-terminated).
    public static let stringsLimit = 0x7fc00
    /// Stack below the area's end.
    public static let stackSize: UInt64 = 0x4000
    /// Info flag bits set by this loader.
    public static let flagMem: UInt32 = 1 << 0, flagCmdline: UInt32 = 1 << 2, flagMods: UInt32 = 1 << 3
    public static let flagMmap: UInt32 = 1 << 6, flagLoaderName: UInt32 = 1 << 9
    /// Field offsets.
    public enum Offset {
        public static let flags = 0, memLower = 4, memUpper = 8, bootDevice = 12, cmdline = 16
        public static let modsCount = 20, modsAddr = 24, mmapLength = 44, mmapAddr = 48
        public static let drivesLength = 52, drivesAddr = 56, configTable = 60, bootLoaderName = 64
    }
    /// The area's size for `stringsBytes` bytes of strings: whole pages, the stack last.
    public static func areaSize(stringsBytes: Int) -> UInt64 {
        (stringsOffset + UInt64(stringsBytes) + 0xfff) & ~0xfff + stackSize
    }
}

/// Loads multiboot v1 kernels as QEMU's `-kernel` does.
public enum MultibootLoader {
    static func load(_ bytes: [UInt8], name: String, cmdline: String, modules: [MultibootModule],
                     memory: GuestMemory) throws -> LoadedKernel {
        let what = "multiboot kernel \(name)"
        guard let h = MultibootHeader.find(in: bytes) else {
            throw BootError.invalidImage("\(what): no multiboot header (magic 0x1badb002 with a valid checksum) in the first 8 KiB")
        }
        var result = LoadedKernel(format: .multiboot)
        let unsupported = h.flags & 0xffff & ~(MultibootHeader.supportedRequiredFlags | MultibootHeader.videoFlag)
        guard unsupported == 0 else {
            throw BootError.unsupported("\(what): header at offset \(hex(h.offset)) has flags \(hex(h.flags)) requesting unsupported features \(hex(unsupported))")
        }
        if h.flags & MultibootHeader.videoFlag != 0 { result.notes.append("video mode request ignored (text console only)") }

        // The kernel first, anywhere in RAM but the MP table's page; the boot area goes above its highest segment.
        let strings = try MultibootStrings(cmdline: cmdline, modules: modules)
        let avoid = [LoadRange(start: BootLayout.mpTableAddress, size: BootLayout.lowMemoryEnd - BootLayout.mpTableAddress,
                               what: "MP table")]

        var kernelRanges: [LoadRange]
        var entry: UInt64
        if h.flags & MultibootHeader.aoutKludgeFlag != 0 {
            (kernelRanges, entry) = try loadAout(h, bytes, memory: memory, avoid: avoid, what: what)
            result.notes.append("a.out kludge header at offset \(hex(h.offset))")
        } else {
            let elf = try ELFImage(parsing: bytes, bits: 32, machine: 3, what: "\(what) (ELF32, no a.out kludge)")
            kernelRanges = try elf.load(from: bytes, into: memory, avoiding: avoid, what: "multiboot ELF")
            entry = try elf.physicalEntry(what: what)
        }
        guard entry <= UInt64(UInt32.max) else {
            throw BootError.invalidImage("\(what): entry point \(hex(entry)) is above 4 GiB")
        }
        // Above the kernel (and above the real-mode IVT and BIOS data a low kernel leaves below it).
        let kernelEnd = max(kernelRanges.map(\.end).max() ?? 0, BootLayout.gdtAddress)
        let areaSize = MultibootInfo.areaSize(stringsBytes: strings.bytes.count)
        guard var base = BootLayout.alignUp(kernelEnd, BootLayout.pageSize) else {
            throw BootError.doesNotFit("\(what): no room for the boot area above \(hex(kernelEnd))")
        }
        // Skip the MP table and the legacy hole below 1 MiB when the area would reach them.
        if base < BootLayout.highMemoryStart, base + areaSize > BootLayout.mpTableAddress { base = max(base, BootLayout.highMemoryStart) }
        guard base + areaSize <= UInt64(UInt32.max), memory.contains(base, count: areaSize) else {
            throw BootError.doesNotFit("\(what): the multiboot boot area (\(sizeText(areaSize))) does not fit in guest RAM above the kernel's end \(hex(kernelEnd))")
        }
        let area = LoadRange(start: base, size: areaSize, what: "multiboot boot area (GDT, info, command lines, stack)")
        try BootGDT.write(long: false, into: memory, at: base + MultibootInfo.gdtOffset, idt: base + MultibootInfo.idtOffset)
        let stringsBase = base + MultibootInfo.stringsOffset
        try guarded("multiboot strings", at: stringsBase) { try memory.write(strings.bytes, at: stringsBase) }

        // Modules, page aligned after the boot area.
        var cursor = base + areaSize
        var modEntries: [(start: UInt64, end: UInt64, string: UInt64)] = []
        for (i, m) in modules.enumerated() {
            let size = try m.source.size()
            guard var start = BootLayout.alignUp(cursor, BootLayout.pageSize) else {
                throw BootError.doesNotFit("multiboot module \(i) \(m.source.name): no room after \(hex(cursor))")
            }
            // Not over the MP table, the ACPI tables and the legacy hole below 1 MiB.
            if start < BootLayout.highMemoryStart, start &+ size > BootLayout.mpTableAddress { start = BootLayout.highMemoryStart }
            guard start.addingReportingOverflow(size).overflow == false,
                  start + size <= UInt64(UInt32.max), memory.contains(start, count: max(size, 1)) else {
                throw BootError.doesNotFit("multiboot module \(i) \(m.source.name) of \(sizeText(size)) does not fit in guest RAM after \(hex(cursor)) (\(sizeText(memory.totalSize)) of RAM)")
            }
            try m.source.copy(into: memory, at: start, expectedSize: size)
            modEntries.append((start, start + size, stringsBase + strings.moduleOffsets[i]))
            result.ranges.append(LoadRange(start: start, size: size, what: "module \(i) \(m.source.name)"))
            cursor = start + size
        }
        guard UInt64(modEntries.count * 16) <= MultibootInfo.modsEnd - MultibootInfo.modsOffset else {
            throw BootError.unsupported("\(modEntries.count) multiboot modules are more than the \((MultibootInfo.modsEnd - MultibootInfo.modsOffset) / 16) the info area holds")
        }

        // The information structure.
        result.e820 = E820Map.build(for: memory)
        let lowEnd = E820Map.lowRAMEnd(of: memory)
        var info = [UInt8](repeating: 0, count: MultibootInfo.infoSize)
        var flags = MultibootInfo.flagMem | MultibootInfo.flagCmdline | MultibootInfo.flagMmap | MultibootInfo.flagLoaderName
        info.putLE(UInt32(min(lowEnd, BootLayout.mpTableAddress) / 1024), at: MultibootInfo.Offset.memLower)
        info.putLE(UInt32(clamping: lowEnd > BootLayout.highMemoryStart ? (lowEnd - BootLayout.highMemoryStart) / 1024 : 0),
                   at: MultibootInfo.Offset.memUpper)
        info.putLE(UInt32(stringsBase), at: MultibootInfo.Offset.cmdline)
        if !modEntries.isEmpty {
            flags |= MultibootInfo.flagMods
            info.putLE(UInt32(modEntries.count), at: MultibootInfo.Offset.modsCount)
            info.putLE(UInt32(base + MultibootInfo.modsOffset), at: MultibootInfo.Offset.modsAddr)
        }
        var mmap: [UInt8] = []
        for (i, e) in result.e820.enumerated() {
            mmap.putLE(UInt32(20), at: i * 24)
            mmap.putLE(e.address, at: i * 24 + 4)
            mmap.putLE(e.size, at: i * 24 + 12)
            mmap.putLE(e.kind.rawValue, at: i * 24 + 20)
        }
        guard UInt64(mmap.count) <= MultibootInfo.mmapEnd - MultibootInfo.mmapOffset else {
            throw BootError.unsupported("multiboot memory map of \(result.e820.count) entries does not fit the info area")
        }
        info.putLE(UInt32(mmap.count), at: MultibootInfo.Offset.mmapLength)
        info.putLE(UInt32(base + MultibootInfo.mmapOffset), at: MultibootInfo.Offset.mmapAddr)
        info.putLE(UInt32(base + MultibootInfo.loaderNameOffset), at: MultibootInfo.Offset.bootLoaderName)
        info.putLE(flags, at: MultibootInfo.Offset.flags)
        var mods: [UInt8] = []
        for (i, m) in modEntries.enumerated() {
            mods.putLE(UInt32(m.start), at: i * 16)
            mods.putLE(UInt32(m.end), at: i * 16 + 4)
            mods.putLE(UInt32(m.string), at: i * 16 + 8)
            mods.putLE(UInt32(0), at: i * 16 + 12)
        }
        try guarded("multiboot info", at: base + MultibootInfo.infoOffset) {
            try memory.zero(at: base + MultibootInfo.infoOffset, count: Int(MultibootInfo.stringsOffset - MultibootInfo.infoOffset))
            try memory.write(info, at: base + MultibootInfo.infoOffset)
            try memory.write(Array("swiftkvm".utf8) + [0], at: base + MultibootInfo.loaderNameOffset)
            try memory.write(mmap, at: base + MultibootInfo.mmapOffset)
            try memory.write(mods, at: base + MultibootInfo.modsOffset)
        }

        result.ranges = [area] + kernelRanges + result.ranges
        var state = EntryState.protectedMode(entry: UInt32(entry), sp: UInt32(base + areaSize - 16))
        state.gdt = EntryState.Table(base: base + MultibootInfo.gdtOffset, limit: 4 * 8 - 1)
        state.idt = EntryState.Table(base: base + MultibootInfo.idtOffset, limit: 7)
        state.rax = UInt64(MultibootHeader.bootloaderMagic)
        state.rbx = base + MultibootInfo.infoOffset
        result.entry = state
        return result
    }

    /// Loads an a.out-kludge image; returns its ranges and entry.
    private static func loadAout(_ h: MultibootHeader, _ bytes: [UInt8], memory: GuestMemory, avoid: [LoadRange],
                                 what: String) throws -> ([LoadRange], UInt64) {
        guard h.offset + 32 <= bytes.count else {
            throw BootError.invalidImage("\(what): a.out kludge header at offset \(hex(h.offset)) is truncated")
        }
        guard h.headerAddr >= h.loadAddr, UInt64(h.headerAddr - h.loadAddr) <= UInt64(h.offset) else {
            throw BootError.invalidImage("\(what): header_addr \(hex(h.headerAddr)) and load_addr \(hex(h.loadAddr)) at offset \(hex(h.offset + 12)) put the image before the start of the file")
        }
        let fileStart = h.offset - Int(h.headerAddr - h.loadAddr)
        let available = UInt64(bytes.count - fileStart)
        let loadSize: UInt64
        if h.loadEndAddr == 0 {
            loadSize = available
        } else {
            guard h.loadEndAddr >= h.loadAddr else {
                throw BootError.invalidImage("\(what): load_end_addr \(hex(h.loadEndAddr)) is below load_addr \(hex(h.loadAddr))")
            }
            loadSize = UInt64(h.loadEndAddr - h.loadAddr)
            guard loadSize <= available else {
                throw BootError.invalidImage("\(what): load_end_addr \(hex(h.loadEndAddr)) asks for \(loadSize) bytes from file offset \(hex(fileStart)), the file has only \(available)")
            }
        }
        let loadEnd = UInt64(h.loadAddr) + loadSize
        let memEnd: UInt64
        if h.bssEndAddr == 0 { memEnd = loadEnd } else {
            guard UInt64(h.bssEndAddr) >= loadEnd else {
                throw BootError.invalidImage("\(what): bss_end_addr \(hex(h.bssEndAddr)) is below the end of the loaded image \(hex(loadEnd))")
            }
            memEnd = UInt64(h.bssEndAddr)
        }
        let start = UInt64(h.loadAddr), total = memEnd - start
        guard total > 0, memory.contains(start, count: total) else {
            throw BootError.doesNotFit("\(what): image at \(hex(start))+\(hex(total)) is outside guest RAM (\(sizeText(memory.totalSize)))")
        }
        for r in avoid where r.overlaps(start, total) {
            throw BootError.doesNotFit("\(what): image at \(hex(start))+\(hex(total)) overlaps the \(r.what) at \(hex(r.start))-\(hex(r.end))")
        }
        guard UInt64(h.entryAddr) >= start, UInt64(h.entryAddr) < memEnd else {
            throw BootError.invalidImage("\(what): entry_addr \(hex(h.entryAddr)) is outside the loaded image \(hex(start))-\(hex(memEnd))")
        }
        try guarded(what, at: start) {
            try memory.write(bytes[fileStart..<fileStart + Int(loadSize)], at: start)
            try memory.zero(at: loadEnd, count: Int(memEnd - loadEnd))
        }
        return ([LoadRange(start: start, size: total, what: "multiboot image")], UInt64(h.entryAddr))
    }
}

/// Kernel and module strings, packed from the boot area's strings offset (the kernel's command line first).
struct MultibootStrings {
    var bytes: [UInt8] = []
    /// Each module's command line, as an offset into `bytes`.
    var moduleOffsets: [UInt64] = []
    init(cmdline: String, modules: [MultibootModule]) throws {
        func add(_ s: String) throws -> UInt64 {
            let u = Array(s.utf8)
            guard !u.contains(0) else { throw BootError.invalidImage("multiboot string \"\(s)\" contains a NUL byte") }
            let at = UInt64(bytes.count)
            bytes += u + [0]
            return at
        }
        _ = try add(cmdline)
        for m in modules { moduleOffsets.append(try add(m.cmdline)) }
        let room = MultibootInfo.stringsLimit
        guard bytes.count <= room else {
            throw BootError.cmdlineTooLong(length: bytes.count, limit: room)
        }
    }
}
