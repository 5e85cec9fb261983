import Testing
@testable import Devices
@testable import PCI

/// Saved PCI state: the config-address latch and a configuration space round trip; a saved
/// space of another device is refused.
@Suite("PCI saved state")
struct PCIStateTests {
    @Test("the host bridge's command register and the CF8 latch survive a save and restore")
    func roundTrip() throws {
        let root = PCIRoot()
        let cf8 = PCIConfigMechanism1(root: root)
        writeLE(4, 0x8000_0004) { cf8.write(offset: 0, data: $0) }   // bus 0, dev 0, reg 4
        writeLE(2, 0x0006) { cf8.write(offset: 4, data: $0) }        // command: memory + bus master
        let saved = root.hostBridge.saveState()
        let fresh = PCIRoot()
        let freshCF8 = PCIConfigMechanism1(root: fresh)
        try freshCF8.restoreState(cf8.saveState())
        try fresh.hostBridge.restoreState(saved)
        #expect(freshCF8.addressRegister == 0x8000_0004)
        #expect(readLE(2) { freshCF8.read(offset: 4, data: $0) } == 0x0006)
        #expect(fresh.hostBridge.saveState() == saved)
    }

    @Test("a configuration space whose identity bytes differ, or that is not 256 bytes, is refused")
    func refused() {
        let bridge = PCIHostBridge()
        var other = bridge.saveState()
        other.bytes[0] ^= 0xff                               // vendor ID
        #expect(throws: DeviceStateError.self) { try bridge.restoreState(other) }
        var short = bridge.saveState()
        short.bytes.removeLast()
        #expect(throws: DeviceStateError.self) { try bridge.restoreState(short) }
    }
}
