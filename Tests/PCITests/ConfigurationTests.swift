import Devices
import PCI
import Testing

@Suite("PCI configuration space")
struct ConfigurationTests {
    func device(_ bars: [PCIBarSpec] = []) -> PCIConfiguration { TestDevice(bars: bars).configuration }

    @Test("the header carries the identity, class code and header type 0")
    func identity() {
        let c = device()
        #expect(cfgRead(c, 0x00, 4) == 0x1234_1af4)
        #expect(cfgRead(c, 0x08, 4) == 0xff00_0001) // class ff/00/00, revision 1
        #expect(cfgRead(c, 0x0E, 1) == 0)
        #expect(cfgRead(c, 0x2C, 4) == 0x0042_1af4)
        #expect(cfgRead(c, 0x06, 2) & 0x10 == 0) // no capabilities yet
    }

    @Test("read-only fields ignore writes of any width while writable ones keep them")
    func readOnly() {
        let c = device()
        cfgWrite(c, 0x00, 4, 0xdead_beef)
        cfgWrite(c, 0x08, 4, 0xffff_ffff)
        cfgWrite(c, 0x0E, 1, 0x80)
        cfgWrite(c, 0x3D, 1, 0x04)
        cfgWrite(c, 0x30, 4, 0xffff_ffff) // no expansion ROM: reads 0
        #expect(cfgRead(c, 0x00, 4) == 0x1234_1af4)
        #expect(cfgRead(c, 0x08, 4) == 0xff00_0001)
        #expect(cfgRead(c, 0x0E, 1) == 0)
        #expect(cfgRead(c, 0x30, 4) == 0)
        #expect(cfgRead(c, 0x3D, 1) == 0)
        cfgWrite(c, 0x3C, 1, 0x17)
        #expect(cfgRead(c, 0x3C, 1) == 0x17)
        // Command: only defined bits stick.
        cfgWrite(c, 0x04, 2, 0xffff)
        #expect(cfgRead(c, 0x04, 2) == 0x0547)
        // Status is not writable except write-one-to-clear bits (all clear here).
        cfgWrite(c, 0x06, 2, 0xffff)
        #expect(cfgRead(c, 0x06, 2) == 0)
    }

    @Test("a 32-bit memory BAR reads back its size mask and type bits after all-ones")
    func memory32Sizing() {
        let c = device([PCIBarSpec(index: 0, size: 0x1000, kind: .memory32, prefetchable: false),
                        PCIBarSpec(index: 1, size: 0x10, kind: .memory32, prefetchable: true)])
        #expect(cfgRead(c, 0x10, 4) == 0)
        #expect(cfgRead(c, 0x14, 4) == 0x8)
        cfgWrite(c, 0x10, 4, 0xffff_ffff)
        cfgWrite(c, 0x14, 4, 0xffff_ffff)
        #expect(cfgRead(c, 0x10, 4) == 0xffff_f000)
        #expect(cfgRead(c, 0x14, 4) == 0xffff_fff8)
        // Size = ~(mask & ~0xf) + 1, as Linux computes it.
        #expect(~(UInt32(cfgRead(c, 0x10, 4)) & ~0xf) &+ 1 == 0x1000)
        cfgWrite(c, 0x10, 4, 0xc000_1234)
        #expect(cfgRead(c, 0x10, 4) == 0xc000_1000)
        #expect(c.barAddress(0) == nil) // memory decoding is off
        cfgWrite(c, 0x04, 2, 0x2)
        #expect(c.barAddress(0) == 0xc000_1000)
        #expect(c.barAddress(2) == nil) // not implemented: reads 0, ignores writes
        cfgWrite(c, 0x18, 4, 0xffff_ffff)
        #expect(cfgRead(c, 0x18, 4) == 0)
    }

    @Test("a 64-bit BAR sizes as a pair and decodes an address above 4 GiB")
    func memory64Sizing() {
        let c = device([PCIBarSpec(index: 2, size: 0x4000, kind: .memory64, prefetchable: true)])
        #expect(cfgRead(c, 0x18, 4) == 0xc)
        cfgWrite(c, 0x18, 4, 0xffff_ffff)
        cfgWrite(c, 0x1C, 4, 0xffff_ffff)
        #expect(cfgRead(c, 0x18, 4) == 0xffff_c00c)
        #expect(cfgRead(c, 0x1C, 4) == 0xffff_ffff)
        cfgWrite(c, 0x18, 4, 0xe000_0000)
        cfgWrite(c, 0x1C, 4, 0x1)
        cfgWrite(c, 0x04, 2, 0x2)
        #expect(c.barAddress(2) == 0x1_e000_0000)
        #expect(c.barAddress(3) == nil)
        #expect(c.bars == [PCIBarSpec(index: 2, size: 0x4000, kind: .memory64, prefetchable: true)])
        // A BAR larger than 4 GiB: the low dword keeps no address bits.
        let big = device([PCIBarSpec(index: 0, size: 1 << 33, kind: .memory64)])
        cfgWrite(big, 0x10, 4, 0xffff_ffff)
        cfgWrite(big, 0x14, 4, 0xffff_ffff)
        #expect(cfgRead(big, 0x10, 4) == 0x4)
        #expect(cfgRead(big, 0x14, 4) == 0xffff_fffe)
    }

