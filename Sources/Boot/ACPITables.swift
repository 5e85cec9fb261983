import GuestMemory

/// The fixed-hardware register block of SwiftKVM's ACPI PM device (FADT), in port I/O space.
///
/// | port | register |
/// |---|---|
/// | `0x600` | PM1a status (16 bits, write 1 to clear) |
/// | `0x602` | PM1a enable (16 bits) |
/// | `0x604` | PM1a control (16 bits: SCI_EN, SLP_TYP, SLP_EN) |
/// | `0x608` | reset register (8 bits, write `resetValue`) |
/// | `0x60c` | PM timer (32 bits, read-only, 3.579545 MHz) |
public enum ACPIPorts {
    /// First port of the block (contract: 0x600–0x63F).
    public static let base: UInt16 = 0x600
    /// Ports reserved for the block.
    public static let length: UInt16 = 0x40
    /// PM1a event block (status + enable).
    public static let pm1aEvent: UInt16 = 0x600
    /// PM1a event block length in bytes.
    public static let pm1EventLength: UInt8 = 4
    /// PM1a control block.
    public static let pm1aControl: UInt16 = 0x604
    /// PM1a control block length in bytes.
    public static let pm1ControlLength: UInt8 = 2
    /// FADT RESET_REG (one byte).
    public static let reset: UInt16 = 0x608
    /// FADT PM_TMR_BLK: the 32-bit, 3.579545 MHz PM timer.
    public static let pmTimer: UInt16 = 0x60c
    /// PM timer block length in bytes.
    public static let pmTimerLength: UInt8 = 4
    /// FADT RESET_VALUE.
    public static let resetValue: UInt8 = 0x01
    /// SLP_TYP value of S5 (soft off), the `\_S5` package in the DSDT.
    public static let s5SleepType: UInt8 = 5
    /// SLP_TYP value of S3 (suspend to RAM), the `\_S3` package in the DSDT (QEMU's value).
    public static let s3SleepType: UInt8 = 1
    /// SCI interrupt (ISA IRQ 9, level-triggered, active high).
    public static let sciIRQ: UInt8 = 9
}

/// What the ACPI tables describe.
public struct ACPIConfiguration: Sendable, Equatable {
    /// Number of CPUs; APIC IDs are 0..<cpus (the MADT lists one enabled LAPIC each).
    public var cpus: Int
    /// I/O APIC ID (the MP table uses `cpus`).
    public var ioapicID: UInt8
    /// I/O APIC address.
    public var ioapicAddress: UInt32 = 0xfec0_0000
    /// Local APIC address.
    public var lapicAddress: UInt32 = 0xfee0_0000
    /// The 32-bit PCI memory windows given to the host bridge: where the VMM places BARs, and the
    /// top of the PCI hole below the I/O APIC, where firmware (SeaBIOS) places them.
    public var pciMemoryWindows: [ClosedRange<UInt32>] = [0xc000_0000...0xdfff_ffff, 0xfe10_0000...0xfebf_ffff]
    /// PCIe ECAM base for bus 0 (1 MiB), described by MCFG; nil without ECAM.
    public var ecamBase: UInt64? = nil
    /// Whether the DSDT lists COM1 (PNP0501 at 0x3f8, IRQ 4) and the i8042 keyboard (PNP0303).
    public var legacyDevices: Bool = true
    /// The virtio-mmio devices the DSDT lists (`LNRO0005`), in this order (the guest names its disks in it).
    public var virtioMMIODevices: [VirtioMMIODevice] = []

    /// One virtio-mmio register window and its interrupt, as the DSDT describes it.
    public struct VirtioMMIODevice: Sendable, Equatable {
        /// Guest-physical base of the register window (below 4 GiB).
        public var base: UInt32
        /// Size of the window in bytes.
        public var size: UInt32
        /// The I/O APIC GSI of its (edge-triggered, active-high) interrupt.
        public var gsi: UInt32
        public init(base: UInt32, size: UInt32, gsi: UInt32) { self.base = base; self.size = size; self.gsi = gsi }
    }

