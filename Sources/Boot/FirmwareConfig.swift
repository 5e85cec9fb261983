import GuestMemory

/// The command list of fw_cfg's `etc/table-loader` (QEMU's BIOS linker/loader, SeaBIOS's
/// romfile loader): 128-byte little-endian commands that tell firmware to allocate fw_cfg files in
/// guest memory, patch pointers between them and fix checksums.
public struct TableLoader: Sendable, Equatable {
    /// Size of one command.
    public static let entrySize = 128
    /// Size of a file-name field.
    public static let nameSize = 56
    /// Command numbers.
    public enum Command: UInt32, Sendable {
        case allocate = 1
        case addPointer = 2
        case addChecksum = 3
    }
    /// Where ALLOCATE puts a file: anywhere in 32-bit memory, or in the F segment (0xF0000–0xFFFFF).
    public enum Zone: UInt8, Sendable {
        case high = 1
        case fseg = 2
    }

    /// The encoded commands.
    public private(set) var bytes: [UInt8] = []

    public init() {}

    private mutating func entry(_ command: Command, _ body: (inout [UInt8]) -> Void) {
        var e = [UInt8](repeating: 0, count: Self.entrySize)
        e.putLE(command.rawValue, at: 0)
        body(&e)
        bytes += e
    }

    private static func put(_ name: String, _ e: inout [UInt8], at offset: Int) {
        let n = Array(name.utf8.prefix(nameSize - 1))
        e.replaceSubrange(offset..<offset + n.count, with: n)
    }

    /// ALLOCATE: load `file` into memory in `zone`, aligned to `alignment` (a power of two).
    public mutating func allocate(_ file: String, alignment: UInt32, zone: Zone) {
        entry(.allocate) { e in
            Self.put(file, &e, at: 4)
            e.putLE(alignment, at: 4 + Self.nameSize)
            e[8 + Self.nameSize] = zone.rawValue
        }
    }

    /// ADD_POINTER: add the address `source` was loaded at to the `size`-byte (1, 2, 4 or 8)
    /// little-endian value at `offset` in `destination`.
    public mutating func addPointer(destination: String, source: String, offset: UInt32, size: UInt8) {
        entry(.addPointer) { e in
            Self.put(destination, &e, at: 4)
            Self.put(source, &e, at: 4 + Self.nameSize)
            e.putLE(offset, at: 4 + 2 * Self.nameSize)
            e[8 + 2 * Self.nameSize] = size
        }
    }

    /// ADD_CHECKSUM: make the bytes `[start, start + length)` of `file` sum to zero by adjusting
    /// the byte at `offset` (which the file holds as 0).
    public mutating func addChecksum(_ file: String, offset: UInt32, start: UInt32, length: UInt32) {
        entry(.addChecksum) { e in
            Self.put(file, &e, at: 4)
            e.putLE(offset, at: 4 + Self.nameSize)
            e.putLE(start, at: 8 + Self.nameSize)
            e.putLE(length, at: 12 + Self.nameSize)
        }
    }
}

/// SwiftKVM's ACPI tables as fw_cfg files for firmware (QEMU's layout): `etc/acpi/tables` (every
/// table, offsets as addresses), `etc/acpi/rsdp` (the RSDP, for the F segment) and
/// `etc/table-loader` (the commands that place them and patch pointers and checksums).
public struct FirmwareACPI: Sendable {
    public static let tablesFile = "etc/acpi/tables"
    public static let rsdpFile = "etc/acpi/rsdp"
    public static let loaderFile = "etc/table-loader"

    /// The tables blob: every table, pointers relative to the blob's start, checksums 0.
    public var tables: [UInt8]
    /// The RSDP: its RSDT and XSDT pointers relative to the tables blob, checksums 0.
    public var rsdp: [UInt8]
    /// The table-loader commands.
    public var loader: TableLoader

    /// Builds the files for `config`.
    public init(_ config: ACPIConfiguration) throws {
        // Built at base 0, every pointer is an offset into the blob, which ADD_POINTER turns into
        // an address. The RSDP's slot at the start of the blob is cleared (it goes to its own file).
        let image = try ACPITables.build(config, at: 0)
        var blob = image.bytes
        var r = Array(blob[0..<ACPITables.rsdpSize])
        blob.replaceSubrange(0..<ACPITables.rsdpSize, with: [UInt8](repeating: 0, count: ACPITables.rsdpSize))
        var loader = TableLoader()
        loader.allocate(Self.rsdpFile, alignment: 16, zone: .fseg)
        loader.allocate(Self.tablesFile, alignment: 64, zone: .high)

        let t = Self.tablesFile
        func offset(_ sig: String) -> Int? { image.addresses[sig].map { Int($0) } }
        // Pointers: XSDT and RSDT entries, FADT's FIRMWARE_CTRL, DSDT and X_DSDT.
        if let xsdt = offset("XSDT"), let len = blob.getLE(UInt32.self, at: xsdt + 4) {
            var o = xsdt + ACPITables.headerSize
            while o + 8 <= xsdt + Int(len) {
                loader.addPointer(destination: t, source: t, offset: UInt32(o), size: 8)
                o += 8
            }
        }
        if let rsdt = offset("RSDT"), let len = blob.getLE(UInt32.self, at: rsdt + 4) {
            var o = rsdt + ACPITables.headerSize
            while o + 4 <= rsdt + Int(len) {
                loader.addPointer(destination: t, source: t, offset: UInt32(o), size: 4)
                o += 4
            }
        }
        if let fadt = offset("FACP") {
            loader.addPointer(destination: t, source: t, offset: UInt32(fadt + 36), size: 4)
            loader.addPointer(destination: t, source: t, offset: UInt32(fadt + 40), size: 4)
            loader.addPointer(destination: t, source: t, offset: UInt32(fadt + 140), size: 8)
        }
        // Checksums (zeroed here; firmware computes them once the pointers are patched).
        for (sig, address) in image.addresses.sorted(by: { $0.value < $1.value }) where sig != "RSD PTR " && sig != "FACS" {
            let o = Int(address)
            guard let len = blob.getLE(UInt32.self, at: o + 4) else { continue }
            blob[o + 9] = 0
            loader.addChecksum(t, offset: UInt32(o + 9), start: UInt32(o), length: len)
        }
        // The RSDP's RSDT and XSDT addresses, then its two checksums.
        loader.addPointer(destination: Self.rsdpFile, source: t, offset: 16, size: 4)
        loader.addPointer(destination: Self.rsdpFile, source: t, offset: 24, size: 8)
        r[8] = 0
        r[32] = 0
        loader.addChecksum(Self.rsdpFile, offset: 8, start: 0, length: 20)
        loader.addChecksum(Self.rsdpFile, offset: 32, start: 0, length: UInt32(ACPITables.rsdpSize))
        self.tables = blob
        self.rsdp = r
        self.loader = loader
    }
}

