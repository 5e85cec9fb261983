import Foundation
import Testing
import GuestMemory
@testable import Boot

/// Sum of bytes modulo 256 (0 for a table with a valid checksum).
private func byteSum<C: Collection>(_ b: C) -> UInt8 where C.Element == UInt8 { b.reduce(0, &+) }

@Suite("ACPI tables")
struct ACPITablesTests {
    func image(cpus: Int = 4, ecam: UInt64? = nil) throws -> ACPITables.Image {
        var c = ACPIConfiguration(cpus: cpus)
        c.ecamBase = ecam
        return try ACPITables.build(c)
    }

    @Test("the RSDP is revision 2 at 0xE0000 with valid checksum and extended checksum, pointing at the XSDT")
    func rsdp() throws {
        let img = try image()
        #expect(img.base == 0xe0000 && img.rsdp == 0xe0000)
        let r = try #require(img.table("RSD PTR "))
        #expect(Array(r[0..<8]) == Array("RSD PTR ".utf8))
        #expect(byteSum(r[0..<20]) == 0, "checksum over the first 20 bytes")
        #expect(byteSum(r) == 0, "extended checksum over 36 bytes")
        #expect(r[15] == 2)
        #expect(r.getLE(UInt32.self, at: 20) == 36)
        #expect(r.getLE(UInt64.self, at: 24) == img.addresses["XSDT"])
    }

    @Test("every table has a valid checksum, a length field equal to its size and lies inside 0xE0000-0xF0000",
          arguments: [1, 2, 32])
    func checksums(cpus: Int) throws {
        let img = try image(cpus: cpus, ecam: 0xe000_0000)
        #expect(img.base + UInt64(img.bytes.count) <= BootLayout.acpiTablesEnd)
        for sig in ["XSDT", "FACP", "DSDT", "APIC", "MCFG"] {
            let t = try #require(img.table(sig), "\(sig) missing")
            #expect(Array(t[0..<4]) == Array(sig.utf8))
            #expect(byteSum(t) == 0, "\(sig) checksum")
            #expect(Array(t[10..<16]) == Array("SWIFTK".utf8), "\(sig) OEM ID")
            #expect(img.addresses[sig]! % 16 == 0, "\(sig) alignment")
        }
        #expect(img.addresses["FACS"]! % 64 == 0, "FACS must be 64-byte aligned")
    }

    @Test("the XSDT lists the FADT and MADT, and MCFG only when ECAM exists; the RSDT (for GRUB and ACPI 1.0 readers) lists the same")
    func xsdt() throws {
        for ecam in [nil, UInt64(0xe000_0000)] {
            let img = try image(ecam: ecam)
            let x = try #require(img.table("XSDT"))
            let entries = stride(from: 36, to: x.count, by: 8).map { x.getLE(UInt64.self, at: $0)! }
            var expected = [img.addresses["FACP"]!, img.addresses["APIC"]!]
            if ecam != nil { expected.append(img.addresses["MCFG"]!) }
            #expect(entries == expected)
            #expect((img.addresses["MCFG"] != nil) == (ecam != nil))
            let r = try #require(img.table("RSDT"))
            #expect(stride(from: 36, to: r.count, by: 4).map { UInt64(r.getLE(UInt32.self, at: $0)!) } == expected)
            #expect(img.bytes.getLE(UInt32.self, at: 16).map(UInt64.init) == img.addresses["RSDT"], "the RSDP points at the RSDT")
        }
    }

