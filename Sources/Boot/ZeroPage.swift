import GuestMemory

/// The Linux zero page (`struct boot_params`, 4 KiB), built byte by byte at explicit offsets.
///
/// Offsets are those of `<asm/bootparam.h>` (checked against the C structs in BootTests). Setup
/// header fields sit at the same offsets in the zero page as in the bzImage file (0x1f1 onwards).
public struct ZeroPage: Sendable, Equatable {
    /// Size of `struct boot_params`.
    public static let size = 4096
    /// Field offsets in `struct boot_params` (setup header fields included, at 0x1f1 + offset in `struct setup_header`).
    public enum Offset {
        public static let acpiRsdpAddr = 0x070
        public static let extRamdiskImage = 0x0c0
        public static let extRamdiskSize = 0x0c4
        public static let extCmdLinePtr = 0x0c8
        public static let altMemK = 0x1e0
        public static let e820Entries = 0x1e8
        public static let sentinel = 0x1ef
        public static let hdr = 0x1f1
        public static let setupSects = 0x1f1
        public static let rootFlags = 0x1f2
        public static let syssize = 0x1f4
        public static let vidMode = 0x1fa
        public static let bootFlag = 0x1fe
        public static let jump = 0x200
        public static let header = 0x202
        public static let version = 0x206
        public static let kernelVersion = 0x20e
        public static let typeOfLoader = 0x210
        public static let loadflags = 0x211
        public static let code32Start = 0x214
        public static let ramdiskImage = 0x218
        public static let ramdiskSize = 0x21c
        public static let heapEndPtr = 0x224
        public static let cmdLinePtr = 0x228
        public static let initrdAddrMax = 0x22c
        public static let kernelAlignment = 0x230
        public static let relocatableKernel = 0x234
        public static let xloadflags = 0x236
        public static let cmdlineSize = 0x238
        public static let payloadOffset = 0x248
        public static let payloadLength = 0x24c
        public static let setupData = 0x250
        public static let prefAddress = 0x258
        public static let initSize = 0x260
        public static let e820Table = 0x2d0
    }
    /// Size of one `struct boot_e820_entry`.
    public static let e820EntrySize = 20
    /// Capacity of the zero page's e820 table (E820_MAX_ENTRIES_ZEROPAGE).
    public static let e820MaxEntries = 128
    /// `loadflags` bits.
    public static let loadedHigh: UInt8 = 0x01
    public static let canUseHeap: UInt8 = 0x80
    /// `type_of_loader` for a loader without an assigned ID.
    public static let undefinedLoader: UInt8 = 0xff

    /// The 4096 bytes.
    public var bytes: [UInt8]

    /// A zero page holding `header`, the setup header bytes from a bzImage file (`file[0x1f1..<end]`).
    public init(setupHeader header: ArraySlice<UInt8>) {
        bytes = [UInt8](repeating: 0, count: ZeroPage.size)
        let n = min(header.count, 0x290 - Offset.hdr)
        bytes.replaceSubrange(Offset.hdr..<Offset.hdr + n, with: header.prefix(n))
    }

    /// A zero page with a synthesized setup header (for ELF kernels): boot_flag 0xAA55, "HdrS",
    /// protocol 2.15, 64-bit entry, 16 MiB alignment, relocatable, 2048-byte command line.
    public static func synthesized() -> ZeroPage {
        var z = ZeroPage(setupHeader: [])
        z.bytes.putLE(UInt16(0xaa55), at: Offset.bootFlag)
        z.bytes.putLE(UInt32(0x5372_6448), at: Offset.header)
        z.bytes.putLE(UInt16(0x020f), at: Offset.version)
        z.bytes.putLE(UInt32(BootLayout.kernelHighLoadAddress), at: Offset.kernelAlignment)
        z.bytes[Offset.relocatableKernel] = 1
        z.bytes.putLE(UInt16(0x1), at: Offset.xloadflags)
        z.bytes.putLE(UInt32(BootLayout.defaultCmdlineSize), at: Offset.cmdlineSize)
        z.bytes.putLE(UInt32(BootLayout.defaultInitrdAddrMax), at: Offset.initrdAddrMax)
        return z
    }

