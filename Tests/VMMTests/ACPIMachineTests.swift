import Boot
import Foundation
import GuestMemory
import Logging
import Testing
@testable import VMM

@Suite("ACPI in the Machine on /dev/kvm", .enabled(if: FileManager.default.fileExists(atPath: "/dev/kvm"), "needs /dev/kvm"), .serialized)
struct ACPIMachineTests {
    /// A Machine running the real-mode `program` loaded (and entered) at `load`; the file is removed before returning.
    func machine(_ program: [UInt8], load: UInt64 = 0x1000, cpus: Int = 1) throws -> Machine {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("vmm-acpi-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).bin").path
        try Data(program).write(to: URL(fileURLWithPath: path))
        defer { try? FileManager.default.removeItem(atPath: path) }
        var config = VMConfiguration(payload: .flat(FlatImage(path: path, loadAddress: load, entry: load, mode: .real)))
        config.memorySize = 8 << 20
        config.cpus = cpus
        return try Machine(config: config, serialOutput: CollectedOutput(), logger: Logger(label: "test"))
    }

    @Test("SLP_TYP=5 | SLP_EN written to PM1a_CNT (0x604) powers off at once, with the BSP spinning and an AP never started")
    func s5() throws {
        // mov dx, 0x604 ; mov ax, 0x3400 ; out dx, ax ; jmp $
        let m = try machine([0xba, 0x04, 0x06, 0xb8, 0x00, 0x34, 0xef, 0xeb, 0xfe], cpus: 2)
        #expect(m.run(handleSignals: false) == .powerOff)
    }

    @Test("RESET_VALUE written to RESET_REG (0x608) resets")
    func reset() throws {
        // mov dx, 0x608 ; mov al, 1 ; out dx, al ; jmp $
        let m = try machine([0xba, 0x08, 0x06, 0xb0, 0x01, 0xee, 0xeb, 0xfe])
        #expect(m.run(handleSignals: false) == .reset)
    }

    @Test("the BSP halted with IF=0 while the AP was never started is a power-off")
    func haltWithUnstartedAP() throws {
        let m = try machine([0xfa, 0xf4], cpus: 2)   // cli ; hlt
        #expect(m.run(handleSignals: false) == .powerOff)
    }

    @Test("an ELF64 Linux kernel gets boot_params.acpi_rsdp_addr = 0xE0000 and the MP table too")
    func linuxRSDP() throws {
        // ELF64 header + one PT_LOAD of 0x100 bytes (hlt) at 0x1000000, entry there.
        var elf = [UInt8](repeating: 0, count: 0x78)
        elf.replaceSubrange(0..<8, with: [0x7f, 0x45, 0x4c, 0x46, 2, 1, 1, 0])
        elf.putLE(UInt16(2), at: 16); elf.putLE(UInt16(62), at: 18); elf.putLE(UInt32(1), at: 20)
        elf.putLE(UInt64(0x100_0000), at: 24); elf.putLE(UInt64(0x40), at: 32)
        elf.putLE(UInt16(0x40), at: 52); elf.putLE(UInt16(0x38), at: 54); elf.putLE(UInt16(1), at: 56)
        elf.putLE(UInt32(1), at: 0x40); elf.putLE(UInt32(7), at: 0x44); elf.putLE(UInt64(0x78), at: 0x48)
        elf.putLE(UInt64(0x100_0000), at: 0x50); elf.putLE(UInt64(0x100_0000), at: 0x58)
        elf.putLE(UInt64(0x100), at: 0x60); elf.putLE(UInt64(0x100), at: 0x68); elf.putLE(UInt64(0x1000), at: 0x70)
        elf += [UInt8](repeating: 0xf4, count: 0x100)
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("vmm-acpi-elf-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try Data(elf).write(to: URL(fileURLWithPath: path))
        defer { try? FileManager.default.removeItem(atPath: path) }
        var config = VMConfiguration(payload: .kernel(path: path, initrd: nil, cmdline: "", modules: []))
        config.memorySize = 64 << 20
        config.cpus = 2
        let m = try Machine(config: config, serialOutput: CollectedOutput(), logger: Logger(label: "test"))
        #expect(m.loaded.format == .elf64)
        #expect(try m.memory.readLE(UInt64.self, at: BootLayout.zeroPageAddress + UInt64(ZeroPage.Offset.acpiRsdpAddr)) == 0xe0000)
        #expect(try m.memory.read(at: 0xe0000, count: 8) == Array("RSD PTR ".utf8))
        #expect(try m.memory.read(at: BootLayout.mpTableAddress, count: 4) == Array("_MP_".utf8))
    }

    @Test("the tables are written at 0xE0000 for a flat guest, and not over a flat image that covers them")
    func placement() throws {
        let m = try machine([0xf4])
        var acpi = ACPIConfiguration(cpus: 1)
        if m.mmioBus.find(Machine.ecamBase) != nil { acpi.ecamBase = Machine.ecamBase }   // MCFG when PCI decodes ECAM
        let image = try ACPITables.build(acpi)
        #expect(try m.memory.read(at: 0xe0000, count: image.bytes.count) == image.bytes)
        let covered = try machine([0xfa, 0xf4, 0x11, 0x22], load: 0xe0000)
        #expect(try covered.memory.read(at: 0xe0000, count: 4) == [0xfa, 0xf4, 0x11, 0x22])
        #expect(covered.ioBus.find(0x604) != nil, "the PM device is there either way")
    }
}