    @Test("the FADT is revision 6 with PM1a blocks at 0x600/0x604, SCI 9, RESET_REG 0x608, the 32-bit PM timer at 0x60c, and matching 32/64-bit pointers")
    func fadt() throws {
        let img = try image()
        let f = try #require(img.table("FACP"))
        #expect(f.count == 276 && f[8] == 6)
        #expect(f.getLE(UInt32.self, at: 36) == UInt32(img.addresses["FACS"]!))
        #expect(f.getLE(UInt32.self, at: 40) == UInt32(img.addresses["DSDT"]!))
        #expect(f.getLE(UInt64.self, at: 132) == 0, "X_FIRMWARE_CTRL unused: FIRMWARE_CTRL points at the FACS")
        #expect(f.getLE(UInt64.self, at: 140) == img.addresses["DSDT"])
        #expect(f.getLE(UInt16.self, at: 46) == 9, "SCI_INT")
        #expect(f.getLE(UInt32.self, at: 48) == 0, "no SMI_CMD: always in ACPI mode")
        #expect(f.getLE(UInt32.self, at: 56) == 0x600 && f[88] == 4, "PM1a_EVT_BLK and PM1_EVT_LEN")
        #expect(f.getLE(UInt32.self, at: 64) == 0x604 && f[89] == 2, "PM1a_CNT_BLK and PM1_CNT_LEN")
        #expect(f.getLE(UInt32.self, at: 76) == 0x60c && f[91] == 4, "PM_TMR_BLK and PM_TMR_LEN")
        #expect(f[208] == 1 && f[209] == 32 && f[211] == 3 && f.getLE(UInt64.self, at: 212) == 0x60c, "X_PM_TMR_BLK: SystemIO, 32 bits, dword access")
        // X_PM1a_EVT_BLK / X_PM1a_CNT_BLK: SystemIO, widths matching the legacy lengths.
        #expect(f[148] == 1 && f[149] == 32 && f.getLE(UInt64.self, at: 152) == 0x600)
        #expect(f[172] == 1 && f[173] == 16 && f.getLE(UInt64.self, at: 176) == 0x604)
        // RESET_REG: SystemIO, 8 bits, port 0x608, value 1, RESET_REG_SUP flag.
        #expect(f[116] == 1 && f[117] == 8 && f[118] == 0 && f.getLE(UInt64.self, at: 120) == 0x608 && f[128] == 1)
        let flags = try #require(f.getLE(UInt32.self, at: 112))
        #expect(flags & (1 << 10) != 0, "RESET_REG_SUP")
        #expect(flags & (1 << 8) != 0, "TMR_VAL_EXT: a 32-bit PM timer")
        #expect(flags & (1 << 20) == 0, "not HW_REDUCED_ACPI")
        #expect(f.getLE(UInt16.self, at: 109)! & 0x3 == 0x3, "IAPC_BOOT_ARCH: legacy devices and 8042")
        let facs = try #require(img.table("FACS"))
        #expect(Array(facs[0..<4]) == Array("FACS".utf8) && facs.getLE(UInt32.self, at: 4) == 64)
    }