    /// A configuration for `cpus` CPUs with the I/O APIC ID `cpus` (as the MP table).
    public init(cpus: Int) {
        self.cpus = cpus
        self.ioapicID = UInt8(truncatingIfNeeded: cpus)
    }

    /// The IOAPIC GSI of INTx pin `pin` (0 = INTA) of PCI slot `slot` (1–31):
    /// `16 + ((slot - 1 + pin) % 8)`; slot N's INTA is GSI 16 + ((N - 1) % 8) (contract).
    public static func intxGSI(slot: Int, pin: Int) -> UInt32 {
        UInt32(16 + ((slot - 1 + pin) % 8))
    }
}

/// Builds SwiftKVM's ACPI tables: RSDP (v2) → XSDT (and an RSDT with the same entries) → FADT (rev 6, full fixed hardware, with
/// FACS and DSDT), MADT, and MCFG when ECAM exists.
///
/// The tables sit together at `BootLayout.acpiTablesAddress` (0xE0000, in the BIOS area Linux
/// scans for the RSDP and e820 reserves), RSDP first.
public enum ACPITables {
    /// Size of the common table header.
    public static let headerSize = 36
    /// Size of the ACPI 2.0+ RSDP.
    public static let rsdpSize = 36
    /// FADT revision 6 size.
    public static let fadtSize = 276
    /// FACS size.
    public static let facsSize = 64
    /// OEM ID in every header.
    public static let oemID = Array("SWIFTK".utf8)
    /// OEM table ID in every header.
    public static let oemTableID = Array("SWIFTKVM".utf8)
    /// Creator ID in every header.
    public static let creatorID = Array("SWKV".utf8)

    /// The built tables, each at its guest-physical address.
    public struct Image: Sendable {
        /// Guest-physical address of the first byte (the RSDP).
        public var base: UInt64
        /// All tables, contiguous from `base`.
        public var bytes: [UInt8]
        /// Address of each table by signature ("RSD PTR ", "XSDT", "FACP", "FACS", "DSDT", "APIC", "MCFG").
        public var addresses: [String: UInt64]
        /// The RSDP address (what boot_params.acpi_rsdp_addr gets).
        public var rsdp: UInt64 { base }
        /// The bytes of the table at `signature`, or nil when there is none.
        public func table(_ signature: String) -> [UInt8]? {
            guard let a = addresses[signature] else { return nil }
            let o = Int(a - base)
            if signature == "RSD PTR " { return Array(bytes[o..<o + ACPITables.rsdpSize]) }
            if signature == "FACS" { return Array(bytes[o..<o + ACPITables.facsSize]) }
            guard let len = bytes.getLE(UInt32.self, at: o + 4) else { return nil }
            return Array(bytes[o..<o + Int(len)])
        }
    }

    /// Builds every table for `config`, laid out from `base`.
    public static func build(_ config: ACPIConfiguration, at base: UInt64 = BootLayout.acpiTablesAddress) throws -> Image {
        guard config.cpus >= 1, config.cpus <= 255 else {
            throw BootError.unsupported("ACPI tables: \(config.cpus) CPUs requested, between 1 and 255 have 8-bit APIC IDs")
        }
        guard Int(config.ioapicID) >= config.cpus else {
            throw BootError.unsupported("ACPI tables: I/O APIC ID \(config.ioapicID) collides with a local APIC ID (0..<\(config.cpus))")
        }
        var bytes: [UInt8] = []
        var addresses: [String: UInt64] = [:]
        func place(_ sig: String, _ t: [UInt8], align: Int = 16) -> UInt64 {
            while bytes.count % align != 0 { bytes.append(0) }
            let a = base + UInt64(bytes.count)
            addresses[sig] = a
            bytes += t
            return a
        }
        // Reserve the RSDP slot; filled once the XSDT address is known.
        _ = place("RSD PTR ", [UInt8](repeating: 0, count: rsdpSize))
        let dsdtAddress = place("DSDT", dsdt(config))
        let facsAddress = place("FACS", facs(), align: 64)
        let fadtAddress = place("FACP", fadt(dsdt: dsdtAddress, facs: facsAddress))
        var entries = [fadtAddress, place("APIC", madt(config))]
        if let ecam = config.ecamBase { entries.append(place("MCFG", mcfg(ecamBase: ecam))) }
        let xsdtAddress = place("XSDT", xsdt(entries))
        // The RSDT too: GRUB, older loaders and ACPI 1.0 readers (QEMU's PCs have only an RSDT) follow it.
        let rsdtAddress = place("RSDT", rsdt(entries))
        bytes.replaceSubrange(0..<rsdpSize, with: rsdp(xsdt: xsdtAddress, rsdt: rsdtAddress))
        return Image(base: base, bytes: bytes, addresses: addresses)
    }

