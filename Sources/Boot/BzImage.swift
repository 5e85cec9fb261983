import GuestMemory

/// The setup header of a bzImage (Documentation/arch/x86/boot.rst), parsed and validated.
///
/// Offsets below are file offsets, equal to the offsets in the zero page (`ZeroPage.Offset`).
public struct SetupHeader: Sendable, Equatable {
    /// "HdrS".
    public static let magic: UInt32 = 0x5372_6448
    /// Oldest supported boot protocol.
    public static let minimumVersion: UInt16 = 0x0206
    /// XLF_KERNEL_64: the kernel has the 64-bit entry at load address + 0x200.
    public static let xlfKernel64: UInt16 = 0x1
    /// XLF_CAN_BE_LOADED_ABOVE_4G.
    public static let xlfCanBeLoadedAbove4G: UInt16 = 0x2

    /// Setup sectors (0 in the file means 4).
    public var setupSects: Int
    public var syssize: UInt32
    public var version: UInt16
    public var kernelVersionOffset: UInt16
    public var loadflags: UInt8
    public var code32Start: UInt32
    public var initrdAddrMax: UInt32
    public var kernelAlignment: UInt32
    public var relocatable: Bool
    public var xloadflags: UInt16
    public var cmdlineSize: UInt32
    public var payloadOffset: UInt32
    public var payloadLength: UInt32
    public var prefAddress: UInt64
    public var initSize: UInt32
    /// File offset one past the setup header (0x202 + the jump's displacement byte).
    public var headerEnd: Int

    /// Bytes of real-mode setup code (boot sector included): (setup_sects + 1) × 512.
    public var setupSize: Int { (setupSects + 1) * 512 }
    /// "2.15" style (minor in decimal, as boot.rst writes it).
    public var versionString: String { SetupHeader.versionText(version) }
    static func versionText(_ v: UInt16) -> String {
        let minor = v & 0xff
        return "\(v >> 8)." + (minor < 10 ? "0\(minor)" : "\(minor)")
    }

    /// Whether `bytes` looks like a bzImage (boot flag 0xAA55 at 0x1fe and "HdrS" at 0x202).
    public static func isBzImage(_ bytes: [UInt8]) -> Bool {
        bytes.getLE(UInt32.self, at: 0x202) == magic && bytes.getLE(UInt16.self, at: 0x1fe) == 0xaa55
    }