    @Test("the MADT lists one enabled LAPIC per CPU (IDs 0..N-1), the I/O APIC with ID N, the SCI override and LINT1 NMI",
          arguments: [1, 3, 32])
    func madt(cpus: Int) throws {
        let m = try #require(try image(cpus: cpus).table("APIC"))
        #expect(m.getLE(UInt32.self, at: 36) == 0xfee0_0000)
        #expect(m.getLE(UInt32.self, at: 40) == 1, "PCAT_COMPAT")
        var lapics: [UInt8] = [], ioapics: [(UInt8, UInt32, UInt32)] = [], overrides: [(UInt8, UInt32, UInt16)] = [], nmis: [(UInt8, UInt8)] = []
        var o = 44
        while o < m.count {
            let type = m[o], len = Int(m[o + 1])
            try #require(len >= 2 && o + len <= m.count, "entry at \(o) overruns the table")
            switch type {
            case 0: #expect(len == 8 && m[o + 2] == m[o + 3] && m.getLE(UInt32.self, at: o + 4) == 1); lapics.append(m[o + 3])
            case 1: #expect(len == 12); ioapics.append((m[o + 2], m.getLE(UInt32.self, at: o + 4)!, m.getLE(UInt32.self, at: o + 8)!))
            case 2: #expect(len == 10); overrides.append((m[o + 3], m.getLE(UInt32.self, at: o + 4)!, m.getLE(UInt16.self, at: o + 8)!))
            case 4: #expect(len == 6); nmis.append((m[o + 2], m[o + 5]))
            default: Issue.record("unexpected MADT entry type \(type)")
            }
            o += len
        }
        #expect(o == m.count)
        #expect(lapics == (0..<cpus).map { UInt8($0) })
        #expect(ioapics.count == 1 && ioapics[0].0 == UInt8(cpus) && ioapics[0].1 == 0xfec0_0000 && ioapics[0].2 == 0)
        #expect(overrides.count == 1 && overrides[0].0 == 9 && overrides[0].1 == 9 && overrides[0].2 == 0x000d,
                "only IRQ 9 (SCI), level-triggered active-high; IRQ 0 stays on pin 0 as in KVM's routing")
        #expect(nmis.count == 1 && nmis[0].0 == 0xff && nmis[0].1 == 1)
    }

    @Test("the MCFG describes ECAM for segment 0, bus 0")
    func mcfg() throws {
        let m = try #require(try image(ecam: 0xe000_0000).table("MCFG"))
        #expect(m.count == 36 + 8 + 16)
        #expect(m.getLE(UInt64.self, at: 44) == 0xe000_0000)
        #expect(m.getLE(UInt16.self, at: 52) == 0 && m[54] == 0 && m[55] == 0)
    }

    @Test("more than 255 CPUs or an I/O APIC ID colliding with a CPU is refused with a clear error")
    func badConfigurations() {
        #expect(throws: BootError.self) { try ACPITables.build(ACPIConfiguration(cpus: 0)) }
        #expect(throws: BootError.self) { try ACPITables.build(ACPIConfiguration(cpus: 300)) }
        var c = ACPIConfiguration(cpus: 4)
        c.ioapicID = 2
        #expect(throws: BootError.self) { try ACPITables.build(c) }
    }

    @Test("ACPITables.write puts the tables in guest memory where the RSDP scan finds them")
    func write() throws {
        let mem = try makeMemory(16 << 20)
        let img = try ACPITables.write(ACPIConfiguration(cpus: 2), into: mem)
        #expect(try mem.read(at: 0xe0000, count: 8) == Array("RSD PTR ".utf8))
        #expect(try mem.read(at: img.base, count: img.bytes.count) == img.bytes)
        #expect(E820Map.build(for: mem).contains(E820Entry(address: 0xe0000, size: 0x20000, kind: .reserved)))
    }

    @Test("INTx routing: slot N's INTA is GSI 16 + ((N - 1) % 8)")
    func intx() {
        #expect(ACPIConfiguration.intxGSI(slot: 1, pin: 0) == 16)
        #expect(ACPIConfiguration.intxGSI(slot: 8, pin: 0) == 23)
        #expect(ACPIConfiguration.intxGSI(slot: 9, pin: 0) == 16)
        #expect(ACPIConfiguration.intxGSI(slot: 31, pin: 0) == 22)
    }
}

@Suite("AML encoder")
struct AMLTests {
    @Test("PkgLength uses 1 byte up to 63 and then 2, 3 bytes with the low nibble first")
    func pkgLength() {
        #expect(AML.pkgLength(0) == [0x01])
        #expect(AML.pkgLength(62) == [0x3f])
        #expect(AML.pkgLength(63) == [0x41, 0x04])          // total 65 = 0x41
        #expect(AML.pkgLength(0xffd) == [0x4f, 0xff])       // total 0xfff
        #expect(AML.pkgLength(0xffe) == [0x81, 0x00, 0x01]) // total 0x1001
    }

    @Test("integers use Zero/One/Ones and the shortest prefix")
    func integers() {
        #expect(AML.integer(0) == [0x00])
        #expect(AML.integer(1) == [0x01])
        #expect(AML.integer(5) == [0x0a, 0x05])
        #expect(AML.integer(0x100) == [0x0b, 0x00, 0x01])
        #expect(AML.integer(0x1_0000) == [0x0c, 0x00, 0x00, 0x01, 0x00])
        #expect(AML.integer(0x1_0000_0000) == [0x0e, 0, 0, 0, 0, 1, 0, 0, 0])
        #expect(AML.integer(.max) == [0xff])
    }