    /// Writes the tables into guest memory at `BootLayout.acpiTablesAddress` and returns them.
    public static func write(_ config: ACPIConfiguration, into memory: GuestMemory) throws -> Image {
        let image = try build(config)
        guard image.base + UInt64(image.bytes.count) <= BootLayout.acpiTablesEnd else {
            throw BootError.doesNotFit("ACPI tables: \(image.bytes.count) bytes do not fit in \(hex(image.base))-\(hex(BootLayout.acpiTablesEnd))")
        }
        try guarded("ACPI tables", at: image.base) { try memory.write(image.bytes, at: image.base) }
        return image
    }

    // MARK: Tables

    /// The RSDP (revision 2): checksum over the first 20 bytes, extended checksum over all 36.
    public static func rsdp(xsdt: UInt64, rsdt: UInt64 = 0) -> [UInt8] {
        var r = [UInt8](repeating: 0, count: rsdpSize)
        r.replaceSubrange(0..<8, with: Array("RSD PTR ".utf8))
        r.replaceSubrange(9..<15, with: oemID)
        r[15] = 2                                 // revision: ACPI 2.0+
        r.putLE(UInt32(truncatingIfNeeded: rsdt), at: 16)
        r.putLE(UInt32(rsdpSize), at: 20)
        r.putLE(xsdt, at: 24)
        r[8] = checksum(r[0..<20])
        r[32] = checksum(r[0..<36])
        return r
    }

    /// The RSDT pointing at `entries` (32-bit addresses).
    public static func rsdt(_ entries: [UInt64]) -> [UInt8] {
        var body: [UInt8] = []
        for e in entries { body += AML.le(UInt64(UInt32(truncatingIfNeeded: e)), 4) }
        return table("RSDT", revision: 1, body: body)
    }

    /// The XSDT pointing at `entries`.
    public static func xsdt(_ entries: [UInt64]) -> [UInt8] {
        var body: [UInt8] = []
        for e in entries { body += AML.le(e, 8) }
        return table("XSDT", revision: 1, body: body)
    }