    /// Parses and validates the setup header of `bytes`, a whole bzImage file.
    public init(parsing bytes: [UInt8], what: String = "bzImage") throws {
        guard bytes.count >= 0x208 else {
            throw BootError.invalidImage("\(what): file is truncated (\(bytes.count) bytes), the setup header needs at least 0x208")
        }
        let magic = bytes.getLE(UInt32.self, at: 0x202)!
        guard magic == SetupHeader.magic else {
            throw BootError.invalidImage("\(what): setup header magic at 0x202 is \(hex8(magic)), expected \"HdrS\"")
        }
        let bootFlag = bytes.getLE(UInt16.self, at: 0x1fe)!
        guard bootFlag == 0xaa55 else {
            throw BootError.invalidImage("\(what): boot_flag at 0x1fe is \(hex(bootFlag)), expected 0xaa55")
        }
        version = bytes.getLE(UInt16.self, at: 0x206)!
        guard version >= SetupHeader.minimumVersion else {
            throw BootError.unsupported("\(what): boot protocol \(SetupHeader.versionText(version)) at 0x206 is too old, need 2.06 or newer")
        }
        let hEnd = 0x202 + Int(bytes[0x201])
        headerEnd = hEnd
        let need = max(hEnd, 0x23c)
        guard bytes.count >= need else {
            throw BootError.invalidImage("\(what): file is truncated (\(bytes.count) bytes) inside the setup header, which ends at \(hex(need))")
        }
        func u32(_ o: Int) -> UInt32 { o + 4 <= hEnd ? bytes.getLE(UInt32.self, at: o)! : 0 }
        func u16(_ o: Int) -> UInt16 { o + 2 <= hEnd ? bytes.getLE(UInt16.self, at: o)! : 0 }
        let sects = Int(bytes[0x1f1])
        setupSects = sects == 0 ? 4 : sects
        syssize = u32(0x1f4)
        kernelVersionOffset = u16(0x20e)
        loadflags = bytes[0x211]
        code32Start = u32(0x214)
        initrdAddrMax = u32(0x22c)
        kernelAlignment = u32(0x230)
        relocatable = hEnd > 0x234 && bytes[0x234] != 0
        xloadflags = version >= 0x020c ? u16(0x236) : 0
        cmdlineSize = u32(0x238)
        payloadOffset = version >= 0x0208 ? u32(0x248) : 0
        payloadLength = version >= 0x0208 ? u32(0x24c) : 0
        prefAddress = version >= 0x020a && hEnd >= 0x260 ? bytes.getLE(UInt64.self, at: 0x258)! : 0
        initSize = version >= 0x020a ? u32(0x260) : 0

        guard version >= 0x020c else {
            throw BootError.unsupported("\(what): boot protocol \(versionString) at 0x206 predates the 64-bit entry (2.12)")
        }
        guard xloadflags & SetupHeader.xlfKernel64 != 0 else {
            throw BootError.unsupported("\(what): xloadflags at 0x236 is \(hex(xloadflags)), XLF_KERNEL_64 is not set: the kernel has no 64-bit entry")
        }
        guard loadflags & ZeroPage.loadedHigh != 0 else {
            throw BootError.unsupported("\(what): loadflags at 0x211 is \(hex(loadflags)), LOADED_HIGH is not set: not a bzImage (zImage is not supported)")
        }
        if relocatable {
            guard kernelAlignment != 0, kernelAlignment & (kernelAlignment - 1) == 0 else {
                throw BootError.invalidImage("\(what): kernel_alignment at 0x230 is \(hex(kernelAlignment)), not a power of two")
            }
        }
        guard bytes.count > setupSize else {
            throw BootError.invalidImage("\(what): file is truncated (\(bytes.count) bytes): \(setupSects) setup sectors at 0x1f1 need \(setupSize) bytes before the protected-mode kernel")
        }
        let pmSize = UInt64(bytes.count - setupSize)
        guard UInt64(syssize) * 16 <= pmSize + 15 else {
            throw BootError.invalidImage("\(what): file is truncated: syssize at 0x1f4 says \(UInt64(syssize) * 16) bytes of protected-mode kernel, the file has \(pmSize)")
        }
        guard UInt64(payloadOffset) + UInt64(payloadLength) <= pmSize else {
            throw BootError.invalidImage("\(what): payload at \(hex(payloadOffset))+\(hex(payloadLength)) (payload_offset/payload_length at 0x248) lies outside the protected-mode kernel of \(pmSize) bytes")
        }
        guard initSize > 0 else {
            throw BootError.invalidImage("\(what): init_size at 0x260 is 0")
        }
    }

    /// Where the protected-mode kernel goes for the bzImage entry: `pref_address` when set (and
    /// aligned to `kernel_alignment` for relocatable kernels), else 1 MiB rounded up to the alignment
    /// for relocatable kernels, else 1 MiB.
    public var loadAddress: UInt64 {
        let align = UInt64(max(kernelAlignment, 1))
        if !relocatable { return prefAddress != 0 ? prefAddress : BootLayout.kernelLoadAddress }
        if prefAddress != 0 && prefAddress % align == 0 { return prefAddress }
        return BootLayout.alignUp(BootLayout.kernelLoadAddress, align) ?? BootLayout.kernelLoadAddress
    }

    /// The command line limit: cmdline_size, or 2048 before protocol 2.06.
    public var cmdlineLimit: UInt32 { version >= 0x0206 && cmdlineSize > 0 ? cmdlineSize : BootLayout.defaultCmdlineSize }

    /// The highest address the initrd may occupy (initrd_addr_max, or 0x37ffffff if absent).
    public var initrdMax: UInt64 { initrdAddrMax == 0 ? BootLayout.defaultInitrdAddrMax : UInt64(initrdAddrMax) }

    /// The kernel version string at 0x200 + kernel_version, if present.
    public func kernelVersion(in bytes: [UInt8]) -> String? {
        guard kernelVersionOffset != 0 else { return nil }
        let start = 0x200 + Int(kernelVersionOffset)
        guard start < min(bytes.count, setupSize) else { return nil }
        let slice = bytes[start..<min(bytes.count, setupSize, start + 256)]
        let s = slice.prefix { $0 != 0 }
        return String(decoding: s, as: UTF8.self)
    }
}

