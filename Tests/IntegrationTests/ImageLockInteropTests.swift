import DiskImage
import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

// Image locking against the real qemu tools (issue 10): `swiftkvm img` against a running qemu-io, compared with
// qemu-img against the same holder; qemu-img, qemu-io and a second `swiftkvm run` against a running `swiftkvm run`.

enum LockEnv {
    static func tool(_ name: String) -> String? {
        ["/usr/bin/", "/usr/local/bin/"].map { $0 + name }.first { FileManager.default.isExecutableFile(atPath: $0) }
    }
    static let qemuImg = tool("qemu-img"), qemuIO = tool("qemu-io")
    static var ready: Bool { qemuImg != nil && qemuIO != nil && ProcessRunner.swiftkvmPath != nil }
    static var guestReady: Bool {
        ready && GuestTestEnvironment.kvmAvailable && MCSupport.ticker != nil
    }
}

/// A temporary folder of images, removed (with its files) when released.
final class LockDir {
    let path: String
    init() throws {
        path = NSTemporaryDirectory() + "swiftkvm-lock-\(getpid())-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
    func file(_ name: String) -> String { path + "/" + name }
}

@Suite("Image locking against qemu-io, qemu-img and swiftkvm run", .serialized,
       .enabled(if: LockEnv.ready, "needs qemu-img, qemu-io and the swiftkvm executable"))
struct ImageLockInteropTests {
    /// base.qcow2 (16 MiB) and overlays ov.qcow2, ov2.qcow2, ov3.qcow2 on it, made by qemu-img.
    func chain(_ d: LockDir) throws {
        _ = try qemuImg(["create", "-f", "qcow2", d.file("base.qcow2"), "16M"])
        for o in ["ov", "ov2", "ov3"] {
            let r = try qemuImg(["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d.file("\(o).qcow2")])
            try #require(r.status == 0, "\(r.stderr)")
        }
    }

    func qemuImg(_ args: [String]) throws -> ProcessRunner.Result { try ProcessRunner.run(LockEnv.qemuImg!, args, timeout: 60) }
    func img(_ args: [String]) throws -> ProcessRunner.Result { try ProcessRunner.runSwiftKVM(["img"] + args, timeout: 60) }

    /// Starts `executable` with its stdin kept open, and waits until it holds lock byte 100 on `path`.
    func holder(_ executable: String, _ args: [String], holding path: String) throws -> GuestTestProcess {
        let p = GuestTestProcess(executable: executable, arguments: args)
        try p.start()
        let end = Date().addingTimeInterval(20)
        while !ImageLock.heldBytes(path: path).contains(100) && Date() < end { Thread.sleep(forTimeInterval: 0.05) }
        try #require(ImageLock.heldBytes(path: path).contains(100), "\(p.commandLine) did not lock \(path):\n\(p.output)")
        return p
    }

    /// Runs `swiftkvm img ARGS` and `qemu-img ARGS`: the exit codes agree, and so do the messages (after the
    /// program's name) unless `sameMessage` is false. Returns our result.
    @discardableResult
    func compare(_ args: [String], expect status: Int32, sameMessage: Bool = true,
                 sourceLocation: SourceLocation = #_sourceLocation) throws -> ProcessRunner.Result {
        let ours = try img(args), theirs = try qemuImg(args)
        let what = Comment(rawValue: "img \(args.joined(separator: " "))\nours: \(ours.stderr)\nqemu-img: \(theirs.stderr)")
        #expect(ours.status == theirs.status, what, sourceLocation: sourceLocation)
        #expect(ours.status == status, what, sourceLocation: sourceLocation)
        if sameMessage {
            #expect(ours.stderr.replacingOccurrences(of: "swiftkvm img: ", with: "")
                    == theirs.stderr.replacingOccurrences(of: "qemu-img: ", with: ""), what, sourceLocation: sourceLocation)
        }
        return ours
    }

    @Test("a qemu-io writer holds ov.qcow2: img writes are refused with qemu-img's message, reads refused without -U and allowed with it, exactly as qemu-img; the locks go with qemu-io")
    func againstQemuIOWriter() throws {
        let d = try LockDir()
        try chain(d)
        let ov = d.file("ov.qcow2"), ov3 = d.file("ov3.qcow2")
        let io = try holder(LockEnv.qemuIO!, ["-f", "qcow2", ov], holding: ov)
        defer { io.kill() }
        for args in [["info", ov], ["check", ov], ["map", ov], ["snapshot", "-l", ov], ["convert", "-O", "raw", ov, d.file("x.raw")]] {
            let r = try compare(args, expect: 1)
            #expect(r.stderr.contains("Failed to get shared \"write\" lock\nIs another process using the image [\(ov)]?"), "\(r.stderr)")
        }
        try compare(["compare", ov3, ov], expect: 2)
        for args in [["resize", ov, "20M"], ["snapshot", "-c", "s1", ov], ["check", "-r", "all", ov], ["create", "-f", "qcow2", ov, "1M"]] {
            let r = try compare(args, expect: 1)
            #expect(r.stderr.contains("Failed to get \"write\" lock\nIs another process using the image [\(ov)]?"), "\(r.stderr)")
        }
        try compare(["convert", "-O", "qcow2", ov3, ov], expect: 1, sameMessage: false)
        // The base is read by qemu-io through ov: commit of another overlay into it is refused, as qemu-img refuses it.
        try compare(["commit", ov3], expect: 1)
        // -U: read-only use is allowed, writing with -U is refused.
        for args in [["info", "-U", ov], ["check", "-U", ov], ["map", "-U", "--output=json", ov], ["snapshot", "-U", "-l", ov],
                     ["compare", "-U", ov, ov3], ["convert", "-U", "-O", "raw", ov, d.file("u.raw")]] {
            try compare(args, expect: 0, sameMessage: false)
        }
        try compare(["check", "-U", "-r", "all", ov], expect: 1)
        try compare(["snapshot", "-U", "-c", "s2", ov], expect: 1)
        // Locks go away when the holder exits.
        io.closeInput()
        #expect(io.waitForExit(timeout: 20) == 0, "qemu-io exits at the end of its input")
        let after = try img(["resize", ov, "20M"])
        #expect(after.status == 0, "\(after.stderr)")
        #expect(try img(["commit", ov3]).status == 0)
        #expect(ImageLock.heldBytes(path: ov).isEmpty)
    }

    @Test("read-only holders share as qemu lets them: qemu-io -r on two overlays of one base; img and qemu-img read them, and only writes are refused")
    func readersShare() throws {
        let d = try LockDir()
        try chain(d)
        let ov = d.file("ov.qcow2"), ov2 = d.file("ov2.qcow2"), base = d.file("base.qcow2")
        let a = try holder(LockEnv.qemuIO!, ["-r", "-f", "qcow2", ov], holding: ov)
        defer { a.kill() }
        let b = try holder(LockEnv.qemuIO!, ["-r", "-f", "qcow2", ov2], holding: ov2)
        defer { b.kill() }
        for args in [["info", ov], ["check", ov], ["map", ov], ["compare", ov, ov2], ["info", "--backing-chain", ov2],
                     ["convert", "-O", "raw", ov2, d.file("c.raw")], ["check", base]] {
            try compare(args, expect: 0, sameMessage: false)
        }
        try compare(["resize", ov, "20M"], expect: 1)
        try compare(["commit", d.file("ov3.qcow2")], expect: 1)
    }

    // MARK: - swiftkvm run as the holder (/dev/kvm)

    /// `swiftkvm run` of the ticker (runs until stopped) with `disks`, once it runs (its first tick).
    func run(_ disks: [String]) throws -> GuestTestProcess {
        let p = GuestTestProcess(executable: ProcessRunner.swiftkvmPath!,
                                 arguments: ["run", "--kernel", MCSupport.ticker!, "--cmdline", MCSupport.tickerArgs(ticks: 0, periodMs: 100),
                                             "--serial", "stdio"] + disks.flatMap { ["--disk", $0] })
        try p.start()
        try #require(p.waitFor("tick 1", timeout: 30), "\(p.commandLine)\n\(p.output)")
        return p
    }

    @Test("a running swiftkvm run holds its qcow2 disk and backing file: qemu-img and qemu-io are refused, a second run exits 2 naming the disk, another overlay of the base runs alongside; all free after it stops",
          .enabled(if: LockEnv.guestReady, "needs /dev/kvm and the guest programs (make -C guest)"))
    func againstSwiftKVMRun() throws {
        let d = try LockDir()
        try chain(d)
        let ov = d.file("ov.qcow2"), base = d.file("base.qcow2")
        let vm = try run(["path=\(ov),backing_files=on"])
        defer { vm.kill() }
        #expect(ImageLock.heldBytes(path: ov) == [100, 101, 103, 201, 203], "as QEMU locks a writable qcow2 drive")
        #expect(ImageLock.heldBytes(path: base) == [100, 201, 203], "as QEMU locks a backing file")
        let info = try qemuImg(["info", ov])
        #expect(info.status == 1 && info.stderr.contains("Failed to get shared \"write\" lock"), "\(info.stderr)")
        let io = try ProcessRunner.run(LockEnv.qemuIO!, ["-f", "qcow2", "-c", "write 0 512", ov], timeout: 60)
        #expect(io.status == 1 && io.stderr.contains("Failed to get \"write\" lock"), "\(io.stderr)")
        #expect(try qemuImg(["info", "-U", ov]).status == 0)
        #expect(try qemuImg(["resize", base, "32M"]).status == 1, "the backing file is not writable meanwhile")
        #expect(try qemuImg(["commit", d.file("ov3.qcow2")]).status == 1)
        let second = try ProcessRunner.runSwiftKVM(["run", "--kernel", MCSupport.ticker!, "--cmdline", MCSupport.tickerArgs(ticks: 1),
                                                    "--disk", "path=\(ov),backing_files=on"], timeout: 60)
        #expect(second.status == 2, "\(second.stderr)")
        #expect(second.stderr.contains("'\(ov)'") && second.stderr.contains("Failed to get \"write\" lock"), "\(second.stderr)")
        #expect(!second.stdout.contains("TICKER-START"), "the refused VM never started its guest")
        // Another overlay of the same base, in use at the same time.
        let other = try run(["path=\(d.file("ov2.qcow2")),backing_files=on"])
        other.kill()
        vm.kill()
        #expect(ImageLock.heldBytes(path: ov).isEmpty && ImageLock.heldBytes(path: base).isEmpty)
        #expect(try qemuImg(["resize", ov, "20M"]).status == 0, "free once the VM stopped")
    }

    @Test("read-only disks are shared by two running VMs and qemu-io -r; a writer is refused",
          .enabled(if: LockEnv.guestReady, "needs /dev/kvm and the guest programs (make -C guest)"))
    func readOnlyVMs() throws {
        let d = try LockDir()
        let disk = d.file("d.raw")
        #expect(try qemuImg(["create", "-f", "raw", disk, "1M"]).status == 0)
        let a = try run(["path=\(disk),readonly=on"])
        defer { a.kill() }
        let b = try run(["path=\(disk),readonly=on"])
        defer { b.kill() }
        #expect(ImageLock.heldBytes(path: disk) == [100, 201], "as QEMU locks a read-only raw drive")
        #expect(try ProcessRunner.run(LockEnv.qemuIO!, ["-r", "-f", "raw", "-c", "read 0 512", disk], timeout: 60).status == 0)
        let w = try ProcessRunner.run(LockEnv.qemuIO!, ["-f", "raw", "-c", "write 0 512", disk], timeout: 60)
        #expect(w.status == 1 && w.stderr.contains("Failed to get \"write\" lock"), "\(w.stderr)")
        let rw = try ProcessRunner.runSwiftKVM(["run", "--kernel", MCSupport.ticker!, "--cmdline", MCSupport.tickerArgs(ticks: 1),
                                                "--disk", "path=\(disk)"], timeout: 60)
        #expect(rw.status == 2 && rw.stderr.contains("Failed to get \"write\" lock"), "\(rw.stderr)")
    }
}
