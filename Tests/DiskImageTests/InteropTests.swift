import Foundation
import Testing
@testable import DiskImage

/// Interoperability with QEMU's qemu-img and qemu-io, in both directions. In CI a missing qemu-img fails these
/// tests; elsewhere they are skipped with a message.
@Suite("qemu-img interoperability", .enabled(if: Tools.interopEnabled, "qemu-img/qemu-io not installed (scripts/install-deps installs qemu-utils; CI=1 turns this into a failure)"))
struct InteropTests {
    static let createOptions: [String] = [
        "", "cluster_size=512", "cluster_size=4096,refcount_bits=64", "cluster_size=2M", "refcount_bits=1",
        "compat=0.10", "compat=1.1,lazy_refcounts=on", "refcount_bits=8", "preallocation=metadata",
        "compression_type=zstd",
    ]

    func makeOptions(_ s: String, size: UInt64) -> Qcow2CreateOptions {
        var o = Qcow2CreateOptions(size: size)
        for kv in s.split(separator: ",") {
            let p = kv.split(separator: "=").map(String.init)
            switch p[0] {
            case "cluster_size": o.clusterSize = p[1] == "2M" ? 2 << 20 : UInt64(p[1])!
            case "refcount_bits": o.refcountBits = UInt32(p[1])!
            case "compat": o.version = p[1] == "0.10" ? 2 : 3
            case "lazy_refcounts": o.lazyRefcounts = true
            case "preallocation": o.preallocateMetadata = true
            case "compression_type": o.compressionType = .zstd
            default: break
            }
        }
        return o
    }

    @Test("images we create and write pass qemu-img check and compare equal to the expected raw content", arguments: createOptions)
    func oursPassQemu(_ opts: String) throws {
        let d = try TempDir()
        let img = d.file("ours.qcow2"), raw = d.file("expect.raw")
        let size: UInt64 = 12 << 20
        try Qcow2Image.create(path: img, options: makeOptions(opts, size: size))
        #expect(try Tools.qemuImg("check", img).status == 0)
        let q = try Qcow2Image(path: img)
        let r = try RawImage.create(path: raw, size: size)
        var g = SplitMix(seed: 42)
        for i in 0..<25 {
            let len = Int.random(in: 1...200_000, using: &g)
            let off = UInt64.random(in: 0...(size - UInt64(len)), using: &g)
            let data = (0..<len).map { UInt8(truncatingIfNeeded: $0 &+ i) | 0x80 }
            try q.write(data, at: off)
            try r.write(data, at: off)
        }
        let cs = Int(q.clusterSize)
        let chunk = (0..<cs).map { UInt8(truncatingIfNeeded: $0 / 512) }
        try chunk.withUnsafeBytes { try q.writeCompressedCluster($0, at: 8 << 20) }
        try r.write(chunk, at: 8 << 20)
        try q.writeZeroes(at: 3 << 20, length: 300_000)
        try r.writeZeroes(at: 3 << 20, length: 300_000)
        try q.close()
        try r.close()
        let check = try Tools.qemuImg("check", img)
        #expect(check.status == 0, "qemu-img check: \(check.stdout) \(check.stderr)")
        let cmp = try Tools.qemuImg("compare", "-f", "raw", "-F", "qcow2", raw, img)
        #expect(cmp.status == 0, "qemu-img compare: \(cmp.stdout)")
        let info = try Tools.qemuImg("info", "--output=json", img)
        #expect(info.status == 0)
    }

    static let qemuLayouts: [String] = [
        "cluster_size=65536", "cluster_size=4096", "cluster_size=2M", "cluster_size=512,refcount_bits=1",
        "refcount_bits=64", "compression_type=zstd", "compat=0.10", "extended_l2=on", "extended_l2=on,cluster_size=128k",
        "lazy_refcounts=on",
    ]

