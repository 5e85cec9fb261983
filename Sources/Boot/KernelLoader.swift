import GuestMemory

/// Kernel image formats `KernelLoader` recognises.
public enum KernelFormat: String, Sendable, Equatable {
    case bzImage, elf64 = "ELF64 vmlinux", multiboot, flat, firmware

    /// Detects the format: bzImage ("HdrS"), then a multiboot v1 header in the first 8 KiB, then ELF64.
    public static func detect(_ bytes: [UInt8]) -> KernelFormat? {
        if SetupHeader.isBzImage(bytes) { return .bzImage }
        if MultibootHeader.find(in: bytes) != nil { return .multiboot }
        if ELFImage.isELF(bytes), bytes.count > 4, bytes[4] == 2 { return .elf64 }
        return nil
    }
}

/// A multiboot module: a file and the string passed with it.
public struct MultibootModule: Sendable, Equatable {
    public var source: BootSource
    public var cmdline: String
    public init(source: BootSource, cmdline: String = "") { self.source = source; self.cmdline = cmdline }
}

/// Options for `KernelLoader.load`.
public struct BootOptions: Sendable {
    /// How a bzImage is entered (default: decompress in the VMM).
    public var linuxEntry: BzImageLoader.Entry = .decompressed
    /// Multiboot modules (`--module`).
    public var modules: [MultibootModule] = []
    /// Hard cap on a decompressed kernel (also capped by guest RAM + 16 MiB).
    public var maxDecompressedSize: UInt64 = 1 << 30
    /// An e820 map to use instead of the one built from guest memory.
    public var e820: [E820Entry]? = nil
    /// When set, Linux loaders (bzImage, ELF) also write an MP table for this many CPUs at 0x9fc00.
    public var mpTableCPUs: Int? = nil
    /// Applied to the command line of a Linux kernel (bzImage, ELF64), not of a multiboot one: the VMM's
    /// host fix-ups add items there.
    public var linuxCmdline: (@Sendable (String) -> String)? = nil
    public init(linuxEntry: BzImageLoader.Entry = .decompressed, modules: [MultibootModule] = [], mpTableCPUs: Int? = nil) {
        self.linuxEntry = linuxEntry; self.modules = modules; self.mpTableCPUs = mpTableCPUs
    }
}

/// A loaded kernel: its first instruction's CPU state and what was done.
public struct LoadedKernel: Sendable {
    /// The CPU state at the first instruction.
    public var entry: EntryState
    public var format: KernelFormat
    /// bzImage boot protocol version (0x20f = 2.15).
    public var protocolVersion: UInt16?
    /// The kernel version string from the setup header.
    public var kernelVersion: String?
    /// The payload compression (bzImage, decompressed entry).
    public var compression: CompressionFormat?
    /// Guest-physical ranges written (boot data, command line, segments, initrd, modules).
    public var ranges: [LoadRange] = []
    /// The e820 map passed to the guest.
    public var e820: [E820Entry] = []
    /// The PVH entry note of an ELF kernel (recorded, not used).
    public var pvhEntry: UInt64?
    /// Free-form diagnostic lines.
    public var notes: [String] = []
    /// A firmware boot's image, which the VMM maps read-only below 4 GiB (`FirmwareLoader`).
    public var firmwareImage: [UInt8]? = nil

    init(format: KernelFormat) {
        self.format = format
        self.entry = .longMode(entry: 0)
    }

    /// What stands for the loaded kernel of a machine restored from a snapshot: nothing was loaded
    /// (guest memory and the CPU state come from the snapshot).
    public static func restoredFromSnapshot() -> LoadedKernel {
        var k = LoadedKernel(format: .flat)
        k.notes = ["restored from a snapshot"]
        return k
    }

    /// One line per fact, for logs.
    public var summary: [String] {
        var s = ["format \(format.rawValue)"]
        if let v = kernelVersion { s.append("kernel \(v)") }
        if let c = compression { s.append("compression \(c.rawValue)") }
        s += notes
        s += ranges.map { "loaded \($0)" }
        s.append("entry \(hex(entry.rip))")
        return s
    }
}

