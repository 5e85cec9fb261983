import Foundation
import Testing
@testable import API
@testable import VMM
#if canImport(Glibc)
import Glibc
#endif

/// Firecracker's snapshot API with real guests: the ticker program is snapshotted while it runs
/// and loaded into another VM, which must print the very next tick.
@Suite("Snapshots over the API with a real guest (/dev/kvm)", .serialized,
       .enabled(if: GuestSupport.hasKVM && GuestSupport.ticker != nil, "needs /dev/kvm and guest/build/ticker.elf"))
struct SnapshotTests {
    typealias Fixture = LifecycleTests.Fixture

    /// The tick numbers of the complete lines printed to `path`, in order (a line still being
    /// written, "tick 2" of "tick 20", is left out).
    static func tickNumbers(_ path: String) -> [Int] {
        tickNumbers(path: path, text: nil)
    }

    /// The first tick a VM snapshotted with the console at `path` prints as a whole line after it
    /// is restored: the one after the last whole line, or the one after that when the pause fell in
    /// the middle of a line (the restored VM finishes that line first, "tick 1" then "1\n").
    /// The console of a paused VM may still be on its way to the file (the console writer runs on
    /// its own thread): the file is read until it stops changing.
    static func nextWholeTick(_ path: String) -> Int {
        var text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
        for _ in 0..<20 {
            Thread.sleep(forTimeInterval: 0.2)
            let now = (try? String(contentsOfFile: path, encoding: .utf8)) ?? text
            if now == text { break }
            text = now
        }
        let unfinished = !(text.split(separator: "\n", omittingEmptySubsequences: false).last ?? "").isEmpty
        return (tickNumbers(path: nil, text: text).last ?? 0) + (unfinished ? 2 : 1)
    }

    /// The same for `text` (when given) instead of the file at `path`.
    static func tickNumbers(path: String?, text given: String?) -> [Int] {
        guard let text = given ?? path.flatMap({ try? String(contentsOfFile: $0, encoding: .utf8) }) else { return [] }
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        lines.removeLast() // after the last newline: empty, or a line not finished yet
        return lines.compactMap { $0.hasPrefix("tick ") ? Int($0.dropFirst(5)) : nil }
    }