extension String {
    /// Two lowercase hex digits.
    init<T: BinaryInteger>(format2 v: T) {
        let s = String(v, radix: 16)
        self = s.count < 2 ? "0" + s : s
    }
}

/// 8-digit hex for magic numbers.
func hex8(_ v: UInt32) -> String {
    let s = String(v, radix: 16)
    return "0x" + String(repeating: "0", count: max(0, 8 - s.count)) + s
}

/// Loads a Linux bzImage with the 64-bit boot protocol.
public enum BzImageLoader {
    /// How to enter a bzImage.
    public enum Entry: String, Sendable, Codable, CaseIterable {
        /// Decompress the payload in the VMM, load the ELF vmlinux, enter startup_64 (default).
        case decompressed
        /// Load the protected-mode kernel and enter its 64-bit entry at load address + 0x200; the
        /// kernel decompresses itself in the guest.
        case bzImage = "bzimage"
    }

    /// Loads `bytes` (a bzImage) and returns the entry state and diagnostics. The decompressed entry
    /// uses `cache` (by default the one the environment names) to skip decompressing a payload seen before.
    static func load(_ bytes: [UInt8], name: String, initrd: BootSource?, cmdline: String, memory: GuestMemory,
                     options: BootOptions, cache: KernelCache? = KernelCache.fromEnvironment(),
                     source: KernelCache.SourceIdentity? = nil) throws -> LoadedKernel {
        let what = "bzImage \(name)"
        let hdr = try SetupHeader(parsing: bytes, what: what)
        var result = LoadedKernel(format: .bzImage)
        result.protocolVersion = hdr.version
        result.kernelVersion = hdr.kernelVersion(in: bytes)
        result.notes.append("boot protocol \(hdr.versionString), setup \(hdr.setupSize) bytes, init_size \(hex(hdr.initSize))")

        var zp = ZeroPage(setupHeader: bytes[0x1f1..<min(hdr.headerEnd, bytes.count)])
        zp.setLoaderFields()
        let boot = try BootStructures.writeLinux(cmdline: cmdline, limit: hdr.cmdlineLimit, memory: memory)
        let pm = bytes.count - hdr.setupSize
        var kernelEnd: UInt64
        var entry: UInt64

        switch options.linuxEntry {
        case .decompressed:
            let start = hdr.setupSize + Int(hdr.payloadOffset)
            let payload = bytes[start..<start + Int(hdr.payloadLength)]
            guard let format = CompressionFormat.detect(payload) else {
                let magic = payload.prefix(6).map { String(format2: $0) }.joined(separator: " ")
                throw BootError.unsupported("\(what): unknown compression of the payload at file offset \(hex(start)) (bytes \(magic))")
            }
            result.compression = format
            let limit = Int(min(options.maxDecompressedSize, memory.totalSize + (16 << 20)))
            let loader = ELFStreamLoader(memory: memory, avoiding: boot, what: "\(what) decompressed kernel")
            // A decompressed-kernel cache entry, when valid, replaces the decompression (KernelCache);
            // either way the bytes go through the same ELFStreamLoader.
            let total = try payload.withUnsafeBytes { buf in
                guard let cache, format != .uncompressed else {
                    return try Decompressor.decompress(buf, format: format, limit: limit) { try loader.feed($0) }
                }
                var loadedFromFile: (mapped: Int, copied: Int)?
                let (total, outcome) = try cache.decompress(buf, format: format, limit: limit, source: source, mapper: { fd, offset, data in
                    loadedFromFile = try loader.load(mapping: fd, dataOffset: offset, data: data)
                }, consumer: { try loader.feed($0) })
                result.notes.append(outcome.note)
                if let l = loadedFromFile {
                    result.notes.append("kernel segments: \(l.mapped) bytes mapped copy-on-write from the cache entry, \(l.copied) copied")
                }
                return total
            }
            let (elf, ranges) = try loader.finish()
            result.notes.append("payload \(format.rawValue), \(payload.count) → \(total) bytes")
            result.ranges += ranges
            entry = try elf.physicalEntry(what: "\(what) decompressed kernel")
            kernelEnd = ranges.map(\.end).max() ?? 0
        case .bzImage:
            let load = hdr.loadAddress
            let need = max(UInt64(pm), UInt64(hdr.initSize))
            guard load.addingReportingOverflow(need).overflow == false, memory.contains(load, count: need) else {
                throw BootError.doesNotFit("\(what): kernel at \(hex(load))+\(hex(need)) (init_size) is outside guest RAM (\(sizeText(memory.totalSize)))")
            }
            for r in boot where r.overlaps(load, need) {
                throw BootError.doesNotFit("\(what): kernel at \(hex(load))+\(hex(need)) overlaps the \(r.what)")
            }
            try guarded("\(what) protected-mode kernel", at: load) { try memory.write(bytes[hdr.setupSize...], at: load) }
            result.ranges.append(LoadRange(start: load, size: UInt64(pm), what: "protected-mode kernel"))
            zp.bytes.putLE(UInt32(truncatingIfNeeded: load), at: ZeroPage.Offset.code32Start)
            entry = load + 0x200
            kernelEnd = load + need
        }

        if let initrd {
            let r = try InitrdPlacer.load(initrd, maxAddress: hdr.initrdMax, kernelEnd: kernelEnd, memory: memory)
            zp.setInitrd(at: r.start, size: r.size)
            result.ranges.append(r)
        }
        result.e820 = options.e820 ?? E820Map.build(for: memory)
        try zp.setE820(result.e820)
        if let cpus = options.mpTableCPUs { result.ranges.append(try MPTable.write(cpus: cpus, into: memory)) }
        zp.setCmdline(at: BootLayout.cmdlineAddress)
        try zp.write(into: memory)
        result.ranges = boot + result.ranges
        result.entry = .longMode(entry: entry, zeroPage: BootLayout.zeroPageAddress)
        return result
    }
}

