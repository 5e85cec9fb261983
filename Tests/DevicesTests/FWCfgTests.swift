import Foundation
import Synchronization
import GuestMemory
import Testing
@testable import Devices

/// fw_cfg through its ports, as SeaBIOS, Linux and test kernels drive it, with DMA into a plain
/// `GuestMemory` (no /dev/kvm).
@Suite("fw_cfg")
struct FWCfgTests {
    typealias Key = FWCfgItems.Key

    func makeDevice(memory: GuestMemory? = nil) throws -> FWCfg {
        var items = FWCfgItems()
        items.set(Key.ramSize, le: UInt64(256 << 20))
        items.set(Key.nbCPUs, le: UInt16(3))
        items.set(Key.maxCPUs, le: UInt16(3))
        try items.addFile("etc/zeta", bytes: Array("last".utf8))
        try items.addFile("bootorder", bytes: [])
        try items.addFile("etc/alpha", bytes: (0..<300).map { UInt8(truncatingIfNeeded: $0) })
        return FWCfg(items: items, memory: memory)
    }

    func select(_ dev: FWCfg, _ key: UInt16) { dev.writeBytes(0, [UInt8(key & 0xff), UInt8(key >> 8)]) }
    func readData(_ dev: FWCfg, _ count: Int) -> [UInt8] { (0..<count).map { _ in dev.inb(1) } }

    /// Writes a DMA access at `at` and triggers it through the two 32-bit big-endian halves.
    func dma(_ dev: FWCfg, _ mem: GuestMemory, at: UInt64, control: UInt32, length: UInt32, address: UInt64) throws -> UInt32 {
        var access: [UInt8] = []
        access += withUnsafeBytes(of: control.bigEndian) { Array($0) }
        access += withUnsafeBytes(of: length.bigEndian) { Array($0) }
        access += withUnsafeBytes(of: address.bigEndian) { Array($0) }
        try mem.write(access, at: at)
        dev.writeBytes(4, withUnsafeBytes(of: UInt32(truncatingIfNeeded: at >> 32).bigEndian) { Array($0) })
        dev.writeBytes(8, withUnsafeBytes(of: UInt32(truncatingIfNeeded: at).bigEndian) { Array($0) })
        return try mem.read(at: at, count: 4).reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
    }

    @Test("the signature reads \"QEMU\", the ID has the traditional and DMA bits, and the DMA port reads \"QEMU CFG\"")
    func signature() throws {
        let dev = try makeDevice()
        select(dev, Key.signature)
        #expect(readData(dev, 4) == Array("QEMU".utf8))
        #expect(readData(dev, 2) == [0, 0], "reads past the end give 0")
        select(dev, Key.id)
        #expect(readData(dev, 4) == [3, 0, 0, 0])
        #expect(dev.readBytes(4, count: 8) == Array("QEMU CFG".utf8))
        // Port 0x510 read as a byte is the data port too (QEMU's combined port).
        select(dev, Key.signature)
        #expect(dev.inb(0) == UInt8(ascii: "Q") && dev.inb(1) == UInt8(ascii: "E"))
    }

    @Test("numbered items are little-endian; selecting resets the offset; the write-channel bit is ignored; unknown keys read 0")
    func numbered() throws {
        let dev = try makeDevice()
        select(dev, Key.ramSize)
        #expect(readData(dev, 8) == [0, 0, 0, 0x10, 0, 0, 0, 0])
        select(dev, Key.nbCPUs)
        _ = readData(dev, 1)
        select(dev, Key.nbCPUs | Key.writeChannel)
        #expect(readData(dev, 2) == [3, 0])
        dev.outb(1, 0x55)                                     // data writes are ignored
        select(dev, Key.nbCPUs)
        #expect(readData(dev, 2) == [3, 0])
        select(dev, 0x1234)
        #expect(readData(dev, 3) == [0, 0, 0])
        select(dev, Key.archLocal | 0x3)
        #expect(readData(dev, 2) == [0, 0], "arch-local 0x8003 is not the generic 0x0003")
    }