    @Test("an I/O BAR sets bit 0, sizes with its mask and decodes only with I/O enabled")
    func ioSizing() {
        let c = device([PCIBarSpec(index: 4, size: 0x20, kind: .io)])
        #expect(cfgRead(c, 0x20, 4) == 0x1)
        cfgWrite(c, 0x20, 4, 0xffff_ffff)
        #expect(cfgRead(c, 0x20, 4) == 0xffff_ffe1)
        cfgWrite(c, 0x20, 4, 0xc040)
        cfgWrite(c, 0x04, 2, 0x2)
        #expect(c.barAddress(4) == nil)
        cfgWrite(c, 0x04, 2, 0x1)
        #expect(c.barAddress(4) == 0xc040)
    }

    @Test("partial and unaligned accesses see and change the right bytes")
    func partialAccess() {
        let c = device([PCIBarSpec(index: 0, size: 0x100, kind: .memory32)])
        #expect(cfgRead(c, 0x01, 2) == 0x341a) // vendor high byte + device low byte
        #expect(cfgRead(c, 0x03, 1) == 0x12)
        #expect(cfgRead(c, 0x02, 8) == 0x0001_0000_0000_1234) // device ID, command, status, revision 1
        // Byte writes into the BAR: the low byte holds only type bits (read-only).
        cfgWrite(c, 0x13, 1, 0xd0)
        cfgWrite(c, 0x11, 1, 0x12)
        cfgWrite(c, 0x10, 1, 0xff)
        #expect(cfgRead(c, 0x10, 4) == 0xd000_1200)
        // An unaligned 3-byte write across BAR0's top and BAR1 (unimplemented).
        cfgWrite(c, 0x12, 3, 0xaa_bbcc)
        #expect(cfgRead(c, 0x10, 4) == 0xbbcc_1200)
        #expect(cfgRead(c, 0x14, 4) == 0)
    }

    @Test("offsets beyond 256 or negative read all ones and writes there change nothing")
    func outOfRange() {
        let c = device()
        #expect(cfgRead(c, 256, 4) == 0xffff_ffff)
        #expect(cfgRead(c, 4095, 1) == 0xff)
        #expect(cfgRead(c, -2, 4) == 0x1af4_ffff)
        #expect(cfgRead(c, 0xFE, 4) == 0xffff_0000)
        #expect(cfgRead(c, Int.max, 4) == 0xffff_ffff)
        cfgWrite(c, Int.max - 1, 8, 0xffff_ffff_ffff_ffff)
        cfgWrite(c, -1, 2, 0xff_ff)
        cfgWrite(c, 0x1000, 4, 0)
        #expect(cfgRead(c, 0x00, 4) == 0x1234_1af4)
        #expect(cfgRead(c, 0x3C, 1) == 0)
        // Zero-length accesses do nothing.
        cfgWrite(c, 0x3C, 0, 0)
        #expect(cfgRead(c, 0x3C, 0) == 0)
    }

    @Test("capabilities form a chain from 0x34 with the status bit set")
    func capabilityChain() {
        let c = device()
        let a = c.addCapability(id: 0x09, body: [0x10, 1, 2, 3, 4])
        let b = c.addCapability(id: 0x09, body: [0x10, 5, 6])
        let d = c.addCapability(id: 0x05, body: Array(repeating: 0, count: 12))
        #expect(cfgRead(c, 0x06, 2) & 0x10 != 0)
        var chain: [(Int, UInt64)] = []
        var p = Int(cfgRead(c, 0x34, 1))
        while p != 0 && chain.count < 48 {
            chain.append((p, cfgRead(c, p, 1)))
            p = Int(cfgRead(c, p + 1, 1))
        }
        #expect(chain.map(\.0) == [a, b, d])
        #expect(chain.map(\.1) == [0x09, 0x09, 0x05])
        #expect(a == 0x40 && a % 4 == 0 && b % 4 == 0 && d % 4 == 0)
        #expect(cfgRead(c, a + 2, 4) == 0x0302_0110)
        // Capability bodies are read-only unless a mask says otherwise.
        cfgWrite(c, a + 2, 4, 0)
        #expect(cfgRead(c, a + 2, 4) == 0x0302_0110)
        cfgWrite(c, a + 1, 1, 0) // the next pointer cannot be cut by the guest
        #expect(cfgRead(c, a + 1, 1) == UInt64(b))
    }

