import Foundation
import Testing
@testable import DiskImage

@Suite("qcow2 header encoding and validation")
struct HeaderTests {
    func sample() -> Qcow2Header {
        var h = Qcow2Header()
        h.clusterBits = 16
        h.virtualSize = 1 << 30
        h.l1Size = 2
        h.l1TableOffset = 3 << 16
        h.refcountTableOffset = 1 << 16
        h.refcountTableClusters = 1
        h.backingFile = "base.qcow2"
        h.backingFormat = "qcow2"
        return h
    }

    @Test("a version 3 header round-trips field by field with extensions and backing name")
    func roundTrip() throws {
        let h = sample()
        var bytes = try h.encode()
        bytes += [UInt8](repeating: 0, count: 65536 - bytes.count)
        let d = try Qcow2Header(bytes: bytes, path: "t", fileSize: 4 << 16)
        #expect(d.version == 3)
        #expect(d.virtualSize == 1 << 30)
        #expect(d.l1TableOffset == 3 << 16)
        #expect(d.backingFile == "base.qcow2")
        #expect(d.backingFormat == "qcow2")
        #expect(d.headerLength == UInt32(Qcow2Header.size))
        #expect(d.extensions.contains { $0.type == 0x6803_f857 })
    }

    @Test("a version 2 header round-trips")
    func roundTripV2() throws {
        var h = sample()
        h.version = 2
        var bytes = try h.encode()
        #expect(bytes.count >= Qcow2Header.v2Size)
        bytes += [UInt8](repeating: 0, count: 65536 - bytes.count)
        let d = try Qcow2Header(bytes: bytes, path: "t", fileSize: 4 << 16)
        #expect(d.version == 2)
        #expect(d.refcountBits == 16)
        #expect(d.backingFile == "base.qcow2")
    }

    func expectCorrupt(_ mutate: (inout [UInt8]) -> Void, fileSize: UInt64 = 4 << 16, _ needle: String) throws {
        var bytes = try sample().encode()
        bytes += [UInt8](repeating: 0, count: 65536 - bytes.count)
        mutate(&bytes)
        do {
            _ = try Qcow2Header(bytes: bytes, path: "img", fileSize: fileSize)
            Issue.record("expected an error containing '\(needle)'")
        } catch let e as DiskImageError {
            #expect(e.message.contains(needle), "message: \(e.message)")
        }
    }

    @Test("bad magic is rejected naming offset 0")
    func badMagic() throws { try expectCorrupt({ $0[0] = 0 }, "bad magic") }

    @Test("a truncated header is rejected")
    func truncated() throws {
        #expect(throws: DiskImageError.self) { try Qcow2Header(bytes: [0x51, 0x46, 0x49, 0xfb], path: "t", fileSize: 4) }
    }

    @Test("cluster bits outside 9...21 are rejected")
    func clusterBits() throws {
        try expectCorrupt({ $0.replaceSubrange(20..<24, with: be32(22)) }, "cluster_bits 22")
        try expectCorrupt({ $0.replaceSubrange(20..<24, with: be32(8)) }, "cluster_bits 8")
    }

    @Test("an absurd L1 size is rejected before any allocation")
    func hugeL1() throws {
        try expectCorrupt({ $0.replaceSubrange(36..<40, with: be32(0xffff_ffff)) }, "l1_size")
    }

    @Test("an absurd virtual size is rejected")
    func hugeSize() throws {
        try expectCorrupt({ $0.replaceSubrange(24..<32, with: be64(UInt64.max)) }, "virtual size")
    }

    @Test("a refcount table past the end of the file is accepted (qemu reads zeros there and check reports it); one past any possible offset is rejected")
    func refcountPastEnd() throws {
        var bytes = try sample().encode()
        bytes += [UInt8](repeating: 0, count: 65536 - bytes.count)
        bytes.replaceSubrange(48..<56, with: be64(1 << 40))
        #expect(try Qcow2Header(bytes: bytes, path: "img", fileSize: 4 << 16).refcountTableOffset == 1 << 40)
        try expectCorrupt({ $0.replaceSubrange(48..<56, with: be64(0xffff_ffff_ffff_0000)) }, "past the end")
    }

    @Test("a table at offset 0 (inside the header) is rejected")
    func tableInHeader() throws {
        try expectCorrupt({ $0.replaceSubrange(48..<56, with: be64(0)) }, "overlaps the header")
    }

    @Test("overlapping L1 and refcount tables are rejected")
    func overlap() throws {
        try expectCorrupt({ $0.replaceSubrange(40..<48, with: be64(1 << 16)) }, "overlaps the refcount table")
    }

    @Test("unknown incompatible features are refused with their bits named")
    func unknownIncompatible() throws {
        var bytes = try sample().encode()
        bytes += [UInt8](repeating: 0, count: 65536 - bytes.count)
        bytes.replaceSubrange(72..<80, with: be64(1 << 40))
        #expect { try Qcow2Header(bytes: bytes, path: "t", fileSize: 4 << 16) } throws: {
            ($0 as? DiskImageError)?.kind == .unsupported && "\($0)".contains("0x10000000000")
        }
    }

    @Test("external data files are refused")
    func externalData() throws {
        var bytes = try sample().encode()
        bytes += [UInt8](repeating: 0, count: 65536 - bytes.count)
        bytes.replaceSubrange(72..<80, with: be64(1 << 2))
        #expect { try Qcow2Header(bytes: bytes, path: "t", fileSize: 4 << 16) } throws: {
            "\($0)".contains("external data")
        }
    }

    @Test("an oversized header extension is rejected")
    func badExtension() throws {
        try expectCorrupt({ b in
            let at = Qcow2Header.size
            b.replaceSubrange((at + 4)..<(at + 8), with: be32(1 << 20))
        }, "header extension")
    }

    @Test("refcounts of every width encode and decode")
    func refcountWidths() {
        for order in 0...6 {
            let bits = UInt64(1) << UInt64(order)
            var block = [UInt8](repeating: 0, count: 512)
            let n = 512 * 8 / Int(bits)
            let maxV: UInt64 = bits == 64 ? .max : (1 << bits) - 1
            for i in 0..<n { Qcow2Image.setRefcount(&block, i, bits: bits, UInt64(i * 7) & maxV) }
            for i in 0..<n { #expect(Qcow2Image.getRefcount(block, i, bits: bits) == UInt64(i * 7) & maxV) }
        }
    }
}

@Suite("compressed cluster codecs")
struct CodecTests {
    @Test("zlib and zstd round-trip a cluster and reject garbage")
    func roundTrip() throws {
        let input = (0..<65536).map { UInt8(truncatingIfNeeded: $0 / 100) }
        for type in [Qcow2CompressionType.zlib, .zstd] {
            let packed = try #require(input.withUnsafeBytes { Qcow2Codec.compress(type, $0) })
            #expect(packed.count < input.count)
            var out = [UInt8](repeating: 0, count: 65536)
            try out.withUnsafeMutableBytes { try Qcow2Codec.decompress(type, packed + [0, 0, 0], into: $0, path: "t", offset: 0) }
            #expect(out == input)
            #expect(throws: DiskImageError.self) {
                try out.withUnsafeMutableBytes { try Qcow2Codec.decompress(type, [1, 2, 3, 4, 5], into: $0, path: "t", offset: 9) }
            }
        }
    }

    @Test("random data is not compressed")
    func incompressible() {
        var g = SplitMix(seed: 3)
        let input = (0..<4096).map { _ in UInt8.random(in: 0...255, using: &g) }
        #expect(input.withUnsafeBytes { Qcow2Codec.compress(.zlib, $0) } == nil)
    }
}