extension E820Map {
    /// Size of one `etc/e820` entry (address, length: u64; type: u32; little-endian).
    public static let firmwareEntrySize = 20

    /// The fw_cfg `etc/e820` file as QEMU gives it to firmware: each RAM region whole (firmware
    /// reserves its own areas below 1 MiB), then `reserved`.
    public static func firmwareTable(for memory: GuestMemory, reserved: [(address: UInt64, size: UInt64)] = []) -> [UInt8] {
        var entries = memory.regions.map { E820Entry(address: $0.start, size: $0.size, kind: .ram) }
        entries += reserved.map { E820Entry(address: $0.address, size: $0.size, kind: .reserved) }
        var out: [UInt8] = []
        for e in entries {
            var b = [UInt8](repeating: 0, count: firmwareEntrySize)
            b.putLE(e.address, at: 0)
            b.putLE(e.size, at: 8)
            b.putLE(e.kind.rawValue, at: 16)
            out += b
        }
        return out
    }
}

/// A Linux bzImage split the way QEMU hands it to firmware for `-kernel` through fw_cfg (the
/// FW_CFG_SETUP_*, KERNEL_*, INITRD_* and CMDLINE_* items): the real-mode setup (its header
/// patched with the loader type, command line and initrd), the protected-mode kernel and the
/// addresses firmware copies them to.
public struct FirmwareKernel: Sendable, Equatable {
    /// Where the setup goes (real-mode segment 0x1000).
    public static let setupAddress: UInt32 = 0x10000
    /// Where the command line goes.
    public static let cmdlineAddress: UInt32 = 0x20000
    /// Where the protected-mode kernel goes.
    public static let kernelAddress: UInt32 = 0x100000
    /// RAM left free below the top of low RAM for firmware's own tables (QEMU's `acpi_data_size`).
    public static let firmwareReserve: UInt64 = 0x28000

    public var setup: [UInt8]
    public var kernel: [UInt8]
    public var initrd: [UInt8]
    /// The command line with its terminating NUL.
    public var cmdline: [UInt8]
    public var initrdAddress: UInt32

    /// Splits `image` (a bzImage, boot protocol 2.06 or later) for firmware loading with
    /// `initrd` and `cmdline`, for a guest with `lowRAM` bytes of RAM below 4 GiB.
    public init(image: [UInt8], initrd: [UInt8], cmdline: String, lowRAM: UInt64) throws {
        let header = try SetupHeader(parsing: image)
        guard header.setupSize < image.count else {
            throw BootError.invalidImage("bzImage: setup of \(header.setupSize) bytes, file of \(image.count)")
        }
        var line = Array(cmdline.utf8)
        guard UInt32(line.count) < header.cmdlineLimit else {
            throw BootError.invalidImage("command line of \(line.count) bytes, the kernel accepts \(header.cmdlineLimit - 1)")
        }
        line.append(0)
        var setup = Array(image[0..<header.setupSize])
        let kernel = Array(image[header.setupSize...])
        // The initrd goes as high as the kernel allows, page-aligned, below the end of low RAM less
        // what firmware keeps there for its tables.
        var initrdAddress: UInt64 = 0
        if !initrd.isEmpty {
            let top = min(header.initrdMax + 1, lowRAM > Self.firmwareReserve ? lowRAM - Self.firmwareReserve : 0)
            guard top > UInt64(initrd.count) + UInt64(Self.kernelAddress) + UInt64(kernel.count) else {
                throw BootError.doesNotFit("initrd of \(initrd.count) bytes does not fit below \(top) with the kernel")
            }
            initrdAddress = (top - UInt64(initrd.count)) & ~(BootLayout.pageSize - 1)
        }
        // Setup header fields (offsets in the boot sector): type_of_loader 0x210, loadflags 0x211
        // (CAN_USE_HEAP), heap_end_ptr 0x224, cmd_line_ptr 0x228, ramdisk_image 0x218, ramdisk_size 0x21c.
        setup[0x210] = 0xb0
        setup[0x211] |= 0x80
        setup.putLE(UInt16(0xfe00), at: 0x224)
        setup.putLE(Self.cmdlineAddress, at: 0x228)
        setup.putLE(UInt32(initrdAddress), at: 0x218)
        setup.putLE(UInt32(initrd.count), at: 0x21c)
        self.setup = setup
        self.kernel = kernel
        self.initrd = initrd
        self.cmdline = line
        self.initrdAddress = UInt32(initrdAddress)
    }
}