    @Test("the file directory is big-endian, sorted by name, with keys from 0x20 and 56-byte names")
    func directory() throws {
        let dev = try makeDevice()
        select(dev, Key.fileDir)
        let count = readData(dev, 4).reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        #expect(count == 3)
        var seen: [(String, UInt16, UInt32)] = []
        for _ in 0..<count {
            let e = readData(dev, 64)
            let size = e[0..<4].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
            let key = UInt16(e[4]) << 8 | UInt16(e[5])
            let name = String(decoding: e[8...].prefix { $0 != 0 }, as: UTF8.self)
            #expect(e[63] == 0)
            seen.append((name, key, size))
        }
        #expect(seen.map(\.0) == ["bootorder", "etc/alpha", "etc/zeta"])
        #expect(seen.map(\.1) == [0x20, 0x21, 0x22])
        #expect(seen.map(\.2) == [0, 300, 4])
        #expect(dev.key(ofFile: "etc/zeta") == 0x22)
        select(dev, 0x22)
        #expect(readData(dev, 4) == Array("last".utf8))
    }

    @Test("bad file names are refused", arguments: ["", String(repeating: "x", count: 56), "a\u{0}b"])
    func badNames(name: String) {
        var items = FWCfgItems()
        #expect(throws: FWCfgError.self) { try items.addFile(name, bytes: [1]) }
    }

    @Test("a DMA read with select copies the item into guest memory, zero-fills past its end and clears control")
    func dmaRead() throws {
        let mem = try GuestMemory.allocate(size: 1 << 20)
        let dev = try makeDevice(memory: mem)
        let key = try #require(dev.key(ofFile: "etc/alpha"))
        try mem.write([UInt8](repeating: 0xee, count: 400), at: 0x2000)
        let control = FWCfg.Control.select | FWCfg.Control.read | UInt32(key) << 16
        #expect(try dma(dev, mem, at: 0x1000, control: control, length: 310, address: 0x2000) == 0)
        let got = try mem.read(at: 0x2000, count: 320)
        #expect(Array(got[0..<300]) == (0..<300).map { UInt8(truncatingIfNeeded: $0) })
        #expect(Array(got[300..<310]) == [UInt8](repeating: 0, count: 10))
        #expect(Array(got[310..<320]) == [UInt8](repeating: 0xee, count: 10), "nothing past the length")
        #expect(dev.dmaAccesses == 1 && dev.dmaBytes == 310)
    }