/// Top-level loader: detects the kernel format and loads it.
public enum KernelLoader {
    /// Loads `kernel` (bzImage, ELF64 vmlinux or multiboot v1) with an optional initrd (Linux) and
    /// command line into `memory`, writing every boot structure the format needs.
    public static func load(kernel: BootSource, initrd: BootSource? = nil, cmdline: String = "",
                            memory: GuestMemory, options: BootOptions = BootOptions()) throws -> LoadedKernel {
        // Detect from the first MiB; ELF kernels are then read segment by segment, so a vmlinux
        // with debug info larger than guest RAM still loads.
        let (prefix, size) = try kernel.readPrefix(ELFStreamLoader.headerLimit)
        guard let format = KernelFormat.detect(prefix) else {
            throw BootError.unknownKernelFormat("\(kernel.name) is not a kernel: no bzImage setup header (\"HdrS\" at 0x202), no multiboot header in the first 8 KiB, and not an ELF64 file")
        }
        let linuxCmdline = options.linuxCmdline?(cmdline) ?? cmdline
        if format == .elf64 {
            return try ELFKernelLoader.load(kernel, prefix: prefix, fileSize: size, initrd: initrd, cmdline: linuxCmdline,
                                            memory: memory, options: options)
        }
        let (bytes, identity) = UInt64(prefix.count) == size ? (prefix, nil) : try kernel.readAllWithIdentity(limit: memory.totalSize)
        switch format {
        case .bzImage:
            return try BzImageLoader.load(bytes, name: kernel.name, initrd: initrd, cmdline: linuxCmdline, memory: memory, options: options,
                                          source: identity)
        case .multiboot:
            if initrd != nil {
                throw BootError.unsupported("\(kernel.name) is a multiboot kernel: pass extra files as modules, not as an initrd")
            }
            return try MultibootLoader.load(bytes, name: kernel.name, cmdline: cmdline, modules: options.modules, memory: memory)
        case .elf64, .flat, .firmware:
            throw BootError.unknownKernelFormat("\(kernel.name): flat binaries are loaded with FlatLoader, firmware with FirmwareLoader")
        }
    }
}

/// Loads an ELF64 x86-64 vmlinux and enters its 64-bit entry with a synthesized zero page.
public enum ELFKernelLoader {
    /// Loads an ELF64 kernel whose first bytes are `prefix` (which must hold the ELF and program
    /// headers) and whose size is `fileSize`; segment data is read straight into guest memory.
    static func load(_ source: BootSource, prefix: [UInt8], fileSize: UInt64, initrd: BootSource?, cmdline: String,
                     memory: GuestMemory, options: BootOptions) throws -> LoadedKernel {
        let what = "kernel ELF \(source.name)"
        let elf = try ELFImage(parsing: prefix, bits: 64, machine: 62, what: what, streamed: true)
        for (i, h) in elf.programHeaders.enumerated() where h.type == ELFProgramHeader.load && h.memsz > 0 {
            guard h.offset <= fileSize, h.filesz <= fileSize - h.offset else {
                throw BootError.invalidImage("\(what): ELF segment \(i) file data at offset \(hex(h.offset))+\(hex(h.filesz)) extends past the end of the file (\(fileSize) bytes)")
            }
        }
        var result = LoadedKernel(format: .elf64)
        result.pvhEntry = elf.pvhEntry
        if let p = elf.pvhEntry { result.notes.append("PVH entry note \(hex(p)) (not used: entering the 64-bit ELF entry)") }
        var zp = ZeroPage.synthesized()
        zp.setLoaderFields()
        let boot = try BootStructures.writeLinux(cmdline: cmdline, limit: BootLayout.defaultCmdlineSize, memory: memory)
        let ranges = try elf.checkPlacement(in: memory, avoiding: boot, what: "kernel ELF")
        for h in elf.loadSegments {
            try source.copyRange(offset: h.offset, count: h.filesz, into: memory, at: h.paddr)
            try guarded("kernel ELF BSS", at: h.paddr + h.filesz) {
                try memory.zero(at: h.paddr + h.filesz, count: Int(h.memsz - h.filesz))
            }
        }
        let entry = try elf.physicalEntry(what: what)
        if let initrd {
            let r = try InitrdPlacer.load(initrd, maxAddress: BootLayout.defaultInitrdAddrMax,
                                          kernelEnd: ranges.map(\.end).max() ?? 0, memory: memory)
            zp.setInitrd(at: r.start, size: r.size)
            result.ranges.append(r)
        }
        result.e820 = options.e820 ?? E820Map.build(for: memory)
        try zp.setE820(result.e820)
        if let cpus = options.mpTableCPUs { result.ranges.append(try MPTable.write(cpus: cpus, into: memory)) }
        zp.setCmdline(at: BootLayout.cmdlineAddress)
        try zp.write(into: memory)
        result.ranges = boot + ranges + result.ranges
        result.entry = .longMode(entry: entry, zeroPage: BootLayout.zeroPageAddress)
        return result
    }
}
