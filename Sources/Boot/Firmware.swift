import GuestMemory

/// Firmware (SeaBIOS's `bios.bin`, or OVMF's combined `OVMF.fd` as a ROM) booted from the architectural reset vector.
///
/// The image is mapped read-only so that it ends at 4 GiB (the reset vector 0xFFFFFFF0 is its
/// last 16 bytes), and its last 128 KiB (or all of it, when smaller) is copied into guest RAM
/// below 1 MiB, ending at 0x100000 (the "shadow" at 0xE0000-0xFFFFF a PC chipset aliases to the
/// flash). vCPU 0 starts in the reset state: real mode, CS selector 0xF000 with base 0xFFFF0000,
/// IP 0xFFF0.
public enum FirmwareLoader {
    /// The top of the firmware window (4 GiB).
    public static let windowEnd: UInt64 = 0x1_0000_0000
    /// The largest image, 16 MiB (0xFF000000–0xFFFFFFFF: the machine keeps KVM's TSS and identity-map pages just
    /// below, at 0xFEFFC000, as QEMU does), enough for OVMF (2–4 MiB) as well as SeaBIOS.
    public static let maximumSize: UInt64 = 16 << 20
    /// The size of the shadow below 1 MiB.
    public static let shadowSize: UInt64 = 0x20000
    /// Where the firmware goes: `windowEnd - size`.
    public static func romAddress(size: UInt64) -> UInt64 { windowEnd - size }

    /// Checks `image` (whole 4 KiB pages, at most `maximumSize`), copies its shadow into
    /// `memory` and returns what was loaded (entry: the reset state).
    public static func load(image: [UInt8], path: String, memory: GuestMemory) throws -> LoadedKernel {
        let size = UInt64(image.count)
        guard size > 0, size % 0x1000 == 0 else {
            throw BootError.invalidImage("firmware \(path): \(size) bytes, not a whole number of 4 KiB pages")
        }
        guard size <= maximumSize else {
            throw BootError.doesNotFit("firmware \(path) is \(size) bytes, larger than its window of \(maximumSize) bytes below 4 GiB")
        }
        let shadow = min(shadowSize, size)
        let shadowStart = BootLayout.highMemoryStart - shadow
        guard memory.contains(shadowStart, count: shadow) else {
            throw BootError.doesNotFit("firmware shadow \(hex(shadowStart))-\(hex(BootLayout.highMemoryStart)) is not guest RAM")
        }
        try memory.write(image[Int(size - shadow)...], at: shadowStart)
        var loaded = LoadedKernel(format: .firmware)
        loaded.entry = .resetVector()
        loaded.firmwareImage = image
        loaded.ranges = [LoadRange(start: shadowStart, size: shadow, what: "firmware shadow")]
        loaded.notes = ["firmware \(path): \(size) bytes at \(hex(romAddress(size: size)))-0xffffffff, last \(shadow) bytes shadowed at \(hex(shadowStart))"]
        return loaded
    }
}

extension EntryState {
    /// The x86 reset state (Intel SDM 9.1.1): real mode, CS selector 0xF000 with base 0xFFFF0000 and
    /// IP 0xFFF0 (the first instruction at 0xFFFFFFF0), data segments at 0 with 64 KiB limits, CR0 =
    /// CD|NW|ET, EDX = 0x600 (a family-6 processor signature).
    public static func resetVector() -> EntryState {
        let code = Segment(base: 0xffff_0000, limit: 0xffff, selector: 0xf000, type: 0xb, db: false, l: false, g: false)
        let data = Segment(base: 0, limit: 0xffff, selector: 0, type: 0x3, db: false, l: false, g: false)
        var s = EntryState(cs: code, ds: data, es: data, fs: data, gs: data, ss: data)
        s.rip = 0xfff0
        s.rdx = 0x600
        s.cr0 = 0x6000_0010
        s.gdt = .init(base: 0, limit: 0xffff)
        s.idt = .init(base: 0, limit: 0xffff)
        return s
    }
}
