import Foundation
import Testing

// guest/programs/pci.c against swiftkvm's PCI bus: enumeration through configuration mechanism #1,
// BAR sizing, capability lists, MSI-X (enable, mask, pending bit, function mask) and INTx, with
// the virtio devices as the functions behind the host bridge.

@Suite("PCI guest program under swiftkvm run", .serialized,
       .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"))
struct PCIGuestTests {
    static let checks = ["enumerate", "host-bridge-class", "bar-sizing", "capability-walk", "contract", "absent-device",
                         "msix-capability", "msix-table-in-bar", "msix-enable", "msix-table-readback", "msix-interrupt",
                         "msix-masked-pending", "msix-unmask-delivers", "msix-function-mask", "intx"]

    @Test("pci: bus 0 holds the host bridge, the disk in slot 1 and the rng in slot 2; BARs, capabilities, MSI-X and INTx work as the contract says")
    func enumerateAndInterrupts() throws {
        let disk = try PatternDisk.make()
        defer { ProcessRunner.removeTemporary(disk) }
        let r = try runGuestProgram(programArguments("pci", cmdline: "swiftkvm devices=3") + ["--disk", "path=\(disk)", "--rng"],
                                    timeout: 180)
        expectPass(r, checks: Self.checks)
        #expect(r.lines.contains { $0.hasPrefix("PCI 00:00.0 8086:0d57 class 06/00/00 ") }, "host bridge\n\(r.output)")
        #expect(r.lines.contains { $0.hasPrefix("PCI 00:01.0 1af4:1042 ") && $0.hasSuffix(" irq 16 pin 1") },
                "virtio-blk in slot 1 on GSI 16\n\(r.output)")
        #expect(r.lines.contains { $0.hasPrefix("PCI 00:02.0 1af4:1044 ") && $0.hasSuffix(" irq 17 pin 1") },
                "virtio-rng in slot 2 on GSI 17\n\(r.output)")
        #expect(r.lines.contains { $0.hasPrefix("CAP 00:01.0 ") && $0.hasSuffix("MSI-X") }, "\(r.output)")
        let bars = r.lines.filter { $0.hasPrefix("BAR 00:0") }
        #expect(!bars.isEmpty, "memory BARs listed\n\(r.output)")
    }

    @Test("pci: with no devices but the host bridge, enumeration finds exactly one function and the MSI-X check reports the missing device")
    func hostBridgeOnly() throws {
        let r = try runGuestProgram(programArguments("pci", cmdline: "swiftkvm devices=1"), timeout: 120)
        #expect(r.okNames.isSuperset(of: ["enumerate", "host-bridge-class", "bar-sizing", "capability-walk", "contract",
                                          "absent-device"]), "\(r.command)\n\(r.output)")
        #expect(r.failLines == ["FAIL msix: no virtio-rng device to raise interrupts (add one)"], "\(r.output)")
        #expect(r.status == 35, "exit status 35 (one check failed, as expected)\n\(r.output)")
    }
}
