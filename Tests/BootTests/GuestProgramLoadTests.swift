import Foundation
import Testing
@testable import Boot

/// Multiboot images built by guest/Makefile (git-ignored guest/build), if present.
let guestProgramImages: [String] = {
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    let dir = root.appendingPathComponent("guest/build")
    let names = (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []
    return names.filter { $0.hasSuffix(".elf") }.sorted().map { dir.appendingPathComponent($0).path }
}()

@Suite("Guest test programs (guest/build/*.elf; skipped when not built)",
       .enabled(if: !guestProgramImages.isEmpty, "guest/build has no .elf images: run make -C guest"))
struct GuestProgramLoadTests {
    @Test("every multiboot guest program loads with a protected-mode entry and its multiboot info")
    func loadAll() throws {
        for path in guestProgramImages {
            let mem = try makeMemory(128 << 20)
            let k = try KernelLoader.load(kernel: .path(path), cmdline: "test", memory: mem)
            #expect(k.format == .multiboot, "\(path)")
            #expect(k.entry.rax == 0x2bad_b002 && k.entry.rbx == 0x6000 && k.entry.cr0 == 0x11, "\(path)")
            #expect(k.ranges.contains { $0.start <= k.entry.rip && k.entry.rip < $0.end && $0.what.hasPrefix("multiboot") }, "\(path)")
        }
    }
}