    @Test("images qemu-img creates and qemu-io writes read identically through our library and our convert", arguments: qemuLayouts)
    func qemuImagesReadIdentically(_ opts: String) throws {
        let d = try TempDir()
        let img = d.file("q.qcow2")
        let size: UInt64 = 8 << 20
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", opts, img, String(size))
        var g = SplitMix(seed: 7)
        var cmds: [String] = []
        for i in 0..<20 {
            let len = Int.random(in: 1...150_000, using: &g)
            let off = UInt64.random(in: 0...(size - UInt64(len)), using: &g)
            cmds += ["-c", i % 5 == 4 ? "write -z \(off) \(len)" : "write -P \(i * 11 + 1) \(off) \(len)"]
        }
        // A compressed cluster-aligned range (qemu-io -c).
        let cs: UInt64 = opts.contains("2M") ? 2 << 20 : opts.contains("128k") ? 128 << 10 : opts.contains("4096") ? 4096 : opts.contains("512,") ? 512 : 65536
        // First, because compressed writes cannot overwrite allocated clusters; later writes then copy on write from it.
        cmds.insert(contentsOf: ["-c", "write -c -P 99 \(size - 2 * cs) \(cs)"], at: 0)
        let w = try Tools.run(Tools.qemuIO, ["-f", "qcow2"] + cmds + [img], name: "qemu-io")
        #expect(w.status == 0, "\(cmds) \(w.stdout) \(w.stderr)")
        let expectRaw = d.file("expect.raw")
        try Tools.qemuImg("convert", "-O", "raw", img, expectRaw)
        let expected = try fileBytes(expectRaw)
        let ours = try Qcow2Image(path: img, options: .init(readOnly: true))
        #expect(try readAll(ours) == expected)
        let c = try ours.check()
        #expect(c.corruptions == 0 && c.leaks == 0, "\(c.messages.prefix(5))")
        // Our convert to raw.
        let outRaw = d.file("ours.raw")
        let dst = try RawImage.create(path: outRaw, size: size)
        try convertImage(from: ours, to: dst)
        try dst.close()
        #expect(try fileBytes(outRaw) == expected)
        try ours.close()
        // Writing through us into qemu's image (not for extended L2, which we read only) keeps qemu happy.
        if !opts.contains("extended_l2") {
            let rw = try Qcow2Image(path: img)
            try rw.write([UInt8](repeating: 0xee, count: 100_000), at: 12345)
            try rw.close()
            #expect(try Tools.qemuImg("check", img).status == 0)
            let io = try Tools.qemuIO("-f", "qcow2", "-c", "read -P 0xee 12345 100000", img)
            #expect(io.stdout.contains("read 100000/100000"), "\(io.stdout)")
        }
    }

