import Foundation
import Testing
@testable import Boot

/// The guest test programs (guest/programs/*.c), one multiboot image each in guest/build, which `scripts/test`
/// builds (`make -C guest`) before the tests. A program added to guest/programs must be added here.
let guestProgramNames = [
    "acpi", "boot", "cpuid_msr", "exits", "fault", "fixups", "fwcfg", "hostile", "i8042", "int3", "pci", "pmtimer", "rtc", "rtc_irq",
    "s3", "serial", "smp",
    "ticker", "timers", "uart_smp", "usermode", "virtio_blk", "virtio_console", "virtio_mmio", "virtio_net", "virtio_rng", "virtio_vsock",
]

let guestBuildDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().appendingPathComponent("guest")

@Suite("Guest test programs (guest/build/*.elf, built by make -C guest)")
struct GuestProgramLoadTests {
    @Test("the list of guest programs matches guest/programs")
    func listMatchesSources() throws {
        let sources = try FileManager.default.contentsOfDirectory(atPath: guestBuildDirectory.appendingPathComponent("programs").path)
            .filter { $0.hasSuffix(".c") }.map { String($0.dropLast(2)) }.sorted()
        #expect(sources == guestProgramNames.sorted())
    }

    @Test("every multiboot guest program loads with a protected-mode entry and its multiboot info")
    func loadAll() throws {
        for name in guestProgramNames {
            let path = guestBuildDirectory.appendingPathComponent("build/\(name).elf").path
            guard FileManager.default.fileExists(atPath: path) else {
                Issue.record("\(path) is missing: scripts/test builds it with make -C guest")
                continue
            }
            let mem = try makeMemory(128 << 20)
            let k = try KernelLoader.load(kernel: .path(path), cmdline: "test", memory: mem)
            #expect(k.format == .multiboot, "\(path)")
            let imageEnd = k.ranges.filter { $0.what.hasPrefix("multiboot ELF") || $0.what.hasPrefix("multiboot image") }.map(\.end).max() ?? 0
            #expect(k.entry.rax == 0x2bad_b002 && k.entry.rbx > imageEnd && k.entry.rbx % 4096 == MultibootInfo.infoOffset
                    && k.entry.cr0 == 0x11, "\(path): info at \(k.entry.rbx), image end \(imageEnd)")
            #expect(k.ranges.contains { $0.start <= k.entry.rip && k.entry.rip < $0.end && $0.what.hasPrefix("multiboot") }, "\(path)")
        }
    }
}
