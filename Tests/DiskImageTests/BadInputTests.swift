import Foundation
import Testing
@testable import DiskImage

@Suite("bad input never crashes, hangs or over-allocates", .timeLimit(.minutes(5)))
struct BadInputTests {
    /// A small image with one written cluster; returns (path, L1 offset, L2 offset, data offset).
    func makeImage(_ d: TempDir, name: String = "x.qcow2") throws -> (String, UInt64, UInt64, UInt64) {
        let p = d.file(name)
        try Qcow2Image.create(path: p, options: .init(size: 4 << 20))
        let img = try Qcow2Image(path: p)
        try img.write([UInt8](repeating: 5, count: 65536), at: 0)
        let l1off = img.header.l1TableOffset
        try img.close()
        let bytes = try fileBytes(p)
        let l2 = bytes.be64(Int(l1off)) & Qcow2Limits.offsetMask
        let data = bytes.be64(Int(l2)) & Qcow2Limits.offsetMask
        return (p, l1off, l2, data)
    }

    func expectError(_ needle: String, _ body: () throws -> Void) {
        do {
            try body()
            Issue.record("expected an error containing '\(needle)'")
        } catch {
            #expect("\(error)".contains(needle), "got: \(error)")
        }
    }

    @Test("files too short for a header give a clear error; a file cut after its header opens as in qemu, reading zeros and checking as corrupt")
    func truncated() throws {
        let d = try TempDir()
        let (p, _, _, _) = try makeImage(d)
        for size in [0, 3, 71, 100] {
            let t = d.file("t\(size).qcow2")
            try Data(try fileBytes(p).prefix(size)).write(to: URL(fileURLWithPath: t))
            #expect(throws: DiskImageError.self) {
                let img = try Qcow2Image(path: t, options: .init(readOnly: true))
                _ = try img.read(at: 0, count: 4096)
            }
        }
        let t = d.file("t70000.qcow2")
        try Data(try fileBytes(p).prefix(70000)).write(to: URL(fileURLWithPath: t))
        let img = try Qcow2Image(path: t, options: .init(readOnly: true))
        #expect(try img.read(at: 0, count: 4096) == [UInt8](repeating: 0, count: 4096))
        let r = try img.check()
        #expect(r.corruptions > 0)
        #expect(r.messages.contains { $0.contains("exceeding the end of the file") }, "\(r.messages)")
    }

    @Test("an L2 entry past the end of the file reads as zeros (as in qemu), is refused for writing, and check reports it")
    func l2PastEnd() throws {
        let d = try TempDir()
        let (p, _, l2, _) = try makeImage(d)
        try patch(p, at: l2, be64((1 << 40) | (1 << 63)))
        let img = try Qcow2Image(path: p, options: .init(readOnly: true))
        #expect(try img.read(at: 0, count: 512) == [UInt8](repeating: 0, count: 512))
        let r = try img.check()
        // The reference past the end, and the COPIED flag of a cluster whose refcount is 0 (as qemu-img counts them).
        #expect(r.corruptions == 2, "\(r.messages)")
        #expect(r.messages.contains { $0.contains("offset 0x10000000000") }, "\(r.messages)")
        let w = try Qcow2Image(path: p)
        expectError("table at offset \(l2)") { try w.write([1, 2, 3], at: 0) }
        expectError("past the end of the file") { try w.write([1, 2, 3], at: 0) }
    }

    @Test("misaligned data and compressed entries pointing into the header are rejected")
    func l2IntoHeader() throws {
        let d = try TempDir()
        let (p, _, l2, _) = try makeImage(d)
        try patch(p, at: l2, be64(512 | (1 << 63)))
        let img = try Qcow2Image(path: p, options: .init(readOnly: true))
        expectError("not cluster aligned") { _ = try img.read(at: 0, count: 512) }
        try patch(p, at: l2, be64((1 << 62) | 100))
        let img2 = try Qcow2Image(path: p, options: .init(readOnly: true))
        expectError("points into the header") { _ = try img2.read(at: 0, count: 512) }
    }

    @Test("an L1 entry past the end of the file or a refcount table entry into the header open (as in qemu); writes that need them are refused by name; check finds them and -r all repairs the refcount table")
    func l1AndRefcountEntries() throws {
        let d = try TempDir()
        let (p, l1, _, _) = try makeImage(d)
        let good = try fileBytes(p)
        try patch(p, at: l1, be64((1 << 50) | (1 << 63)))
        let img = try Qcow2Image(path: p, options: .init(readOnly: true))
        #expect(try img.read(at: 0, count: 512) == [UInt8](repeating: 0, count: 512))
        #expect(try img.check().corruptions > 0)
        let w = try Qcow2Image(path: p)
        expectError("L1 entry 0") { try w.write([1], at: 0) }
        try Data(good).write(to: URL(fileURLWithPath: p))
        let h = try Qcow2Header(bytes: good, path: p, fileSize: UInt64(good.count))
        try patch(p, at: h.refcountTableOffset, be64(0x200))
        let img2 = try Qcow2Image(path: p)
        #expect(try img2.read(at: 0, count: 512) == [UInt8](repeating: 5, count: 512))
        expectError("refcount block at offset 512") { try img2.write([UInt8](repeating: 1, count: 65536), at: 1 << 20); try img2.flush() }
        let r = try img2.check()
        #expect(r.messages.contains { $0.contains("refcount block 0 is not cluster aligned") }, "\(r.messages)")
        let fixed = try img2.check(repair: .all)
        #expect(fixed.corruptions == 0 && fixed.leaks == 0 && fixed.checkErrors == 0, "\(fixed.messages)")
        try img2.write([UInt8](repeating: 7, count: 4096), at: 2 << 20)
        try img2.close()
        let again = try Qcow2Image(path: p)
        #expect(try again.read(at: 0, count: 512) == [UInt8](repeating: 5, count: 512))
        #expect(try again.read(at: 2 << 20, count: 4096) == [UInt8](repeating: 7, count: 4096))
        let final = try again.check()
        #expect(final.corruptions == 0 && final.leaks == 0, "\(final.messages)")
    }

    @Test("an L2 table overlapping the refcount table is found by check as corruption")
    func overlappingTables() throws {
        let d = try TempDir()
        let (p, l1, _, _) = try makeImage(d)
        let good = try fileBytes(p)
        let h = try Qcow2Header(bytes: good, path: p, fileSize: UInt64(good.count))
        try patch(p, at: l1, be64(h.refcountTableOffset | (1 << 63)))
        let img = try Qcow2Image(path: p, options: .init(readOnly: true))
        let r = try img.check()
        #expect(r.corruptions > 0)
    }

    @Test("absurd sizes in a real file are refused before allocating")
    func absurdSizes() throws {
        let d = try TempDir()
        let (p, _, _, _) = try makeImage(d)
        try patch(p, at: 36, be32(0x7fff_ffff))  // l1_size
        expectError("l1_size") { _ = try Qcow2Image(path: p, options: .init(readOnly: true)) }
        let (p2, _, _, _) = try makeImage(d, name: "y.qcow2")
        try patch(p2, at: 56, be32(0xffff_ffff))  // refcount_table_clusters
        expectError("refcount_table_clusters") { _ = try Qcow2Image(path: p2, options: .init(readOnly: true)) }
        let (p3, _, _, _) = try makeImage(d, name: "z.qcow2")
        try patch(p3, at: 60, be32(0xffff_ffff))  // nb_snapshots
        expectError("nb_snapshots") { _ = try Qcow2Image(path: p3, options: .init(readOnly: true)) }
        let (p4, _, _, _) = try makeImage(d, name: "w.qcow2")
        try patch(p4, at: 16, be32(0xffff_ffff))  // backing name length, with an offset
        try patch(p4, at: 8, be64(2000))
        expectError("backing file name length") { _ = try Qcow2Image(path: p4, options: .init(readOnly: true)) }
    }

    @Test("the corrupt bit forbids opening for writing")
    func corruptBit() throws {
        let d = try TempDir()
        let (p, _, _, _) = try makeImage(d)
        try patch(p, at: 72, be64(1 << 1))
        expectError("marked corrupt") { _ = try Qcow2Image(path: p) }
        let ro = try Qcow2Image(path: p, options: .init(readOnly: true))
        #expect(try ro.read(at: 0, count: 2) == [5, 5])
    }

    @Test("a backing chain cycle is detected")
    func cycle() throws {
        let d = try TempDir()
        var a = Qcow2CreateOptions(size: 1 << 20)
        a.backingFile = "b.qcow2"
        a.backingFormat = "qcow2"
        var b = a
        b.backingFile = "a.qcow2"
        try Qcow2Image.create(path: d.file("a.qcow2"), options: a)
        expectError("b.qcow2") { _ = try Qcow2Image(path: d.file("a.qcow2")) }  // b missing: clear open error
        try Qcow2Image.create(path: d.file("b.qcow2"), options: b)
        do {
            _ = try Qcow2Image(path: d.file("a.qcow2"))
            Issue.record("cycle not detected")
        } catch let e as DiskImageError {
            #expect(e.kind == .backingChain && e.message.contains("cycle"))
        }
    }

    @Test("a backing chain of depth 1000 is refused as too deep")
    func deepChain() throws {
        let d = try TempDir()
        try RawImage.create(path: d.file("0.img"), size: 65536).close()
        for i in 1...1000 {
            var o = Qcow2CreateOptions(size: 65536)
            o.clusterSize = 512
            o.backingFile = i == 1 ? "0.img" : "\(i - 1).qcow2"
            o.backingFormat = i == 1 ? "raw" : "qcow2"
            try Qcow2Image.create(path: d.file("\(i).qcow2"), options: o)
        }
        do {
            _ = try Qcow2Image(path: d.file("1000.qcow2"), options: .init(readOnly: true))
            Issue.record("deep chain accepted")
        } catch let e as DiskImageError {
            #expect(e.kind == .backingChain && e.message.contains("deeper than 256"))
        }
        // 200 deep is fine.
        let ok = try Qcow2Image(path: d.file("200.qcow2"), options: .init(readOnly: true))
        #expect(try ok.read(at: 0, count: 4) == [0, 0, 0, 0])
    }

    @Test("random byte corruption of an image never crashes")
    func randomCorruption() throws {
        let d = try TempDir()
        let (p, _, _, _) = try makeImage(d)
        let good = try fileBytes(p)
        var g = SplitMix(seed: 5)
        for _ in 0..<300 {
            var bad = good
            for _ in 0..<Int.random(in: 1...8, using: &g) {
                let at = Int.random(in: 0..<min(bad.count, 6 * 65536), using: &g)
                bad[at] = UInt8.random(in: 0...255, using: &g)
            }
            let t = d.file("r.qcow2")
            try Data(bad).write(to: URL(fileURLWithPath: t))
            if let img = try? Qcow2Image(path: t, options: .init(readOnly: true, allowBackingFiles: false)) {
                _ = try? img.read(at: 0, count: 128 << 10)
                _ = try? img.check()
                _ = try? img.snapshots()
            }
        }
    }
}