    @Test("DMA skip advances the offset, a later read continues there, and the port sees the same offset")
    func dmaSkip() throws {
        let mem = try GuestMemory.allocate(size: 1 << 20)
        let dev = try makeDevice(memory: mem)
        let key = UInt32(try #require(dev.key(ofFile: "etc/alpha")))
        #expect(try dma(dev, mem, at: 0x1000, control: FWCfg.Control.select | FWCfg.Control.skip | key << 16,
                        length: 100, address: 0) == 0)
        #expect(try dma(dev, mem, at: 0x1000, control: FWCfg.Control.read, length: 4, address: 0x3000) == 0)
        #expect(try mem.read(at: 0x3000, count: 4) == [100, 101, 102, 103])
        #expect(readData(dev, 1) == [104])
    }

    @Test("hostile DMA: a target outside RAM, a length running past RAM, a write and an access structure outside RAM")
    func dmaHostile() throws {
        let mem = try GuestMemory.allocate(size: 1 << 20)
        let dev = try makeDevice(memory: mem)
        let read = FWCfg.Control.select | FWCfg.Control.read | UInt32(Key.signature) << 16
        #expect(try dma(dev, mem, at: 0x1000, control: read, length: 4, address: 0x1_0000_0000) == FWCfg.Control.error)
        #expect(try dma(dev, mem, at: 0x1000, control: read, length: 0x2000, address: 0xff000) == FWCfg.Control.error)
        #expect(try dma(dev, mem, at: 0x1000, control: read, length: 0xffff_ffff, address: 0xffff_ffff_ffff_f000) == FWCfg.Control.error)
        #expect(try dma(dev, mem, at: 0x1000, control: FWCfg.Control.select | FWCfg.Control.write, length: 4, address: 0x2000)
                == FWCfg.Control.error)
        // The structure itself outside RAM (and straddling its end): ignored, nothing crashes.
        dev.writeBytes(4, [0, 0, 0, 0x10]); dev.writeBytes(8, [0, 0, 0, 0])
        dev.writeBytes(4, [0, 0, 0, 0]); dev.writeBytes(8, [0, 0x0f, 0xff, 0xf8])
        #expect(dev.dmaAccesses == 4)
        // Odd widths and offsets are ignored; a 64-bit write triggers at once.
        dev.writeBytes(5, [1, 2]); dev.writeBytes(0, [9]); dev.writeBytes(2, [1, 2])
        try mem.write([0, 0, 0, UInt8(FWCfg.Control.read), 0, 0, 0, 1] + [UInt8](repeating: 0, count: 4) + [0, 0, 0x40, 0], at: 0x5000)
        dev.writeBytes(4, [0, 0, 0, 0, 0, 0, 0x50, 0])
        #expect(try mem.read(at: 0x5000, count: 4) == [0, 0, 0, 0])
        #expect(dev.dmaAccesses == 5)
    }

    @Test("without guest memory, DMA does nothing")
    func noMemory() throws {
        let dev = try makeDevice()
        dev.writeBytes(4, [0, 0, 0, 0]); dev.writeBytes(8, [0, 0, 0x10, 0])
        #expect(dev.dmaAccesses == 0)
    }

    @Test("saved state (selector, offset, half-written DMA address) round-trips to identical bytes and continues reading")
    func savedState() throws {
        let mem = try GuestMemory.allocate(size: 1 << 20)
        let dev = try makeDevice(memory: mem)
        select(dev, 0x21)
        _ = readData(dev, 10)
        dev.writeBytes(4, [0, 0, 0, 0])
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let saved = try encoder.encode(dev.saveState())
        let fresh = try makeDevice(memory: mem)
        try fresh.restoreState(try JSONDecoder().decode(FWCfg.State.self, from: saved))
        #expect(try encoder.encode(fresh.saveState()) == saved)
        #expect(readData(fresh, 2) == [10, 11])
        #expect(FWCfg.stateVersion == 1)
        var bad = fresh.saveState()
        bad.selector = 0x4001
        #expect(throws: DeviceStateError.self) { try fresh.restoreState(bad) }
        #expect(readData(fresh, 1) == [12], "a refused state changes nothing")
    }
}

@Suite("firmware ports: debug console 0x402 and system control port A 0x92")
struct FirmwarePortTests {
    @Test("the debug console reads 0xE9 and passes complete lines on, cleaning control bytes and splitting long lines")
    func debugConsole() {
        let lines = Mutex<[String]>([])
        let con = DebugConsole { l in lines.withLock { $0.append(l) } }
        #expect(con.inb(0) == 0xe9)
        con.writeBytes(0, Array("Sea".utf8))
        #expect(lines.withLock { $0 }.isEmpty)
        con.writeBytes(0, Array("BIOS\r\n\u{1b}x\n".utf8))
        con.writeBytes(0, [UInt8](repeating: 0x41, count: DebugConsole.maxLine + 3))
        let got = lines.withLock { $0 }
        #expect(got.count == 3 && got[0] == "SeaBIOS" && got[1] == ".x" && got[2].count == DebugConsole.maxLine)
    }

    @Test("port 0x92 reads A20 set, keeps other bits, and bit 0 requests a reset")
    func portA() {
        let control = RecordingControl()
        let p = SystemControlPortA(control: control)
        #expect(p.inb(0) == 0x02)
        p.outb(0, 0x00)
        #expect(p.inb(0) == 0x02, "A20 cannot be turned off")
        #expect(control.all.isEmpty)
        p.outb(0, 0x03)
        #expect(control.all == [.reset])
        #expect(p.inb(0) == 0x02)
    }
}

/// A small deterministic generator for the hostile-input tests.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}

