import Devices
import Foundation
import KVM
import Logging
import PCI
import Synchronization
import Testing
@testable import VMM

/// A PCI device for machine tests: BARs as given, reads return 0x5A, writes are recorded.
final class StubPCIDevice: PCIDevice {
    let configuration = PCIConfiguration(vendorID: 0x1af4, deviceID: 0x10ff, classCode: 0xff, subclass: 0, progIF: 0,
                                         revision: 0, subsystemVendorID: 0, subsystemID: 0)
    let written = Mutex<[(Int, UInt64, [UInt8])]>([])
    init(bars: [PCIBarSpec]) { for b in bars { configuration.addBAR(b) } }
    func barRead(index: Int, offset: UInt64, data: UnsafeMutableRawBufferPointer) { for i in data.indices { data[i] = 0x5a } }
    func barWrite(index: Int, offset: UInt64, data: UnsafeRawBufferPointer) {
        written.withLock { $0.append((index, offset, Array(data))) }
    }
}

@Suite("Machine PCI bus on /dev/kvm", .enabled(if: FileManager.default.fileExists(atPath: "/dev/kvm"), "needs /dev/kvm"), .serialized)
struct MachinePCITests {
    func machine(_ program: [UInt8]) throws -> (Machine, String) {
        let path = FileManager.default.temporaryDirectory
            .appendingPathComponent("vmm-pci-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).bin").path
        try Data(program).write(to: URL(fileURLWithPath: path))
        var config = VMConfiguration(payload: .flat(FlatImage(path: path, loadAddress: 0x1000, entry: 0x1000, mode: .real)))
        config.memorySize = 8 << 20
        return (try Machine(config: config, serialOutput: CollectedOutput(), logger: Logger(label: "test")), path)
    }

    func read32(_ bus: Bus, _ address: UInt64) -> UInt32 {
        var v: UInt32 = 0
        withUnsafeMutableBytes(of: &v) { _ = bus.read(address: address, data: $0) }
        return UInt32(littleEndian: v)
    }

    func write32(_ bus: Bus, _ address: UInt64, _ value: UInt32) {
        withUnsafeBytes(of: value.littleEndian) { _ = bus.write(address: address, data: $0) }
    }

    @Test("a guest reads the host bridge 8086:0d57 at 00.0 through 0xCF8/0xCFC, and all ones at the empty slot 1")
    func guestSeesHostBridge() throws {
        // mov eax,0x80000000; mov dx,0xcf8; out dx,eax; mov dl,0xfc; in eax,dx; cmp eax,0x0d578086; jne fail
        // mov eax,0x80000800; mov dl,0xf8; out dx,eax; mov dl,0xfc; in eax,dx; cmp eax,-1; jne fail
        // mov al,3; jmp out; fail: mov al,5; out: out 0xf4,al; hlt
        let program: [UInt8] = [
            0x66, 0xb8, 0x00, 0x00, 0x00, 0x80, 0xba, 0xf8, 0x0c, 0x66, 0xef, 0xb2, 0xfc, 0x66, 0xed, 0x66, 0x3d, 0x86,
            0x80, 0x57, 0x0d, 0x75, 0x18, 0x66, 0xb8, 0x00, 0x08, 0x00, 0x80, 0xb2, 0xf8, 0x66, 0xef, 0xb2, 0xfc, 0x66,
            0xed, 0x66, 0x83, 0xf8, 0xff, 0x75, 0x04, 0xb0, 0x03, 0xeb, 0x02, 0xb0, 0x05, 0xe6, 0xf4, 0xf4,
        ]
        let (m, path) = try machine(program)
        defer { try? FileManager.default.removeItem(atPath: path) }
        #expect(m.run(handleSignals: false) == .debugExit(status: 7), "status 11 means a config read returned the wrong value")
    }

    @Test("the bus exists with no devices: mechanism #1, ECAM at 0xE0000000 and the MMIO window are on the buses")
    func busWithoutDevices() throws {
        let (m, path) = try machine([0xf4])
        defer { try? FileManager.default.removeItem(atPath: path) }
        write32(m.ioBus, 0xCF8, 0x8000_0000)
        #expect(read32(m.ioBus, 0xCFC) == 0x0d57_8086)
        #expect(read32(m.mmioBus, 0xE000_0000) == 0x0d57_8086)
        #expect(read32(m.mmioBus, 0xE000_8000) == 0xffff_ffff)
        #expect(m.mmioBus.find(0xC000_0000) != nil && m.mmioBus.find(0xDFFF_FFFF) != nil)
        #expect(read32(m.mmioBus, 0xC000_0000) == 0xffff_ffff)
        #expect(m.pciRoot.devices.count == 1)
    }

