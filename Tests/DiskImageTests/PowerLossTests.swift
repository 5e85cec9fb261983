import Foundation
import Testing
@testable import DiskImage
import SwiftKVMTestSupport

/// Power loss, simulated: a SIGKILL leaves the page cache intact, so it cannot show a missing or misordered
/// fdatasync. Here every change the writer makes to the image is logged (Tests/Tools/write_log.c, an LD_PRELOAD
/// library in the spirit of device-mapper's log-writes target, which this host's kernel lacks), and the image is
/// rebuilt as a disk could have left it at a power cut: everything up to the last completed flush, plus any subset
/// of the writes issued after it (a disk may lose or reorder what was never flushed). Each such image must pass
/// `qemu-img check` without corruption (leaks are allowed) and hold every write the writer saw acknowledged.
@Suite("power loss: replayed write logs (raw and qcow2)", .serialized,
       .enabled(if: Tools.interopEnabled, "qemu-img not installed (CI=1 turns this into a failure)"),
       .timeLimit(.minutes(10)))
struct PowerLossTests {
    struct Record {
        var type: UInt8
        var a: UInt64
        var b: UInt64
        var data: Data
    }

    /// Parses the write log: 17-byte headers ('W'/'F'/'T'/'Z'/'M', two little-endian words), 'W' followed by data.
    static func parse(_ log: Data) throws -> [Record] {
        var records: [Record] = []
        var i = log.startIndex
        func word(_ at: Int) -> UInt64 {
            var v: UInt64 = 0
            for k in 0..<8 { v |= UInt64(log[at + k]) << (8 * UInt64(k)) }
            return v
        }
        while i < log.endIndex {
            try #require(log.endIndex - i >= 17, "truncated record at \(i)")
            let type = log[i], a = word(i + 1), b = word(i + 9)
            i += 17
            var data = Data()
            if type == UInt8(ascii: "W") {
                try #require(log.endIndex - i >= Int(b), "truncated write data at \(i)")
                data = log.subdata(in: i..<i + Int(b))
                i += Int(b)
            }
            records.append(Record(type: type, a: a, b: b, data: data))
        }
        return records
    }

    /// Applies `records` to the file at `path`.
    static func apply(_ records: [Record], to path: String) throws {
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        defer { try? h.close() }
        for r in records {
            switch r.type {
            case UInt8(ascii: "W"):
                try h.seek(toOffset: r.a)
                try h.write(contentsOf: r.data)
            case UInt8(ascii: "T"):
                try h.truncate(atOffset: r.a)
            case UInt8(ascii: "Z"):
                let end = try h.seekToEnd()
                guard r.a < end else { continue }
                try h.seek(toOffset: r.a)
                try h.write(contentsOf: Data(count: Int(min(r.b, end - r.a))))
            default:
                break
            }
        }
    }

    /// Builds an LD_PRELOAD library from Tests/Tools.
    static func buildShim(_ name: String, in dir: TempDir) throws -> String {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        let out = dir.file("\(name).so")
        let r = try Tools.run("/usr/bin/cc", ["-shared", "-fPIC", "-O2", "-o", out, root.appendingPathComponent("Tools/\(name).c").path, "-ldl"], name: "cc")
        try #require(r.status == 0, "cc: \(r.stderr)")
        return out
    }