@Suite("hostile guests against fw_cfg and the RTC")
struct HostileFirmwarePortTests {
    @Test("20000 random fw_cfg accesses and DMA structures (addresses anywhere, lengths up to 4 GiB - 1) never trap, and every DMA ends with control 0 or the error bit")
    func fwcfgFuzz() throws {
        let mem = try GuestMemory.allocate(size: 1 << 20)
        var items = FWCfgItems()
        items.set(FWCfgItems.Key.ramSize, le: UInt64(1 << 20))
        try items.addFile("etc/x", bytes: [UInt8](repeating: 7, count: 5000))
        let dev = FWCfg(items: items, memory: mem)
        var rng = SplitMix(state: 14)
        for _ in 0..<20_000 {
            let offset = UInt64.random(in: 0..<16, using: &rng)
            let size = [1, 2, 4, 8][Int.random(in: 0..<4, using: &rng)]
            if Bool.random(using: &rng) {
                _ = dev.readBytes(offset, count: size)
                continue
            }
            if offset == 8 && size == 4 && Bool.random(using: &rng) {
                // A DMA structure in RAM with random fields; the target is RAM a third of the time.
                let at = UInt64.random(in: 0..<(1 << 20) - 16, using: &rng)
                let control = UInt32.random(in: 0...UInt32.max, using: &rng) & 0x003f_001f
                let length = Bool.random(using: &rng) ? UInt32.random(in: 0..<8192, using: &rng) : UInt32.random(in: 0...UInt32.max, using: &rng)
                let target = Int.random(in: 0..<3, using: &rng) == 0 ? UInt64.random(in: 0..<(1 << 20), using: &rng)
                                                                   : UInt64.random(in: 0...UInt64.max, using: &rng)
                var access: [UInt8] = []
                access += withUnsafeBytes(of: control.bigEndian) { Array($0) }
                access += withUnsafeBytes(of: length.bigEndian) { Array($0) }
                access += withUnsafeBytes(of: target.bigEndian) { Array($0) }
                try mem.write(access, at: at)
                dev.writeBytes(4, [0, 0, 0, 0])
                dev.writeBytes(8, withUnsafeBytes(of: UInt32(at).bigEndian) { Array($0) })
                let status = try mem.read(at: at, count: 4).reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
                // The copy may have overwritten the structure itself; when it did not, control is 0 or ERROR.
                let overlaps = target < at + 16 && at < target &+ UInt64(length) && target <= UInt64.max - UInt64(length)
                if !overlaps { #expect(status == 0 || status == FWCfg.Control.error, "control \(status)") }
                continue
            }
            dev.writeBytes(offset, (0..<size).map { _ in UInt8.random(in: 0...255, using: &rng) })
        }
        #expect(dev.dmaAccesses > 0)
    }

    @Test("random RTC register traffic with clock jumps (backwards, days forward) never traps, and the line only ever changes level")
    func rtcFuzz() {
        let now = Mutex<Int64>(1_709_214_307 * 1_000_000_000)
        let line = RecordingLine()
        let rtc = CMOSRTC(nanoClock: { now.withLock { $0 } }, interrupt: line)
        var rng = SplitMix(state: 8)
        for _ in 0..<20_000 {
            switch Int.random(in: 0..<10, using: &rng) {
            case 0: now.withLock { $0 += Int64.random(in: -2_000_000_000...3 * 86_400_000_000_000, using: &rng) }
            case 1...3: now.withLock { $0 += Int64.random(in: 0...50_000_000, using: &rng) }
            case 4...6:
                rtc.outb(0, UInt8.random(in: 0...255, using: &rng))
                _ = rtc.inb(1)
            default:
                rtc.outb(0, [0x01, 0x03, 0x05, 0x0a, 0x0b, 0x0c, 0x00][Int.random(in: 0..<7, using: &rng)])
                rtc.outb(1, UInt8.random(in: 0...255, using: &rng))
            }
        }
        let h = line.history
        #expect(h.count > 10, "some interrupts were raised")
        #expect(zip(h, h.dropFirst()).allSatisfy { $0 != $1 }, "set(level:) is called only when the level changes")
        #expect(h.first != false, "the first call raises the line")
    }
}