    @Test("names: padding, root and parent prefixes, dual and multi-segment paths")
    func names() {
        #expect(AML.nameString("_S5") == Array("_S5_".utf8))
        #expect(AML.nameString("\\_SB_") == [0x5c] + Array("_SB_".utf8))
        #expect(AML.nameString("^PCI0") == [0x5e] + Array("PCI0".utf8))
        #expect(AML.nameString("_SB.PCI0") == [0x2e] + Array("_SB_PCI0".utf8))
        #expect(AML.nameString("\\_SB.PCI0.S01") == [0x5c, 0x2f, 3] + Array("_SB_PCI0S01_".utf8))
        #expect(AML.nameString("\\") == [0x5c, 0x00])
    }

    @Test("EisaId, strings, Name(_S5, Package) and a resource template encode as the ACPI spec says")
    func snippets() {
        #expect(AML.eisaID("PNP0A08") == [0x0c, 0x41, 0xd0, 0x0a, 0x08])
        #expect(AML.eisaID("PNP0501") == [0x0c, 0x41, 0xd0, 0x05, 0x01])
        #expect(AML.string("ab") == [0x0d, 0x61, 0x62, 0x00])
        #expect(AML.name("_S5", AML.package([AML.integer(5), AML.integer(5), AML.integer(0), AML.integer(0)]))
                == [0x08, 0x5f, 0x53, 0x35, 0x5f, 0x12, 0x08, 0x04, 0x0a, 0x05, 0x0a, 0x05, 0x00, 0x00])
        #expect(AML.resourceTemplate([AMLResource.io(min: 0x3f8, max: 0x3f8, alignment: 0, length: 8), AMLResource.irqNoFlags([4])])
                == [0x11, 0x10, 0x0a, 0x0d, 0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x00, 0x08, 0x22, 0x10, 0x00, 0x79, 0x00])
        #expect(AML.method("_STA", [AML.return(AML.integer(0x0f))]) == [0x14, 0x09, 0x5f, 0x53, 0x54, 0x41, 0x00, 0xa4, 0x0a, 0x0f])
        #expect(AMLResource.extendedInterrupt(5, level: true, activeLow: false, shared: false) == [0x89, 0x06, 0x00, 0x01, 0x01, 0x05, 0x00, 0x00, 0x00])
        #expect(AMLResource.qwordMemory(min: 0x1_0000_0000, max: 0x1_ffff_ffff).count == 46)
    }
}

