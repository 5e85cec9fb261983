import Foundation
import Testing
@testable import DiskImage

/// `swiftkvm img measure` against `qemu-img measure` (the judge): the same bytes out for sizes and for
/// images with data, zero clusters, compressed clusters, backing chains, sparse raw files and bitmaps.
@Suite("img measure matches qemu-img measure", .enabled(if: Tools.interopEnabled, "qemu-img/qemu-io not installed (scripts/install-deps installs qemu-utils; CI=1 turns this into a failure)"))
struct MeasureTests {
    @Test("the fixed point of the refcount metadata: 1 GiB in 64 KiB clusters needs one refcount block and one table cluster")
    func refcountFixedPoint() {
        let layout = ImageMeasure.Qcow2Layout()
        #expect(ImageMeasure.refcountMetadataSize(clusters: 16388, layout: layout) == 2 * 65536)
        #expect(ImageMeasure.qcow2FullyAllocated(virtualSize: 1 << 30, layout: layout) == 1_074_135_040)
        // 1-bit refcounts in 512-byte clusters: one block counts 4096 clusters, the table grows with the blocks.
        let tiny = ImageMeasure.Qcow2Layout(clusterSize: 512, refcountBits: 1)
        let size = ImageMeasure.refcountMetadataSize(clusters: 100_000, layout: tiny)
        let blocks = size / 512
        #expect(blocks * 4096 >= 100_000 + blocks, "the blocks count themselves too")
    }

    @Test("every case prints the same as qemu-img measure (human and json)")
    func sameAsQemu() throws {
        guard let exe = Tools.swiftkvm else { Issue.record("swiftkvm executable not built next to the tests (swift build)"); return }
        let d = try TempDir()
        // A qcow2 image with data, a zero range, a compressed cluster and a bitmap.
        try Tools.qemuImg("create", "-q", "-f", "qcow2", d.file("a.qcow2"), "100M")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 1 0 10M", "-c", "write -z 20M 5M", "-c", "write -P 2 50M 100k",
                         "-c", "write -c -P 3 80M 64k", d.file("a.qcow2"))
        try Tools.qemuImg("bitmap", "--add", "-g", "128k", d.file("a.qcow2"), "dirty-since-backup")
        // An overlay over it, and a sparse raw file.
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", d.file("a.qcow2"), "-F", "qcow2", d.file("top.qcow2"))
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 4 90M 1M", d.file("top.qcow2"))
        #expect(FileManager.default.createFile(atPath: d.file("s.raw"), contents: nil))
        #expect(truncate(d.file("s.raw"), 64 << 20) == 0)
        try Tools.qemuIO("-f", "raw", "-c", "write -P 5 1M 3M", "-c", "write -P 6 33M 4k", d.file("s.raw"))
        let cases: [[String]] = [
            ["--size", "1G", "-O", "qcow2"], ["--size", "1G", "-O", "raw"], ["--size", "1000", "-O", "qcow2"],
            ["--size", "10G", "-O", "qcow2", "-o", "cluster_size=512,refcount_bits=1"],
            ["--size", "100G", "-O", "qcow2", "-o", "cluster_size=2M"],
            ["--size", "1G", "-O", "qcow2", "-o", "extended_l2=on"], ["--size", "1G", "-O", "qcow2", "-o", "preallocation=falloc"],
            ["-O", "qcow2", d.file("a.qcow2")], ["-O", "qcow2", "-o", "cluster_size=4k", d.file("a.qcow2")],
            ["-O", "qcow2", "-o", "compat=0.10", d.file("a.qcow2")], ["-O", "raw", d.file("a.qcow2")],
            ["-O", "qcow2", d.file("top.qcow2")], ["-O", "qcow2", "-o", "backing_file=" + d.file("a.qcow2") + ",backing_fmt=qcow2", d.file("top.qcow2")],
            ["-O", "qcow2", "-f", "raw", d.file("s.raw")], ["-O", "qcow2", "-o", "cluster_size=1M", d.file("s.raw")],
            [d.file("s.raw")],
        ]
        for args in cases {
            for output in ["human", "json"] {
                let a = ["measure", "--output=\(output)"] + args
                let theirs = try Tools.qemuImg(a)
                let ours = try Tools.run(exe, ["img"] + a)
                #expect(ours.status == 0 && ours.stdout == theirs.stdout, "\(a.joined(separator: " ")):\nours: \(ours.stdout)\(ours.stderr)\ntheirs: \(theirs.stdout)\(theirs.stderr)")
            }
        }
    }

    @Test("bad requests exit 1 with qemu-img's reason: no size and no file, both, an unknown format, a bad cluster size or option, a missing file")
    func badInput() throws {
        guard let exe = Tools.swiftkvm else { Issue.record("swiftkvm executable not built next to the tests (swift build)"); return }
        let d = try TempDir()
        try Tools.qemuImg("create", "-q", "-f", "qcow2", d.file("a.qcow2"), "1M")
        let cases: [([String], String)] = [
            (["-O", "qcow2"], "Either --size N or one filename must be specified"),
            (["-O", "qcow2", "--size", "1G", d.file("a.qcow2")], "--size N cannot be used together with a filename"),
            (["-O", "vmdk2", "--size", "1G"], "Unknown file format 'vmdk2'"),
            (["-O", "qcow2", "--size", "-5"], "Invalid image size"),
            (["-O", "qcow2", "-o", "cluster_size=1000", "--size", "1G"], "Cluster size must be a power of two between 512 and 2048k"),
            (["-O", "qcow2", "-o", "foo=1", "--size", "1G"], "foo"),
            (["-O", "qcow2", d.file("missing.qcow2")], d.file("missing.qcow2")),
            (["-O", "qcow2", "--size", "18446744073709551615"], "Invalid image size"),
            (["-O", "qcow2", "-o", "cluster_size=512", "--size", "9223372036854775807"], "The image size is too large"),
        ]
        for (args, reason) in cases {
            let r = try Tools.run(exe, ["img", "measure"] + args)
            #expect(r.status == 1 && r.stderr.contains(reason), "\(args): \(r.status) \(r.stderr)")
            #expect(try Tools.qemuImg(["measure"] + args).status == 1, "qemu-img refuses \(args) too")
        }
    }
}