    /// Runs the ticker until it printed at least `ticks`, pauses it and snapshots it into `dir`.
    /// Returns the last tick printed before the pause.
    static func snapshotRunningTicker(_ f: Fixture, into dir: TempDir, ticks: Int = 10) throws -> Int {
        try f.startTicker(ticks: 0)
        #expect(GuestSupport.wait(seconds: 30) { f.ticks >= ticks }, "the ticker should print ticks")
        #expect(try f.send("PATCH", "/vm", #"{"state": "Paused"}"#).status == 204)
        let r = try f.send("PUT", "/snapshot/create",
                           #"{"snapshot_type": "Full", "snapshot_path": "\#(dir.path)/vm.snap", "mem_file_path": "\#(dir.path)/vm.mem"}"#)
        #expect(r.status == 204, "snapshot/create: \(r.body)")
        return try #require(tickNumbers(f.serialPath).last)
    }

    @Test("a ticker snapshotted while it runs continues in a new VM with the next tick, no gap and no repeat; a snapshot of the loaded, never resumed VM is byte-identical")
    func continuesAfterLoad() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let first = try Fixture()
        let last = try Self.snapshotRunningTicker(first, into: dir)
        let next = Self.nextWholeTick(first.serialPath)
        try FileManager.default.copyItem(atPath: first.serialPath, toPath: dir.path + "/first.serial")
        first.shutdown()
        #expect(FileManager.default.fileExists(atPath: dir.path + "/vm.snap"))
        let memSize = (try? FileManager.default.attributesOfItem(atPath: dir.path + "/vm.mem")[.size] as? Int) ?? 0
        #expect(memSize == 64 << 20, "the memory file holds the whole 64 MiB of guest RAM")

        // Loaded paused: nothing runs, and its own snapshot equals the one it came from.
        let paused = try Fixture()
        var r = try paused.send("PUT", "/snapshot/load",
                                #"{"snapshot_path": "\#(dir.path)/vm.snap", "mem_backend": {"backend_type": "File", "backend_path": "\#(dir.path)/vm.mem"}}"#)
        #expect(r.status == 204, "snapshot/load: \(r.body)")
        #expect(try paused.send("GET", "/").json?["state"] as? String == "Paused")
        usleep(300_000)
        #expect(paused.ticks == 0, "a VM loaded without resume_vm must not run")
        r = try paused.send("PUT", "/snapshot/create", #"{"snapshot_path": "\#(dir.path)/again.snap", "mem_file_path": "\#(dir.path)/again.mem"}"#)
        #expect(r.status == 204, "\(r.body)")
        let a = try SnapshotFile.read(dir.path + "/vm.snap"), b = try SnapshotFile.read(dir.path + "/again.snap")
        // The TSC (MSR 0x10) keeps counting while a VM exists, paused or not; the rest is equal.
        func withoutTSC(_ v: [VCPUState]) -> [VCPUState] { v.map { var s = $0; s.msrs.removeAll { $0.index == 0x10 }; return s } }
        #expect(withoutTSC(a.vcpus) == withoutTSC(b.vcpus), "vCPU state round trip")
        #expect(a.vcpus[0].msrs.contains { $0.index == 0x10 }, "the TSC is saved")
        #expect(a.devices == b.devices, "device state round trip")
        #expect(a.vm.picMaster == b.vm.picMaster && a.vm.picSlave == b.vm.picSlave && a.vm.ioapic == b.vm.ioapic)
        #expect(FileManager.default.contentsEqual(atPath: dir.path + "/vm.mem", andPath: dir.path + "/again.mem"),
                "guest memory round trip")
        // Resumed, it prints the tick after the last one before the snapshot.
        #expect(try paused.send("PATCH", "/vm", #"{"state": "Resumed"}"#).status == 204)
        #expect(GuestSupport.wait(seconds: 30) { paused.ticks >= 5 })
        paused.shutdown()

        // Loaded with resume_vm: runs at once.
        let second = try Fixture()
        defer { second.shutdown() }
        r = try second.send("PUT", "/snapshot/load",
                            #"{"snapshot_path": "\#(dir.path)/vm.snap", "mem_backend": {"backend_type": "File", "backend_path": "\#(dir.path)/vm.mem"}, "resume_vm": true}"#)
        #expect(r.status == 204, "snapshot/load: \(r.body)")
        #expect(try second.send("GET", "/").json?["state"] as? String == "Running")
        #expect(GuestSupport.wait(seconds: 30) { second.ticks >= 10 }, "the restored ticker should keep printing")
        // The pause may fall in the middle of a line ("tick 1" before, "1\n" after): the two consoles
        // together must read as one sequence.
        let before = (try? String(contentsOfFile: dir.path + "/first.serial", encoding: .utf8)) ?? ""
        let afterText = (try? String(contentsOfFile: second.serialPath, encoding: .utf8)) ?? ""
        let all = (before + afterText).split(separator: "\n", omittingEmptySubsequences: false).dropLast()
            .compactMap { $0.hasPrefix("tick ") ? Int($0.dropFirst(5)) : nil }
        let after = Self.tickNumbers(second.serialPath)
        #expect(all.count > last && all.first == 1, "\(all.prefix(30))")
        #expect(zip(all, all.dropFirst()).allSatisfy { $1 == $0 + 1 }, "ticks across the snapshot: \(all.prefix(60))")
        #expect(after.first == next, "the first whole tick after the load is \(after.first ?? -1), the last before it \(last)")
    }

    @Test("bad snapshot requests and files are 400s naming the problem, and leave the VM as it was")
    func badInput() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let f = try Fixture()
        // create before start, and while running.
        var r = try f.send("PUT", "/snapshot/create", #"{"snapshot_path": "\#(dir.path)/x.snap", "mem_file_path": "\#(dir.path)/x.mem"}"#)
        #expect(r.status == 400)
        try f.startTicker(ticks: 0)
        #expect(GuestSupport.wait(seconds: 30) { f.ticks >= 3 })
        r = try f.send("PUT", "/snapshot/create", #"{"snapshot_path": "\#(dir.path)/x.snap", "mem_file_path": "\#(dir.path)/x.mem"}"#)
        #expect(r.status == 400 && r.fault?.contains("not paused") == true, "\(r.body)")
        #expect(try f.send("PATCH", "/vm", #"{"state": "Paused"}"#).status == 204)
        r = try f.send("PUT", "/snapshot/create", #"{"snapshot_type": "Diff", "snapshot_path": "\#(dir.path)/x.snap", "mem_file_path": "\#(dir.path)/x.mem"}"#)
        #expect(r.status == 400 && r.fault?.contains("Diff") == true, "\(r.body)")
        r = try f.send("PUT", "/snapshot/create", #"{"snapshot_path": "\#(dir.path)/no/such/dir/x.snap", "mem_file_path": "\#(dir.path)/no/such/dir/x.mem"}"#)
        #expect(r.status == 400 && r.fault?.contains("no/such/dir") == true, "\(r.body)")
        r = try f.send("PUT", "/snapshot/create", #"{"snapshot_path": "\#(dir.path)/vm.snap", "mem_file_path": "\#(dir.path)/vm.mem"}"#)
        #expect(r.status == 204, "\(r.body)")
        f.shutdown()

        let good = try [UInt8](Data(contentsOf: URL(fileURLWithPath: dir.path + "/vm.snap")))
        var flipped = good
        flipped[flipped.count / 2] ^= 0x20
        var wrongVersion = good
        wrongVersion[8] = 99
        let cases: [(name: String, bytes: [UInt8], memory: String, expect: String)] = [
            ("truncated", Array(good.prefix(good.count - 100)), "vm.mem", "truncated"),
            ("flipped", flipped, "vm.mem", "checksum"),
            ("version", wrongVersion, "vm.mem", "version 99"),
            ("not a snapshot", Array("{\"hello\": 1}".utf8), "vm.mem", "SKVMSNAP"),
            ("short memory", good, "short.mem", "bytes"),
        ]
        _ = dir.file("short.mem", contents: "tiny")
        for c in cases {
            let path = dir.path + "/\(c.name.replacingOccurrences(of: " ", with: "-")).snap"
            try Data(c.bytes).write(to: URL(fileURLWithPath: path))
            let g = try Fixture()
            defer { g.shutdown() }
            let r = try g.send("PUT", "/snapshot/load",
                               #"{"snapshot_path": "\#(path)", "mem_backend": {"backend_type": "File", "backend_path": "\#(dir.path)/\#(c.memory)"}}"#)
            #expect(r.status == 400 && r.fault?.contains(c.expect) == true, "\(c.name): \(r.body)")
            #expect(try g.send("GET", "/").json?["state"] as? String == "Not started", "\(c.name): nothing half-restored")
        }
        // Loading after configuring the boot source, with both memory fields, or from userfaultfd.
        let g = try Fixture()
        defer { g.shutdown() }
        r = try g.send("PUT", "/snapshot/load", #"{"snapshot_path": "\#(dir.path)/vm.snap", "mem_file_path": "\#(dir.path)/vm.mem", "mem_backend": {"backend_type": "File", "backend_path": "\#(dir.path)/vm.mem"}}"#)
        #expect(r.status == 400 && r.fault?.contains("exactly one") == true, "\(r.body)")
        r = try g.send("PUT", "/snapshot/load", #"{"snapshot_path": "\#(dir.path)/vm.snap", "mem_backend": {"backend_type": "Uffd", "backend_path": "/tmp/uffd.sock"}}"#)
        #expect(r.status == 400 && r.fault?.contains("Uffd") == true, "\(r.body)")
        #expect(try g.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(GuestSupport.ticker!)"}"#).status == 204)
        r = try g.send("PUT", "/snapshot/load", #"{"snapshot_path": "\#(dir.path)/vm.snap", "mem_backend": {"backend_type": "File", "backend_path": "\#(dir.path)/vm.mem"}}"#)
        #expect(r.status == 400 && r.fault?.contains("boot-specific resources") == true, "\(r.body)")
    }

    @Test("after a snapshot of a paused VM its disk stays as the snapshot left it until the VM resumes (requests held in the ring do not run meanwhile), then the guest streams on")
    func disksHeldUntilResume() throws {
        let program = try #require(GuestSupport.guestProgram("virtio_blk"))
        let dir = TempDir()
        defer { dir.cleanup() }
        let disk = dir.path + "/disk.raw"
        #expect(FileManager.default.createFile(atPath: disk, contents: Data(count: 1 << 20)))
        let f = try Fixture(transport: .pci)
        defer { f.shutdown() }
        #expect(try f.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(program)", "boot_args": "stream tsc_khz=\#(GuestSupport.tscKHz)"}"#).status == 204)
        #expect(try f.send("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 64}"#).status == 204)
        // A rate limit keeps requests waiting in the ring, for the device thread to serve later.
        #expect(try f.send("PUT", "/drives/d0", #"{"drive_id": "d0", "path_on_host": "\#(disk)", "is_root_device": false, "is_read_only": false, "rate_limiter": {"ops": {"size": 16, "refill_time": 100}}}"#).status == 204)
        #expect(try f.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
        #expect(GuestSupport.wait(seconds: 60) { Self.streamRounds(f.serialPath).count >= 2 }, "the guest streams")
        #expect(try f.send("PATCH", "/vm", #"{"state": "Paused"}"#).status == 204)
        let r = try f.send("PUT", "/snapshot/create", #"{"snapshot_path": "\#(dir.path)/vm.snap", "mem_file_path": "\#(dir.path)/vm.mem"}"#)
        #expect(r.status == 204, "\(r.body)")
        let atSnapshot = try Data(contentsOf: URL(fileURLWithPath: disk))
        usleep(1_500_000) // the limiter refills several times meanwhile
        #expect(try Data(contentsOf: URL(fileURLWithPath: disk)) == atSnapshot, "no request ran while the snapshot holds the devices")
        let rounds = Self.streamRounds(f.serialPath).count
        #expect(try f.send("PATCH", "/vm", #"{"state": "Resumed"}"#).status == 204)
        #expect(GuestSupport.wait(seconds: 60) { Self.streamRounds(f.serialPath).count >= rounds + 2 }, "the guest streams on after the resume")
        #expect(!((try? String(contentsOfFile: f.serialPath, encoding: .utf8)) ?? "").contains("FAIL"))
    }

    @Test("a snapshot after PATCH /drives swapped the disk's image records the new image, so a restore opens the file the guest was using")
    func swappedDrive() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let first = dir.file("first.raw"), second = dir.file("second.raw")
        for path in [first, second] { #expect(truncate(path, 1 << 20) == 0) }
        let f = try Fixture()
        defer { f.shutdown() }
        #expect(try f.send("PUT", "/drives/d0", #"{"drive_id": "d0", "path_on_host": "\#(first)", "is_root_device": false, "is_read_only": false}"#).status == 204)
        try f.startTicker(ticks: 0)
        #expect(GuestSupport.wait(seconds: 30) { f.ticks >= 3 })
        #expect(try f.send("PATCH", "/drives/d0", #"{"drive_id": "d0", "path_on_host": "\#(second)"}"#).status == 204)
        #expect(try f.send("PATCH", "/vm", #"{"state": "Paused"}"#).status == 204)
        let r = try f.send("PUT", "/snapshot/create", #"{"snapshot_path": "\#(dir.path)/vm.snap", "mem_file_path": "\#(dir.path)/vm.mem"}"#)
        #expect(r.status == 204, "\(r.body)")
        let snap = try SnapshotFile.read(dir.path + "/vm.snap")
        #expect(snap.config.disks.map(\.path) == [second])
    }

    @Test("with track_dirty_pages, a Diff snapshot after a Full one holds only the pages written since (a small part of RAM); merged onto the Full memory file it loads into a VM that continues with the next tick; a Diff needs tracking and a base")
    func diffSnapshot() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let f = try Fixture()
        let kernel = try #require(GuestSupport.ticker)
        #expect(try f.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(kernel)", "boot_args": "\#(GuestSupport.tickerArgs(ticks: 0))"}"#).status == 204)
        #expect(try f.send("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 64, "track_dirty_pages": true}"#).status == 204)
        #expect(try f.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
        #expect(GuestSupport.wait(seconds: 30) { f.ticks >= 5 })
        #expect(try f.send("PATCH", "/vm", #"{"state": "Paused"}"#).status == 204)
        func create(_ type: String, _ name: String) throws -> UnixHTTPClient.Reply {
            try f.send("PUT", "/snapshot/create", #"{"snapshot_type": "\#(type)", "snapshot_path": "\#(dir.path)/\#(name).snap", "mem_file_path": "\#(dir.path)/\#(name).mem"}"#)
        }
        var r = try create("Diff", "early")
        #expect(r.status == 400 && r.fault?.contains("needs a base") == true, "\(r.body)")
        #expect(try create("Full", "base").status == 204)
        #expect(try f.send("PATCH", "/vm", #"{"state": "Resumed"}"#).status == 204)
        let atBase = f.ticks
        #expect(GuestSupport.wait(seconds: 30) { f.ticks >= atBase + 10 })
        #expect(try f.send("PATCH", "/vm", #"{"state": "Paused"}"#).status == 204)
        r = try create("Diff", "diff")
        #expect(r.status == 204, "\(r.body)")
        let next = Self.nextWholeTick(f.serialPath)
        let last = try #require(Self.tickNumbers(f.serialPath).last)
        f.shutdown()

        let diff = try SnapshotFile.read(dir.path + "/diff.snap")
        let ranges = try #require(diff.diffRanges, "a Diff lists its ranges")
        let held = ranges.reduce(0) { $0 + $1.length }
        #expect(!ranges.isEmpty && held < 4 << 20, "the Diff holds \(held) bytes in \(ranges.count) ranges of 64 MiB of RAM")
        #expect(try SnapshotFile.read(dir.path + "/base.snap").diffRanges == nil)
        let allocatedKB = { (path: String) -> Int in
            var st = stat()
            return stat(path, &st) == 0 ? Int(st.st_blocks) / 2 : -1
        }
        #expect(allocatedKB(dir.path + "/diff.mem") <= Int(held / 1024) + 64, "the Diff's memory file is sparse")

        // Merge onto a copy of the base and load the Diff's state with it.
        try FileManager.default.copyItem(atPath: dir.path + "/base.mem", toPath: dir.path + "/merged.mem")
        func tool(_ args: [String]) throws -> (status: Int32?, out: String, err: String) {
            let out = dir.path + "/tool.out"
            let p = try VMMProcessTests.launch(["snapshot"] + args, stdout: out)
            let status = VMMProcessTests.finish(p)
            let err = String(decoding: (p.standardError as? Pipe)?.fileHandleForReading.readDataToEndOfFile() ?? Data(), as: UTF8.self)
            return (status, (try? String(contentsOfFile: out, encoding: .utf8)) ?? "", err)
        }
        let info = try tool(["info", dir.path + "/diff.snap"])
        #expect(info.status == 0 && info.out.contains("kind:     Diff") && info.out.contains("\(held) bytes in \(ranges.count) ranges"), "\(info)")
        let merged = try tool(["merge", dir.path + "/merged.mem", dir.path + "/diff.snap", dir.path + "/diff.mem"])
        #expect(merged.status == 0 && merged.out.contains("merged \(held) bytes"), "\(merged)")
        let notDiff = try tool(["merge", dir.path + "/merged.mem", dir.path + "/base.snap", dir.path + "/base.mem"])
        #expect(notDiff.status == 2 && notDiff.err.contains("not a Diff"), "\(notDiff)")
        let wrongSize = try tool(["merge", dir.path + "/diff.snap", dir.path + "/diff.snap", dir.path + "/diff.mem"])
        #expect(wrongSize.status == 2 && wrongSize.err.contains("base memory file"), "\(wrongSize)")
        let g = try Fixture()
        defer { g.shutdown() }
        r = try g.send("PUT", "/snapshot/load", #"{"snapshot_path": "\#(dir.path)/diff.snap", "mem_backend": {"backend_type": "File", "backend_path": "\#(dir.path)/merged.mem"}, "resume_vm": true}"#)
        #expect(r.status == 204, "\(r.body)")
        #expect(GuestSupport.wait(seconds: 30) { Self.tickNumbers(g.serialPath).count >= 5 })
        let after = Self.tickNumbers(g.serialPath)
        #expect(after.first == next && zip(after, after.dropFirst()).allSatisfy { $1 == $0 + 1 }, "\(after.prefix(8)) after \(last)")

        // Without tracking a Diff is refused.
        let h = try Fixture()
        defer { h.shutdown() }
        try h.startTicker(ticks: 0)
        #expect(GuestSupport.wait(seconds: 30) { h.ticks >= 2 })
        #expect(try h.send("PATCH", "/vm", #"{"state": "Paused"}"#).status == 204)
        r = try h.send("PUT", "/snapshot/create", #"{"snapshot_type": "Diff", "snapshot_path": "\#(dir.path)/x.snap", "mem_file_path": "\#(dir.path)/x.mem"}"#)
        #expect(r.status == 400 && r.fault?.contains("track_dirty_pages") == true, "\(r.body)")
    }

    @Test("a Diff snapshot of a virtio-blk guest holds the pages the device wrote (used ring, read data): merged onto its base it continues streaming in a new VM")
    func diffWithDeviceWrites() throws {
        let program = try #require(GuestSupport.guestProgram("virtio_blk"))
        let dir = TempDir()
        defer { dir.cleanup() }
        let disk = dir.path + "/disk.raw"
        #expect(FileManager.default.createFile(atPath: disk, contents: Data(count: 1 << 20)))
        let f = try Fixture(transport: .pci)
        #expect(try f.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(program)", "boot_args": "stream tsc_khz=\#(GuestSupport.tscKHz)"}"#).status == 204)
        #expect(try f.send("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 64, "track_dirty_pages": true}"#).status == 204)
        #expect(try f.send("PUT", "/drives/d0", #"{"drive_id": "d0", "path_on_host": "\#(disk)", "is_root_device": false, "is_read_only": false}"#).status == 204)
        #expect(try f.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
        #expect(GuestSupport.wait(seconds: 60) { Self.streamRounds(f.serialPath).count >= 3 })
        #expect(try f.send("PATCH", "/vm", #"{"state": "Paused"}"#).status == 204)
        #expect(try f.send("PUT", "/snapshot/create", #"{"snapshot_path": "\#(dir.path)/base.snap", "mem_file_path": "\#(dir.path)/base.mem"}"#).status == 204)
        #expect(try f.send("PATCH", "/vm", #"{"state": "Resumed"}"#).status == 204)
        let atBase = Self.streamRounds(f.serialPath).count
        #expect(GuestSupport.wait(seconds: 60) { Self.streamRounds(f.serialPath).count >= atBase + 3 })
        #expect(try f.send("PATCH", "/vm", #"{"state": "Paused"}"#).status == 204)
        let r = try f.send("PUT", "/snapshot/create", #"{"snapshot_type": "Diff", "snapshot_path": "\#(dir.path)/diff.snap", "mem_file_path": "\#(dir.path)/diff.mem"}"#)
        #expect(r.status == 204, "\(r.body)")
        let firstLog = (try? String(contentsOfFile: f.serialPath, encoding: .utf8)) ?? ""
        let last = try #require(Self.streamRounds(text: firstLog).last)
        f.shutdown()
        try FileManager.default.copyItem(atPath: dir.path + "/base.mem", toPath: dir.path + "/merged.mem")
        _ = try SnapshotIO.mergeDiff(baseMemory: dir.path + "/merged.mem", diffState: dir.path + "/diff.snap", diffMemory: dir.path + "/diff.mem")
        let g = try Fixture()
        defer { g.shutdown() }
        let l = try g.send("PUT", "/snapshot/load", #"{"snapshot_path": "\#(dir.path)/diff.snap", "mem_backend": {"backend_type": "File", "backend_path": "\#(dir.path)/merged.mem"}, "resume_vm": true}"#)
        #expect(l.status == 204, "\(l.body)")
        #expect(GuestSupport.wait(seconds: 60) { Self.streamRounds(g.serialPath).count >= 3 || g.exit != nil })
        let log = (try? String(contentsOfFile: g.serialPath, encoding: .utf8)) ?? ""
        #expect(!log.contains("FAIL"), "\(log.suffix(600))")
        // The guest's output continues across the two VMs (a line the pause cut is completed by the second).
        let rounds = Self.streamRounds(text: firstLog + log)
        #expect(rounds == Array(1...max(1, rounds.count)) && rounds.count >= last + 3, "\(rounds.suffix(8)) (last before the snapshot \(last))")
    }

    /// The "STREAM round N ok" numbers printed to `path`.
    static func streamRounds(_ path: String) -> [Int] {
        streamRounds(text: (try? String(contentsOfFile: path, encoding: .utf8)) ?? "")
    }

    /// The "STREAM round N ok" numbers in `text` (a line cut by a pause is completed by the
    /// restored VM's output: check the two outputs joined).
    static func streamRounds(text: String) -> [Int] {
        text.split(separator: "\n").compactMap { line in
            guard line.hasPrefix("STREAM round "), line.hasSuffix(" ok") else { return nil }
            return Int(line.dropFirst(13).dropLast(3))
        }
    }

    /// Requests the driver had made available and the device had not completed when the snapshot
    /// was taken: queue 0's avail idx (read from the memory file, at the ring address the saved
    /// transport names) minus the saved used index of virtio-blk0.
    static func outstandingBlockRequests(snapshot: String, memory: String) throws -> Int {
        let snap = try SnapshotFile.read(snapshot)
        let blk = try #require(snap.devices.first { $0.id == "virtio-blk0" }, "virtio-blk0 is in the snapshot")
        let state = try #require(try JSONSerialization.jsonObject(with: blk.state) as? [String: Any])
        let queue = try #require(((state["registers"] as? [String: Any])?["queues"] as? [[String: Any]])?.first)
        let ring = try #require((state["rings"] as? [Any])?.first as? [String: Any], "the device was saved live")
        let availRing = try #require((queue["driver"] as? NSNumber)?.uint64Value)
        let nextUsed = try #require((ring["nextUsed"] as? NSNumber)?.intValue)
        let fh = try #require(FileHandle(forReadingAtPath: memory))
        defer { try? fh.close() }
        try fh.seek(toOffset: availRing + 2)
        let idx = try #require(try fh.read(upToCount: 2))
        return (Int(idx[0]) | Int(idx[1]) << 8 &- nextUsed) & 0xffff
    }

    @Test("a virtio-blk guest with 32 requests in flight, snapshotted mid-round with requests still in the ring, continues in a new VM: the round in progress and the next ones complete, read back what they wrote, and interrupt (virtio-pci and virtio-mmio)",
          arguments: [VirtioTransportKind.pci, .mmio])
    func blockRequestsInFlight(transport: VirtioTransportKind) throws {
        let program = try #require(GuestSupport.guestProgram("virtio_blk"))
        let dir = TempDir()
        defer { dir.cleanup() }
        let disk = dir.path + "/disk.raw"
        #expect(FileManager.default.createFile(atPath: disk, contents: Data(count: 1 << 20)))
        func configure(_ f: Fixture) throws {
            let mmio = transport == .mmio ? " mmio" : ""
            #expect(try f.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(program)", "boot_args": "stream\#(mmio) tsc_khz=\#(GuestSupport.tscKHz)"}"#).status == 204)
            #expect(try f.send("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 64}"#).status == 204)
            // A rate limit (160 requests/s, 5 rounds/s) keeps requests waiting in the ring and one held back.
            #expect(try f.send("PUT", "/drives/d0", #"{"drive_id": "d0", "path_on_host": "\#(disk)", "is_root_device": false, "is_read_only": false, "rate_limiter": {"ops": {"size": 16, "refill_time": 100}}}"#).status == 204)
        }
        let first = try Fixture(transport: transport)
        try configure(first)
        #expect(try first.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
        #expect(GuestSupport.wait(seconds: 60) { Self.streamRounds(first.serialPath).count >= 2 }, "the guest streams")
        // Snapshot until one catches requests in flight (the guest spends most of a round waiting for them).
        var outstanding = 0
        for attempt in 0..<8 {
            #expect(try first.send("PATCH", "/vm", #"{"state": "Paused"}"#).status == 204)
            let r = try first.send("PUT", "/snapshot/create", #"{"snapshot_path": "\#(dir.path)/vm.snap", "mem_file_path": "\#(dir.path)/vm.mem"}"#)
            #expect(r.status == 204, "snapshot/create: \(r.body)")
            outstanding = try Self.outstandingBlockRequests(snapshot: dir.path + "/vm.snap", memory: dir.path + "/vm.mem")
            if outstanding > 0 || attempt == 7 { break }
            let seen = Self.streamRounds(first.serialPath).count
            #expect(try first.send("PATCH", "/vm", #"{"state": "Resumed"}"#).status == 204)
            GuestSupport.wait(seconds: 10) { Self.streamRounds(first.serialPath).count > seen }
        }
        #expect(outstanding > 0, "a snapshot with virtio-blk requests in flight")
        let firstLog = (try? String(contentsOfFile: first.serialPath, encoding: .utf8)) ?? ""
        let last = try #require(Self.streamRounds(text: firstLog).last)
        first.shutdown()
        #expect(!firstLog.contains("FAIL"), "\(firstLog.suffix(500))")
        let onDisk = try #require(FileHandle(forReadingAtPath: disk).map { fh in
            defer { try? fh.close() }
            try fh.seek(toOffset: 512 * 512)
            return try fh.read(upToCount: 8) ?? Data()
        })
        #expect(onDisk.count == 8 && onDisk.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) } >> 32 >= UInt64(last),
                "sector 512 holds a round at least as new as the last one completed")

        let second = try Fixture()
        defer { second.shutdown() }
        let r = try second.send("PUT", "/snapshot/load", #"{"snapshot_path": "\#(dir.path)/vm.snap", "mem_backend": {"backend_type": "File", "backend_path": "\#(dir.path)/vm.mem"}, "resume_vm": true}"#)
        #expect(r.status == 204, "snapshot/load: \(r.body)")
        #expect(GuestSupport.wait(seconds: 60) { Self.streamRounds(second.serialPath).count >= 4 || second.exit != nil },
                "the restored guest keeps streaming")
        let log = (try? String(contentsOfFile: second.serialPath, encoding: .utf8)) ?? ""
        #expect(!log.contains("FAIL"), "\(log.suffix(800))")
        // The guest's output continues across the two VMs (a line the pause cut is completed by the second):
        // the round in progress at the snapshot completes, then every round in order.
        let rounds = Self.streamRounds(text: firstLog + log)
        #expect(rounds == Array(1...max(1, rounds.count)) && rounds.count >= last + 4, "\(rounds.suffix(8)) (last before the snapshot \(last))")
    }
}

/// Clones: one snapshot loaded by ten `swiftkvm vmm` processes at once.
@Suite("Snapshot clones in separate vmm processes (/dev/kvm)", .serialized,
       .enabled(if: GuestSupport.hasKVM && GuestSupport.ticker != nil && GuestSupport.swiftkvm != nil,
                "needs /dev/kvm, guest/build/ticker.elf and the swiftkvm executable"))
struct SnapshotCloneTests {
    /// The guest-RAM mappings of `pid` that come from `path`, and their Shared_Clean kB.
    static func sharedKB(pid: Int32, path: String) -> (mappings: Int, sharedKB: Int) {
        let text = FileHandle(forReadingAtPath: "/proc/\(pid)/smaps").map { String(decoding: $0.readDataToEndOfFile(), as: UTF8.self) } ?? ""
        var mappings = 0, shared = 0, inside = false
        for line in text.split(separator: "\n") {
            if let dash = line.firstIndex(of: "-"), line[..<dash].allSatisfy(\.isHexDigit) {
                inside = line.hasSuffix(path)
                if inside { mappings += 1 }
            } else if inside, line.hasPrefix("Shared_Clean:") {
                shared += Int(line.split(separator: " ").dropFirst().first ?? "0") ?? 0
            }
        }
        return (mappings, shared)
    }

    @Test("ten clones of one running ticker load at once, each continues the sequence, and they share the memory file's pages")
    func tenClones() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let f = try LifecycleTests.Fixture()
        let last = try SnapshotTests.snapshotRunningTicker(f, into: dir)
        let next = SnapshotTests.nextWholeTick(f.serialPath)
        f.shutdown()
        var clones: [(Process, String, String)] = []
        defer { for (p, _, _) in clones where p.isRunning { p.terminate(); p.waitUntilExit() } }
        for i in 0..<10 {
            let sock = "/tmp/swk-clone-\(getpid())-\(i).sock", out = dir.path + "/clone\(i).out"
            clones.append((try VMMProcessTests.launch(["vmm", "--api-sock", sock, "--id", "clone\(i)"], stdout: out), sock, out))
        }
        for (_, sock, _) in clones {
            #expect(GuestSupport.wait(seconds: 10) { FileManager.default.fileExists(atPath: sock) })
        }
        // All ten loads in flight together.
        let group = DispatchGroup()
        let statuses = Locked<[Int]>([])
        for (_, sock, _) in clones {
            DispatchQueue.global().async(group: group) {
                let r = try? UnixHTTPClient(path: sock).send("PUT", "/snapshot/load",
                    #"{"snapshot_path": "\#(dir.path)/vm.snap", "mem_backend": {"backend_type": "File", "backend_path": "\#(dir.path)/vm.mem"}, "resume_vm": true}"#)
                statuses.withLock { $0.append(r?.status ?? -1) }
            }
        }
        group.wait()
        #expect(statuses.withLock { $0 } == Array(repeating: 204, count: 10))
        for (_, _, out) in clones {
            #expect(GuestSupport.wait(seconds: 30) { SnapshotTests.tickNumbers(out).count >= 5 }, "\(out) keeps ticking")
            let after = SnapshotTests.tickNumbers(out)
            #expect(after.first == next && zip(after, after.dropFirst()).allSatisfy { $1 == $0 + 1 },
                    "\(out): \(after.prefix(10)) after \(last)")
        }
        // Guest RAM is the memory file mapped copy-on-write: its clean pages are shared between the clones.
        let usage = Self.sharedKB(pid: clones[0].0.processIdentifier, path: dir.path + "/vm.mem")
        #expect(usage.mappings >= 1, "the memory file is mapped")
        #expect(usage.sharedKB > 0, "pages of the memory file are shared with the other clones")
    }
    /// The VmFlags of `pid`'s mappings of `path`.
    static func vmFlags(pid: Int32, path: String) -> [String] {
        let text = FileHandle(forReadingAtPath: "/proc/\(pid)/smaps").map { String(decoding: $0.readDataToEndOfFile(), as: UTF8.self) } ?? ""
        var flags: [String] = [], inside = false
        for line in text.split(separator: "\n") {
            if let dash = line.firstIndex(of: "-"), line[..<dash].allSatisfy(\.isHexDigit) {
                inside = line.hasSuffix(path)
            } else if inside, line.hasPrefix("VmFlags:") {
                flags.append(String(line))
            }
        }
        return flags
    }

    @Test("swiftkvm vmm --ksm: the guest RAM of a loaded snapshot (the memory file's copy-on-write mapping) is mergeable by KSM (VmFlags mg); without --ksm it is not")
    func ksmAfterLoad() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let f = try LifecycleTests.Fixture()
        _ = try SnapshotTests.snapshotRunningTicker(f, into: dir)
        f.shutdown()
        for ksm in [true, false] {
            let sock = "/tmp/swk-ksm-\(getpid())-\(ksm).sock", out = dir.path + "/ksm-\(ksm).out"
            unlink(sock)
            let p = try VMMProcessTests.launch(["vmm", "--api-sock", sock] + (ksm ? ["--ksm"] : []), stdout: out)
            defer { if p.isRunning { p.terminate(); p.waitUntilExit() } }
            #expect(GuestSupport.wait(seconds: 10) { (try? UnixHTTPClient(path: sock).send("GET", "/"))?.status == 200 })
            let r = try UnixHTTPClient(path: sock).send("PUT", "/snapshot/load",
                #"{"snapshot_path": "\#(dir.path)/vm.snap", "mem_backend": {"backend_type": "File", "backend_path": "\#(dir.path)/vm.mem"}, "resume_vm": true}"#)
            #expect(r.status == 204, "\(r.body)")
            let flags = Self.vmFlags(pid: p.processIdentifier, path: dir.path + "/vm.mem")
            #expect(!flags.isEmpty, "the memory file is mapped")
            #expect(flags.allSatisfy { $0.contains(" mg") } == ksm && flags.contains { $0.contains(" mg") } == ksm, "--ksm \(ksm): \(flags)")
        }
    }

    @Test("swiftkvm run --restore DIR continues a ticker snapshotted over the API, printing to its own --serial; machine options with --restore, a missing directory and a corrupt state file are usage errors (exit 2) naming the problem")
    func runRestore() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let f = try LifecycleTests.Fixture()
        let last = try SnapshotTests.snapshotRunningTicker(f, into: dir)
        let next = SnapshotTests.nextWholeTick(f.serialPath)
        f.shutdown()
        let snap = dir.path + "/snapdir"
        try FileManager.default.createDirectory(atPath: snap, withIntermediateDirectories: true)
        try FileManager.default.moveItem(atPath: dir.path + "/vm.snap", toPath: snap + "/snapshot")
        try FileManager.default.moveItem(atPath: dir.path + "/vm.mem", toPath: snap + "/memory")
        let out = dir.path + "/run.out"
        let p = try VMMProcessTests.launch(["run", "--restore", snap, "--serial", "file:" + out])
        #expect(GuestSupport.wait(seconds: 30) { SnapshotTests.tickNumbers(out).count >= 5 }, "the restored ticker prints to the new serial file")
        kill(p.processIdentifier, SIGTERM)
        #expect(VMMProcessTests.finish(p) == 143)
        let ticks = SnapshotTests.tickNumbers(out)
        #expect(ticks.first == next && zip(ticks, ticks.dropFirst()).allSatisfy { $1 == $0 + 1 }, "\(ticks.prefix(10)) after \(last)")

        func usage(_ args: [String]) throws -> String {
            let q = try VMMProcessTests.launch(args)
            let status = VMMProcessTests.finish(q)
            let err = String(decoding: (q.standardError as? Pipe)?.fileHandleForReading.readDataToEndOfFile() ?? Data(), as: UTF8.self)
            #expect(status == 2, "\(args): \(err)")
            return err
        }
        #expect(try usage(["run", "--restore", snap, "--cpus", "2", "--kernel", "/x"]).contains("--kernel, --cpus cannot be combined"))
        #expect(try usage(["run", "--restore", dir.path + "/none"]).contains("not a directory"))
        try Data("junk".utf8).write(to: URL(fileURLWithPath: snap + "/snapshot"))
        #expect(try usage(["run", "--restore", snap]).contains("no SKVMSNAP header"))
    }
}
