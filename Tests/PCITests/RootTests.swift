import Devices
import PCI
import Testing

@Suite("PCI root, config mechanism #1, ECAM and BAR windows")
struct RootTests {
    static let windowBase: UInt64 = 0xC000_0000
    static let windowSize: UInt64 = 0x2000_0000

    /// A root on fresh buses: mechanism #1 at 0xCF8, ECAM at 0xE000_0000, MMIO window.
    struct Rig {
        let root = PCIRoot()
        let io = Bus()
        let mmio = Bus()
        let window: PCIBARWindow
        init() throws {
            window = PCIBARWindow(root: root, space: .memory, base: RootTests.windowBase)
            try io.insert(PCIConfigMechanism1(root: root), base: PCIConfigMechanism1.base, length: PCIConfigMechanism1.portCount)
            try mmio.insert(PCIECAM(root: root), base: 0xE000_0000, length: PCIECAM.busSize)
            try mmio.insert(window, base: RootTests.windowBase, length: RootTests.windowSize)
        }
        func outl(_ port: UInt64, _ v: UInt32) { writeLE(4, UInt64(v)) { io.write(address: port, data: $0) } }
        func inp(_ port: UInt64, _ n: Int) -> UInt64 { readLE(n) { io.read(address: port, data: $0) } }
        func outp(_ port: UInt64, _ n: Int, _ v: UInt64) { writeLE(n, v) { io.write(address: port, data: $0) } }
        /// Config read through 0xCF8/0xCFC.
        func cf8(_ dev: Int, _ reg: Int, _ n: Int = 4, bus: Int = 0, fn: Int = 0) -> UInt64 {
            outl(0xCF8, 0x8000_0000 | UInt32(bus) << 16 | UInt32(dev) << 11 | UInt32(fn) << 8 | UInt32(reg & 0xfc))
            return inp(0xCFC + UInt64(reg & 3), n)
        }
        func cf8Write(_ dev: Int, _ reg: Int, _ n: Int, _ v: UInt64) {
            outl(0xCF8, 0x8000_0000 | UInt32(dev) << 11 | UInt32(reg & 0xfc))
            outp(0xCFC + UInt64(reg & 3), n, v)
        }
        func mmioRead(_ a: UInt64, _ n: Int) -> UInt64 { readLE(n) { mmio.read(address: a, data: $0) } }
        func mmioWrite(_ a: UInt64, _ n: Int, _ v: UInt64) { writeLE(n, v) { mmio.write(address: a, data: $0) } }
    }

    @Test("the host bridge answers at 00.0 through 0xCF8/0xCFC with 8086:0d57, class 06/00/00")
    func hostBridge() throws {
        let r = try Rig()
        #expect(r.cf8(0, 0) == 0x0d57_8086)
        #expect(r.cf8(0, 0x08) >> 8 == 0x06_0000)
        #expect(r.cf8(0, 0x0E, 1) == 0)
        #expect(r.cf8(0, 2, 2) == 0x0d57)
        #expect(r.cf8(0, 3, 1) == 0x0d)
        #expect(r.inp(0xCF8, 4) == 0x8000_0000)
    }

    @Test("nonexistent functions, other buses and the disabled address register read all ones")
    func nonexistent() throws {
        let r = try Rig()
        #expect(r.cf8(1, 0) == 0xffff_ffff)
        #expect(r.cf8(0, 0, fn: 1) == 0xffff_ffff)
        #expect(r.cf8(0, 0, bus: 1) == 0xffff_ffff)
        r.outl(0xCF8, 0x0000_0000) // enable bit clear
        #expect(r.inp(0xCFC, 4) == 0xffff_ffff)
        r.outp(0xCFC, 4, 0) // dropped
        // Byte/word accesses to 0xCF8–0xCFB are not address writes.
        r.outl(0xCF8, 0x8000_0000)
        r.outp(0xCF9, 1, 0x06)
        r.outp(0xCF8, 2, 0)
        #expect(r.inp(0xCF8, 4) == 0x8000_0000)
        #expect(r.inp(0xCF9, 1) == 0xff)
        // A dword at 0xCFE runs past the data port: the bytes beyond read all ones.
        #expect(r.inp(0xCFE, 4) == 0xffff_0d57)
    }

