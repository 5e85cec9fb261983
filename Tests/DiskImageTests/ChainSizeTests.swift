import Foundation
import Testing
@testable import DiskImage

/// Every write operation of `swiftkvm img` on backing chains whose images differ in size, and sizes that are not a
/// multiple of 512, judged by qemu-img and qemu-io: no byte the guest could see may be lost or changed, and where
/// qemu-img does the same operation the results must compare identical.
@Suite("img write operations across chains of different sizes (judged by qemu-img)",
       .enabled(if: Tools.interopEnabled, "qemu-img/qemu-io not installed (scripts/install-deps installs qemu-utils; CI=1 turns this into a failure)"))
struct ChainSizeTests {
    /// Runs `swiftkvm img ARGS…`.
    @discardableResult
    func img(_ args: String...) throws -> ToolResult {
        try Tools.run(Tools.swiftkvm, ["img"] + args, name: "swiftkvm")
    }

    /// Expects a tool run to have succeeded, showing its output otherwise.
    func expectOK(_ r: ToolResult, _ what: String, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(r.status == 0, "\(what): exit \(r.status)\n\(r.stdout)\(r.stderr)", sourceLocation: sourceLocation)
    }

    func virtualSize(_ path: String) throws -> UInt64? { try qemuVirtualSize(path) }

