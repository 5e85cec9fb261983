import Foundation
import GuestMemory
import Testing
@testable import Boot

/// The path of `relative` (e.g. "assets/vmlinuz") in the package, if that file exists.
func packageFile(_ relative: String) -> String? {
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    let p = root.appendingPathComponent(relative).path
    return FileManager.default.fileExists(atPath: p) ? p : nil
}

/// The Debian kernel fetched by scripts/guest-assets (assets/vmlinuz), or $SWIFTKVM_TEST_KERNEL.
let realKernelPath: String? = {
    if let p = ProcessInfo.processInfo.environment["SWIFTKVM_TEST_KERNEL"], FileManager.default.fileExists(atPath: p) { return p }
    return packageFile("assets/vmlinuz")
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

/// The lean kernel as an LZ4 bzImage (scripts/guest-kernel builds assets/lean/bzImage).
let leanBzImagePath = packageFile("assets/lean/bzImage")

@Suite("The lean kernel's bzImage (assets/lean/bzImage)",
       .enabled(if: leanBzImagePath != nil, "no kernel at assets/lean/bzImage: run scripts/guest-kernel"))
struct LeanBzImageTests {
    @Test("a cache hit maps the real kernel's segments copy-on-write and leaves guest memory byte-identical to a load without the cache")
    func mappedHitIsIdentical() throws {
        let path = try #require(leanBzImagePath)
        let image = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("lean-kcache-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let cache = KernelCache(directory: dir)
        func load(_ cache: KernelCache?) throws -> (LoadedKernel, GuestMemory) {
            let mem = try makeMemory(256 << 20)
            let k = try BzImageLoader.load(image, name: "lean", initrd: nil, cmdline: "console=ttyS0", memory: mem,
                                           options: BootOptions(), cache: cache)
            return (k, mem)
        }
        let (plain, plainMem) = try load(nil)
        let (miss, _) = try load(cache)
        #expect(miss.compression == .lz4Legacy || miss.compression == .lz4Frame, "\(String(describing: miss.compression))")
        #expect(miss.notes.contains { $0.hasPrefix("kernel cache miss") }, "\(miss.notes)")
        let (hit, hitMem) = try load(cache)
        #expect(hit.notes.contains { $0.hasPrefix("kernel cache hit: ") && $0.hasSuffix("(verified before, same file)") }, "\(hit.notes)")
        let mapped = try #require(hit.notes.first { $0.hasPrefix("kernel segments: ") }, "\(hit.notes)")
        let mappedBytes = Int(mapped.split(separator: " ")[2]) ?? 0
        #expect(mappedBytes > 4 << 20, "most of the kernel should be mapped, not copied: \(mapped)")
        #expect(hit.entry == plain.entry && hit.ranges == plain.ranges)
        for r in plain.ranges {
            #expect(try hitMem.read(at: r.start, count: Int(r.size)) == plainMem.read(at: r.start, count: Int(r.size)),
                    "\(r.what) at 0x\(String(r.start, radix: 16)) differs between the mapped and the plain load")
        }
    }
}
