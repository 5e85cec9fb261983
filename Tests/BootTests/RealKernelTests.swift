import Foundation
import GuestMemory
import Testing
@testable import Boot

/// The Debian kernel fetched by scripts/guest-assets (assets/vmlinuz), or $SWIFTKVM_TEST_KERNEL.
let realKernelPath: String? = {
    if let p = ProcessInfo.processInfo.environment["SWIFTKVM_TEST_KERNEL"], FileManager.default.fileExists(atPath: p) { return p }
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    let p = root.appendingPathComponent("assets/vmlinuz").path
    return FileManager.default.fileExists(atPath: p) ? p : nil
}()

@Suite("A real Debian kernel (assets/vmlinuz; skipped when scripts/guest-assets has not run)",
       .enabled(if: realKernelPath != nil, "no kernel at assets/vmlinuz: run scripts/guest-assets"))
struct RealKernelTests {
    @Test("the stock bzImage parses, decompresses in the VMM and loads at 16 MiB in long mode")
    func load() throws {
        let path = try #require(realKernelPath)
        let mem = try makeMemory(256 << 20)
        let start = Date()
        let k = try KernelLoader.load(kernel: .path(path), cmdline: "console=ttyS0", memory: mem)
        let elapsed = Date().timeIntervalSince(start)
        #expect(k.format == .bzImage)
        #expect((k.protocolVersion ?? 0) >= 0x020c)
        #expect(k.kernelVersion?.hasPrefix("6.") == true, "\(k.kernelVersion ?? "none")")
        #expect(k.compression != nil && k.compression!.isSupported)
        #expect(k.entry.rip == 0x100_0000, "startup_64 is at the kernel's physical load address")
        #expect(k.entry.rsi == 0x7000 && k.entry.efer == 0x500)
        let hdr = try mem.read(at: 0x7000 + 0x202, count: 4)
        #expect(hdr == Array("HdrS".utf8))
        #expect(k.ranges.contains { $0.start == 0x100_0000 })
        print("real kernel: \(k.summary.joined(separator: "; ")) in \(String(format: "%.2f", elapsed)) s")
    }

    @Test("the stock kernel loads with the project's initramfs placed below initrd_addr_max")
    func withInitrd() throws {
        let path = try #require(realKernelPath)
        let initrd = URL(fileURLWithPath: path).deletingLastPathComponent().appendingPathComponent("initramfs.cpio").path
        try #require(FileManager.default.fileExists(atPath: initrd), "no initramfs.cpio next to the kernel")
        let mem = try makeMemory(256 << 20)
        let k = try KernelLoader.load(kernel: .path(path), initrd: .path(initrd), cmdline: "console=ttyS0", memory: mem)
        let rd = try #require(k.ranges.first { $0.what == "initrd" })
        #expect(rd.start % 4096 == 0 && rd.end <= 256 << 20)
        #expect(try mem.read(at: rd.start, count: 6) == Array("070701".utf8), "newc cpio magic")
        #expect(try mem.readLE(UInt32.self, at: 0x7000 + 0x218) == UInt32(rd.start))
    }

    @Test("the bzImage entry option loads the compressed kernel at pref_address and enters at +0x200")
    func bzImageEntry() throws {
        let path = try #require(realKernelPath)
        let mem = try makeMemory(256 << 20)
        let k = try KernelLoader.load(kernel: .path(path), cmdline: "console=ttyS0", memory: mem,
                                      options: BootOptions(linuxEntry: .bzImage))
        #expect(k.entry.rip == 0x100_0200 && k.compression == nil)
    }
}