    @Test("attached devices get slots from 1, naturally aligned BARs in the window, and INTA# on GSI 16 + (slot - 1) % 8")
    func attachAndPlace() throws {
        let (m, path) = try machine([0xf4])
        defer { try? FileManager.default.removeItem(atPath: path) }
        let a = StubPCIDevice(bars: [PCIBarSpec(index: 0, size: 0x1000, kind: .memory32),
                                     PCIBarSpec(index: 2, size: 0x4000, kind: .memory64)])
        let b = StubPCIDevice(bars: [PCIBarSpec(index: 1, size: 0x10_0000, kind: .memory32),
                                     PCIBarSpec(index: 4, size: 0x20, kind: .io)])
        let (sa, intxA) = try m.attachPCIDevice(a)
        let (sb, _) = try m.attachPCIDevice(b)
        #expect(sa == 1 && sb == 2)
        #expect(a.configuration.barAddress(0) == 0xC000_0000)
        #expect(a.configuration.barAddress(2) == 0xC000_4000)
        #expect(b.configuration.barAddress(1) == 0xC010_0000)
        #expect(b.configuration.barAddress(4) == 0xC000)
        write32(m.ioBus, 0xCF8, 0x8000_0000 | 1 << 11 | 0x3C)
        #expect(read32(m.ioBus, 0xCFC) & 0xffff == 0x0110)
        write32(m.ioBus, 0xCF8, 0x8000_0000 | 2 << 11 | 0x3C)
        #expect(read32(m.ioBus, 0xCFC) & 0xffff == 0x0111)
        #expect(read32(m.mmioBus, 0xC000_4010) == 0x5a5a_5a5a)
        write32(m.mmioBus, 0xC010_0008, 0xabcd)
        #expect(b.written.withLock { $0.first.map { $0.0 == 1 && $0.1 == 8 } } == true)
        var io: UInt8 = 0
        withUnsafeMutableBytes(of: &io) { _ = m.ioBus.read(address: 0xC01F, data: $0) }
        #expect(io == 0x5a)
        // INTx through KVM_IRQ_LINE: status bit 3 follows the level.
        intxA.set(level: true)
        #expect(a.configuration.command & PCIConfigRegister.commandINTxDisable == 0)
        write32(m.ioBus, 0xCF8, 0x8000_0000 | 1 << 11 | 0x04)
        #expect(read32(m.ioBus, 0xCFC) >> 16 & 0x8 != 0)
        intxA.set(level: false)
        #expect(read32(m.ioBus, 0xCFC) >> 16 & 0x8 == 0)
    }

    @Test("MSI-X vectors get GSIs from 24 with irqfds, and programming installs MSI routes in KVM")
    func msiRouting() throws {
        let (m, path) = try machine([0xf4])
        defer { try? FileManager.default.removeItem(atPath: path) }
        let table = try MSIXTable(vectorCount: 3, controller: m.msiController)
        table.setControl(enabled: true, functionMasked: false)
        func writeEntry(_ v: Int, _ words: [UInt32]) {
            for (i, w) in words.enumerated() {
                withUnsafeBytes(of: w.littleEndian) { table.tableWrite(offset: UInt64(16 * v + 4 * i), data: $0) }
            }
        }
        writeEntry(0, [0xfee0_0000, 0, 0x4030, 0])
        writeEntry(2, [0xfee0_1000, 0, 0x31, 0])
        #expect(m.pci.msi.routes == [24: .msi(gsi: 24, address: 0xfee0_0000, data: 0x4030),
                                      26: .msi(gsi: 26, address: 0xfee0_1000, data: 0x31)])
        #expect(table.signal(0))
        #expect(table.signal(2))
        // Reprogramming replaces the route.
        withUnsafeBytes(of: UInt32(1).littleEndian) { table.tableWrite(offset: 12, data: $0) } // mask while changing
        writeEntry(0, [0xfee0_2000, 0, 0x4031, 0])
        #expect(m.pci.msi.routes[24] == .msi(gsi: 24, address: 0xfee0_2000, data: 0x4031))
    }
}

@Suite("PCI windows")
struct PCIWindowLayoutTests {
    @Test("the firmware's BAR window (below the I/O APIC) leaves the PVM fix-up's pages and trampoline exit page unclaimed")
    func firmwareWindowAvoidsFixup() {
        let window = MachinePCI.firmwareWindowBase..<(MachinePCI.firmwareWindowBase + MachinePCI.firmwareWindowSize)
        #expect(!window.contains(SyscallFixup.mmioTargetPhys))
        #expect(!window.overlaps(SyscallFixup.pagesPhys..<(SyscallFixup.pagesPhys + 0x3000)))
        #expect(window.upperBound == 0xfec0_0000, "SeaBIOS allocates down from the I/O APIC")
    }
}
