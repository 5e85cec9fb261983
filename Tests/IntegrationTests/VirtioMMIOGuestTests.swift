import Foundation
import Testing

// The freestanding drivers of guest/programs over swiftkvm's virtio-mmio transport (`--transport mmio`):
// virtio_mmio checks the transport (discovery through the DSDT or the command line, the register file, bad
// driver input); virtio_blk, virtio_rng and virtio_console run their PCI suites over it with `mmio`. virtio_net and
// virtio_vsock run over it through the vmm's Firecracker config file (VirtioNetGuestTests, VirtioVsockGuestTests).

@Suite("Virtio-mmio drivers under swiftkvm run", .serialized,
       .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"))
struct VirtioMMIOGuestTests {
    static let transportChecks = ["discovery", "sources-agree", "identity", "blk-found", "rng-found", "read-only", "widths",
                                  "blk-setup", "blk-read", "blk-write", "rng-read", "live-queue", "bad-notify",
                                  "bad-queue-size", "bad-ring"]

    @Test("virtio_mmio: the blk and rng windows found in the DSDT (LNRO0005) and, in a second run, on the command line; registers, interrupts and bad input",
          arguments: ["acpi", "cmdline"])
    func transport(source: String) throws {
        let d0 = try PatternDisk.make()
        defer { ProcessRunner.removeTemporary(d0) }
        let r = try runGuestProgram(programArguments("virtio_mmio", cmdline: "source=\(source) devices=2") +
                                    ["--transport", "mmio", "--disk", "path=\(d0)", "--rng"], timeout: 120)
        expectPass(r, checks: Self.transportChecks)
        #expect(r.output.contains("virtio_mmio.device=4K@0xf0000000:5 virtio_mmio.device=4K@0xf0001000:6"), "\(r.output)")
        #expect(r.lines.contains { $0.hasPrefix("MMIO 0 base=f0000000 size=1000 irq=5 device=2 version=2") }, "\(r.output)")
        #expect(r.lines.contains { $0.hasPrefix("MMIO 1 base=f0001000 size=1000 irq=6 device=4 version=2") }, "\(r.output)")
        let data = try [UInt8](Data(contentsOf: URL(fileURLWithPath: d0)))
        #expect(PatternDisk.mismatch(data, sectors: 100..<101, expected: PatternDisk.written) == nil, "sector 100 written")
        #expect(PatternDisk.mismatch(data, sectors: 0..<100, expected: PatternDisk.initial) == nil, "sectors 0-99 untouched")
    }

    @Test("virtio_mmio: a flat image (no command line) finds its devices through the DSDT")
    func flatImage() throws {
        let d0 = try PatternDisk.make()
        defer { ProcessRunner.removeTemporary(d0) }
        let r = try runGuestProgram(flatProgramArguments("virtio_mmio") + ["--transport", "mmio", "--disk", "path=\(d0)", "--rng"])
        expectPass(r, checks: Self.transportChecks.filter { $0 != "sources-agree" })
    }

    @Test("virtio_blk over virtio-mmio: a writable and a read-only disk, the whole device suite; the host sees the written bytes",
          arguments: ["acpi", "cmdline"])
    func block(source: String) throws {
        let d0 = try PatternDisk.make(name: "disk0.img")
        let d1 = try PatternDisk.make(name: "disk1.img")
        defer { ProcessRunner.removeTemporary(d0); ProcessRunner.removeTemporary(d1) }
        let r = try runGuestProgram(programArguments("virtio_blk", cmdline: "mmio source=\(source) id=swiftkvm-disk0 disks=2 readonly=1") +
                                    ["--transport", "mmio", "--disk", "path=\(d0),id=swiftkvm-disk0", "--disk", "path=\(d1),readonly=on"],
                                    timeout: 180)
        expectPass(r, checks: ["mmio-discovery"] + VirtioGuestTests.writableChecks.map { "blk0-" + $0 } +
                   ["blk1-setup", "blk1-read-only-flag", "blk1-read", "blk1-write-refused", "blk1-read-only-unchanged", "disks"])
        try VirtioGuestTests().expectWrittenDisk(d0)
        let ro = try [UInt8](Data(contentsOf: URL(fileURLWithPath: d1)))
        #expect(ro == PatternDisk.bytes(sectors: 2048), "the read-only disk is unchanged")
    }

    @Test("virtio_blk bench mode over virtio-mmio completes without errors")
    func blockBench() throws {
        let d0 = try PatternDisk.make()
        defer { ProcessRunner.removeTemporary(d0) }
        let r = try runGuestProgram(programArguments("virtio_blk", cmdline: "mmio bench=randread size=4096 n=500 qd=4") +
                                    ["--transport", "mmio", "--disk", "path=\(d0)"], timeout: 180)
        expectPass(r, checks: ["blk0-setup", "bench"])
        #expect(r.lines.contains { $0.hasPrefix("BENCH randread done ops=500 bytes=2048000 ") && $0.hasSuffix(" errors=0") }, "\(r.output)")
    }

    @Test("QueueNotify goes through the ioeventfd: 5000 notifications cost almost no user-space MMIO exits",
          arguments: [true, false])
    func notifyStaysInKernel(mmio: Bool) throws {
        let d0 = try PatternDisk.make()
        defer { ProcessRunner.removeTemporary(d0) }
        let r = try runGuestProgram(programArguments("virtio_blk", cmdline: (mmio ? "mmio " : "") + "bench=notify n=5000") +
                                    ["--transport", mmio ? "mmio" : "pci", "--disk", "path=\(d0)", "--log-level", "info"])
        expectPass(r, checks: ["blk0-setup", "bench"])
        #expect(r.lines.contains { $0.hasPrefix("BENCH notify done ops=5000 bytes=0 ") && $0.contains(" kicks=5000 ") }, "\(r.output)")
        let exits = try #require(r.lines.first { $0.contains("exits: ") }, "no exits line: \(r.output)")
        let mmioExits = exits.split(separator: " ").first { $0.hasPrefix("mmio=") }.flatMap { Int($0.dropFirst(5)) } ?? 0
        #expect(mmioExits < 1000, "\(mmioExits) user-space MMIO exits for 5000 notifications: \(exits)")
    }

    @Test("virtio_rng over virtio-mmio: requests complete with the window's interrupt")
    func rng() throws {
        let r = try runGuestProgram(programArguments("virtio_rng", cmdline: "mmio reads=4") + ["--transport", "mmio", "--rng"])
        expectPass(r, checks: ["mmio-discovery", "rng-found", "rng-features", "rng-queue", "rng-driver-ok", "rng-read",
                               "rng-nonzero", "rng-varies", "rng-msix-interrupt"])
    }

    @Test("virtio_console over virtio-mmio: the guest's line reaches the host and the host's line is echoed back, with interrupts")
    func console() throws {
        let r = try runGuestProgram(programArguments("virtio_console", cmdline: "mmio timeout=60000") + ["--transport", "mmio", "--virtio-console"],
                                    timeout: 120) { child in
            if child.waitFor("CONSOLE-READY hello from the guest", timeout: 60) { child.send("hello-console\n") }
        }
        expectPass(r, checks: ["mmio-discovery", "console-found", "console-setup", "console-write", "console-read", "console-echo", "console-msix"])
        #expect(r.lines.contains("echo-console: hello-console"), "\(r.output)")
    }

    @Test("--transport refuses anything but pci and mmio, and more virtio-mmio devices than interrupts, with exit 2")
    func badTransport() throws {
        let r = try runGuestProgram(programArguments("virtio_rng") + ["--transport", "isa", "--rng"])
        #expect(r.status == 2 && r.output.contains("--transport"), "\(r.output)")
        let disks = (0..<16).flatMap { _ in ["--disk", "path=/dev/null,readonly=on"] }
        let many = try runGuestProgram(programArguments("virtio_rng") + ["--transport", "mmio"] + disks)
        #expect(many.status == 2 && many.output.contains("at most 15"), "\(many.output)")
    }
}