    @Test("commit into a smaller base grows the base first (the issue's reproduction)", arguments: ["qcow2", "raw"])
    func commitGrowsBase(baseFormat: String) throws {
        let d = try TempDir()
        let base = d.file("b.\(baseFormat)"), top = d.file("o.qcow2")
        try Tools.qemuImg("create", "-q", "-f", baseFormat, base, "32M")
        try Tools.qemuIO("-f", baseFormat, "-c", "write -P 1 0 32M", base)
        expectOK(try img("create", "-q", "-f", "qcow2", "-b", "b.\(baseFormat)", "-F", baseFormat, top, "64M"), "create")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 2 40M 1M", "-c", "write -P 3 31M 2M", top)
        try Tools.qemuImg("convert", "-O", "raw", top, d.file("expected.raw"))
        expectOK(try img("commit", top), "commit")
        #expect(try virtualSize(base) == 64 << 20)
        #expect(try Tools.qemuImg("compare", "-f", baseFormat, "-F", "raw", base, d.file("expected.raw")).status == 0)
        #expect(try Tools.qemuIO("-f", "qcow2", "-c", "read -P 2 40M 1M", top).stdout.contains("read 1048576/1048576"))
        #expect(try Tools.qemuIO("-f", "qcow2", "-c", "read -P 0 41M 23M", top).stdout.contains("read 24117248/24117248"))
        if baseFormat == "qcow2" { #expect(try Tools.qemuImg("check", base).status == 0) }
        #expect(try Tools.qemuImg("check", top).status == 0)
    }

    @Test("commit into a larger base keeps the base's size and its data past the overlay's end")
    func commitIntoLargerBase() throws {
        let d = try TempDir()
        let base = d.file("b.qcow2"), top = d.file("o.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", base, "16M")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 1 0 16M", base)
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", top, "8M")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 2 7M 1M", "-c", "write -z 0 64k", top)
        // What qemu-img commit makes of an identical copy is the judge.
        try FileManager.default.copyItem(atPath: base, toPath: d.file("qb.qcow2"))
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "qb.qcow2", "-F", "qcow2", d.file("qo.qcow2"), "8M")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 2 7M 1M", "-c", "write -z 0 64k", d.file("qo.qcow2"))
        expectOK(try img("commit", top), "commit")
        expectOK(try Tools.qemuImg("commit", "-q", d.file("qo.qcow2")), "qemu-img commit")
        #expect(try virtualSize(base) == 16 << 20)
        let cmp = try Tools.qemuImg("compare", base, d.file("qb.qcow2"))
        #expect(cmp.status == 0, "\(cmp.stdout)\(cmp.stderr)")
        #expect(try Tools.qemuImg("check", base).status == 0)
    }

    @Test("safe rebase onto a smaller or larger backing file keeps every visible byte", arguments: [2 << 20, 16 << 20] as [UInt64])
    func rebaseAcrossSizes(newBackingSize: UInt64) throws {
        let d = try TempDir()
        let top = d.file("o.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", d.file("old.qcow2"), "4M")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 1 0 4M", d.file("old.qcow2"))
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "old.qcow2", "-F", "qcow2", top, "8M")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 2 3M 64k", "-c", "write -P 4 6M 64k", top)
        try Tools.qemuImg("create", "-q", "-f", "raw", d.file("new.raw"), "\(newBackingSize)")
        try Tools.qemuIO("-f", "raw", "-c", "write -P 3 0 \(newBackingSize)", d.file("new.raw"))
        try Tools.qemuImg("convert", "-O", "raw", top, d.file("expected.raw"))
        expectOK(try img("rebase", "-b", "new.raw", "-F", "raw", top), "rebase")
        let cmp = try Tools.qemuImg("compare", "-F", "raw", top, d.file("expected.raw"))
        #expect(cmp.status == 0, "\(cmp.stdout)\(cmp.stderr)")
        #expect(try virtualSize(top) == 8 << 20)
        #expect(try Tools.qemuImg("check", top).status == 0)
    }

    @Test("resize of an overlay over a longer backing file shows zeros in the new range, as qemu-img resize does")
    func resizeOverLongerBacking() throws {
        let d = try TempDir()
        try Tools.qemuImg("create", "-q", "-f", "qcow2", d.file("b.qcow2"), "8M")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 1 0 8M", d.file("b.qcow2"))
        for name in ["ours.qcow2", "qemu.qcow2"] {
            try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", d.file(name), "4M")
            try Tools.qemuIO("-f", "qcow2", "-c", "write -P 2 1M 64k", d.file(name))
        }
        // Shrink to a size inside a cluster, then grow past the backing file's end.
        expectOK(try img("resize", "--shrink", d.file("ours.qcow2"), "1000448"), "shrink")
        expectOK(try img("resize", d.file("ours.qcow2"), "12M"), "grow")
        expectOK(try Tools.qemuImg("resize", "-q", "--shrink", d.file("qemu.qcow2"), "1000448"), "qemu shrink")
        expectOK(try Tools.qemuImg("resize", "-q", d.file("qemu.qcow2"), "12M"), "qemu grow")
        #expect(try virtualSize(d.file("ours.qcow2")) == 12 << 20)
        #expect(try Tools.qemuIO("-f", "qcow2", "-c", "read -P 0 1000448 11582464", d.file("ours.qcow2")).stdout.contains("read 11582464/11582464"))
        let cmp = try Tools.qemuImg("compare", d.file("ours.qcow2"), d.file("qemu.qcow2"))
        #expect(cmp.status == 0, "\(cmp.stdout)\(cmp.stderr)")
        #expect(try Tools.qemuImg("check", d.file("ours.qcow2")).status == 0)
    }

    @Test("resize of a qcow2 image to a size that is not a multiple of 512 is refused, as by qemu-img")
    func resizeUnaligned() throws {
        let d = try TempDir()
        try Tools.qemuImg("create", "-q", "-f", "qcow2", d.file("a.qcow2"), "1M")
        let r = try img("resize", d.file("a.qcow2"), "1500000")
        #expect(r.status == 1)
        #expect(r.stderr.contains("multiple of 512"), "\(r.stderr)")
        #expect(try Tools.qemuImg("resize", d.file("a.qcow2"), "1500000").status == 1)
        #expect(try virtualSize(d.file("a.qcow2")) == 1 << 20)
    }

    @Test("convert of a 10,000,000-byte raw file keeps its tail in qemu's view")
    func convertUnalignedRaw() throws {
        let d = try TempDir()
        var rng = SplitMix(seed: 10_000_000)
        let bytes = (0..<10_000_000).map { _ in UInt8.random(in: 1...255, using: &rng) }
        FileManager.default.createFile(atPath: d.file("src.raw"), contents: Data(bytes))
        for fmt in ["qcow2", "raw"] {
            let out = d.file("out.\(fmt)")
            expectOK(try img("convert", "-f", "raw", "-O", fmt, d.file("src.raw"), out), "convert to \(fmt)")
            #expect(try virtualSize(out) == 10_000_384)
            let cmp = try Tools.qemuImg("compare", "-f", "raw", "-F", fmt, d.file("src.raw"), out)
            #expect(cmp.status == 0, "\(fmt): \(cmp.stdout)\(cmp.stderr)")
            #expect(try Tools.qemuIO("-f", fmt, "-c", "read -P 0 10000000 384", out).stdout.contains("read 384/384"))
        }
    }

    @Test("convert of an overlay larger than its backing file equals qemu-img convert")
    func convertLargerOverlay() throws {
        let d = try TempDir()
        try Tools.qemuImg("create", "-q", "-f", "qcow2", d.file("b.qcow2"), "2M")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 1 0 2M", d.file("b.qcow2"))
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", d.file("o.qcow2"), "6M")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 2 5M 512k", d.file("o.qcow2"))
        try Tools.qemuImg("convert", "-O", "raw", d.file("o.qcow2"), d.file("expected.raw"))
        expectOK(try img("convert", "-O", "qcow2", d.file("o.qcow2"), d.file("c.qcow2")), "convert")
        #expect(try Tools.qemuImg("compare", "-F", "raw", d.file("c.qcow2"), d.file("expected.raw")).status == 0)
        #expect(try virtualSize(d.file("c.qcow2")) == 6 << 20)
    }

    @Test("snapshot apply across a resize restores the snapshot's size and data, as qemu-img snapshot -a does")
    func snapshotApplyAcrossResize() throws {
        let d = try TempDir()
        for name in ["ours.qcow2", "qemu.qcow2"] {
            try Tools.qemuImg("create", "-q", "-f", "qcow2", d.file(name), "32M")
            try Tools.qemuIO("-f", "qcow2", "-c", "write -P 1 0 32M", d.file(name))
        }
        expectOK(try img("snapshot", "-c", "s1", d.file("ours.qcow2")), "snapshot -c")
        expectOK(try img("resize", d.file("ours.qcow2"), "64M"), "resize")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 2 40M 1M", "-c", "write -P 3 0 1M", d.file("ours.qcow2"))
        expectOK(try img("snapshot", "-a", "s1", d.file("ours.qcow2")), "snapshot -a")
        try Tools.qemuImg("snapshot", "-c", "s1", d.file("qemu.qcow2"))
        try Tools.qemuImg("resize", "-q", d.file("qemu.qcow2"), "64M")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 2 40M 1M", "-c", "write -P 3 0 1M", d.file("qemu.qcow2"))
        try Tools.qemuImg("snapshot", "-a", "s1", d.file("qemu.qcow2"))
        #expect(try virtualSize(d.file("ours.qcow2")) == (try virtualSize(d.file("qemu.qcow2"))))
        let cmp = try Tools.qemuImg("compare", d.file("ours.qcow2"), d.file("qemu.qcow2"))
        #expect(cmp.status == 0, "\(cmp.stdout)\(cmp.stderr)")
        #expect(try Tools.qemuIO("-f", "qcow2", "-c", "read -P 1 0 32M", d.file("ours.qcow2")).stdout.contains("read 33554432/33554432"))
        #expect(try Tools.qemuImg("check", d.file("ours.qcow2")).status == 0)
    }

    @Test("create rounds sizes up to 512 bytes as qemu-img does", arguments: ["raw", "qcow2"])
    func createRoundsUp(format: String) throws {
        let d = try TempDir()
        expectOK(try img("create", "-q", "-f", format, d.file("ours"), "1000"), "create")
        expectOK(try Tools.qemuImg("create", "-q", "-f", format, d.file("qemu"), "1000"), "qemu-img create")
        #expect(try virtualSize(d.file("ours")) == 1024)
        #expect(try virtualSize(d.file("ours")) == (try virtualSize(d.file("qemu"))))
    }

    @Test("create with -b and no size takes the backing file's size; -b without -F is refused")
    func createFromBacking() throws {
        let d = try TempDir()
        try Tools.qemuImg("create", "-q", "-f", "qcow2", d.file("base.qcow2"), "24M")
        expectOK(try img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.qcow2", "-F", "qcow2", d.file("ov.qcow2")), "create")
        #expect(try virtualSize(d.file("ov.qcow2")) == 24 << 20)
        let check = try Tools.qemuImg("check", d.file("ov.qcow2"))
        #expect(check.status == 0, "\(check.stdout)")
        let noFormat = try img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", d.file("nf.qcow2"))
        #expect(noFormat.status == 1)
        #expect(noFormat.stderr.contains("backing format"), "\(noFormat.stderr)")
        #expect(!FileManager.default.fileExists(atPath: d.file("nf.qcow2")))
        let rebase = try img("rebase", "-b", "base.qcow2", d.file("ov.qcow2"))
        #expect(rebase.status == 1)
        #expect(rebase.stderr.contains("backing format"), "\(rebase.stderr)")
    }

    @Test("sizes in scientific notation or with a sign are refused", arguments: ["1e6", "-5", "inf", "0x100", "1.5.3"])
    func badSizes(size: String) throws {
        let d = try TempDir()
        let r = try img("create", "-q", "-f", "raw", d.file("x.raw"), size)
        #expect(r.status != 0, "size '\(size)' was taken")
        #expect(!FileManager.default.fileExists(atPath: d.file("x.raw")))
    }
}

