import Devices
import PCI
import Testing

@Suite("MSI-X table")
struct MSIXTests {
    /// A table of `n` vectors in a device's config space, enabled when `enable`.
    func make(_ n: Int = 4) throws -> (MSIXTable, PCIConfiguration, Int, RecordingController) {
        let controller = RecordingController()
        let table = try MSIXTable(vectorCount: n, controller: controller)
        let cfg = TestDevice(bars: [PCIBarSpec(index: 1, size: 0x1000, kind: .memory32)]).configuration
        let cap = cfg.addMSIX(table, tableBAR: 1, tableOffset: 0, pbaBAR: 1, pbaOffset: 0x800)
        return (table, cfg, cap, controller)
    }

    /// Writes an entry as a driver does: mask, then address and data, then the final mask state.
    func program(_ t: MSIXTable, _ v: Int, address: UInt64, data: UInt32, masked: Bool) {
        writeLE(4, 1) { t.tableWrite(offset: UInt64(16 * v + 12), data: $0) }
        writeLE(8, address) { t.tableWrite(offset: UInt64(16 * v), data: $0) }
        writeLE(4, UInt64(data)) { t.tableWrite(offset: UInt64(16 * v + 8), data: $0) }
        writeLE(4, masked ? 1 : 0) { t.tableWrite(offset: UInt64(16 * v + 12), data: $0) }
    }

    @Test("the capability describes table size, BIR and offsets; Message Control bits 14–15 are writable")
    func capability() throws {
        let (t, cfg, cap, _) = try make(3)
        #expect(cfgRead(cfg, cap, 1) == 0x11)
        #expect(cfgRead(cfg, cap + 2, 2) == 2) // N - 1
        #expect(cfgRead(cfg, cap + 4, 4) == 0x1)
        #expect(cfgRead(cfg, cap + 8, 4) == 0x801)
        cfgWrite(cfg, cap + 2, 2, 0xffff)
        #expect(cfgRead(cfg, cap + 2, 2) == 0xc002)
        #expect(t.isEnabled && t.isFunctionMasked)
        cfgWrite(cfg, cap + 3, 1, 0x80)
        #expect(t.isEnabled && !t.isFunctionMasked)
        #expect(t.tableSize == 48 && t.pbaSize == 8)
    }

    @Test("entries start masked; the mask bit is the only writable control bit")
    func resetState() throws {
        let (t, _, _, _) = try make()
        #expect(readLE(16) { t.tableRead(offset: 16, data: $0) } == 0)
        #expect(readLE(4) { t.tableRead(offset: 28, data: $0) } == 1)
        writeLE(4, 0xffff_fffe) { t.tableWrite(offset: 12, data: $0) }
        #expect(readLE(4) { t.tableRead(offset: 12, data: $0) } == 0)
        #expect(!t.isMasked(0) && t.isMasked(1))
    }

    @Test("a masked vector becomes pending and fires once when unmasked, programmed first")
    func pendingOnUnmask() throws {
        let (t, cfg, cap, c) = try make()
        cfgWrite(cfg, cap + 2, 2, 0x8000)
        program(t, 1, address: 0xfee0_0000, data: 0x41, masked: true)
        #expect(t.signal(1) == false)
        #expect(t.isPending(1))
        #expect(readLE(8) { t.pbaRead(offset: 0, data: $0) } == 0b10)
        #expect(c.vectors[1].log.isEmpty)
        writeLE(4, 0) { t.tableWrite(offset: 16 + 12, data: $0) }
        #expect(c.vectors[1].log == [.program(0xfee0_0000, 0x41), .fire])
        #expect(!t.isPending(1))
        #expect(readLE(8) { t.pbaRead(offset: 0, data: $0) } == 0)
        // Unmasked: fires at once, not reprogrammed when nothing changed.
        #expect(t.signal(1))
        #expect(c.vectors[1].log == [.program(0xfee0_0000, 0x41), .fire, .fire])
    }

    @Test("program() is called only when an unmasked vector's message changed")
    func programOnlyOnChange() throws {
        let (t, cfg, cap, c) = try make()
        cfgWrite(cfg, cap + 2, 2, 0x8000)
        program(t, 0, address: 0xfee0_1000, data: 0x30, masked: false)
        #expect(c.vectors[0].log == [.program(0xfee0_1000, 0x30)])
        program(t, 0, address: 0xfee0_1000, data: 0x30, masked: false)
        #expect(c.vectors[0].log.count == 1)
        // While masked, changes are not programmed; unmasking programs the new message.
        program(t, 0, address: 0xfee0_2000, data: 0x31, masked: true)
        #expect(c.vectors[0].log.count == 1)
        writeLE(4, 0) { t.tableWrite(offset: 12, data: $0) }
        #expect(c.vectors[0].log == [.program(0xfee0_1000, 0x30), .program(0xfee0_2000, 0x31)])
    }

    @Test("a message changed while the vector is unmasked is reprogrammed at once")
    func changeWhileUnmasked() throws {
        let (t, cfg, cap, c) = try make()
        cfgWrite(cfg, cap + 2, 2, 0x8000)
        program(t, 3, address: 0xfee0_0000, data: 0x20, masked: false)
        writeLE(4, 0x21) { t.tableWrite(offset: 3 * 16 + 8, data: $0) }
        t.signal(3)
        #expect(c.vectors[3].log == [.program(0xfee0_0000, 0x20), .program(0xfee0_0000, 0x21), .fire])
    }