    /// Sets the loader fields: type_of_loader 0xff, loadflags LOADED_HIGH|CAN_USE_HEAP, heap_end_ptr,
    /// vid_mode "normal" (0xffff).
    public mutating func setLoaderFields() {
        bytes[Offset.typeOfLoader] = ZeroPage.undefinedLoader
        bytes[Offset.loadflags] |= ZeroPage.loadedHigh | ZeroPage.canUseHeap
        bytes.putLE(UInt16(0xfe00), at: Offset.heapEndPtr)
        bytes.putLE(UInt16(0xffff), at: Offset.vidMode)
    }

    /// Points cmd_line_ptr (and ext_cmd_line_ptr for the high half) at `address`.
    public mutating func setCmdline(at address: UInt64) {
        bytes.putLE(UInt32(truncatingIfNeeded: address), at: Offset.cmdLinePtr)
        bytes.putLE(UInt32(truncatingIfNeeded: address >> 32), at: Offset.extCmdLinePtr)
    }

    /// Sets ramdisk_image/ramdisk_size and their ext_ high halves.
    public mutating func setInitrd(at address: UInt64, size: UInt64) {
        bytes.putLE(UInt32(truncatingIfNeeded: address), at: Offset.ramdiskImage)
        bytes.putLE(UInt32(truncatingIfNeeded: size), at: Offset.ramdiskSize)
        bytes.putLE(UInt32(truncatingIfNeeded: address >> 32), at: Offset.extRamdiskImage)
        bytes.putLE(UInt32(truncatingIfNeeded: size >> 32), at: Offset.extRamdiskSize)
    }

    /// Fills e820_entries and e820_table (at most 128 entries).
    public mutating func setE820(_ map: [E820Entry]) throws {
        guard map.count <= ZeroPage.e820MaxEntries else {
            throw BootError.unsupported("e820 map has \(map.count) entries, the zero page holds at most \(ZeroPage.e820MaxEntries)")
        }
        bytes[Offset.e820Entries] = UInt8(map.count)
        for (i, e) in map.enumerated() {
            let o = Offset.e820Table + i * ZeroPage.e820EntrySize
            bytes.putLE(e.address, at: o)
            bytes.putLE(e.size, at: o + 8)
            bytes.putLE(e.kind.rawValue, at: o + 16)
        }
    }

    /// Writes the zero page at `BootLayout.zeroPageAddress` (or `address`).
    public func write(into memory: GuestMemory, at address: UInt64 = BootLayout.zeroPageAddress) throws {
        try guarded("zero page", at: address) { try memory.write(bytes, at: address) }
    }
}

/// Writing the kernel command line.
public enum KernelCmdline {
    /// Writes `cmdline` NUL-terminated at `BootLayout.cmdlineAddress`. `limit` is the kernel's
    /// `cmdline_size` (bytes without the NUL). Returns the range written.
    @discardableResult
    public static func write(_ cmdline: String, limit: UInt32, into memory: GuestMemory) throws -> LoadRange {
        let utf8 = Array(cmdline.utf8)
        let area = Int(BootLayout.cmdlineAreaEnd - BootLayout.cmdlineAddress) - 1
        let max = min(Int(limit), area)
        guard utf8.count <= max else { throw BootError.cmdlineTooLong(length: utf8.count, limit: max) }
        guard !utf8.contains(0) else { throw BootError.invalidImage("kernel command line contains a NUL byte") }
        try guarded("kernel command line", at: BootLayout.cmdlineAddress) {
            try memory.write(utf8 + [0], at: BootLayout.cmdlineAddress)
        }
        return LoadRange(start: BootLayout.cmdlineAddress, size: UInt64(utf8.count + 1), what: "command line")
    }
}
