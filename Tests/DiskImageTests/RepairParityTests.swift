import Foundation
import Testing
@testable import DiskImage

/// A corpus of damaged qcow2 images, generated from a fixed seed: base images made by qemu-img and qemu-io in several
/// layouts, each given one kind of damage (bit flips, truncations, overwritten entries, wrong refcounts…).
struct DamagedImageCorpus {
    /// The kinds of damage, one per case in turn.
    enum Damage: String, CaseIterable {
        case unusedRefTableBitFlip, truncated, l2EntryPastEnd, l1ReservedBits, l2ReservedBits, refBlockTwice,
             misalignedZeroEntry, leakedCluster, wrongRefcount, metadataBitFlip, copiedFlagFlip, overwrittenEntry,
             refTableIntoData, l2TableRefcountZero
    }

    /// qemu-img create options and qemu-io commands of each base layout.
    static let layouts: [(name: String, create: [String], size: String, io: [String], snapshot: Bool)] = [
        ("4k", ["-o", "cluster_size=4096"], "4M",
         ["write -P 1 0 64k", "write -P 2 1M 8k", "write -c -P 3 2M 4k", "write -z 8k 4k", "write -P 4 3M 4k"], false),
        ("512", ["-o", "cluster_size=512"], "1M",
         ["write -P 1 0 8k", "write -P 2 300k 2k", "write -c -P 3 600k 512", "write -P 5 900k 1k"], true),
        ("64k-snap", [], "16M", ["write -P 1 0 256k", "write -P 2 8M 64k", "write -c -P 3 12M 64k"], true),
        ("v2", ["-o", "compat=0.10,cluster_size=4096"], "2M", ["write -P 1 0 16k", "write -P 2 1M 4k"], true),
        ("rc1", ["-o", "cluster_size=4096,refcount_bits=1"], "2M", ["write -P 1 0 16k", "write -z 4k 4k", "write -P 2 1M 4k"], false),
        ("rc64", ["-o", "cluster_size=4096,refcount_bits=64"], "2M", ["write -P 1 0 16k", "write -P 2 1M 4k"], true),
        ("ext-l2", ["-o", "cluster_size=32768,extended_l2=on"], "4M",
         ["write -P 1 0 40k", "write -P 2 1M 2k", "write -z 64k 32k", "write -c -P 3 2M 32k"], false),
    ]

    /// Makes the base images in `dir`; returns their paths in layout order.
    static func makeBases(in dir: TempDir) throws -> [String] {
        try layouts.map { l in
            let p = dir.file("base-\(l.name).qcow2")
            try Tools.qemuImg(["create", "-q", "-f", "qcow2"] + l.create + [p, l.size])
            for c in l.io { try Tools.qemuIO("-f", "qcow2", "-c", c, p) }
            if l.snapshot {
                try Tools.qemuImg("snapshot", "-c", "s1", p)
                try Tools.qemuIO("-f", "qcow2", "-c", "write -P 9 0 4k", p)
            }
            return p
        }
    }

    /// Where the metadata of an image is (parsed from its bytes).
    struct Layout {
        var cs: UInt64, l1Offset: UInt64, l1Size: Int, rtOffset: UInt64, rtEntries: Int, refBits: UInt64
        var l2Tables: [UInt64] = []
        var refBlocks: [UInt64] = []
        /// (file offset of the entry, entry) of allocated standard (non-compressed) L2 entries.
        var dataEntries: [(UInt64, UInt64)] = []
        var l2EntryOffsets: [UInt64] = []

        init(_ b: [UInt8]) {
            cs = 1 << UInt64(b.be32(20))
            l1Size = Int(b.be32(36))
            l1Offset = b.be64(40)
            rtOffset = b.be64(48)
            rtEntries = Int(UInt64(b.be32(56)) * cs / 8)
            refBits = b.be32(4) == 3 ? 1 << UInt64(b.be32(96)) : 16
            let entrySize: UInt64 = b.be32(4) == 3 && b.be64(72) & (1 << 4) != 0 ? 16 : 8
            for i in 0..<l1Size {
                let l2 = b.be64(Int(l1Offset) + i * 8) & Qcow2Limits.offsetMask
                if l2 == 0 || l2 + cs > UInt64(b.count) { continue }
                l2Tables.append(l2)
                for k in 0..<Int(cs / entrySize) {
                    let at = l2 + UInt64(k) * entrySize
                    l2EntryOffsets.append(at)
                    let e = b.be64(Int(at))
                    if e & (1 << 62) == 0 && e & Qcow2Limits.offsetMask != 0 { dataEntries.append((at, e)) }
                }
            }
            for i in 0..<rtEntries {
                let e = b.be64(Int(rtOffset) + i * 8)
                if e != 0 { refBlocks.append(e & ~UInt64(0x1ff)) }
            }
        }