    @Test("every power-cut image of a crash-writer run passes qemu-img check and keeps every acknowledged write",
          arguments: ["raw", "qcow2", "qcow2:cluster_size=4096", "qcow2:lazy_refcounts=on,cluster_size=4096"])
    func replay(format spec: String) throws {
        let helper = try #require(Tools.testHelper, "swiftkvm-test-helper not built next to the tests (swift build)")
        let d = try TempDir()
        let shim = try Self.buildShim("write_log", in: d)
        let parts = spec.split(separator: ":", maxSplits: 1).map(String.init)
        let format = parts[0]
        let image = d.file("disk.\(format)")
        var create = ["create", "-q", "-f", format]
        if parts.count > 1 { create += ["-o", parts[1]] }
        try Tools.run(Tools.qemuImg, create + [image, "16M"], name: "qemu-img")
        let base = try Data(contentsOf: URL(fileURLWithPath: image))
        let log = d.file("writes.log")

        // The writer: 150 writes of the crash plan, a flush every 3, through the DiskImage library.
        let p = Process()
        p.executableURL = URL(fileURLWithPath: helper)
        p.arguments = ["crash-writer", "--seed", "7", "--count", "150", "--flush-every", "3", image]
        var env = ProcessInfo.processInfo.environment
        env["LD_PRELOAD"] = shim
        env["WRITELOG_TARGET"] = image
        env["WRITELOG_PATH"] = log
        p.environment = env
        p.standardOutput = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        try #require(p.terminationStatus == 0, "crash-writer failed with status \(p.terminationStatus)")
        let records = try Self.parse(try Data(contentsOf: URL(fileURLWithPath: log)))
        let flushes = records.indices.filter { records[$0].type == UInt8(ascii: "F") }
        let markers = records.indices.filter { records[$0].type == UInt8(ascii: "M") }
        try #require(flushes.count >= 50, "only \(flushes.count) flushes were logged: is the shim working?")
        try #require(markers.count == 50, "\(markers.count) acknowledgement markers, expected 50")

        var rng = SplitMix(seed: 0x5eed ^ UInt64(spec.utf8.count))
        // Crash points: the window between each pair of consecutive flushes (sampled), and the end.
        var windows = Array(zip([-1] + flushes, flushes + [records.count]))
        if windows.count > 32 {
            let step = Double(windows.count) / 32
            windows = (0..<32).map { windows[Int(Double($0) * step)] } + [windows.last!]
        }
        var checked = 0
        for (durableEnd, nextFlush) in windows {
            // Acknowledged before this crash: the last marker before the next flush (its flushes all completed).
            let acked = markers.filter { $0 < nextFlush }.map { Int(records[$0].a) }.max() ?? 0
            let pending = Array(records[(durableEnd + 1)..<nextFlush])
            for attempt in 0..<2 {
                // Attempt 0 loses every pending write; attempt 1 keeps a random subset of them, in order.
                let kept = attempt == 0 ? [] : pending.filter { _ in Bool.random(using: &rng) }
                let state = d.file("state.\(format)")
                try base.write(to: URL(fileURLWithPath: state))
                try Self.apply(Array(records[0..<(durableEnd + 1)]) + kept, to: state)
                let where_ = "\(spec): power cut after record \(durableEnd) (+\(kept.count) of \(pending.count) pending), \(acked) writes acknowledged"
                if spec.contains("lazy_refcounts=on") {
                    // Lazy refcounts are rebuilt after a crash (qemu does it when it opens the dirty image):
                    // the repaired image must be clean.
                    let repair = try Tools.qemuImg("check", "-r", "all", state)
                    #expect(repair.status == 0, "\(where_): qemu-img check -r all exit \(repair.status)\n\(repair.stdout)\(repair.stderr)")
                    if repair.status != 0 { return }
                } else if format == "qcow2" {
                    let check = try Tools.qemuImg("check", "--output=json", state)
                    #expect(check.status == 0 || check.status == 3, "\(where_): qemu-img check exit \(check.status)\n\(check.stdout)\(check.stderr)")
                    if check.status != 0 && check.status != 3 { return }
                }
                let img = try openDiskImage(path: state, options: .init(readOnly: true, format: format))
                defer { try? img.close() }
                for i in 0..<acked {
                    let (off, len) = CrashPlan.write(i, seed: 7)
                    let got = try img.read(at: off, count: len)
                    if got != CrashPlan.pattern(i, length: len) {
                        Issue.record("\(where_): acknowledged write \(i) at \(off)+\(len) was lost")
                        return
                    }
                }
                checked += 1
            }
        }
        #expect(checked >= 60)
    }
}