    @Test("the function mask holds every vector pending until it is cleared")
    func functionMask() throws {
        let (t, cfg, cap, c) = try make()
        program(t, 0, address: 0xfee0_0000, data: 0x50, masked: false)
        program(t, 2, address: 0xfee0_0000, data: 0x52, masked: false)
        #expect(c.vectors[0].log.isEmpty) // MSI-X disabled: nothing programmed
        cfgWrite(cfg, cap + 2, 2, 0xc000)
        #expect(!t.signal(0) && !t.signal(2))
        #expect(readLE(8) { t.pbaRead(offset: 0, data: $0) } == 0b101)
        cfgWrite(cfg, cap + 2, 2, 0x8000)
        #expect(c.vectors[0].log == [.program(0xfee0_0000, 0x50), .fire])
        #expect(c.vectors[2].log == [.program(0xfee0_0000, 0x52), .fire])
        #expect(c.vectors[1].log.isEmpty && c.vectors[3].log.isEmpty)
    }

    @Test("signals while MSI-X is disabled or for out-of-range vectors do nothing")
    func disabledAndOutOfRange() throws {
        let (t, cfg, cap, c) = try make()
        program(t, 0, address: 0xfee0_0000, data: 0x50, masked: false)
        #expect(!t.signal(0))
        #expect(!t.isPending(0))
        cfgWrite(cfg, cap + 2, 2, 0x8000)
        #expect(!t.signal(0xffff) && !t.signal(-1) && !t.signal(4))
        #expect(c.vectors.allSatisfy { $0.log.filter { $0 == .fire }.isEmpty })
    }

    @Test("accesses outside the table or PBA read all ones and are ignored; the PBA is read-only")
    func hostileAccess() throws {
        let (t, cfg, cap, c) = try make(2)
        cfgWrite(cfg, cap + 2, 2, 0x8000)
        #expect(readLE(4) { t.tableRead(offset: 32, data: $0) } == 0xffff_ffff)
        #expect(readLE(4) { t.tableRead(offset: UInt64.max - 1, data: $0) } == 0xffff_ffff)
        writeLE(8, 0xffff_ffff_ffff_ffff) { t.tableWrite(offset: UInt64.max - 3, data: $0) }
        writeLE(4, 0) { t.tableWrite(offset: 1 << 40, data: $0) }
        // A write straddling the end: only the in-range bytes land (entry 1's control).
        writeLE(8, 0) { t.tableWrite(offset: 28, data: $0) }
        #expect(!t.isMasked(1))
        var pba = [UInt8](repeating: 0x5a, count: 16)
        pba.withUnsafeMutableBytes { t.pbaRead(offset: 0, data: $0) }
        #expect(pba == Array(repeating: 0, count: 8) + Array(repeating: 0xff, count: 8))
        #expect(readLE(8) { t.pbaRead(offset: 8, data: $0) } == 0xffff_ffff_ffff_ffff)
        writeLE(4, 0) { t.tableWrite(offset: 12, data: $0) }
        writeLE(4, 1) { t.tableWrite(offset: 12, data: $0) }
        t.signal(0)
        writeLE(8, 0) { t.pbaWrite(offset: 0, data: $0) }
        #expect(t.isPending(0))
        // Byte-wide table accesses work.
        writeLE(1, 0x44) { t.tableWrite(offset: 8, data: $0) }
        #expect(readLE(1) { t.tableRead(offset: 8, data: $0) } == 0x44)
        #expect(c.vectors.count == 2)
    }

    @Test("vector counts outside 1–2048 and controller failures are clear errors")
    func badCounts() {
        #expect(throws: PCIError.invalidVectorCount(0)) { try MSIXTable(vectorCount: 0, controller: RecordingController()) }
        #expect(throws: PCIError.invalidVectorCount(2049)) { try MSIXTable(vectorCount: 2049, controller: RecordingController()) }
        #expect(throws: PCIError.self) { try MSIXTable(vectorCount: 3, controller: RecordingController(failAfter: 2)) }
        #expect("\(PCIError.invalidVectorCount(0))".contains("1–2048"))
    }
}

@Suite("MSI-X saved state")
struct MSIXStateTests {
    @Test("a table's entries, pending bits and control survive a save and restore; the restore programs live vectors and fires a pending unmasked one; a table of another size is refused")
    func roundTrip() throws {
        let t = try MSIXTable(vectorCount: 3, controller: RecordingController())
        t.setControl(enabled: true, functionMasked: true)
        MSIXTests().program(t, 1, address: 0xfee0_1000, data: 0x51, masked: false)
        t.signal(1)                                                 // function-masked: pending
        let saved = t.saveState()
        #expect(saved.pending == [false, true, false])

        let fresh = RecordingController()
        let u = try MSIXTable(vectorCount: 3, controller: fresh)
        try u.restoreState(saved)
        #expect(u.saveState() == saved, "save → restore → save gives the same state")
        #expect(fresh.vectors[1].log.isEmpty, "still function-masked: nothing programmed or fired")
        u.setControl(enabled: true, functionMasked: false)
        #expect(fresh.vectors[1].log == [.program(0xfee0_1000, 0x51), .fire])

        var unmasked = saved
        unmasked.functionMasked = false
        let other = RecordingController()
        try MSIXTable(vectorCount: 3, controller: other).restoreState(unmasked)
        #expect(other.vectors[1].log == [.program(0xfee0_1000, 0x51), .fire], "a pending, unmasked vector fires at the restore")
        #expect(other.vectors[0].log.isEmpty && other.vectors[2].log.isEmpty)

        let small = try MSIXTable(vectorCount: 2, controller: RecordingController())
        #expect(throws: DeviceStateError.self) { try small.restoreState(saved) }
    }
}
