import Foundation
import Testing
@testable import DiskImage

@Suite("raw images")
struct RawImageTests {
    @Test("raw images read, write, zero, resize and refuse writes when read-only")
    func basics() throws {
        let d = try TempDir()
        let p = d.file("r.img")
        let img = try RawImage.create(path: p, size: 1 << 20)
        try img.write([1, 2, 3], at: 4095)
        #expect(try img.read(at: 4094, count: 5) == [0, 1, 2, 3, 0])
        try img.writeZeroes(at: 4096, length: 4096)
        #expect(try img.read(at: 4095, count: 2) == [1, 0])
        #expect(throws: DiskImageError.self) { try img.write([1], at: 1 << 20) }
        try img.resize(to: 2 << 20, allowShrink: false)
        #expect(img.size == 2 << 20)
        #expect(throws: DiskImageError.self) { try img.resize(to: 1, allowShrink: false) }
        try img.close()
        let ro = try RawImage(path: p, readOnly: true)
        #expect(throws: DiskImageError.self) { try ro.write([1], at: 0) }
        try ro.close()
    }
}

@Suite("qcow2 engine")
struct Qcow2EngineTests {
    /// Writes random patterns at random offsets, mirroring them into a model, and checks reads against it.
    func exercise(_ img: BlockBackend, model: inout [UInt8], seed: UInt64, count: Int) throws {
        var g = SplitMix(seed: seed)
        for i in 0..<count {
            let len = Int.random(in: 1...70000, using: &g)
            let off = UInt64.random(in: 0...(UInt64(model.count - len)), using: &g)
            let byte = UInt8(truncatingIfNeeded: i * 37 + 1)
            let data = [UInt8](repeating: byte, count: len)
            try img.write(data, at: off)
            model.replaceSubrange(Int(off)..<(Int(off) + len), with: data)
            if i % 7 == 0 {
                let zoff = UInt64.random(in: 0...(UInt64(model.count - 200000)), using: &g)
                try img.writeZeroes(at: zoff, length: 150000)
                model.replaceSubrange(Int(zoff)..<(Int(zoff) + 150000), with: [UInt8](repeating: 0, count: 150000))
            }
        }
    }

    @Test("random writes read back identically before and after reopening, for many layouts", arguments: [
        (65536 as UInt64, 16 as UInt32, 3 as UInt32), (512, 1, 3), (4096, 64, 3), (2 << 20, 16, 3), (1024, 2, 3), (65536, 16, 2),
    ])
    func randomWrites(_ layout: (UInt64, UInt32, UInt32)) throws {
        let d = try TempDir()
        let p = d.file("x.qcow2")
        var o = Qcow2CreateOptions(size: 6 << 20)
        o.clusterSize = layout.0
        o.refcountBits = layout.1
        o.version = layout.2
        try Qcow2Image.create(path: p, options: o)
        var model = [UInt8](repeating: 0, count: 6 << 20)
        let img = try Qcow2Image(path: p)
        try exercise(img, model: &model, seed: layout.0 ^ UInt64(layout.1), count: 40)
        #expect(try readAll(img) == model)
        let live = try img.check()
        #expect(live.corruptions == 0 && live.leaks == 0, "\(live.messages.prefix(5))")
        try img.close()
        let again = try Qcow2Image(path: p, options: .init(readOnly: true))
        #expect(try readAll(again) == model)
        let r = try again.check()
        #expect(r.corruptions == 0)
        #expect(r.leaks == 0, "\(r.messages.prefix(5))")
    }

    @Test("the refcount table grows when the image outgrows it")
    func refcountTableGrowth() throws {
        let d = try TempDir()
        let p = d.file("g.qcow2")
        var o = Qcow2CreateOptions(size: 8 << 20)
        o.clusterSize = 512
        o.refcountBits = 64  // 64 refcounts per block, 64 blocks per table cluster: 2 MiB per table cluster
        try Qcow2Image.create(path: p, options: o)
        let img = try Qcow2Image(path: p)
        let data = (0..<(8 << 20)).map { UInt8(truncatingIfNeeded: $0 >> 9 | 1) }
        try img.write(data, at: 0)
        try img.close()
        let r = try Qcow2Image(path: p, options: .init(readOnly: true))
        #expect(r.header.refcountTableClusters > 1)
        #expect(try readAll(r) == data)
        let c = try r.check()
        #expect(c.corruptions == 0 && c.leaks == 0, "\(c.messages.prefix(5))")
    }