/// The command line as qemu-img users type it.
@Suite("img command line like qemu-img's",
       .enabled(if: Tools.interopEnabled, "qemu-img/qemu-io not installed (scripts/install-deps installs qemu-utils; CI=1 turns this into a failure)"))
struct ImgCommandLineTests {
    @Test("-U is a flag (info -U --output=json works), as in qemu-img")
    func forceShare() throws {
        let d = try TempDir()
        try Tools.qemuImg("create", "-q", "-f", "qcow2", d.file("a.qcow2"), "1M")
        for args in [["info", "-U", "--output=json"], ["check", "-U"], ["map", "-U"]] {
            let r = try Tools.run(Tools.swiftkvm, ["img"] + args + [d.file("a.qcow2")], name: "swiftkvm")
            #expect(r.status == 0, "img \(args): \(r.stderr)")
        }
        let info = try Tools.run(Tools.swiftkvm, ["img", "info", "-U", "--output=json", d.file("a.qcow2")], name: "swiftkvm")
        #expect(info.stdout.contains("\"virtual-size\": 1048576"), "\(info.stdout)")
    }

    @Test("check's usage errors exit 1 as qemu-img's do, never 2 (which means corruptions)")
    func checkUsageStatus() throws {
        let d = try TempDir()
        try Tools.qemuImg("create", "-q", "-f", "qcow2", d.file("a.qcow2"), "1M")
        for args in [["-r", "bogus"], ["--no-such-option"]] {
            let ours = try Tools.run(Tools.swiftkvm, ["img", "check"] + args + [d.file("a.qcow2")], name: "swiftkvm")
            let theirs = try Tools.qemuImg(["check"] + args + [d.file("a.qcow2")])
            #expect(ours.status == 1, "img check \(args): \(ours.status) \(ours.stderr)")
            #expect(theirs.status == 1, "qemu-img check \(args): \(theirs.status)")
        }
    }

