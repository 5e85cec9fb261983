import GuestMemory

/// One entry of the BIOS e820 memory map.
public struct E820Entry: Sendable, Equatable, CustomStringConvertible {
    /// Entry types used here.
    public enum Kind: UInt32, Sendable {
        case ram = 1
        case reserved = 2
    }
    public var address: UInt64
    public var size: UInt64
    public var kind: Kind
    public init(address: UInt64, size: UInt64, kind: Kind) {
        self.address = address; self.size = size; self.kind = kind
    }
    /// One past the last byte.
    public var end: UInt64 { address + size }
    public var description: String { "[\(hex(address))-\(hex(end - 1))] \(kind)" }
}

/// Builds the e820 memory map from guest memory's regions.
public enum E820Map {
    /// The map for `memory`:
    /// - usable `[0, 0x9fc00)`, reserved `[0x9fc00, 0xa0000)` (EBDA / MP table) and `[0xe0000, 0x100000)` (ACPI tables, BIOS area);
    /// - usable `[1 MiB, end of the region at 0)` (which ends at the PCI hole with ≥ 3 GiB of RAM);
    /// - every other region (the RAM moved above 4 GiB) usable.
    public static func build(for memory: GuestMemory) -> [E820Entry] {
        var map: [E820Entry] = []
        for region in memory.regions {
            if region.start == 0 {
                map.append(.init(address: 0, size: min(region.end, BootLayout.mpTableAddress), kind: .ram))
                map.append(.init(address: BootLayout.mpTableAddress,
                                 size: BootLayout.lowMemoryEnd - BootLayout.mpTableAddress, kind: .reserved))
                map.append(.init(address: BootLayout.biosAreaStart,
                                 size: BootLayout.highMemoryStart - BootLayout.biosAreaStart, kind: .reserved))
                if region.end > BootLayout.highMemoryStart {
                    map.append(.init(address: BootLayout.highMemoryStart,
                                     size: region.end - BootLayout.highMemoryStart, kind: .ram))
                }
            } else if region.start >= BootLayout.highMemoryStart {
                map.append(.init(address: region.start, size: region.size, kind: .ram))
            } else {
                // A region starting inside the first MiB but not at 0: keep only its part above 1 MiB.
                if region.end > BootLayout.highMemoryStart {
                    map.append(.init(address: BootLayout.highMemoryStart,
                                     size: region.end - BootLayout.highMemoryStart, kind: .ram))
                }
            }
        }
        return map
    }

    /// End of the RAM region that starts at address 0 ("low RAM"); 0 if there is none.
    public static func lowRAMEnd(of memory: GuestMemory) -> UInt64 {
        memory.regions.first(where: { $0.start == 0 })?.end ?? 0
    }
}