/// Compiles ASL with `iasl` (Debian package acpica-tools) and compares its AML with ours.
@Suite("AML against iasl", .enabled(if: IASL.path != nil, "iasl not installed (apt-get install acpica-tools)"))
struct AMLIASLTests {
    @Test("the DSDT's definition block is byte-identical to iasl's compilation of the equivalent ASL",
          arguments: [false, true], [false, true])
    func dsdt(ecam: Bool, mmio: Bool) throws {
        var c = ACPIConfiguration(cpus: 2)
        c.ecamBase = ecam ? 0xe000_0000 : nil
        if mmio {
            c.virtioMMIODevices = [.init(base: 0xf000_0000, size: 0x1000, gsi: 5), .init(base: 0xf000_1000, size: 0x1000, gsi: 16)]
        }
        let virtio = !mmio ? "" : """
            Device (V000) {
                Name (_HID, "LNRO0005")
                Name (_UID, Zero)
                Name (_CCA, One)
                Name (_CRS, ResourceTemplate () {
                    Memory32Fixed (ReadWrite, 0xF0000000, 0x00001000)
                    Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 5 }
                })
            }
            Device (V001) {
                Name (_HID, "LNRO0005")
                Name (_UID, One)
                Name (_CCA, One)
                Name (_CRS, ResourceTemplate () {
                    Memory32Fixed (ReadWrite, 0xF0001000, 0x00001000)
                    Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 16 }
                })
            }
            """
        var prt = ""
        for slot in 1...31 {
            for pin in 0..<4 {
                prt += "Package () { 0x\(String(slot << 16 | 0xffff, radix: 16)), \(pin), Zero, \(ACPIConfiguration.intxGSI(slot: slot, pin: pin)) },\n"
            }
        }
        let hid = ecam ? "Name (_HID, EisaId (\"PNP0A08\"))\nName (_CID, EisaId (\"PNP0A03\"))" : "Name (_HID, EisaId (\"PNP0A03\"))"
        let mres = !ecam ? "" : """
            Device (MRES) {
                Name (_HID, EisaId ("PNP0C02"))
                Name (_UID, Zero)
                Name (_CRS, ResourceTemplate () { Memory32Fixed (ReadWrite, 0xE0000000, 0x00100000) })
            }
            """
        let asl = """
        DefinitionBlock ("", "DSDT", 2, "SWIFTK", "SWIFTKVM", 1) {
            Name (\\_S3, Package () { One, One, Zero, Zero })
            Name (\\_S5, Package () { 5, 5, Zero, Zero })
            Scope (\\_SB) {
                Device (PCI0) {
                    \(hid)
                    Name (_SEG, Zero)
                    Name (_BBN, Zero)
                    Name (_UID, Zero)
                    Name (_CRS, ResourceTemplate () {
                        WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, 0, 0, 0, 1)
                        IO (Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08)
                        WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, 0x0000, 0x0CF7, 0, 0x0CF8)
                        WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, 0x0D00, 0xFFFF, 0, 0xF300)
                        DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, 0, 0xC0000000, 0xDFFFFFFF, 0, 0x20000000)
                        DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, 0, 0xFE100000, 0xFEBFFFFF, 0, 0x00B00000)
                    })
                    Name (_PRT, Package () {
                        \(prt)
                    })
                }
                Device (COM1) {
                    Name (_HID, EisaId ("PNP0501"))
                    Name (_UID, One)
                    Name (_CRS, ResourceTemplate () { IO (Decode16, 0x03F8, 0x03F8, 0x00, 0x08) IRQNoFlags () {4} })
                }
                Device (PS2K) {
                    Name (_HID, EisaId ("PNP0303"))
                    Name (_CRS, ResourceTemplate () { IO (Decode16, 0x0060, 0x0060, 0x01, 0x01) IO (Decode16, 0x0064, 0x0064, 0x01, 0x01) IRQNoFlags () {1} })
                }
                \(mres)
                \(virtio)
            }
        }
        """
        let theirs = try IASL.compile(asl)
        let ours = ACPITables.dsdt(c)
        try #require(theirs.count >= 36)
        let a = Array(ours.dropFirst(36)), b = Array(theirs.dropFirst(36))
        let firstDifference = zip(a, b).enumerated().first { $0.element.0 != $0.element.1 }?.offset
        #expect(a.count == b.count && firstDifference == nil, "AML differs (ours \(a.count) bytes, iasl \(b.count) bytes, first difference at body offset \(String(describing: firstDifference)))")
    }
}

/// Runs iasl in a temporary directory.
enum IASL {
    static let path: String? = ["/usr/bin/iasl", "/usr/local/bin/iasl"].first { FileManager.default.isExecutableFile(atPath: $0) }

    struct Failure: Error, CustomStringConvertible { var description: String }

    /// The AML file iasl produces for `asl`.
    static func compile(_ asl: String) throws -> [UInt8] {
        guard let path else { throw Failure(description: "iasl not installed") }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("swiftkvm-iasl-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let source = dir.appendingPathComponent("t.asl")
        try asl.write(to: source, atomically: true, encoding: .utf8)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = ["-p", dir.appendingPathComponent("t").path, source.path]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let log = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw Failure(description: "iasl failed (\(p.terminationStatus)):\n\(log)") }
        return try [UInt8](Data(contentsOf: dir.appendingPathComponent("t.aml")))
    }
}
