import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Testing

// The freestanding virtio drivers of guest/programs (virtio_blk, virtio_rng, virtio_console,
// hostile; see guest/README.md) against swiftkvm's virtio-pci devices. The host prepares the
// disks with a known pattern and checks their bytes afterwards.

/// Disk files with the pattern the guest programs expect: every little-endian 64-bit word k
/// (0–63) of sector s holds `(s << 8) | k`.
enum PatternDisk {
    static let sectorWords = 64

    /// The pattern word of sector s, word k.
    static func initial(_ s: Int, _ k: Int) -> UInt64 { UInt64(s) << 8 | UInt64(k) }
    /// What virtio_blk writes: `0x57 << 56 | s << 8 | k`.
    static func written(_ s: Int, _ k: Int) -> UInt64 { 0x5700_0000_0000_0000 | UInt64(s) << 8 | UInt64(k) }

    static func bytes(sectors: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: sectors * 512)
        for s in 0..<sectors {
            for k in 0..<sectorWords {
                let v = initial(s, k)
                for b in 0..<8 { out[s * 512 + k * 8 + b] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(b))) }
            }
        }
        return out
    }

    /// A temporary pattern disk (remove with ProcessRunner.removeTemporary).
    static func make(sectors: Int = 2048, name: String = "disk.img") throws -> String {
        try ProcessRunner.temporaryFile(bytes(sectors: sectors), name: name)
    }

    static func word(_ data: [UInt8], _ s: Int, _ k: Int) -> UInt64? {
        let o = s * 512 + k * 8
        guard o + 8 <= data.count else { return nil }
        var v: UInt64 = 0
        for b in 0..<8 { v |= UInt64(data[o + b]) << (8 * UInt64(b)) }
        return v
    }

    /// Sectors of `data` whose words differ from `expected(s, k)`, as a short description (nil when all match).
    static func mismatch(_ data: [UInt8], sectors: Range<Int>, expected: (Int, Int) -> UInt64) -> String? {
        for s in sectors {
            for k in 0..<sectorWords {
                let got = word(data, s, k)
                if got != expected(s, k) {
                    return "sector \(s) word \(k): \(got.map { String($0, radix: 16) } ?? "missing"), expected \(String(expected(s, k), radix: 16))"
                }
            }
        }
        return nil
    }
}

/// `swiftkvm run` arguments for the flat (long-mode) image of a program.
func flatProgramArguments(_ name: String) -> [String] {
    ["--flat", GuestTestEnvironment.guestImage(name, ext: "bin"), "--load-address", "0x100000", "--entry", "0x100040",
     "--mode", "long", "--debug-exit-port", "0xf4", "--serial", "stdio"]
}

@Suite("Virtio guest program images (no /dev/kvm needed)")
struct VirtioGuestImageTests {
    @Test("the pci, virtio and hostile programs build as multiboot and flat images",
          arguments: ["pci", "virtio_blk", "virtio_rng", "virtio_console", "hostile", "virtio_mmio"])
    func image(name: String) throws {
        try #require(GuestTestEnvironment.guestBuildError == nil, "\(GuestTestEnvironment.guestBuildError ?? "")")
        let elf = try [UInt8](Data(contentsOf: URL(fileURLWithPath: GuestTestEnvironment.guestImage(name))))
        #expect(Array(elf.prefix(5)) == [0x7f, 0x45, 0x4c, 0x46, 1], "ELF32 multiboot image")
        let flat = try [UInt8](Data(contentsOf: URL(fileURLWithPath: GuestTestEnvironment.guestImage(name, ext: "bin"))))
        #expect(flat.count > 0x48 && flat[0x40] == 0xe9, "jmp at the flat 64-bit entry (offset 0x40)")
    }

    @Test("the pattern disk helper writes (s << 8) | k little-endian")
    func pattern() {
        let d = PatternDisk.bytes(sectors: 3)
        #expect(d.count == 1536)
        #expect(PatternDisk.word(d, 2, 5) == 0x205)
        #expect(Array(d[1024..<1026]) == [0x00, 0x02])
        #expect(PatternDisk.mismatch(d, sectors: 0..<3, expected: PatternDisk.initial) == nil)
        #expect(PatternDisk.mismatch(d, sectors: 0..<3, expected: PatternDisk.written) != nil)
    }
}

