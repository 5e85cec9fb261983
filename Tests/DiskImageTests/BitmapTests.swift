import Foundation
import Testing
@testable import DiskImage

/// Persistent dirty bitmaps, judged by qemu-img 7.2: the same `bitmap` operations and writes on two copies of an image,
/// one by qemu-img/qemu-io and one by us, must leave bitmaps that qemu-img info lists identically, with the same
/// bits, in images qemu-img check calls clean.
@Suite("persistent dirty bitmaps (judged by qemu-img)",
       .enabled(if: Tools.interopEnabled, "qemu-img/qemu-io not installed (scripts/install-deps installs qemu-utils; CI=1 turns this into a failure)"))
struct BitmapTests {
    func ours(_ args: [String]) throws -> ToolResult { try Tools.run(Tools.swiftkvm, ["img"] + args, name: "swiftkvm") }

    /// format-specific.data.bitmaps of qemu-img info.
    func qemuBitmaps(_ path: String) throws -> String {
        let r = try Tools.qemuImg("info", "-U", "--output=json", path)
        guard let d = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any],
              let fs = d["format-specific"] as? [String: Any], let data = fs["data"] as? [String: Any] else { return "unreadable: \(r.stderr)" }
        guard let b = data["bitmaps"] else { return "none" }
        return String(decoding: try JSONSerialization.data(withJSONObject: b, options: [.sortedKeys]), as: UTF8.self)
    }

    /// Every bitmap's bits as our library reads them.
    func bits(_ path: String) throws -> [String: [UInt8]] {
        let img = try Qcow2Image(path: path, options: .init(readOnly: true, ignoreBackingFile: true))
        defer { try? img.close() }
        var out: [String: [UInt8]] = [:]
        for b in try img.bitmaps() { out[b.name] = try img.bitmapData(b.name) }
        return out
    }

    func expectSame(_ q: String, _ o: String, _ step: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        #expect(try qemuBitmaps(q) == qemuBitmaps(o), "\(step): qemu-img info bitmaps differ", sourceLocation: sourceLocation)
        #expect(try bits(q) == bits(o), "\(step): bitmap bits differ", sourceLocation: sourceLocation)
        let cq = try Tools.qemuImg("check", q), co = try Tools.qemuImg("check", o)
        #expect(cq.status == 0 && co.status == 0, "\(step): qemu-img check: qemu's \(cq.status), ours \(co.status) \(co.stderr)", sourceLocation: sourceLocation)
    }

    @Test("img bitmap --add/--disable/--merge/--enable/--clear/--remove and our writes leave the bitmaps qemu-img's do")
    func operations() throws {
        let d = try TempDir()
        let q = d.file("q.qcow2"), o = d.file("o.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", q, "8M")
        try FileManager.default.copyItem(atPath: q, toPath: o)
        func both(_ args: [String], _ step: String) throws {
            let a = try Tools.qemuImg(["bitmap"] + args.map { $0 == "IMG" ? q : $0 })
            let b = try ours(["bitmap"] + args.map { $0 == "IMG" ? o : $0 })
            #expect(a.status == 0 && b.status == 0, "\(step): qemu-img \(a.status) \(a.stderr), ours \(b.status) \(b.stderr)")
            try expectSame(q, o, step)
        }
        try both(["--add", "IMG", "b0"], "add b0")
        try both(["--add", "-g", "128k", "--disable", "IMG", "b1"], "add disabled b1 with 128k granularity")
        #expect(try qemuBitmaps(o).contains("\"granularity\":131072"))
        // qemu writes to both: the enabled bitmap tracks them when qemu has the image.
        for p in [q, o] { try Tools.qemuIO("-f", "qcow2", "-c", "write -P 1 0 100k", "-c", "write 1M 4k", p) }
        try expectSame(q, o, "qemu-io writes")
        #expect(try bits(o)["b0"]?.first == 0b11)
        try both(["--merge", "b0", "IMG", "b1"], "merge b0 into b1")
        try both(["--enable", "IMG", "b1"], "enable b1")
        try both(["--disable", "IMG", "b0"], "disable b0")
        // The same writes, by qemu-io on its copy and by our library on ours: b1 tracks them, b0 does not.
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 2 2M 64k", "-c", "write -z 3M 128k", "-c", "write -P 3 7M 1k", q)
        let img = try Qcow2Image(path: o)
        try img.write([UInt8](repeating: 2, count: 65536), at: 2 << 20)
        try img.writeZeroes(at: 3 << 20, length: 128 << 10)
        try img.write([UInt8](repeating: 3, count: 1024), at: 7 << 20)
        #expect(try Tools.qemuImg("info", "-U", "--output=json", o).stdout.contains("in-use"), "an enabled bitmap is marked in use while we have the image open for writing")
        try img.close()
        try expectSame(q, o, "writes tracked by b1")
        try both(["--clear", "IMG", "b0"], "clear b0")
        try both(["--add", "--merge", "b1", "IMG", "b2"], "add b2 and merge b1 into it in one call")
        try both(["--remove", "IMG", "b0"], "remove b0")
        #expect(try qemuBitmaps(o).contains("b2") && !qemuBitmaps(o).contains("b0"))
        // check -r leaks keeps the bitmaps (their clusters are counted, not leaked).
        let r = try ours(["check", "-r", "leaks", o])
        #expect(r.status == 0, "\(r.stdout)\(r.stderr)")
        try expectSame(q, o, "after our check -r leaks")
    }

    @Test("bitmaps are kept across resize and snapshot creation, as qemu-img keeps them")
    func keptAcrossWrites() throws {
        let d = try TempDir()
        let q = d.file("q.qcow2"), o = d.file("o.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", q, "4M")
        try Tools.qemuImg("bitmap", "--add", q, "live")
        try Tools.qemuImg("bitmap", "--add", "--disable", "-g", "64k", q, "frozen")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 1 0 8k", q)
        try FileManager.default.copyItem(atPath: q, toPath: o)
        try expectSame(q, o, "copies")
        try Tools.qemuImg("snapshot", "-c", "s1", q)
        #expect(try ours(["snapshot", "-c", "s1", o]).status == 0)
        #expect(try qemuBitmaps(q) == qemuBitmaps(o))
        try Tools.qemuImg("resize", q, "8M")
        #expect(try ours(["resize", o, "8M"]).status == 0)
        try expectSame(q, o, "after resize to 8M")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 2 6M 4k", q)
        let img = try Qcow2Image(path: o)
        try img.write([UInt8](repeating: 2, count: 4096), at: 6 << 20)
        try img.close()
        try expectSame(q, o, "a write past the old end")
        #expect(try bits(o)["live"].map { $0.count } == (8 << 20) / 4096 / 8)  // the default granularity: the 4 KiB cluster size
    }

    @Test("img bitmap refuses what qemu-img refuses: a v2 image, a missing bitmap, a duplicate name, a bad granularity")
    func refusals() throws {
        let d = try TempDir()
        let v2 = d.file("v2.qcow2"), v3 = d.file("v3.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "1M")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", v3, "1M")
        for args in [["--add", v2, "b"], ["--remove", v3, "nope"], ["--add", "-g", "1000", v3, "b"], ["--merge", "nope", v3, "x"]] {
            let q = try Tools.qemuImg(["bitmap"] + args), o = try ours(["bitmap"] + args)
            #expect(q.status != 0 && o.status == q.status, "\(args): qemu-img \(q.status), ours \(o.status) \(o.stderr)")
        }
        #expect(try ours(["bitmap", "--add", v3, "b"]).status == 0)
        let dup = try ours(["bitmap", "--add", v3, "b"])
        #expect(dup.status == 1 && dup.stderr.contains("already exists"), "\(dup.stderr)")
        #expect(try Tools.qemuImg("bitmap", "--add", v3, "b").status == 1)
    }
}
