import GuestMemory

/// Intel MultiProcessor Specification 1.4 tables: the floating pointer ("_MP_") followed by the
/// configuration table ("PCMP") at `BootLayout.mpTableAddress` (0x9fc00, reserved in e820).
///
/// Entries: one processor per vCPU (APIC IDs 0..<N, CPU 0 the bootstrap processor), bus 0 "ISA",
/// one I/O APIC with ID N at 0xfec00000, I/O interrupt entries for ISA IRQs 0-15 (IRQ n → INTIN n),
/// and local interrupts LINT0 = ExtINT, LINT1 = NMI for all local APICs.
public enum MPTable {
    public static let ioapicAddress: UInt32 = 0xfec0_0000
    public static let lapicAddress: UInt32 = 0xfee0_0000
    static let floatingSize = 16, headerSize = 44, processorSize = 20, entrySize = 8
    /// The most CPUs whose tables fit in the 1 KiB below 0xa0000.
    public static var maxCPUs: Int {
        (Int(BootLayout.lowMemoryEnd - BootLayout.mpTableAddress) - floatingSize - headerSize - entrySize * (2 + 16 + 2)) / processorSize
    }

    /// The table bytes for `cpus` processors, placed at `address`.
    public static func build(cpus: Int, at address: UInt64 = BootLayout.mpTableAddress) throws -> [UInt8] {
        guard cpus >= 1, cpus <= maxCPUs, cpus < 255 else {
            throw BootError.unsupported("MP table: \(cpus) CPUs requested, between 1 and \(maxCPUs) fit at \(hex(address))")
        }
        let ioapicID = UInt8(cpus)
        var t: [UInt8] = []
        var count: UInt16 = 0
        // Processor entries.
        for i in 0..<cpus {
            var e = [UInt8](repeating: 0, count: processorSize)
            e[0] = 0                       // type: processor
            e[1] = UInt8(i)                // local APIC ID
            e[2] = 0x14                    // local APIC version
            e[3] = 0x1 | (i == 0 ? 0x2 : 0) // EN, BP
            e.putLE(UInt32(0x600), at: 4)  // CPU signature: family 6
            e.putLE(UInt32(0x201), at: 8)  // feature flags: FPU, APIC
            t += e; count += 1
        }
        // Bus 0: ISA.
        t += [1, 0] + Array("ISA   ".utf8); count += 1
        // I/O APIC.
        var io = [UInt8](repeating: 0, count: entrySize)
        io[0] = 2; io[1] = ioapicID; io[2] = 0x11; io[3] = 1
        io.putLE(ioapicAddress, at: 4)
        t += io; count += 1
        // I/O interrupts: ISA IRQ n → I/O APIC INTIN n.
        for irq in 0..<16 {
            t += [3, 0 /* INT */, 0, 0 /* flags: conforms */, 0 /* bus */, UInt8(irq), ioapicID, UInt8(irq)]
            count += 1
        }
        // Local interrupts: LINT0 ExtINT, LINT1 NMI, to every local APIC (0xff).
        t += [4, 3 /* ExtINT */, 0, 0, 0, 0, 0xff, 0]; count += 1
        t += [4, 1 /* NMI */, 0, 0, 0, 0, 0xff, 1]; count += 1

        var header = [UInt8](repeating: 0, count: headerSize)
        header.replaceSubrange(0..<4, with: Array("PCMP".utf8))
        header.putLE(UInt16(headerSize + t.count), at: 4)  // base table length
        header[6] = 4                                       // spec revision 1.4
        header.replaceSubrange(8..<16, with: Array("SWIFTKVM".utf8))
        header.replaceSubrange(16..<28, with: Array("SWIFTKVM 1.0".utf8))
        header.putLE(count, at: 34)
        header.putLE(lapicAddress, at: 36)
        var config = header + t
        config[7] = checksum(config)

        var fp = [UInt8](repeating: 0, count: floatingSize)
        fp.replaceSubrange(0..<4, with: Array("_MP_".utf8))
        fp.putLE(UInt32(address + UInt64(floatingSize)), at: 4) // physical address of the config table
        fp[8] = 1                                                // length in 16-byte units
        fp[9] = 4                                                // spec revision 1.4
        fp[10] = checksum(fp)
        return fp + config
    }

    /// Builds and writes the tables at `BootLayout.mpTableAddress`.
    @discardableResult
    public static func write(cpus: Int, into memory: GuestMemory) throws -> LoadRange {
        let bytes = try build(cpus: cpus)
        try guarded("MP table", at: BootLayout.mpTableAddress) { try memory.write(bytes, at: BootLayout.mpTableAddress) }
        return LoadRange(start: BootLayout.mpTableAddress, size: UInt64(bytes.count), what: "MP table")
    }

    /// The byte that makes the sum of `bytes` zero (with that byte currently 0).
    static func checksum(_ bytes: [UInt8]) -> UInt8 {
        0 &- bytes.reduce(0, &+)
    }
}
