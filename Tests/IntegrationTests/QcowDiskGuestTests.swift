import Foundation
import Testing

/// `--disk path=X.qcow2,format=qcow2` (issue 3, part 5): the freestanding virtio_blk driver runs on a qcow2
/// overlay whose base is a raw file opened read-only; real qemu-img is the judge of the result.
@Suite("qcow2 disks under a guest driver", .serialized,
       .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"),
       .enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-img"), "needs qemu-img (scripts/install-deps)"))
struct QcowDiskGuestTests {
    static let qemuImg = "/usr/bin/qemu-img"

    /// A raw pattern base and a qcow2 overlay on it (made by real qemu-img), in a fresh folder.
    static func makeOverlay() throws -> (dir: String, base: String, overlay: String) {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("swiftkvm-qcow2-guest-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let base = dir + "/base.raw", overlay = dir + "/overlay.qcow2"
        try Data(PatternDisk.bytes(sectors: 2048)).write(to: URL(fileURLWithPath: base))
        // A relative backing path: resolved against the overlay's folder.
        let r = try ProcessRunner.run(qemuImg, ["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
                                                "-b", "base.raw", "-F", "raw", overlay])
        try #require(r.status == 0, "qemu-img create: \(r.stderr)")
        return (dir, base, overlay)
    }

    @Test("virtio_blk on a qcow2 overlay of a raw base: reads fall through, writes copy on write, the base is unchanged, qemu-img check is clean and the converted image holds what the guest wrote")
    func overlay() throws {
        let (dir, base, overlay) = try Self.makeOverlay()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let baseBefore = try Data(contentsOf: URL(fileURLWithPath: base))

        let r = try runGuestProgram(programArguments("virtio_blk", cmdline: "id=swiftkvm-disk0 disks=1") +
                                    ["--disk", "path=\(overlay),format=qcow2,backing_files=on,id=swiftkvm-disk0"],
                                    timeout: 180)
        expectPass(r, checks: VirtioGuestTests.writableChecks.map { "blk0-" + $0 })

        #expect(try Data(contentsOf: URL(fileURLWithPath: base)) == baseBefore, "the base image changed")
        let check = try ProcessRunner.run(Self.qemuImg, ["check", overlay])
        #expect(check.status == 0, "qemu-img check: status \(check.status)\n\(check.stdout)\(check.stderr)")
        let flat = dir + "/flat.raw"
        let convert = try ProcessRunner.run(Self.qemuImg, ["convert", "-f", "qcow2", "-O", "raw", overlay, flat])
        try #require(convert.status == 0, "qemu-img convert: \(convert.stderr)")
        try VirtioGuestTests().expectWrittenDisk(flat)
    }

    @Test("a qcow2 disk with a backing file is refused without backing_files=on, naming the option, and nothing is written")
    func backingFilesNeedConsent() throws {
        let (dir, _, overlay) = try Self.makeOverlay()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let before = try Data(contentsOf: URL(fileURLWithPath: overlay))
        let r = try ProcessRunner.runSwiftKVM(["run"] + programArguments("virtio_blk", cmdline: "disks=1") +
                                              ["--disk", "path=\(overlay),format=qcow2"], timeout: 60)
        #expect(r.status == 2, "exit status \(r.status)\n\(r.stderr)")
        #expect(r.stderr.contains("backing_files"), "the error names backing_files: \(r.stderr)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: overlay)) == before, "the overlay changed")
    }
}