    @Test("--version and img help SUBCOMMAND answer, as qemu-img --version and qemu-img help do")
    func versionAndHelp() throws {
        let v = try Tools.run(Tools.swiftkvm, ["img", "--version"], name: "swiftkvm")
        #expect(v.status == 0 && v.stdout.hasPrefix("swiftkvm "), "\(v.stdout)\(v.stderr)")
        let h = try Tools.run(Tools.swiftkvm, ["img", "help", "convert"], name: "swiftkvm")
        #expect(h.status == 0 && h.stdout.contains("USAGE: img convert"), "\(h.stdout)\(h.stderr)")
        let bad = try Tools.run(Tools.swiftkvm, ["img", "help", "nosuch"], name: "swiftkvm")
        #expect(bad.status == 2 && bad.stderr.contains("unknown subcommand 'nosuch'"), "\(bad.stderr)")
    }

    @Test("human map output names the file that holds each extent, as qemu-img map does")
    func mapNamesHolder() throws {
        let d = try TempDir()
        try Tools.qemuImg("create", "-q", "-f", "qcow2", d.file("b.qcow2"), "4M")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 1 0 1M", d.file("b.qcow2"))
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", d.file("o.qcow2"))
        try Tools.qemuIO("-f", "qcow2", "-c", "write -P 2 2M 512k", d.file("o.qcow2"))
        let ours = try Tools.run(Tools.swiftkvm, ["img", "map", d.file("o.qcow2")], name: "swiftkvm")
        let theirs = try Tools.qemuImg("map", d.file("o.qcow2"))
        #expect(ours.status == 0, "\(ours.stderr)")
        // The same rows (offset, length, file); host offsets may differ between the two tools' layouts.
        func rows(_ text: String) -> [String] {
            text.split(separator: "\n").dropFirst().map { line in
                let f = line.split(separator: " ", omittingEmptySubsequences: true)
                return "\(f[0]) \(f[1]) \(URL(fileURLWithPath: String(f.last!)).lastPathComponent)"
            }
        }
        #expect(rows(ours.stdout) == rows(theirs.stdout), "ours:\n\(ours.stdout)\nqemu-img:\n\(theirs.stdout)")
        #expect(rows(ours.stdout).contains { $0.hasSuffix(" b.qcow2") }, "\(ours.stdout)")
    }

