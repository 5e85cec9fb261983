/// Where the loaders put things in guest-physical memory. One place for every fixed address.
///
/// Low memory map (all below 1 MiB unless noted):
///
/// | range | content |
/// |---|---|
/// | `0x500..<0x520` | GDT (4 entries: null, 0x08 32-bit code, 0x10 code, 0x18 data) |
/// | `0x520..<0x528` | IDT (one empty entry; the guest installs its own) |
/// | `0x7000..<0x8000` | Linux zero page (`struct boot_params`) |
/// | `0x8000..<0x9000` | boot stack for flat entries (grows down from `bootStackTop`) |
/// | `0x9000..<0xf000` | identity page tables: PML4, PDPT, 4 page directories (4 GiB in 2 MiB pages) |
/// | `0x20000..<0x9fc00` | Linux kernel command line |
/// | `0x9fc00..<0xa0000` | MP floating pointer and configuration table (reserved in e820) |
/// | `0xe0000..<0xf0000` | ACPI tables, RSDP first (`ACPITables`) |
/// | `0xe0000..<0x100000` | reserved (BIOS area) in e820 |
/// | `0x100000` | protected-mode kernel / multiboot kernels (typical) |
/// | `0x1000000` | Linux 64-bit kernel (`pref_address` / `LOAD_PHYSICAL_ADDR`) |
/// | top of low RAM | initrd, page aligned, below `min(initrd_addr_max, end of low RAM)` |
///
/// Multiboot kernels get their GDT, information structure, command lines and stack in one area page-aligned above
/// their highest segment (`MultibootInfo`), as QEMU places them, so they may load anywhere from 0x500.
public enum BootLayout {
    /// Global descriptor table.
    public static let gdtAddress: UInt64 = 0x500
    /// Interrupt descriptor table (a single zero entry).
    public static let idtAddress: UInt64 = 0x520
    /// Linux zero page (`struct boot_params`, 4 KiB).
    public static let zeroPageAddress: UInt64 = 0x7000
    /// Initial stack pointer offered to flat and multiboot guests.
    public static let bootStackTop: UInt64 = 0x8ff0
    /// Page-map level 4 of the identity page tables.
    public static let pml4Address: UInt64 = 0x9000
    /// Page-directory-pointer table.
    public static let pdptAddress: UInt64 = 0xa000
    /// First of four page directories (0xb000-0xefff).
    public static let pdAddress: UInt64 = 0xb000
    /// End of the page tables.
    public static let pageTablesEnd: UInt64 = 0xf000
    /// Bytes of guest-physical space the identity page tables map.
    public static let identityMappedSize: UInt64 = 4 << 30
    /// Start of all fixed boot structures (GDT through page tables).
    public static let bootDataStart: UInt64 = gdtAddress
    /// End of all fixed boot structures (GDT through page tables).
    public static let bootDataEnd: UInt64 = pageTablesEnd
    /// Kernel command line.
    public static let cmdlineAddress: UInt64 = 0x20000
    /// The command line area ends where the MP table begins.
    public static let cmdlineAreaEnd: UInt64 = mpTableAddress
    /// Command line limit for boot protocols before 2.06, which have no `cmdline_size` field.
    public static let defaultCmdlineSize: UInt32 = 2048
    /// MP floating pointer structure, followed by the MP configuration table.
    public static let mpTableAddress: UInt64 = 0x9fc00
    /// End of conventional low memory (start of the VGA hole).
    public static let lowMemoryEnd: UInt64 = 0xa0000
    /// Reserved BIOS area (reserved in e820; the ACPI tables are at its start).
    public static let biosAreaStart: UInt64 = 0xe0000
    /// ACPI tables, RSDP first (inside the range Linux scans for the RSDP).
    public static let acpiTablesAddress: UInt64 = 0xe0000
    /// End of the ACPI table area.
    public static let acpiTablesEnd: UInt64 = 0xf0000
    /// 1 MiB: start of extended memory and the classic protected-mode kernel load address.
    public static let highMemoryStart: UInt64 = 0x100000
    /// Load address of a bzImage's protected-mode kernel when it has no usable `pref_address`.
    public static let kernelLoadAddress: UInt64 = 0x100000
    /// Where 64-bit Linux kernels are linked (`CONFIG_PHYSICAL_START`).
    public static let kernelHighLoadAddress: UInt64 = 0x1000000
    /// Highest initrd address for boot protocols before 2.03.
    public static let defaultInitrdAddrMax: UInt64 = 0x37ff_ffff
    /// Page size used for alignment of the initrd and multiboot modules.
    public static let pageSize: UInt64 = 0x1000

    /// Rounds `value` up to a multiple of `alignment` (a power of two), or nil on overflow.
    static func alignUp(_ value: UInt64, _ alignment: UInt64) -> UInt64? {
        let (s, o) = value.addingReportingOverflow(alignment - 1)
        return o ? nil : s & ~(alignment - 1)
    }
}