/// Fixed boot structures shared by the Linux loaders.
enum BootStructures {
    /// Writes GDT, IDT, identity page tables and the command line; returns the ranges used.
    static func writeLinux(cmdline: String, limit: UInt32, memory: GuestMemory) throws -> [LoadRange] {
        try BootGDT.write(long: true, into: memory)
        try IdentityPageTables.write(into: memory)
        let c = try KernelCmdline.write(cmdline, limit: limit, into: memory)
        return [LoadRange(start: BootLayout.bootDataStart, size: BootLayout.bootDataEnd - BootLayout.bootDataStart,
                          what: "boot data (GDT, zero page, page tables)"), c]
    }
}

/// Places an initrd as high as possible in low RAM.
public enum InitrdPlacer {
    /// The page-aligned address of an initrd of `size` bytes placed as high as possible below
    /// `min(maxAddress + 1, end of low RAM)` and above `kernelEnd`.
    public static func place(size: UInt64, maxAddress: UInt64, kernelEnd: UInt64, memory: GuestMemory) throws -> UInt64 {
        let lowEnd = E820Map.lowRAMEnd(of: memory)
        let top = min(maxAddress &+ 1 == 0 ? UInt64.max : maxAddress + 1, lowEnd)
        let floor = max(kernelEnd, BootLayout.highMemoryStart)
        let fail = BootError.doesNotFit("initrd of \(sizeText(size)) does not fit below \(hex(maxAddress)) in \(sizeText(memory.totalSize)) of guest RAM (it must lie between the kernel end \(hex(floor)) and \(hex(top)))")
        guard size > 0 else { throw BootError.invalidImage("initrd is empty") }
        guard size <= top else { throw fail }
        let addr = (top - size) & ~(BootLayout.pageSize - 1)
        guard addr >= floor else { throw fail }
        return addr
    }

    /// Places and copies an initrd; returns its range.
    static func load(_ source: BootSource, maxAddress: UInt64, kernelEnd: UInt64, memory: GuestMemory) throws -> LoadRange {
        let size = try source.size()
        let addr = try place(size: size, maxAddress: maxAddress, kernelEnd: kernelEnd, memory: memory)
        try source.copy(into: memory, at: addr, expectedSize: size)
        return LoadRange(start: addr, size: size, what: "initrd")
    }
}