    @Test("compare -s: different sizes or allocation are a difference (exit 1), as in qemu-img; identical images still compare equal")
    func strictCompare() throws {
        let d = try TempDir()
        try Tools.qemuImg("create", "-q", "-f", "qcow2", d.file("a.qcow2"), "1M")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", d.file("big.qcow2"), "2M")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", d.file("z.qcow2"), "1M")
        try Tools.qemuIO("-f", "qcow2", "-c", "write -z 64k 64k", d.file("z.qcow2"))
        for (other, strictStatus, plainStatus) in [("big.qcow2", Int32(1), Int32(0)), ("z.qcow2", 1, 0), ("a.qcow2", 0, 0)] {
            let theirs = try Tools.qemuImg("compare", "-s", d.file("a.qcow2"), d.file(other))
            let ours = try Tools.run(Tools.swiftkvm, ["img", "compare", "-s", d.file("a.qcow2"), d.file(other)], name: "swiftkvm")
            #expect(theirs.status == strictStatus, "qemu-img compare -s a \(other): \(theirs.status)")
            #expect(ours.status == theirs.status, "img compare -s a \(other): \(ours.status) \(ours.stdout)\(ours.stderr)")
            #expect(ours.status == 0 || ours.stdout.hasPrefix("Strict mode: "), "\(ours.stdout)")
            let plain = try Tools.run(Tools.swiftkvm, ["img", "compare", d.file("a.qcow2"), d.file(other)], name: "swiftkvm")
            #expect(plain.status == plainStatus, "img compare a \(other): \(plain.status)")
        }
    }

    @Test("create -o preallocation=falloc|full reserves the host space like qemu-img's, reads as zeroes and checks clean",
          arguments: ["raw:falloc", "raw:full", "qcow2:falloc", "qcow2:full", "qcow2:metadata"])
    func preallocation(spec: String) throws {
        let d = try TempDir()
        let parts = spec.split(separator: ":").map(String.init)
        let (format, mode) = (parts[0], parts[1])
        let ours = d.file("ours.\(format)"), theirs = d.file("theirs.\(format)"), empty = d.file("empty.raw")
        let r = try Tools.run(Tools.swiftkvm, ["img", "create", "-q", "-f", format, "-o", "preallocation=\(mode)", ours, "8M"], name: "swiftkvm")
        #expect(r.status == 0, "\(r.stderr)")
        try Tools.qemuImg("create", "-q", "-f", format, "-o", "preallocation=\(mode)", theirs, "8M")
        try Tools.qemuImg("create", "-q", "-f", "raw", empty, "8M")
        #expect(try Tools.qemuImg("compare", "-F", "raw", ours, empty).status == 0)
        if format == "qcow2" { #expect(try Tools.qemuImg("check", ours).status == 0) }
        let (a, b) = (try qemuActualSize(ours), try qemuActualSize(theirs))
        if mode == "metadata" {
            #expect(a < 8 << 20, "metadata preallocation keeps the file sparse: \(a) bytes")
        } else {
            #expect(a >= 8 << 20 && b >= 8 << 20, "host space reserved: ours \(a), qemu-img's \(b) bytes")
        }
    }

    @Test("resize --preallocation preallocates only the part the resize adds, as qemu-img resize does",
          arguments: ["raw:falloc", "raw:full", "qcow2:metadata", "qcow2:falloc", "qcow2:full"])
    func resizePreallocation(spec: String) throws {
        let d = try TempDir()
        let parts = spec.split(separator: ":").map(String.init)
        let (format, mode) = (parts[0], parts[1])
        let image = d.file("disk.\(format)")
        try Tools.qemuImg("create", "-q", "-f", format, image, "4M")
        try Tools.qemuIO("-f", format, "-c", "write -P 9 0 64k", image)
        let r = try Tools.run(Tools.swiftkvm, ["img", "resize", "-f", format, "--preallocation=\(mode)", image, "12M"], name: "swiftkvm")
        #expect(r.status == 0, "\(r.stderr)")
        #expect(try qemuVirtualSize(image) == 12 << 20)
        // The old data is intact, the added part reads as zeroes.
        #expect(try Tools.qemuIO("-f", format, "-c", "read -P 9 0 64k", "-c", "read -P 0 4M 8M", image).stdout.contains("read 8388608/8388608"))
        if format == "qcow2" {
            #expect(try Tools.qemuImg("check", image).status == 0)
            // Preallocated: the added 8 MiB is allocated in the image, the old unwritten part is not.
            let map = try Tools.qemuImg("map", "--output=json", image).stdout
            #expect(map.contains("\"start\": 4194304") && map.contains("\"data\": true"), "\(map)")
        }
        let actual = try qemuActualSize(image)
        if mode != "metadata" { #expect(actual >= 8 << 20, "the added part's host space is reserved: \(actual) bytes") }
        #expect(actual < 12 << 20 + (1 << 20), "the old part was not preallocated too: \(actual) bytes")
    }

    @Test("create -o help lists the options of the format, as qemu-img does")
    func optionHelp() throws {
        for format in ["qcow2", "raw"] {
            let r = try Tools.run(Tools.swiftkvm, ["img", "create", "-f", format, "-o", "help"], name: "swiftkvm")
            #expect(r.status == 0, "\(r.stderr)")
            #expect(r.stdout.hasPrefix("Supported \(format) options:") && r.stdout.contains("preallocation=<str>"), "\(r.stdout)")
            // Every key we list, qemu-img lists too (with a file name it adds the file protocol's, as preallocation).
            let theirs = try Tools.qemuImg("create", "-f", format, "-o", "help", "/tmp/swiftkvm-option-help.\(format)").stdout
            for line in r.stdout.split(separator: "\n").dropFirst() {
                let key = line.trimmingCharacters(in: .whitespaces).split(separator: "=").first.map(String.init) ?? ""
                #expect(theirs.contains("  \(key)="), "qemu-img does not list \(key) for \(format)")
            }
        }
    }

    @Test("an unknown -o key names the keys that exist")
    func unknownCreateOption() throws {
        let d = try TempDir()
        let r = try Tools.run(Tools.swiftkvm, ["img", "create", "-f", "qcow2", "-o", "clustersize=4096", d.file("x.qcow2"), "1M"], name: "swiftkvm")
        #expect(r.status != 0)
        #expect(r.stderr.contains("'clustersize'") && r.stderr.contains("cluster_size"), "\(r.stderr)")
    }
}

/// A number from `qemu-img info --output=json` for the image at `path`.
func qemuInfoNumber(_ path: String, _ key: String) throws -> UInt64? {
    let r = try Tools.qemuImg("info", "-U", "--output=json", path)
    guard let obj = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any] else { return nil }
    return (obj[key] as? NSNumber)?.uint64Value
}

/// The virtual size qemu-img reports for the image at `path`.
func qemuVirtualSize(_ path: String) throws -> UInt64? { try qemuInfoNumber(path, "virtual-size") }

/// The host bytes qemu-img reports the image's file takes ("actual-size"), 0 when it reports none.
func qemuActualSize(_ path: String) throws -> UInt64 { try qemuInfoNumber(path, "actual-size") ?? 0 }