    @Test("devices attach from slot 1 and the bus reports a full bus and taken slots")
    func attach() throws {
        let root = PCIRoot()
        let first = try root.attach(TestDevice(bars: []))
        let second = try root.attach(TestDevice(bars: []))
        #expect(first == 1 && second == 2)
        #expect(throws: PCIError.self) { try root.attach(TestDevice(bars: []), slot: 2) }
        #expect(throws: PCIError.self) { try root.attach(TestDevice(bars: []), slot: 0) }
        #expect(throws: PCIError.self) { try root.attach(TestDevice(bars: []), slot: 32) }
        for _ in 3..<32 { _ = try root.attach(TestDevice(bars: [])) }
        #expect(throws: PCIError.busFull(slots: 31)) { try root.attach(TestDevice(bars: [])) }
        #expect(root.devices.count == 32)
    }

    @Test("placement aligns BARs naturally in slot order and fails clearly when the window is full")
    func placement() throws {
        let root = PCIRoot()
        let a = TestDevice(bars: [PCIBarSpec(index: 0, size: 0x100, kind: .memory32),
                                  PCIBarSpec(index: 1, size: 0x4000, kind: .memory64)])
        let b = TestDevice(bars: [PCIBarSpec(index: 0, size: 0x1000, kind: .memory32),
                                  PCIBarSpec(index: 2, size: 0x20, kind: .io)])
        let sa = try root.attach(a), sb = try root.attach(b)
        var mem = PCIAddressAllocator(base: Self.windowBase, size: Self.windowSize)
        var io: PCIAddressAllocator? = nil
        try root.placeBARs(slot: sa, memory: &mem, io: &io)
        try root.placeBARs(slot: sb, memory: &mem, io: &io)
        #expect(a.configuration.barAddress(0) == 0xC000_0000)
        #expect(a.configuration.barAddress(1) == 0xC000_4000)
        #expect(b.configuration.barAddress(0) == 0xC000_8000)
        #expect(b.configuration.barAddress(2) == nil) // no I/O window given
        #expect(a.configuration.command & PCIConfigRegister.commandMemory != 0)
        #expect(a.remapLog.contains(TestDevice.Remap(index: 1, old: nil, new: 0xC000_4000)))
        var tiny = PCIAddressAllocator(base: 0xC000_0000, size: 0x1000)
        _ = try tiny.allocate(size: 0x800, what: "x")
        #expect(throws: PCIError.windowFull(what: "y", size: 0x1000, windowBase: 0xC000_0000, windowSize: 0x1000)) {
            try tiny.allocate(size: 0x1000, what: "y")
        }
        #expect(throws: PCIError.self) { try tiny.allocate(size: 3, what: "z") }
        var top = PCIAddressAllocator(base: UInt64.max - 0xfff, size: 0x1000)
        #expect(throws: PCIError.self) { try top.allocate(size: 0x2000, what: "w") }
    }

    @Test("MMIO in the window reaches the BAR that decodes it, follows a guest move, and misses read all ones")
    func dispatchAndMove() throws {
        let r = try Rig()
        let d = TestDevice(bars: [PCIBarSpec(index: 0, size: 0x1000, kind: .memory32),
                                  PCIBarSpec(index: 2, size: 0x100, kind: .memory64)])
        let slot = try r.root.attach(d)
        var mem = PCIAddressAllocator(base: Self.windowBase, size: Self.windowSize)
        var io: PCIAddressAllocator? = nil
        try r.root.placeBARs(slot: slot, memory: &mem, io: &io)
        #expect(r.mmioRead(0xC000_0010, 4) == 0xA0A0_A0A0)
        #expect(r.mmioRead(0xC000_1000, 2) == 0xA2A2)
        r.mmioWrite(0xC000_1008, 4, 0x1122_3344)
        #expect(d.writeLog.last == TestDevice.Access(index: 2, offset: 8, bytes: [0x44, 0x33, 0x22, 0x11]))
        #expect(r.mmioRead(0xC000_2000, 4) == 0xffff_ffff)
        #expect(r.mmioRead(0xC000_0ffe, 4) == 0xffff_ffff) // crosses the BAR end
        #expect(r.window.misses == 2)

        // The guest sizes BAR0 (decode off), then moves it.
        r.cf8Write(slot, 0x04, 2, 0)
        #expect(r.mmioRead(0xC000_0010, 4) == 0xffff_ffff)
        r.cf8Write(slot, 0x10, 4, 0xffff_ffff)
        #expect(r.cf8(slot, 0x10) == 0xffff_f000)
        r.cf8Write(slot, 0x10, 4, 0xD000_0000)
        r.cf8Write(slot, 0x04, 2, 0x6)
        #expect(r.mmioRead(0xD000_0004, 1) == 0xA0)
        #expect(r.mmioRead(0xC000_0004, 1) == 0xff)
        #expect(r.root.decodedBARs(slot: slot).map(\.address).sorted() == [0xC000_1000, 0xD000_0000])
        let moves = d.remapLog.filter { $0.index == 0 }
        #expect(moves.map(\.new) == [0xC000_0000, nil, 0xD000_0000])
    }

    @Test("overlapping and garbage BAR values from the guest do not crash and are handled deterministically")
    func hostileBARs() throws {
        let r = try Rig()
        let a = TestDevice(bars: [PCIBarSpec(index: 0, size: 0x1000, kind: .memory32)])
        let b = TestDevice(bars: [PCIBarSpec(index: 1, size: 0x1000, kind: .memory32),
                                  PCIBarSpec(index: 2, size: 0x1000, kind: .memory64)])
        let sa = try r.root.attach(a), sb = try r.root.attach(b)
        r.cf8Write(sa, 0x10, 4, 0xC000_0000)
        r.cf8Write(sb, 0x14, 4, 0xC000_0000)
        r.cf8Write(sa, 0x04, 2, 0x2)
        r.cf8Write(sb, 0x04, 2, 0x2)
        #expect(r.mmioRead(0xC000_0000, 1) == 0xA0) // first slot wins
        // A 64-bit BAR placed so that it would wrap around the address space.
        r.cf8Write(sb, 0x18, 4, 0xffff_f000)
        r.cf8Write(sb, 0x1C, 4, 0xffff_ffff)
        #expect(b.configuration.barAddress(2) == 0xffff_ffff_ffff_f000)
        r.cf8Write(sb, 0x1C, 4, 0x1234_5678)
        // Garbage everywhere in the header of slot b, of every width.
        for reg in stride(from: 0, to: 0x100, by: 1) { r.cf8Write(sb, reg, 1, 0xff) }
        for reg in stride(from: 0, to: 0x100, by: 2) { r.cf8Write(sb, reg, 2, 0xffff) }
        #expect(r.cf8(sb, 0) == 0x1234_1af4)
        #expect(r.mmioRead(0xDFFF_FFFC, 4) == 0xffff_ffff)
        // Accesses far outside anything and wrapping offsets in the window do not trap.
        let w = PCIBARWindow(root: r.root, space: .memory, base: UInt64.max - 1)
        #expect(readLE(4) { w.read(offset: 16, data: $0) } == 0xffff_ffff)
        writeLE(4, 0) { w.write(offset: 16, data: $0) }
    }

    @Test("ECAM reaches the same config space; extended offsets read all ones")
    func ecam() throws {
        let r = try Rig()
        let d = TestDevice(bars: [PCIBarSpec(index: 0, size: 0x1000, kind: .memory32)])
        let slot = try r.root.attach(d)
        let base: UInt64 = 0xE000_0000 | UInt64(slot) << 15
        #expect(r.mmioRead(0xE000_0000, 4) == 0x0d57_8086)
        #expect(r.mmioRead(base, 4) == 0x1234_1af4)
        #expect(r.mmioRead(base + 0x100, 4) == 0xffff_ffff)
        #expect(r.mmioRead(base + 0xffe, 4) == 0xffff_ffff) // cut at the 4 KiB boundary
        #expect(r.mmioRead(base | 1 << 12, 4) == 0xffff_ffff) // function 1
        r.mmioWrite(base + 0x3C, 1, 0x15)
        #expect(r.cf8(slot, 0x3C, 1) == 0x15)
        r.mmioWrite(base + 0x10, 4, 0xC800_0000)
        r.mmioWrite(base + 0x04, 2, 2)
        #expect(r.mmioRead(0xC800_0000, 1) == 0xA0)
    }

    @Test("I/O BARs are reachable through an I/O window")
    func ioWindow() throws {
        let root = PCIRoot()
        let io = Bus()
        try io.insert(PCIBARWindow(root: root, space: .io, base: 0xC000), base: 0xC000, length: 0x1000)
        let d = TestDevice(bars: [PCIBarSpec(index: 3, size: 0x40, kind: .io)])
        let slot = try root.attach(d)
        var mem = PCIAddressAllocator(base: Self.windowBase, size: Self.windowSize)
        var ioAlloc: PCIAddressAllocator? = PCIAddressAllocator(base: 0xC000, size: 0x1000)
        try root.placeBARs(slot: slot, memory: &mem, io: &ioAlloc)
        #expect(d.configuration.barAddress(3) == 0xC000)
        #expect(readLE(1) { io.read(address: 0xC03F, data: $0) } == 0xA3)
        #expect(readLE(1) { io.read(address: 0xC040, data: $0) } == 0xff)
    }

    /// A 5000-byte option ROM with a PCIR structure at 0x1c naming 8086:100e, and a valid checksum
    /// over its 10 declared 512-byte blocks' first 5000 bytes (the rest of the blocks count as zeros here).
    static func optionROM() -> [UInt8] {
        var rom = [UInt8](repeating: 0, count: 5120)
        rom[0] = 0x55; rom[1] = 0xaa; rom[2] = 10
        rom[0x18] = 0x1c
        rom.replaceSubrange(0x1c..<0x20, with: Array("PCIR".utf8))
        rom[0x20] = 0x86; rom[0x21] = 0x80; rom[0x22] = 0x0e; rom[0x23] = 0x10
        for i in 0x40..<5000 { rom[i] = UInt8(truncatingIfNeeded: i &* 7) }
        rom[6] = 0 &- rom.reduce(0, &+)
        return Array(rom.prefix(5000)) + [UInt8](repeating: 0, count: 120)
    }

    @Test("an expansion ROM BAR sizes like a memory BAR (8 KiB for 5120 bytes), decodes only with its enable bit and memory decoding, reads the image with the device's IDs patched in and a valid checksum, zeros past it, and ignores writes")
    func expansionROM() throws {
        let r = try Rig()
        let dev = TestDevice(bars: [PCIBarSpec(index: 0, size: 0x1000, kind: .memory32)], deviceID: 0x1041)
        try r.root.attach(dev, slot: 3)
        #expect(r.cf8(3, 0x30) == 0, "no ROM: the register reads 0 and stays 0")
        r.cf8Write(3, 0x30, 4, 0xffff_ffff)
        #expect(r.cf8(3, 0x30) == 0)
        try r.root.setExpansionROM(slot: 3, image: Self.optionROM())
        r.cf8Write(3, 0x30, 4, 0xffff_fffe)
        #expect(r.cf8(3, 0x30) == 0xffff_e000, "sizing: 8 KiB, enable bit clear")
        let base = RootTests.windowBase + 0x10000
        r.cf8Write(3, 0x30, 4, base)
        r.cf8Write(3, 0x04, 2, 0x2)
        #expect(r.mmioRead(base, 2) == 0xffff, "placed but not enabled: nothing decodes")
        r.cf8Write(3, 0x30, 4, base | 1)
        #expect(r.cf8(3, 0x30) == base | 1)
        #expect(r.mmioRead(base, 2) == 0xaa55)
        #expect(r.mmioRead(base + 0x20, 4) == 0x1041_1af4, "PCIR vendor/device are the device's")
        var sum: UInt8 = 0
        for a in 0..<5120 { sum &+= UInt8(r.mmioRead(base + UInt64(a), 1)) }
        #expect(sum == 0, "the checksum over the declared length stays valid")
        #expect(r.mmioRead(base + 0x1ffc, 4) == 0, "past the image: zeros")
        r.mmioWrite(base + 0x40, 4, 0xdead_beef)
        #expect(r.mmioRead(base + 0x40, 1) == UInt64(UInt8(truncatingIfNeeded: 0x40 * 7)), "a ROM ignores writes")
        #expect(dev.writeLog.isEmpty, "ROM writes never reach the device's BARs")
        r.cf8Write(3, 0x04, 2, 0x0)
        #expect(r.mmioRead(base, 2) == 0xffff, "memory decoding off: the ROM is gone too")
        #expect(r.root.decodedBARs(slot: 3).isEmpty)
        #expect(throws: PCIError.self) { try r.root.setExpansionROM(slot: 4, image: [0x55, 0xaa]) }
        #expect(throws: PCIError.self) { try r.root.setExpansionROM(slot: 3, image: []) }
    }

    @Test("ID patching leaves non-ROMs alone and keeps an invalid checksum invalid")
    func romPatching() {
        #expect(PCIRoot.patchingIDs([1, 2, 3], vendorID: 1, deviceID: 2) == [1, 2, 3])
        var rom = Self.optionROM()
        rom[6] &+= 1
        let patched = PCIRoot.patchingIDs(rom, vendorID: 0x1af4, deviceID: 0x1041)
        #expect(patched[6] == rom[6], "no checksum to keep")
        #expect(Array(patched[0x20..<0x24]) == [0xf4, 0x1a, 0x41, 0x10])
    }
}