        /// File offset and bit position of cluster `c`'s refcount.
        func refcountPosition(_ c: UInt64) -> (block: Int, bit: UInt64)? {
            let perBlock = cs * 8 / refBits
            let ti = Int(c / perBlock)
            guard ti < refBlocks.count else { return nil }
            return (ti, (c % perBlock) * refBits)
        }
    }

    static func setRefcount(_ b: inout [UInt8], _ l: Layout, cluster c: UInt64, _ v: UInt64) {
        guard let (ti, bit) = l.refcountPosition(c) else { return }
        let base = Int(l.refBlocks[ti])
        if l.refBits >= 8 {
            let n = Int(l.refBits / 8)
            let at = base + Int(bit / 8)
            for k in 0..<n { b[at + k] = UInt8(truncatingIfNeeded: v >> UInt64(8 * (n - 1 - k))) }
        } else {
            let at = base + Int(bit / 8)
            let mask = UInt8(((1 << l.refBits) - 1) << (bit % 8))
            b[at] = (b[at] & ~mask) | (UInt8(truncatingIfNeeded: v << (bit % 8)) & mask)
        }
    }

    /// Applies damage `kind` to the image bytes `b`, choosing where with `rng`. Returns a description.
    static func damage(_ b: inout [UInt8], _ kind: Damage, _ rng: inout SplitMix) -> String {
        let l = Layout(b)
        let cs = l.cs
        func put(_ at: UInt64, _ v: UInt64) {
            guard Int(at) + 8 <= b.count else { return }
            for k in 0..<8 { b[Int(at) + k] = UInt8(truncatingIfNeeded: v >> UInt64(56 - 8 * k)) }
        }
        func get(_ at: UInt64) -> UInt64 { Int(at) + 8 <= b.count ? b.be64(Int(at)) : 0 }
        let clusters = UInt64(b.count) / cs
        switch kind {
        case .unusedRefTableBitFlip:
            let i = l.refBlocks.count + Int(rng.next() % UInt64(max(1, l.rtEntries - l.refBlocks.count)))
            let bit = rng.next() % 64
            put(l.rtOffset + UInt64(i) * 8, get(l.rtOffset + UInt64(i) * 8) ^ (1 << bit))
            return "refcount table entry \(i): bit \(bit) flipped"
        case .truncated:
            let keep = cs + rng.next() % (UInt64(b.count) - cs)
            let aligned = rng.next() % 2 == 0 ? keep / cs * cs : keep
            b = Array(b.prefix(Int(max(aligned, 512))))
            return "truncated to \(b.count) bytes"
        case .l2EntryPastEnd:
            guard let (at, e) = l.dataEntries.randomElement(using: &rng) else { return "none" }
            let off = (UInt64(b.count) / cs + 1 + rng.next() % 64) * cs
            put(at, (e & ~Qcow2Limits.offsetMask) | off)
            return "L2 entry at \(at) points to \(off), past the end"
        case .l1ReservedBits:
            let used = (0..<l.l1Size).filter { get(l.l1Offset + UInt64($0) * 8) != 0 }
            guard let i = used.randomElement(using: &rng) else { return "none" }
            let reserved: [UInt64] = Array(1...8) + Array(56...62)
            let bit = reserved.randomElement(using: &rng)!
            put(l.l1Offset + UInt64(i) * 8, get(l.l1Offset + UInt64(i) * 8) | (1 << bit))
            return "L1 entry \(i): reserved bit \(bit) set"
        case .l2ReservedBits:
            guard let at = (rng.next() % 2 == 0 ? l.dataEntries.map(\.0) : l.l2EntryOffsets).randomElement(using: &rng) else { return "none" }
            let reserved: [UInt64] = Array(1...8) + Array(56...61)
            let bit = reserved.randomElement(using: &rng)!
            put(at, get(at) | (1 << bit))
            return "L2 entry at \(at): reserved bit \(bit) set"
        case .refBlockTwice:
            if rng.next() % 2 == 0 && l.rtEntries > l.refBlocks.count {
                let i = l.refBlocks.count
                put(l.rtOffset + UInt64(i) * 8, l.refBlocks[0])
                return "refcount table entry \(i) also points to refcount block 0"
            }
            guard let l2 = l.l2Tables.randomElement(using: &rng) else { return "none" }
            put(l.rtOffset + UInt64(l.refBlocks.count) * 8, l2)
            return "a refcount table entry points to the L2 table at \(l2)"
        case .misalignedZeroEntry:
            guard cs > 512 else {
                // 512-byte clusters cannot be misaligned: use a zero flag on an entry past the end instead.
                guard let (at, e) = l.dataEntries.randomElement(using: &rng) else { return "none" }
                put(at, e | 1)
                return "L2 entry at \(at) gets the zero flag"
            }
            let pick = rng.next() % 3
            let at: UInt64
            let base: UInt64
            if pick == 0, let (a, e) = l.dataEntries.randomElement(using: &rng) {
                at = a; base = e & Qcow2Limits.offsetMask
            } else {
                at = l.l2EntryOffsets.randomElement(using: &rng) ?? l.l1Offset
                base = (1 + rng.next() % max(1, clusters)) * cs
            }
            let mis = base + 512 * (1 + rng.next() % (cs / 512 - 1))
            let data = rng.next() % 4 == 0  // sometimes without the zero flag: a misaligned data entry
            put(at, mis | (data ? 0 : 1) | (rng.next() % 2 == 0 ? 1 << 63 : 0))
            return "L2 entry at \(at) = misaligned offset \(mis)\(data ? "" : " with the zero flag")"
        case .leakedCluster:
            let n = 1 + rng.next() % 4
            for _ in 0..<n {
                let c = clusters + rng.next() % 8
                setRefcount(&b, l, cluster: rng.next() % 3 == 0 ? c : c - 1 - rng.next() % 2, 1)
            }
            return "\(n) refcounts raised near the end"
        case .wrongRefcount:
            let c = 1 + rng.next() % max(1, clusters - 1)
            let v: UInt64 = [0, 2, 3, 1].randomElement(using: &rng)!
            setRefcount(&b, l, cluster: c, min(v, l.refBits == 64 ? v : (1 << l.refBits) - 1))
            return "refcount of cluster \(c) set to \(v)"
        case .metadataBitFlip:
            var regions: [(UInt64, UInt64)] = [(l.l1Offset, UInt64(l.l1Size) * 8), (l.rtOffset, UInt64(l.refBlocks.count) * 8)]
            regions += l.l2Tables.map { ($0, cs) } + l.refBlocks.map { ($0, cs) }
            let (off, len) = regions.filter { $0.1 > 0 }.randomElement(using: &rng)!
            let at = Int(off + rng.next() % len)
            guard at < b.count else { return "none" }
            let bit = rng.next() % 8
            b[at] ^= 1 << UInt8(bit)
            return "bit \(bit) of byte \(at) flipped"
        case .copiedFlagFlip:
            if rng.next() % 2 == 0, let (at, e) = l.dataEntries.randomElement(using: &rng) {
                put(at, e ^ (1 << 63))
                return "COPIED flipped in the L2 entry at \(at)"
            }
            let used = (0..<l.l1Size).filter { get(l.l1Offset + UInt64($0) * 8) != 0 }
            guard let i = used.randomElement(using: &rng) else { return "none" }
            put(l.l1Offset + UInt64(i) * 8, get(l.l1Offset + UInt64(i) * 8) ^ (1 << 63))
            return "COPIED flipped in L1 entry \(i)"
        case .overwrittenEntry:
            let v = rng.next() & [0xffff_ffff_ffff_ffff, 0x00ff_ffff_ffff_fe00, 0x0000_0000_00ff_f000, 0x8000_0000_000f_f000].randomElement(using: &rng)!
            let at: UInt64
            switch rng.next() % 3 {
            case 0: at = l.l1Offset + (rng.next() % UInt64(max(1, l.l1Size))) * 8
            case 1: at = l.l2EntryOffsets.randomElement(using: &rng) ?? l.l1Offset
            default: at = l.rtOffset + (rng.next() % UInt64(max(1, l.refBlocks.count + 1))) * 8
            }
            put(at, v)
            return "entry at \(at) overwritten with 0x\(String(v, radix: 16))"
        case .refTableIntoData:
            guard let (_, e) = l.dataEntries.randomElement(using: &rng) else { return "none" }
            let i = rng.next() % 2 == 0 ? 0 : l.refBlocks.count
            put(l.rtOffset + UInt64(i) * 8, e & Qcow2Limits.offsetMask)
            return "refcount table entry \(i) points to a data cluster"
        case .l2TableRefcountZero:
            guard let l2 = l.l2Tables.randomElement(using: &rng) else { return "none" }
            setRefcount(&b, l, cluster: l2 / cs, 0)
            return "refcount of the L2 table at \(l2) set to 0"
        }
    }
}