    @Test("writable capability bits change and the write hook sees the new bytes")
    func capabilityHook() {
        let c = device()
        let seen = RecordingVector() // reuse the recorder: program(address = offset, data = first body dword)
        let off = c.addCapability(id: 0x09, body: [0, 0, 0, 0], writableMask: [0xff, 0x0f, 0, 0]) { o, bytes in
            let w = UInt32(bytes[2]) | UInt32(bytes[3]) << 8 | UInt32(bytes[4]) << 16 | UInt32(bytes[5]) << 24
            seen.program(address: UInt64(o), data: w)
        }
        cfgWrite(c, off + 2, 4, 0xffff_ffff)
        #expect(cfgRead(c, off + 2, 4) == 0x0fff)
        #expect(seen.log == [.program(UInt64(off), 0x0fff)])
        cfgWrite(c, 0x3C, 1, 1) // elsewhere: no hook call
        #expect(seen.log.count == 1)
    }

    @Test("INTx level shows in status bit 3 and reaches the line unless Interrupt Disable is set")
    func intx() {
        let c = device()
        let line = RecordingLine()
        c.attachINTx(line)
        c.setInterrupt(line: 17, pin: 1)
        #expect(cfgRead(c, 0x3C, 2) == 0x0111)
        c.setINTx(level: true)
        #expect(cfgRead(c, 0x06, 2) & 0x8 != 0)
        #expect(line.log == [true])
        c.setINTx(level: true) // no change, no call
        #expect(line.log == [true])
        cfgWrite(c, 0x04, 2, 0x400) // Interrupt Disable deasserts the line
        #expect(line.log == [true, false])
        #expect(cfgRead(c, 0x06, 2) & 0x8 != 0) // status still shows the device's request
        c.setINTx(level: false)
        cfgWrite(c, 0x04, 2, 0)
        #expect(line.log == [true, false])
        #expect(cfgRead(c, 0x06, 2) & 0x8 == 0)
    }

    @Test("VMM placement writes aligned BAR addresses and enables decoding")
    func placement() {
        let c = device([PCIBarSpec(index: 0, size: 0x1000, kind: .memory32),
                        PCIBarSpec(index: 1, size: 0x100000, kind: .memory64)])
        c.setBARAddress(0, 0xc000_0fff)
        c.setBARAddress(1, 0x2_0010_0000)
        c.setBARAddress(5, 0x1234) // nothing there: ignored
        #expect(c.barAddresses.allSatisfy { $0 == nil })
        c.setCommandBits(PCIConfigRegister.commandMemory)
        #expect(c.barAddress(0) == 0xc000_0000)
        #expect(c.barAddress(1) == 0x2_0010_0000)
        #expect(cfgRead(c, 0x14, 4) == 0x0010_0004)
        #expect(c.barAddress(-1) == nil && c.barAddress(6) == nil)
    }
}

@Suite("INTx wiring")
struct INTxWiringTests {
    @Test("a shared line stays asserted while any member asserts it and changes the wire only on edges")
    func sharedLine() {
        let wire = RecordingLine()
        let shared = SharedInterruptLine(wire: wire)
        let a = shared.member(), b = shared.member()
        a.set(level: true)
        b.set(level: true)
        a.set(level: false)
        #expect(wire.log == [true])
        b.set(level: false)
        b.set(level: false)
        #expect(wire.log == [true, false])
        a.trigger()
        #expect(wire.log == [true, false, true, false])
    }

    @Test("a device's INTx line goes through its configuration space to the shared wire")
    func deviceLine() {
        let wire = RecordingLine()
        let shared = SharedInterruptLine(wire: wire)
        let d = TestDevice(bars: [])
        d.configuration.attachINTx(shared.member())
        let line = PCIINTxLine(configuration: d.configuration)
        line.set(level: true)
        #expect(cfgRead(d.configuration, 0x06, 2) & 0x8 != 0)
        #expect(wire.log == [true])
        line.set(level: false)
        #expect(wire.log == [true, false])
    }
}

@Suite("Capability read hooks")
struct CapabilityReadHookTests {
    @Test("a read touching a capability with a read hook sees the hook's bytes; other reads and the stored bytes do not change")
    func readHook() {
        let c = TestDevice(bars: []).configuration
        let plain = c.addCapability(id: 0x09, body: [1, 2])
        let hooked = c.addCapability(id: 0x09, body: [0, 0, 0, 0, 0, 0], writableMask: [0xff, 0, 0, 0, 0, 0], onRead: { _, bytes in
            // Shows the first body byte + 1 in the last four bytes (like a data window fed from a BAR).
            var b = bytes
            for i in 4..<8 { b[i] = bytes[2] &+ 1 }
            return b
        })
        let wrong = c.addCapability(id: 0x09, body: [7], onRead: { _, _ in [0xde] }) // wrong length: ignored
        cfgWrite(c, hooked + 2, 1, 0x41)
        #expect(cfgRead(c, hooked + 4, 4) == 0x4242_4242)
        #expect(cfgRead(c, hooked + 6, 4) & 0xffff == 0x4242) // partial overlap
        #expect(cfgRead(c, hooked + 2, 1) == 0x41)
        #expect(cfgRead(c, plain + 2, 2) == 0x0201)
        #expect(cfgRead(c, wrong + 2, 1) == 7)
        #expect(cfgRead(c, 0, 4) == 0x1234_1af4)
    }
}
