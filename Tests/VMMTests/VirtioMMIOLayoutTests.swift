import Foundation
import Testing
@testable import VMM

@Suite("virtio-mmio layout")
struct VirtioMMIOLayoutTests {
    @Test("devices get consecutive 4 KiB windows from 0xF0000000 and the free ISA IRQs, then GSIs 16-23")
    func slots() throws {
        let s = try (0..<VirtioMMIOLayout.maximumDevices).map { try VirtioMMIOLayout.slot($0) }
        #expect(s.map(\.base) == (0..<15).map { 0xf000_0000 + UInt64($0) * 0x1000 })
        #expect(s.map(\.irq) == [5, 6, 7, 10, 11, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23])
        #expect(throws: VMMError.self) { try VirtioMMIOLayout.slot(15) }
        #expect(throws: VMMError.self) { try VirtioMMIOLayout.slot(-1) }
        // Below the PVM fix-up pages and the I/O APIC, above the PCI BAR window and ECAM.
        #expect(s.last!.base + VirtioMMIOLayout.windowSize <= 0xfdff_d000 && s.first!.base >= 0xe010_0000)
    }

    @Test("the command line gets Firecracker's virtio_mmio.device=4K@ADDR:IRQ items only for devices on MMIO")
    func cmdline() throws {
        var c = VMConfiguration(payload: .kernel(path: "k", initrd: nil, cmdline: "console=ttyS0", modules: []))
        c.disks = [DiskSpec(path: "a"), DiskSpec(path: "b")]
        c.rng = true
        #expect(try c.cmdlineWithVirtioMMIODevices("console=ttyS0") == "console=ttyS0", "PCI by default")
        c.transport = .mmio
        #expect(c.virtioDeviceCount == 3)
        #expect(try c.cmdlineWithVirtioMMIODevices("console=ttyS0") == "console=ttyS0 virtio_mmio.device=4K@0xf0000000:5 virtio_mmio.device=4K@0xf0001000:6 virtio_mmio.device=4K@0xf0002000:7")
        #expect(try c.cmdlineWithVirtioMMIODevices("") == "virtio_mmio.device=4K@0xf0000000:5 virtio_mmio.device=4K@0xf0001000:6 virtio_mmio.device=4K@0xf0002000:7")
        c.disks = (0..<15).map { DiskSpec(path: "d\($0)") }
        #expect(throws: VMMError.self) { try c.cmdlineWithVirtioMMIODevices("") }
        c.disks = []; c.rng = false
        #expect(try c.cmdlineWithVirtioMMIODevices("x") == "x")
    }

    @Test("a configuration saved before the transport existed still decodes, as PCI")
    func decodesWithoutTransport() throws {
        var c = VMConfiguration(payload: .kernel(path: "k", initrd: nil, cmdline: "", modules: []))
        c.transport = .mmio
        let encoded = try JSONEncoder().encode(c)
        var object = try #require(try JSONSerialization.jsonObject(with: encoded) as? [String: Any])
        #expect(object["transport"] as? String == "mmio")
        object.removeValue(forKey: "transport")
        let old = try JSONDecoder().decode(VMConfiguration.self, from: try JSONSerialization.data(withJSONObject: object))
        #expect(old.virtioTransport == .pci)
    }
}

@Suite("virtio-mmio configuration checks")
struct VirtioMMIOValidationTests {
    @Test("more virtio devices than virtio-mmio interrupts is a usage error naming --transport; PCI takes them")
    func tooMany() throws {
        var c = VMConfiguration(payload: .kernel(path: "k", initrd: nil, cmdline: "", modules: []))
        c.disks = (0..<15).map { DiskSpec(path: "d\($0)") }
        c.transport = .mmio
        try c.validate(hostMemory: nil)
        c.rng = true
        #expect(throws: VMMError.self) { try c.validate(hostMemory: nil) }
        c.transport = .pci
        try c.validate(hostMemory: nil)
    }
}