/// The verdicts and repairs of `swiftkvm img` against qemu-img 7.2's on the damaged-image corpus: what `check` says
/// (exit code, counts), what reads back (`convert -O raw`), and whether `check -r leaks|all` ends in an image that
/// qemu-img check calls clean wherever qemu-img's own repair gets there, and never claims success when it does not.
@Suite("check and repair of damaged images, judged by qemu-img",
       .enabled(if: Tools.interopEnabled, "qemu-img/qemu-io not installed (scripts/install-deps installs qemu-utils; CI=1 turns this into a failure)"),
       .timeLimit(.minutes(20)))
struct RepairParityTests {
    static let seed: UInt64 = 0x5157_4b56_4d10
    static let cases = 224

    func ours(_ args: [String]) throws -> ToolResult { try Tools.run(Tools.swiftkvm, ["img"] + args, name: "swiftkvm") }

    func counts(_ json: String) -> (Int, Int) {
        guard let d = try? JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any] else { return (-1, -1) }
        return ((d["corruptions"] as? Int) ?? 0, (d["leaks"] as? Int) ?? 0)
    }

    /// What the corpus measured.
    struct Stats {
        var cases = 0
        var verdictSame = 0, countsSame = 0, infoSame = 0
        var verdictDiff: [String] = [], infoDiff: [String] = []
        var qemuReads = 0, oursReads = 0, readMismatch: [String] = []
        var cleaned: [String: (qemu: Int, ours: Int)] = ["all": (0, 0), "leaks": (0, 0)]
        var missed: [String] = [], falseClaims: [String] = [], dataDiffers: [String] = [], grown: [String] = []

        func summary(_ what: String) -> String {
            """
            \(what): \(cases) images; check verdict (exit code) same as qemu-img: \(verdictSame), with same \
            corruption and leak counts: \(countsSame); info exit code same: \(infoSame); \
            qemu reads \(qemuReads), ours reads \(oursReads) of those, read mismatches: \(readMismatch.count); \
            -r all cleaned: qemu \(cleaned["all"]!.qemu), ours \(cleaned["all"]!.ours); \
            -r leaks cleaned: qemu \(cleaned["leaks"]!.qemu), ours \(cleaned["leaks"]!.ours); \
            qemu clean but ours not: \(missed.count); false success claims: \(falseClaims.count); \
            repaired data differs: \(dataDiffers.count); files grown by our repair: \(grown.count)
            """
        }
    }

    /// Runs both tools on one damaged image (bytes `b`) and records the comparison.
    func evaluate(_ b: [UInt8], name: String, at p: String, into st: inout Stats) throws {
        st.cases += 1
        try Data(b).write(to: URL(fileURLWithPath: p))
        defer { try? FileManager.default.removeItem(atPath: p) }

        // info and check
        let qi = try Tools.qemuImg("info", "--output=json", p)
        let oi = try ours(["info", "--output=json", p])
        if qi.status == oi.status { st.infoSame += 1 } else { st.infoDiff.append("\(name): qemu \(qi.status), ours \(oi.status) \(oi.stderr.prefix(300))\(qi.stderr.prefix(300))") }
        let q = try Tools.qemuImg("check", "--output=json", p)
        let o = try ours(["check", "--output=json", p])
        if q.status == o.status { st.verdictSame += 1 } else { st.verdictDiff.append("\(name): qemu \(q.status), ours \(o.status) \(o.stderr.prefix(300)) / qemu: \(q.stderr.prefix(300))") }
        if q.status == o.status && counts(q.stdout) == counts(o.stdout) { st.countsSame += 1 }

        // reading
        let qr = try Tools.qemuImg("convert", "-O", "raw", p, p + ".q.raw")
        let or = try ours(["convert", "-O", "raw", p, p + ".o.raw"])
        if qr.status == 0 {
            st.qemuReads += 1
            if or.status == 0 {
                st.oursReads += 1
                if try fileBytes(p + ".q.raw") != fileBytes(p + ".o.raw") { st.readMismatch.append("\(name): different bytes") }
            } else {
                st.readMismatch.append("\(name): qemu reads, ours: \(or.stderr.prefix(200))")
            }
        }
        try? FileManager.default.removeItem(atPath: p + ".q.raw")
        try? FileManager.default.removeItem(atPath: p + ".o.raw")

        // repair
        for mode in ["all", "leaks"] {
            let qp = p + ".q-\(mode)", op = p + ".o-\(mode)"
            try Data(b).write(to: URL(fileURLWithPath: qp))
            try Data(b).write(to: URL(fileURLWithPath: op))
            defer {
                try? FileManager.default.removeItem(atPath: qp)
                try? FileManager.default.removeItem(atPath: op)
            }
            try Tools.qemuImg("check", "-r", mode, qp)
            let qAfter = try Tools.qemuImg("check", qp).status
            let oRepair = try ours(["check", "-r", mode, op])
            let oAfter = try Tools.qemuImg("check", op)
            // A repair never grows a file far beyond what qemu's repair leaves (a damaged entry can point terabytes
            // away).
            let qSize = try FileManager.default.attributesOfItem(atPath: qp)[.size] as? UInt64 ?? 0
            let oSize = try FileManager.default.attributesOfItem(atPath: op)[.size] as? UInt64 ?? 0
            if oSize > max(qSize, UInt64(b.count)) + (16 << 20) { st.grown.append("\(name) -r \(mode): ours \(oSize) bytes, qemu's \(qSize)") }
            if qAfter == 0 { st.cleaned[mode]!.qemu += 1 }
            if oAfter.status == 0 { st.cleaned[mode]!.ours += 1 }
            if qAfter == 0 && oAfter.status != 0 {
                st.missed.append("\(name) -r \(mode): qemu's repair is clean, ours leaves exit \(oAfter.status): \(oAfter.stderr.prefix(300)) / ours said \(oRepair.status): \(oRepair.stderr.prefix(300))")
            }
            if oRepair.status == 0 && oAfter.status != 0 {
                st.falseClaims.append("\(name) -r \(mode): ours exited 0, qemu-img check exits \(oAfter.status): \(oAfter.stderr.prefix(300))")
            }
            if qAfter == 0 && oAfter.status == 0 && mode == "all" {
                // Both repaired images read the same through qemu (or fail the same way).
                let a = try Tools.qemuImg("convert", "-O", "raw", qp, qp + ".raw")
                let b = try Tools.qemuImg("convert", "-O", "raw", op, op + ".raw")
                var same = a.status == b.status
                if same && a.status == 0 { same = try fileBytes(qp + ".raw") == fileBytes(op + ".raw") }
                if !same { st.dataDiffers.append("\(name): qemu's repair reads \(a.status), ours \(b.status) \(b.stderr.prefix(200))") }
                try? FileManager.default.removeItem(atPath: qp + ".raw")
                try? FileManager.default.removeItem(atPath: op + ".raw")
            }
        }
    }

    func expectParity(_ st: Stats, sameVerdicts: Bool) {
        #expect(st.falseClaims.isEmpty, "\(st.falseClaims.prefix(10).joined(separator: "\n"))")
        #expect(st.missed.isEmpty, "\(st.missed.prefix(10).joined(separator: "\n"))")
        #expect(st.readMismatch.isEmpty, "\(st.readMismatch.prefix(10).joined(separator: "\n"))")
        #expect(st.dataDiffers.isEmpty, "\(st.dataDiffers.prefix(10).joined(separator: "\n"))")
        #expect(st.grown.isEmpty, "\(st.grown.prefix(10).joined(separator: "\n"))")
        if sameVerdicts {
            #expect(st.verdictDiff.isEmpty, "\(st.verdictDiff.prefix(10).joined(separator: "\n"))")
            #expect(st.countsSame == st.cases)
            #expect(st.infoDiff.isEmpty, "\(st.infoDiff.prefix(10).joined(separator: "\n"))")
        }
    }

    @Test("on 224 damaged images: check verdicts and counts equal qemu-img's, intact data reads back as in qemu, and repairs end clean wherever qemu's do, with no false success")
    func corpus() throws {
        let d = try TempDir()
        let bases = try DamagedImageCorpus.makeBases(in: d)
        let baseBytes = try bases.map { try fileBytes($0) }
        var st = Stats()
        let kinds = DamagedImageCorpus.Damage.allCases
        for n in 0..<Self.cases {
            var rng = SplitMix(seed: Self.seed &+ UInt64(n))
            let kind = kinds[n % kinds.count]
            let li = (n / kinds.count) % bases.count
            var b = baseBytes[li]
            let what = DamagedImageCorpus.damage(&b, kind, &rng)
            try evaluate(b, name: "case \(n) [\(DamagedImageCorpus.layouts[li].name), \(kind.rawValue)]: \(what)",
                         at: d.file("c\(n).qcow2"), into: &st)
        }
        print(st.summary("repair parity, damaged corpus (seed 0x\(String(Self.seed, radix: 16)))"))
        for m in st.verdictDiff.prefix(40) { print("verdict: \(m)") }
        expectParity(st, sameVerdicts: true)
    }

    @Test("on 100 fuzzed images (random bytes of the header and metadata overwritten, several at once): no false success, and every image qemu repairs to clean we repair to clean")
    func fuzzed() throws {
        let d = try TempDir()
        let bases = try DamagedImageCorpus.makeBases(in: d)
        let baseBytes = try bases.map { try fileBytes($0) }
        var st = Stats()
        for n in 0..<100 {
            var rng = SplitMix(seed: Self.seed ^ 0xf022 &+ UInt64(n))
            let li = n % bases.count
            var b = baseBytes[li]
            let l = DamagedImageCorpus.Layout(b)
            var regions: [(UInt64, UInt64)] = [(0, 112), (l.l1Offset, UInt64(l.l1Size) * 8), (l.rtOffset, UInt64(max(1, l.refBlocks.count)) * 8)]
            regions += l.l2Tables.map { ($0, l.cs) } + l.refBlocks.map { ($0, l.cs) }
            var what: [String] = []
            for _ in 0..<(1 + rng.next() % 4) {
                let (off, len) = regions.randomElement(using: &rng)!
                let at = Int(off + rng.next() % max(1, len))
                if at < 8 || at >= b.count { continue }  // keep the magic and version
                if rng.next() % 2 == 0 {
                    b[at] ^= 1 << UInt8(rng.next() % 8)
                    what.append("bit flip at \(at)")
                } else {
                    b[at] = UInt8(truncatingIfNeeded: rng.next())
                    what.append("byte \(at) = \(b[at])")
                }
            }
            try evaluate(b, name: "fuzz \(n) [\(DamagedImageCorpus.layouts[li].name)]: \(what.joined(separator: ", "))",
                         at: d.file("f\(n).qcow2"), into: &st)
        }
        print(st.summary("repair parity, fuzzed corpus"))
        for m in st.verdictDiff.prefix(40) { print("verdict: \(m)") }
        for m in st.infoDiff.prefix(40) { print("info: \(m)") }
        expectParity(st, sameVerdicts: false)
    }
}
