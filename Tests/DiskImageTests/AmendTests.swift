import Foundation
import Testing
@testable import DiskImage

/// `swiftkvm img amend` against `qemu-img amend` (the judge): the same `qemu-img info` (but the file name
/// and size on disk), the same data, a clean `qemu-img check`; refusals change nothing.
@Suite("img amend matches qemu-img amend", .enabled(if: Tools.interopEnabled, "qemu-img/qemu-io not installed (scripts/install-deps installs qemu-utils; CI=1 turns this into a failure)"))
struct AmendTests {
    /// `qemu-img info --output=json` without the keys that name the file or its host size.
    func info(_ path: String) throws -> String {
        try Tools.qemuImg("info", "--output=json", path).stdout.split(separator: "\n")
            .filter { !$0.contains("\"filename\"") && !$0.contains("\"actual-size\"") }.joined(separator: "\n")
    }

    func makeV3(_ d: TempDir) throws -> String {
        let p = d.file("base.qcow2")
        unlink(p)
        try Tools.qemuImg("create", "-q", "-f", "qcow2", p, "10M")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -z 2M 1M", "-c", "write -P 2 4M 64k",
                         "-c", "write -z 4M 64k", "-c", "write -c -P 3 6M 64k", p)
        return p
    }

    func makeV2(_ d: TempDir) throws -> String {
        let p = d.file("base.qcow2")
        unlink(p)
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", p, "10M")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 1 0 1M", p)
        return p
    }

    @Test("compat up and down, lazy_refcounts, growing and shrinking: the same image as qemu-img's")
    func sameAsQemu() throws {
        guard let exe = Tools.swiftkvm else { Issue.record("swiftkvm executable not built next to the tests (swift build)"); return }
        let d = try TempDir()
        let cases: [(v2: Bool, options: String)] = [
            (false, "compat=0.10"), (false, "compat=1.1"), (false, "lazy_refcounts=on"), (false, "size=20M"), (false, "size=5M"),
            (false, "lazy_refcounts=on,size=12M"), (true, "compat=1.1"), (true, "compat=1.1,lazy_refcounts=on"), (true, "size=3M"),
        ]
        for c in cases {
            let base = c.v2 ? try makeV2(d) : try makeV3(d)
            let q = d.file("q.qcow2"), s = d.file("s.qcow2")
            for p in [q, s] {
                unlink(p)
                try FileManager.default.copyItem(atPath: base, toPath: p)
            }
            let theirs = try Tools.qemuImg("amend", "-o", c.options, q)
            let ours = try Tools.run(exe, ["img", "amend", "-o", c.options, s])
            let what = "\(c.v2 ? "v2" : "v3") -o \(c.options)"
            #expect(theirs.status == 0 && ours.status == 0, "\(what): \(ours.stderr) / \(theirs.stderr)")
            let (mine, qemu) = (try info(s), try info(q))
            #expect(mine == qemu, "\(what):\nours \(mine)\ntheirs \(qemu)")
            #expect(try Tools.qemuImg("check", s).status == 0, "\(what): qemu-img check")
            #expect(try Tools.qemuImg("compare", q, s).status == 0, "\(what): same data")
        }
    }

    @Test("refused with qemu-img's reason (or ours where we do less), the image unchanged: lazy refcounts on v2, creation-only options, the backing file, bad levels, raw images, no -o, a downgrade with zero clusters over a backing file")
    func refused() throws {
        guard let exe = Tools.swiftkvm else { Issue.record("swiftkvm executable not built next to the tests (swift build)"); return }
        let d = try TempDir()
        let cases: [(String, String)] = [
            ("lazy_refcounts=on,compat=0.10", "Lazy refcounts only supported with compatibility level 1.1"),
            ("cluster_size=4k", "Invalid parameter 'cluster_size'"), ("preallocation=full", "Invalid parameter 'preallocation'"),
            ("foo=1", "Invalid parameter 'foo'"), ("compat=2", "Unknown compatibility level 2"),
            ("backing_file=/x", "Cannot amend the backing file"), ("refcount_bits=8", "refcount_bits"),
        ]
        for (options, reason) in cases {
            let p = try makeV3(d)
            let before = try info(p)
            let r = try Tools.run(exe, ["img", "amend", "-o", options, p])
            #expect(r.status == 1 && r.stderr.contains(reason), "\(options): \(r.status) \(r.stderr)")
            #expect(try info(p) == before, "\(options): unchanged")
        }
        let p = try makeV3(d)
        var r = try Tools.run(exe, ["img", "amend", p])
        #expect(r.status == 1 && r.stderr.contains("Must specify options (-o)"), "\(r.stderr)")
        try Tools.qemuImg("create", "-q", "-f", "raw", d.file("r.raw"), "1M")
        r = try Tools.run(exe, ["img", "amend", "-o", "size=2M", d.file("r.raw")])
        #expect(r.status == 1 && r.stderr.contains("does not support option amendment"), "\(r.stderr)")
        // Downgrading while growing over a longer backing file: the new range reads as zeros, not as the backing's
        // data (the resize runs after the version change, so it writes zeros as data).
        try Tools.qemuImg("create", "-q", "-f", "qcow2", d.file("long.qcow2"), "20M")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 9 0 20M", d.file("long.qcow2"))
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", d.file("long.qcow2"), "-F", "qcow2", d.file("short.qcow2"), "10M")
        r = try Tools.run(exe, ["img", "amend", "-o", "compat=0.10,size=20M", d.file("short.qcow2")])
        #expect(r.status == 0, "\(r.stderr)")
        let tail = try Tools.qemuIO("-f", "qcow2", "-c", "read -P 0 10M 10M", d.file("short.qcow2"))
        #expect(tail.stdout.contains("read 10485760/10485760"), "the grown range reads zeros: \(tail.stdout) \(tail.stderr)")
        #expect(try Tools.qemuImg("check", d.file("short.qcow2")).status == 0)
        // A version 2 image with internal snapshots: the upgrade is refused, nothing changed.
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", d.file("snap.qcow2"), "1M")
        try Tools.qemuImg("snapshot", "-c", "s1", d.file("snap.qcow2"))
        let snapBefore = try info(d.file("snap.qcow2"))
        r = try Tools.run(exe, ["img", "amend", "-o", "compat=1.1", d.file("snap.qcow2")])
        #expect(r.status == 1 && r.stderr.contains("internal snapshots"), "\(r.stderr)")
        #expect(try info(d.file("snap.qcow2")) == snapBefore)
        // Zero clusters over a backing file: version 2 cannot say "zero here"; refused, nothing changed.
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", p, "-F", "qcow2", d.file("top.qcow2"))
        try Tools.qemuIO("-f", "qcow2", "-c", "write -z 0 64k", d.file("top.qcow2"))
        let before = try info(d.file("top.qcow2"))
        r = try Tools.run(exe, ["img", "amend", "-o", "compat=0.10", d.file("top.qcow2")])
        #expect(r.status == 1 && r.stderr.contains("zero clusters"), "\(r.stderr)")
        #expect(try info(d.file("top.qcow2")) == before)
        #expect(try Tools.qemuImg("check", d.file("top.qcow2")).status == 0)
    }
}