    @Test("overlay writes copy on write and never change the backing image")
    func copyOnWrite() throws {
        let d = try TempDir()
        let base = d.file("base.qcow2")
        try Qcow2Image.create(path: base, options: .init(size: 4 << 20))
        let b = try Qcow2Image(path: base)
        let baseData = (0..<(4 << 20)).map { UInt8(truncatingIfNeeded: $0 % 251) }
        try b.write(baseData, at: 0)
        try b.close()
        let before = try fileBytes(base)
        var o = Qcow2CreateOptions(size: 4 << 20)
        o.backingFile = "base.qcow2"
        o.backingFormat = "qcow2"
        try Qcow2Image.create(path: d.file("top.qcow2"), options: o)
        let top = try Qcow2Image(path: d.file("top.qcow2"))
        var model = baseData
        try exercise(top, model: &model, seed: 9, count: 30)
        #expect(try readAll(top) == model)
        try top.close()
        #expect(try fileBytes(base) == before)
    }

    @Test("opening backing files can be disallowed")
    func backingDisallowed() throws {
        let d = try TempDir()
        try Qcow2Image.create(path: d.file("b.qcow2"), options: .init(size: 1 << 20))
        var o = Qcow2CreateOptions(size: 1 << 20)
        o.backingFile = "b.qcow2"
        try Qcow2Image.create(path: d.file("t.qcow2"), options: o)
        #expect { try Qcow2Image(path: d.file("t.qcow2"), options: .init(allowBackingFiles: false)) } throws: {
            ($0 as? DiskImageError)?.kind == .backingChain
        }
    }

    @Test("internal snapshots: create, write, apply restores, delete leaves a clean image")
    func snapshots() throws {
        let d = try TempDir()
        let p = d.file("s.qcow2")
        try Qcow2Image.create(path: p, options: .init(size: 2 << 20))
        let img = try Qcow2Image(path: p)
        try img.write([UInt8](repeating: 1, count: 300_000), at: 1000)
        let snap = try readAll(img)
        try img.createSnapshot(name: "one")
        try img.write([UInt8](repeating: 2, count: 300_000), at: 200_000)
        #expect(try readAll(img) != snap)
        try img.applySnapshot("one")
        #expect(try readAll(img) == snap)
        try img.write([UInt8](repeating: 3, count: 10), at: 0)
        try img.deleteSnapshot("one")
        #expect(try img.snapshots().isEmpty)
        let r = try img.check()
        #expect(r.corruptions == 0 && r.leaks == 0, "\(r.messages.prefix(5))")
        try img.close()
    }

    @Test("compressed clusters written for convert -c read back")
    func compressedWrites() throws {
        let d = try TempDir()
        for type in [Qcow2CompressionType.zlib, .zstd] {
            let p = d.file("c-\(type).qcow2")
            var o = Qcow2CreateOptions(size: 1 << 20)
            o.compressionType = type
            try Qcow2Image.create(path: p, options: o)
            let img = try Qcow2Image(path: p)
            let data = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 / 1000) }
            try data.withUnsafeBytes { b in
                for c in 0..<16 { try img.writeCompressedCluster(UnsafeRawBufferPointer(rebasing: b[(c * 65536)..<((c + 1) * 65536)]), at: UInt64(c) * 65536) }
            }
            try img.close()
            let r = try Qcow2Image(path: p, options: .init(readOnly: true))
            #expect(try readAll(r) == data)
            let c = try r.check()
            #expect(c.compressedClusters == 16 && c.corruptions == 0 && c.leaks == 0)
        }
    }

    @Test("lazy refcounts set the dirty bit while open and clear it on close")
    func dirtyBit() throws {
        let d = try TempDir()
        let p = d.file("l.qcow2")
        var o = Qcow2CreateOptions(size: 1 << 20)
        o.lazyRefcounts = true
        try Qcow2Image.create(path: p, options: o)
        let img = try Qcow2Image(path: p)
        try img.write([1], at: 0)
        let onDisk = try Qcow2Header(bytes: try fileBytes(p), path: p, fileSize: UInt64(try fileBytes(p).count))
        #expect(onDisk.incompatible.contains(.dirty))
        try img.close()
        let after = try fileBytes(p)
        #expect(!(try Qcow2Header(bytes: after, path: p, fileSize: UInt64(after.count))).incompatible.contains(.dirty))
    }

    @Test("growing and shrinking the virtual size")
    func resize() throws {
        let d = try TempDir()
        let p = d.file("r.qcow2")
        var o = Qcow2CreateOptions(size: 1 << 20)
        o.clusterSize = 512
        try Qcow2Image.create(path: p, options: o)
        let img = try Qcow2Image(path: p)
        try img.resize(to: 64 << 20, allowShrink: false)
        try img.write([7, 7], at: (64 << 20) - 2)
        #expect(try img.read(at: (64 << 20) - 3, count: 3) == [0, 7, 7])
        #expect(throws: DiskImageError.self) { try img.resize(to: 1 << 20, allowShrink: false) }
        try img.resize(to: 1 << 20, allowShrink: true)
        let r = try img.check()
        #expect(r.corruptions == 0 && r.leaks == 0, "\(r.messages.prefix(5))")
        try img.close()
    }
}