    @Test("backing chains made by qemu read identically, and our copy-on-write never changes the base")
    func backingChains() throws {
        let d = try TempDir()
        let base = d.file("base.qcow2"), mid = d.file("mid.raw"), top = d.file("sub/top.qcow2")
        try FileManager.default.createDirectory(atPath: d.file("sub"), withIntermediateDirectories: true)
        try Tools.qemuImg("create", "-q", "-f", "raw", mid, "6M")
        try Tools.qemuIO("-f", "raw", "-c", "write -P 3 1000 2000000", mid)
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "mid.raw", "-F", "raw", base)
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 4 1500000 1000000", base)
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2", top, "8M")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 5 3000000 10000", top)
        let expectRaw = d.file("e.raw")
        try Tools.qemuImg("convert", "-O", "raw", top, expectRaw)
        let sums = (try sha256(base), try sha256(mid))
        let img = try Qcow2Image(path: top)
        #expect(try readAll(img) == (try fileBytes(expectRaw)))
        try img.write([UInt8](repeating: 9, count: 70000), at: 1_400_000)
        try img.write([UInt8](repeating: 8, count: 1), at: 7 << 20)
        try img.close()
        #expect(try sha256(base) == sums.0)
        #expect(try sha256(mid) == sums.1)
        #expect(try Tools.qemuImg("check", top).status == 0)
        let io = try Tools.qemuIO("-f", "qcow2", "-c", "read -P 9 1400000 70000", "-c", "read -P 3 1000 399000", "-c", "read -P 4 1470000 30000", top)
        #expect(io.stdout.components(separatedBy: "read ").count == 4, "\(io.stdout) \(io.stderr)")
    }

    @Test("internal snapshots made by qemu are listed and our snapshot operations pass qemu-img check")
    func snapshots() throws {
        let d = try TempDir()
        let p = d.file("s.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", p, "4M")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 1 0 1M", p)
        try Tools.qemuImg("snapshot", "-c", "qsnap", p)
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 2 512k 1M", p)
        let img = try Qcow2Image(path: p)
        #expect(try img.snapshots().map(\.name) == ["qsnap"])
        try img.createSnapshot(name: "ours")
        try img.write([UInt8](repeating: 3, count: 5000), at: 100)
        try img.close()
        #expect(try Tools.qemuImg("check", p).status == 0)
        let list = try Tools.qemuImg("snapshot", "-l", p).stdout
        #expect(list.contains("qsnap") && list.contains("ours"))
        #expect(try Tools.qemuImg("snapshot", "-a", "qsnap", p).status == 0)
        let again = try Qcow2Image(path: p)
        #expect(try again.read(at: 0, count: 1 << 20) == [UInt8](repeating: 1, count: 1 << 20))
        try again.applySnapshot("ours")
        #expect(try again.read(at: 512 << 10, count: 4) == [2, 2, 2, 2])
        try again.deleteSnapshot("qsnap")
        try again.close()
        #expect(try Tools.qemuImg("check", p).status == 0)
        let io = try Tools.qemuIO("-f", "qcow2", "-c", "read -P 2 524288 1048576", p)
        #expect(io.stdout.contains("read 1048576/1048576"))
    }

    @Test("our info JSON has the same keys and values as qemu-img info, across a backing chain")
    func infoJSON() throws {
        guard let exe = Tools.swiftkvm else { Issue.record("swiftkvm executable not built next to the tests (swift build)"); return }
        let d = try TempDir()
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", d.file("b.qcow2"), "5M")
        try Tools.qemuImg("snapshot", "-c", "s", d.file("b.qcow2"))
        try Tools.run(exe, ["img", "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "-o", "refcount_bits=4,lazy_refcounts=on", d.file("t.qcow2")])
        let ours = try Tools.run(exe, ["img", "info", "--output=json", "--backing-chain", d.file("t.qcow2")])
        let theirs = try Tools.qemuImg("info", "--output=json", "--backing-chain", d.file("t.qcow2"))
        let a = try JSONSerialization.jsonObject(with: Data(ours.stdout.utf8)) as? NSArray
        let b = try JSONSerialization.jsonObject(with: Data(theirs.stdout.utf8)) as? NSArray
        #expect(a != nil && a == b, "ours: \(ours.stdout)\ntheirs: \(theirs.stdout)")
        let m1 = try Tools.run(exe, ["img", "map", "--output=json", d.file("t.qcow2")]).stdout
        let m2 = try Tools.qemuImg("map", "--output=json", d.file("t.qcow2")).stdout
        #expect(m1 == m2)
    }

    @Test("img convert to qcow2 (plain, compressed, with -B) and back to raw matches qemu-img")
    func convertRoundTrips() throws {
        guard let exe = Tools.swiftkvm else { Issue.record("swiftkvm executable not built next to the tests (swift build)"); return }
        let d = try TempDir()
        let src = d.file("src.raw")
        try Tools.qemuImg("create", "-q", "-f", "raw", src, "16M")
        try Tools.qemuIO("-f", "raw", "-c", "write -P 7 0 3M", "-c", "write -P 8 9000000 123457", "-c", "write -P 0 5M 1M", src)
        for args in [["-O", "qcow2"], ["-O", "qcow2", "-c"], ["-O", "qcow2", "-o", "cluster_size=4096,compression_type=zstd", "-c"], ["-O", "raw"]] {
            let out = d.file("out")
            let r = try Tools.run(exe, ["img", "convert", "-p"] + args + [src, out])
            #expect(r.status == 0, "\(args): \(r.stderr)")
            #expect(try Tools.qemuImg("compare", src, out).status == 0, "\(args)")
            if args.contains("qcow2") { #expect(try Tools.qemuImg("check", out).status == 0, "\(args)") }
            try? FileManager.default.removeItem(atPath: out)
        }
        // -B: only the differences from the backing file are stored.
        try Tools.qemuImg("convert", "-O", "qcow2", src, d.file("base.qcow2"))
        try Tools.qemuIO("-f", "raw", "-c", "write -P 9 100000 5000", src)
        let r = try Tools.run(exe, ["img", "convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", src, d.file("ov.qcow2")])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(try Tools.qemuImg("compare", src, d.file("ov.qcow2")).status == 0)
        let ov = try Qcow2Image(path: d.file("ov.qcow2"), options: .init(readOnly: true))
        #expect(try ov.check().allocatedClusters == 1)
        // check exit codes: clean 0.
        #expect(try Tools.run(exe, ["img", "check", d.file("ov.qcow2")]).status == 0)
    }

    @Test("commit writes the overlay into its base and rebase keeps the visible content")
    func commitAndRebase() throws {
        guard let exe = Tools.swiftkvm else { Issue.record("swiftkvm executable not built next to the tests (swift build)"); return }
        let d = try TempDir()
        try Tools.qemuImg("create", "-q", "-f", "qcow2", d.file("b.qcow2"), "4M")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 1 0 4M", d.file("b.qcow2"))
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", d.file("o.qcow2"))
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 2 1000 100000", "-c", "write -z 2M 64k", d.file("o.qcow2"))
        try Tools.qemuImg("convert", "-O", "raw", d.file("o.qcow2"), d.file("e.raw"))
        #expect(try Tools.run(exe, ["img", "commit", d.file("o.qcow2")]).status == 0)
        #expect(try Tools.qemuImg("compare", d.file("b.qcow2"), d.file("e.raw")).status == 0)
        #expect(try Tools.qemuImg("check", d.file("b.qcow2")).status == 0)
        try Tools.qemuImg("create", "-q", "-f", "raw", d.file("n.raw"), "4M")
        #expect(try Tools.run(exe, ["img", "rebase", "-b", "n.raw", "-F", "raw", d.file("o.qcow2")]).status == 0)
        #expect(try Tools.qemuImg("compare", d.file("o.qcow2"), d.file("e.raw")).status == 0)
        #expect(try Tools.qemuImg("check", d.file("o.qcow2")).status == 0)
        #expect(try Tools.run(exe, ["img", "compare", d.file("o.qcow2"), d.file("e.raw")]).status == 0)
        #expect(try Tools.run(exe, ["img", "compare", d.file("o.qcow2"), d.file("n.raw")]).status == 1)
    }
}