    /// The FADT (revision 6): FACS through FIRMWARE_CTRL, DSDT through DSDT and X_DSDT; full fixed hardware with the PM1a event and control blocks of
    /// `ACPIPorts`, SCI on IRQ 9, no SMI command port (always in ACPI mode), the 32-bit PM timer
    /// (PM_TMR_BLK, X_PM_TMR_BLK, TMR_VAL_EXT), no GPE blocks, C2/C3 unsupported, RESET_REG at port 0x608, legacy devices and an i8042
    /// present, no VGA.
    public static func fadt(dsdt: UInt64, facs: UInt64) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: fadtSize - headerSize)
        func put<T: FixedWidthInteger>(_ v: T, _ offset: Int) { b.putLE(v, at: offset - headerSize) }
        func gas(_ offset: Int, port: UInt16, bits: UInt8, access: UInt8) {
            let o = offset - headerSize
            b[o] = 1; b[o + 1] = bits; b[o + 2] = 0; b[o + 3] = access   // SystemIO
            b.putLE(UInt64(port), at: o + 4)
        }
        put(UInt32(truncatingIfNeeded: facs), 36)          // FIRMWARE_CTRL
        put(UInt32(truncatingIfNeeded: dsdt), 40)          // DSDT
        put(UInt16(ACPIPorts.sciIRQ), 46)                  // SCI_INT
        put(UInt32(ACPIPorts.pm1aEvent), 56)               // PM1a_EVT_BLK
        put(UInt32(ACPIPorts.pm1aControl), 64)             // PM1a_CNT_BLK
        put(UInt32(ACPIPorts.pmTimer), 76)                 // PM_TMR_BLK
        put(ACPIPorts.pm1EventLength, 88)                  // PM1_EVT_LEN
        put(ACPIPorts.pm1ControlLength, 89)                // PM1_CNT_LEN
        put(ACPIPorts.pmTimerLength, 91)                   // PM_TMR_LEN
        put(UInt16(101), 96)                               // P_LVL2_LAT > 100: no C2
        put(UInt16(1001), 98)                              // P_LVL3_LAT > 1000: no C3
        put(UInt16(0x0007), 109)                           // IAPC_BOOT_ARCH: LEGACY_DEVICES, 8042, VGA not present
        let flags: UInt32 = 1 << 0     // WBINVD
            | 1 << 2                   // PROC_C1
            | 1 << 4                   // PWR_BUTTON: no fixed power button
            | 1 << 5                   // SLP_BUTTON: no fixed sleep button
            | 1 << 6                   // FIX_RTC: no RTC wake status
            | 1 << 8                   // TMR_VAL_EXT: the PM timer has 32 bits
            | 1 << 10                  // RESET_REG_SUP
        put(flags, 112)
        gas(116, port: ACPIPorts.reset, bits: 8, access: 1) // RESET_REG
        put(ACPIPorts.resetValue, 128)                     // RESET_VALUE
        put(UInt8(0), 131)                                 // FADT minor version
        // X_FIRMWARE_CTRL stays 0: with both set, Linux installs (and lists) the FACS twice.
        put(dsdt, 140)                                     // X_DSDT
        gas(148, port: ACPIPorts.pm1aEvent, bits: ACPIPorts.pm1EventLength * 8, access: 2)    // X_PM1a_EVT_BLK
        gas(172, port: ACPIPorts.pm1aControl, bits: ACPIPorts.pm1ControlLength * 8, access: 2) // X_PM1a_CNT_BLK
        gas(208, port: ACPIPorts.pmTimer, bits: ACPIPorts.pmTimerLength * 8, access: 3)       // X_PM_TMR_BLK
        put(UInt64(0x4d56_4b74_6669_7753), 268)            // hypervisor vendor identity "SwiftKVM"
        return table("FACP", revision: 6, body: b)
    }

    /// The FACS (64 bytes, version 2, no global lock, no waking vector).
    public static func facs() -> [UInt8] {
        var f = [UInt8](repeating: 0, count: facsSize)
        f.replaceSubrange(0..<4, with: Array("FACS".utf8))
        f.putLE(UInt32(facsSize), at: 4)
        f[32] = 2                                          // version
        return f
    }

    /// The MADT: local APIC address, PCAT_COMPAT (8259s present), one enabled local APIC per CPU
    /// (processor UID = APIC ID = CPU index), the I/O APIC at GSI base 0, an interrupt source
    /// override for the SCI (IRQ 9 → GSI 9, level, active high) and LINT1 = NMI on every local APIC.
    ///
    /// There is no IRQ0 → GSI 2 override: KVM's default routing (and the MP table) wire the PIT's
    /// IRQ 0 to I/O APIC pin 0.
    public static func madt(_ config: ACPIConfiguration) -> [UInt8] {
        var b: [UInt8] = AML.le(UInt64(config.lapicAddress), 4) + AML.le(1, 4)   // PCAT_COMPAT
        for i in 0..<config.cpus {
            b += [0, 8, UInt8(i), UInt8(i)] + AML.le(1, 4)                         // Processor Local APIC, enabled
        }
        b += [1, 12, config.ioapicID, 0] + AML.le(UInt64(config.ioapicAddress), 4) + AML.le(0, 4)  // I/O APIC
        b += [2, 10, 0, ACPIPorts.sciIRQ] + AML.le(UInt64(ACPIPorts.sciIRQ), 4) + AML.le(0x000d, 2) // ISO: level, high
        b += [4, 6, 0xff] + AML.le(0x0000, 2) + [1]                                // Local APIC NMI: all, LINT1
        return table("APIC", revision: 5, body: b)
    }

    /// The MCFG: one ECAM allocation for segment 0, bus 0.
    public static func mcfg(ecamBase: UInt64) -> [UInt8] {
        let b = [UInt8](repeating: 0, count: 8) + AML.le(ecamBase, 8) + AML.le(0, 2) + [0, 0] + AML.le(0, 4)
        return table("MCFG", revision: 1, body: b)
    }

    /// The DSDT (revision 2: 64-bit integers).
    public static func dsdt(_ config: ACPIConfiguration) -> [UInt8] {
        table("DSDT", revision: 2, body: dsdtAML(config))
    }

    /// The DSDT's definition block (names relative to the root scope, as iasl emits them):
    /// - `\_S3` = Package { 1, 1, 0, 0 } (SLP_TYP of suspend to RAM) and `\_S5` = Package { 5, 5, 0, 0 } (soft-off);
    /// - `\_SB.PCI0`: the host bridge (PNP0A08 with _CID PNP0A03 when ECAM exists, else PNP0A03),
    ///   _SEG/_BBN/_UID 0, _CRS with bus 0, the config ports, I/O windows 0x0000–0x0CF7 and
    ///   0x0D00–0xFFFF and the 32-bit memory window, and _PRT routing INTA–INTD of slots 1–31
    ///   to GSIs 16–23;
    /// - `\_SB.COM1` (PNP0501) and `\_SB.PS2K` (PNP0303) when `legacyDevices`;
    /// - `\_SB.MRES` (PNP0C02) reserving the ECAM range when ECAM exists;
    /// - `\_SB.V000`, `V001`… for the virtio-mmio devices, as Firecracker describes them: _HID "LNRO0005",
    ///   _UID the index, _CCA 1 and _CRS with the register window (Memory32Fixed) and the interrupt
    ///   (Interrupt: consumer, edge, active high, exclusive).
    public static func dsdtAML(_ config: ACPIConfiguration) -> [UInt8] {
        let s5 = AML.name("_S5", AML.package([AML.integer(UInt64(ACPIPorts.s5SleepType)),
                                                AML.integer(UInt64(ACPIPorts.s5SleepType)),
                                                AML.integer(0), AML.integer(0)]))
        let s3 = AML.name("_S3", AML.package([AML.integer(UInt64(ACPIPorts.s3SleepType)),
                                                AML.integer(UInt64(ACPIPorts.s3SleepType)),
                                                AML.integer(0), AML.integer(0)]))
        var prt: [[UInt8]] = []
        for slot in 1...31 {
            for pin in 0..<4 {
                prt.append(AML.package([AML.integer(UInt64(slot) << 16 | 0xffff), AML.integer(UInt64(pin)),
                                        AML.integer(0), AML.integer(UInt64(ACPIConfiguration.intxGSI(slot: slot, pin: pin)))]))
            }
        }
        var pci: [[UInt8]] = []
        if config.ecamBase != nil {
            pci.append(AML.name("_HID", AML.eisaID("PNP0A08")))
            pci.append(AML.name("_CID", AML.eisaID("PNP0A03")))
        } else {
            pci.append(AML.name("_HID", AML.eisaID("PNP0A03")))
        }
        pci += [
            AML.name("_SEG", AML.integer(0)),
            AML.name("_BBN", AML.integer(0)),
            AML.name("_UID", AML.integer(0)),
            AML.name("_CRS", AML.resourceTemplate([
                AMLResource.wordBusNumber(min: 0, max: 0),
                AMLResource.io(min: 0xcf8, max: 0xcf8, alignment: 1, length: 8),
                AMLResource.wordIO(min: 0x0000, max: 0x0cf7),
                AMLResource.wordIO(min: 0x0d00, max: 0xffff),
            ] + config.pciMemoryWindows.map { AMLResource.dwordMemory(min: $0.lowerBound, max: $0.upperBound) })),
            AML.name("_PRT", AML.package(prt)),
        ]
        var sb: [[UInt8]] = [AML.device("PCI0", pci)]
        if config.legacyDevices {
            sb.append(AML.device("COM1", [
                AML.name("_HID", AML.eisaID("PNP0501")),
                AML.name("_UID", AML.integer(1)),
                AML.name("_CRS", AML.resourceTemplate([
                    AMLResource.io(min: 0x3f8, max: 0x3f8, alignment: 0, length: 8),
                    AMLResource.irqNoFlags([4]),
                ])),
            ]))
            sb.append(AML.device("PS2K", [
                AML.name("_HID", AML.eisaID("PNP0303")),
                AML.name("_CRS", AML.resourceTemplate([
                    AMLResource.io(min: 0x60, max: 0x60, alignment: 1, length: 1),
                    AMLResource.io(min: 0x64, max: 0x64, alignment: 1, length: 1),
                    AMLResource.irqNoFlags([1]),
                ])),
            ]))
        }
        if let ecam = config.ecamBase {
            sb.append(AML.device("MRES", [
                AML.name("_HID", AML.eisaID("PNP0C02")),
                AML.name("_UID", AML.integer(0)),
                AML.name("_CRS", AML.resourceTemplate([
                    AMLResource.memory32Fixed(base: UInt32(truncatingIfNeeded: ecam), length: 1 << 20),
                ])),
            ]))
        }
        for (i, d) in config.virtioMMIODevices.enumerated() {
            sb.append(AML.device(virtioMMIODeviceName(i), [
                AML.name("_HID", AML.string("LNRO0005")),
                AML.name("_UID", AML.integer(UInt64(i))),
                AML.name("_CCA", AML.integer(1)),
                AML.name("_CRS", AML.resourceTemplate([
                    AMLResource.memory32Fixed(base: d.base, length: d.size),
                    AMLResource.extendedInterrupt(d.gsi, level: false, activeLow: false, shared: false),
                ])),
            ]))
        }
        return s3 + s5 + AML.scope("_SB_", sb)
    }

    /// The DSDT name of virtio-mmio device `index`: V000, V001… (hexadecimal past 999, up to VFFF).
    public static func virtioMMIODeviceName(_ index: Int) -> String {
        let digits = index < 1000 ? String(index) : String(index & 0xfff, radix: 16, uppercase: true)
        return "V" + String(repeating: "0", count: max(0, 3 - digits.count)) + digits
    }

    // MARK: Helpers

    /// A table: the 36-byte header (signature, length, revision, checksum, OEM and creator IDs) + `body`.
    public static func table(_ signature: String, revision: UInt8, body: [UInt8]) -> [UInt8] {
        var h = [UInt8](repeating: 0, count: headerSize)
        h.replaceSubrange(0..<4, with: Array(signature.utf8.prefix(4)))
        h.putLE(UInt32(headerSize + body.count), at: 4)
        h[8] = revision
        h.replaceSubrange(10..<16, with: oemID)
        h.replaceSubrange(16..<24, with: oemTableID)
        h.putLE(UInt32(1), at: 24)                          // OEM revision
        h.replaceSubrange(28..<32, with: creatorID)
        h.putLE(UInt32(1), at: 32)                          // creator revision
        var t = h + body
        t[9] = checksum(t[...])
        return t
    }

    /// The byte that makes the sum of `bytes` zero (with that byte currently 0).
    public static func checksum(_ bytes: ArraySlice<UInt8>) -> UInt8 {
        0 &- bytes.reduce(0, &+)
    }
}