@Suite("Virtio drivers under swiftkvm run", .serialized,
       .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"))
struct VirtioGuestTests {
    static let writableChecks = ["setup", "config", "get-id", "read", "read-indirect", "read-past-end", "read-across-end",
                                 "write", "write-readback", "write-indirect", "write-indirect-readback", "write-past-end",
                                 "flush", "discard", "write-zeroes", "write-zeroes-readback", "inflight-write",
                                 "inflight-read", "flush-final", "event-idx-suppressed", "event-idx-interrupt",
                                 "msix-completions"]

    /// Checks the writable disk's bytes after virtio_blk: W where it wrote, zeroes where it wrote
    /// zeroes, zeroes or the pattern where it discarded, the pattern elsewhere.
    func expectWrittenDisk(_ path: String, indirect: Bool = true, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let data = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        #expect(data.count == 2048 * 512, "disk size unchanged", sourceLocation: sourceLocation)
        var written: [Range<Int>] = [64..<72, 512..<768]
        if indirect { written.append(80..<88) }
        for r in written {
            #expect(PatternDisk.mismatch(data, sectors: r, expected: PatternDisk.written) == nil,
                    "written sectors \(r): \(PatternDisk.mismatch(data, sectors: r, expected: PatternDisk.written) ?? "")",
                    sourceLocation: sourceLocation)
        }
        #expect(PatternDisk.mismatch(data, sectors: 192..<200) { _, _ in 0 } == nil, "WRITE_ZEROES sectors 192-199",
                sourceLocation: sourceLocation)
        let discarded = PatternDisk.mismatch(data, sectors: 128..<136) { _, _ in 0 } == nil ||
            PatternDisk.mismatch(data, sectors: 128..<136, expected: PatternDisk.initial) == nil
        #expect(discarded, "discarded sectors 128-135 hold zeroes or the old pattern", sourceLocation: sourceLocation)
        let untouched: [Range<Int>] = [0..<64, 72..<80, (indirect ? 88 : 80)..<128, 136..<192, 200..<512, 768..<2048]
        for r in untouched {
            #expect(PatternDisk.mismatch(data, sectors: r, expected: PatternDisk.initial) == nil,
                    "untouched sectors \(r): \(PatternDisk.mismatch(data, sectors: r, expected: PatternDisk.initial) ?? "")",
                    sourceLocation: sourceLocation)
        }
    }

    @Test("virtio_blk: a writable and a read-only disk: reads, writes, flush, GET_ID, discard, write-zeroes, indirect, EVENT_IDX, 32 in flight, MSI-X; the host sees the written bytes")
    func blockTwoDisks() throws {
        let d0 = try PatternDisk.make(name: "disk0.img")
        let d1 = try PatternDisk.make(name: "disk1.img")
        defer { ProcessRunner.removeTemporary(d0); ProcessRunner.removeTemporary(d1) }
        let r = try runGuestProgram(programArguments("virtio_blk", cmdline: "id=swiftkvm-disk0 disks=2 readonly=1") +
                                    ["--disk", "path=\(d0),id=swiftkvm-disk0", "--disk", "path=\(d1),readonly=on"],
                                    timeout: 180)
        expectPass(r, checks: Self.writableChecks.map { "blk0-" + $0 } +
                   ["blk1-setup", "blk1-read-only-flag", "blk1-read", "blk1-write-refused", "blk1-read-only-unchanged",
                    "blk0-read-only-flag", "disks"])
        #expect(r.lines.contains("BLKID 0 swiftkvm-disk0"), "\(r.output)")
        try expectWrittenDisk(d0)
        let ro = try [UInt8](Data(contentsOf: URL(fileURLWithPath: d1)))
        #expect(ro == PatternDisk.bytes(sectors: 2048), "the read-only disk is unchanged")
    }

    @Test("virtio_blk: the same without indirect descriptors and EVENT_IDX (plain notification and interrupt flags)")
    func blockPlainRing() throws {
        let d0 = try PatternDisk.make()
        defer { ProcessRunner.removeTemporary(d0) }
        let r = try runGuestProgram(programArguments("virtio_blk", cmdline: "noindirect noevent disks=1") +
                                    ["--disk", "path=\(d0)"], timeout: 180)
        expectPass(r, checks: ["blk0-setup", "blk0-read", "blk0-write", "blk0-write-readback", "blk0-flush",
                               "blk0-write-zeroes-readback", "blk0-inflight-write", "blk0-inflight-read",
                               "blk0-msix-completions"])
        #expect(!r.okNames.contains("blk0-read-indirect"), "indirect must not be negotiated with noindirect")
        try expectWrittenDisk(d0, indirect: false)
    }

    @Test("virtio_blk bench mode: sequential and random reads and writes complete without errors",
          arguments: [("seqread", 65536, 32), ("seqwrite", 65536, 32), ("randread", 4096, 500), ("randwrite", 4096, 500)])
    func blockBench(kind: String, size: Int, n: Int) throws {
        let d0 = try PatternDisk.make()
        defer { ProcessRunner.removeTemporary(d0) }
        let r = try runGuestProgram(programArguments("virtio_blk", cmdline: "bench=\(kind) size=\(size) n=\(n) qd=4") +
                                    ["--disk", "path=\(d0)"], timeout: 180)
        expectPass(r, checks: ["blk0-setup", "bench"])
        #expect(r.lines.contains { $0.hasPrefix("BENCH \(kind) done ops=\(n) bytes=\(n * size) ") && $0.hasSuffix(" errors=0") },
                "\(r.output)")
    }

    @Test("virtio_rng: requests complete with MSI-X and return varying random bytes")
    func rng() throws {
        let r = try runGuestProgram(programArguments("virtio_rng", cmdline: "reads=4") + ["--rng"])
        expectPass(r, checks: ["rng-found", "rng-capabilities", "rng-features", "rng-queue", "rng-driver-ok", "rng-read",
                               "rng-nonzero", "rng-varies", "rng-msix-interrupt"])
        #expect(r.lines.filter { $0.hasPrefix("RNG ") }.count == 4, "\(r.output)")
    }

    @Test("virtio_console: the guest's line reaches the host and the host's line is echoed back")
    func console() throws {
        let r = try runGuestProgram(programArguments("virtio_console", cmdline: "timeout=60000") + ["--virtio-console"],
                                    timeout: 120) { child in
            if child.waitFor("CONSOLE-READY hello from the guest", timeout: 60) { child.send("hello-console\n") }
        }
        expectPass(r, checks: ["console-found", "console-setup", "console-write", "console-read", "console-echo", "console-msix"])
        #expect(r.output.contains("CONSOLE-READY hello from the guest over virtio-console"), "\(r.output)")
        #expect(r.lines.contains("echo-console: hello-console"), "\(r.output)")
        #expect(r.output.contains("echo: hello-console"), "\(r.output)")
    }

    @Test("virtio_blk fill: writes the host file rejects with EIO (a failing disk region) give the guest IOERR; the rest of the disk, rewrites and FLUSH keep working")
    func failingHostDisk() throws {
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath, "swiftkvm executable not found")
        let d0 = try PatternDisk.make()
        defer { ProcessRunner.removeTemporary(d0) }
        let library = d0 + ".fail_io.so"
        defer { ProcessRunner.removeTemporary(library) }
        let source = GuestTestEnvironment.repoRoot.appendingPathComponent("Tests/Tools/fail_io.c").path
        let cc = try ProcessRunner.run("/usr/bin/cc", ["-shared", "-fPIC", "-O2", "-o", library, source, "-ldl"])
        try #require(cc.status == 0, "cc: \(cc.stderr)")
        var env = ProcessInfo.processInfo.environment
        env["LD_PRELOAD"] = library
        env["FAILIO_TARGET"] = d0
        env["FAILIO_FROM"] = "524288"       // writes reaching past 512 KiB fail with EIO
        let r = try ProcessRunner.run(swiftkvm, ["run"] + programArguments("virtio_blk", cmdline: "fill") +
                                      ["--memory", "64M", "--disk", "path=\(d0)"], timeout: 180, environment: env)
        let report = GuestReport(status: r.status, output: r.stdout + r.stderr, command: "swiftkvm run virtio_blk fill (EIO past 512 KiB)")
        expectPass(report, checks: ["blk0-setup", "fill-ioerr", "fill-read-after", "fill-rewrite", "fill-flush-reported"])
        #expect(report.output.contains("FILL wrote 1024 sectors, then IOERR at sector 1024"), "\(report.output)")
        #expect(report.output.contains("Input/output error"), "the VMM logs the host error\n\(report.output)")
    }

    /// Runs virtio_blk in one of its single-disk modes on a fresh pattern disk.
    func runBlockMode(_ mode: String, memory: String) throws -> GuestReport {
        let d0 = try PatternDisk.make()
        defer { ProcessRunner.removeTemporary(d0) }
        return try runGuestProgram(programArguments("virtio_blk", cmdline: mode) + ["--memory", memory, "--disk", "path=\(d0)"])
    }

    @Test("virtio_blk bigmem: a 4.5 GiB guest has RAM below and above the PCI hole; the CPU and the device reach both, and a buffer across the hole is refused without touching RAM")
    func bigMemory() throws {
        let r = try runBlockMode("bigmem", memory: "4608M")
        expectPass(r, checks: ["blk0-setup", "two-regions", "cpu-access", "dma-high", "dma-top", "dma-straddle-refused"])
        #expect(r.output.contains("usable RAM to c0000000, then 100000000-160000000"), "\(r.output)")
    }

    @Test("virtio_blk movebar: a guest that moves the device's BAR kicks it at the new address; the old address no longer starts requests")
    func movedBAR() throws {
        let r = try runBlockMode("movebar", memory: "64M")
        expectPass(r, checks: ["blk0-setup", "before-move", "notify-bar", "moved", "moved-read", "old-address-dead",
                               "kick-at-new-address", "moved-back", "moved-back-read"])
    }

    @Test("virtio_blk fill: a disk whose host file system fills up gives the guest IOERR; earlier data stays, the device and the VMM keep working")
    func fullHostDisk() throws {
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath, "swiftkvm executable not found")
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("swiftkvm-full-\(getpid())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // A 2 MiB tmpfs in a private mount namespace (gone with the process; the host's mounts are untouched)
        // holding a sparse 16 MiB raw disk: the guest's writes hit ENOSPC after about 2 MiB.
        let script = #"mount -t tmpfs -o size=2m swiftkvm-full "$1" && truncate -s 16M "$1/disk.raw" && shift && exec "$@""#
        let child = GuestTestProcess(executable: "/usr/bin/unshare", arguments: [
            "--mount", "--propagation", "private", "/bin/sh", "-c", script, "sh", dir, swiftkvm, "run",
        ] + programArguments("virtio_blk", cmdline: "fill") + ["--memory", "64M", "--disk", "path=\(dir)/disk.raw"],
            currentDirectory: GuestTestEnvironment.repoRoot)
        try child.start()
        let status = child.waitForExit(timeout: 180)
        let r = GuestReport(status: status, output: child.output, command: child.commandLine)
        expectPass(r, checks: ["blk0-setup", "fill-ioerr", "fill-read-after", "fill-rewrite", "fill-flush-reported"])
        #expect(r.lines.contains { $0.hasPrefix("FILL wrote ") && $0.contains(", then IOERR at sector ") }, "\(r.output)")
        #expect(r.output.contains("backend error") || r.output.contains("No space left"), "the VMM logs the host error\n\(r.output)")
    }

    static let hostileCases = ["loop", "self-loop", "full-ring-loop", "longer-than-queue", "indirect-bad-length",
                               "indirect-zero-length", "indirect-loop", "indirect-next-out-of-table", "nested-indirect",
                               "indirect-outside-ram", "buffer-outside-ram", "buffer-straddles-ram-end",
                               "buffer-in-mmio-hole", "length-4g", "address-wraps", "header-writable", "header-short",
                               "status-read-only", "status-zero-length", "read-into-read-only", "avail-ahead",
                               "head-out-of-range", "next-out-of-range"]

    @Test("hostile (flat long-mode binary): every malformed chain fails cleanly, a reset recovers the device, the VMM keeps running")
    func hostile() throws {
        let d0 = try PatternDisk.make()
        defer { ProcessRunner.removeTemporary(d0) }
        let r = try runGuestProgram(flatProgramArguments("hostile") + ["--memory", "128M", "--disk", "path=\(d0)"],
                                    timeout: 180)
        expectPass(r, checks: ["hostile-found", "hostile-setup", "hostile-baseline", "hostile-valid-after"] +
                   Self.hostileCases.map { "hostile-" + $0 })
        #expect(r.output.contains("(flat 64-bit entry)"), "\(r.output)")
        #expect(r.lines.contains { $0.contains("warning") && $0.contains("virtqueue") }, "the VMM logs the malformed chains\n\(r.output)")
        let data = try [UInt8](Data(contentsOf: URL(fileURLWithPath: d0)))
        #expect(data == PatternDisk.bytes(sectors: 2048), "the hostile requests (reads) left the disk unchanged")
    }
}
