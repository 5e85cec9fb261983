import Foundation
import Synchronization
import Testing
@testable import API
import DiskImage
import Virtio
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// What a fake guest was asked to do with its disks.
enum FakeDiskCalls {
    struct Update: Equatable, Sendable { var index: Int; var bandwidth: TokenBucketConfig?; var ops: TokenBucketConfig? }
    static func of(_ vm: FakeVM) -> [Update] { vm.diskUpdates.withLock { $0 } }
}

extension FakeVM {
    func updateDiskRateLimit(index: Int, bandwidth: TokenBucketConfig?, ops: TokenBucketConfig?) throws {
        diskUpdates.withLock { $0.append(.init(index: index, bandwidth: bandwidth, ops: ops)) }
    }
    func replaceDiskImage(index: Int, path: String) throws {
        throw VMMError.invalidValue(what: "disk path", value: path, reason: "the fake guest has no disks")
    }
}

@Suite("Rate limiters and drive updates over the API (fake guests)")
struct RateLimitAPITests {
    @Test("drive and entropy rate limiters reach the VM configuration as device buckets")
    func configured() throws {
        let f = try FakeServerFixture()
        defer { f.shutdown() }
        let disk = f.dir.file("d.img", contents: "x")
        #expect(try f.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(f.kernel)"}"#).status == 204)
        let limiter = #"{"bandwidth": {"size": 1000, "one_time_burst": 50, "refill_time": 100}, "ops": {"size": 10, "refill_time": 1000}}"#
        #expect(try f.send("PUT", "/drives/d", #"{"drive_id": "d", "path_on_host": "\#(disk)", "is_root_device": false, "rate_limiter": \#(limiter)}"#).status == 204)
        #expect(try f.send("PUT", "/entropy", #"{"rate_limiter": {"bandwidth": {"size": 64, "refill_time": 100}}}"#).status == 204)
        #expect(try f.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
        let config = try #require(f.built.withLock { $0.first }?.config)
        #expect(config.disks.first?.rateLimit == RateLimitConfig(bandwidth: TokenBucketConfig(size: 1000, oneTimeBurst: 50, refillTimeMs: 100),
                                                                 ops: TokenBucketConfig(size: 10, refillTimeMs: 1000)))
        #expect(config.rngRateLimit == RateLimitConfig(bandwidth: TokenBucketConfig(size: 64, refillTimeMs: 100)))
    }

    @Test("PATCH rate_limiter reaches the live disk at its guest position; GET /vm/config shows the merged limiter")
    func patchRateLimiter() throws {
        let f = try FakeServerFixture()
        defer { f.shutdown() }
        let data = f.dir.file("data.img", contents: "x"), root = f.dir.file("root.img", contents: "x")
        #expect(try f.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(f.kernel)"}"#).status == 204)
        #expect(try f.send("PUT", "/drives/data", #"{"drive_id": "data", "path_on_host": "\#(data)", "is_root_device": false}"#).status == 204)
        #expect(try f.send("PUT", "/drives/rootfs", #"{"drive_id": "rootfs", "path_on_host": "\#(root)", "is_root_device": true}"#).status == 204)
        #expect(try f.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
        let vm = try #require(f.built.withLock { $0.first })
        // "data" is the second disk: the root drive comes first.
        #expect(try f.send("PATCH", "/drives/data", #"{"drive_id": "data", "rate_limiter": {"ops": {"size": 5, "refill_time": 10}}}"#).status == 204)
        #expect(try f.send("PATCH", "/drives/data", #"{"drive_id": "data", "rate_limiter": {"bandwidth": {"size": 0, "refill_time": 0}}}"#).status == 204)
        #expect(FakeDiskCalls.of(vm) == [.init(index: 1, bandwidth: nil, ops: TokenBucketConfig(size: 5, refillTimeMs: 10)),
                                         .init(index: 1, bandwidth: TokenBucketConfig(size: 0, refillTimeMs: 0), ops: nil)])
        let drives = try #require(f.send("GET", "/vm/config").json?["drives"] as? [[String: Any]])
        let entry = try #require(drives.first { $0["drive_id"] as? String == "data" })
        let rl = try #require(entry["rate_limiter"] as? [String: Any])
        #expect((rl["ops"] as? [String: Any])?["size"] as? Int == 5)
        #expect((rl["bandwidth"] as? [String: Any])?["size"] as? Int == 0)
        // Bad buckets are refused before anything changes.
        let bad = try f.send("PATCH", "/drives/data", #"{"drive_id": "data", "rate_limiter": {"ops": {"size": -1, "refill_time": 10}}}"#)
        #expect(bad.status == 400 && bad.fault?.contains("rate_limiter.ops") == true, "\(bad.body)")
        let missing = try f.send("PATCH", "/drives/data", #"{"drive_id": "data", "rate_limiter": {"ops": {"size": 1}}}"#)
        #expect(missing.status == 400 && missing.fault?.contains("refill_time") == true, "\(missing.body)")
        #expect(FakeDiskCalls.of(vm).count == 2)
    }

    @Test("PATCH path_on_host with a missing file is a 400 naming the path; the drive keeps its file")
    func patchBadPath() throws {
        let f = try FakeServerFixture()
        defer { f.shutdown() }
        let data = f.dir.file("data.img", contents: "x")
        #expect(try f.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(f.kernel)"}"#).status == 204)
        #expect(try f.send("PUT", "/drives/data", #"{"drive_id": "data", "path_on_host": "\#(data)", "is_root_device": false}"#).status == 204)
        #expect(try f.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
        let missing = f.dir.path + "/nope.img"
        let r = try f.send("PATCH", "/drives/data", #"{"drive_id": "data", "path_on_host": "\#(missing)"}"#)
        #expect(r.status == 400 && r.fault?.contains(missing) == true && r.fault?.contains("path_on_host") == true, "\(r.body)")
        let refused = try f.send("PATCH", "/drives/data", #"{"drive_id": "data", "path_on_host": "\#(data)"}"#)
        #expect(refused.status == 400 && refused.fault?.contains("keeps using \(data)") == true, "\(refused.body)")
        let drives = try #require(f.send("GET", "/vm/config").json?["drives"] as? [[String: Any]])
        #expect(drives.first?["path_on_host"] as? String == data)
    }
}

/// The virtio_blk and virtio_rng guest programs (guest/build/*.elf), built once; nil when they cannot be.
enum VirtioBlkGuest {
    static let image: String? = GuestSupport.guestProgram("virtio_blk")
    static let rngImage: String? = GuestSupport.guestProgram("virtio_rng")

    /// A disk of `bytes` bytes all set to `fill`.
    static func disk(_ dir: TempDir, _ name: String, bytes: Int, fill: UInt8) -> String {
        let p = dir.path + "/" + name
        FileManager.default.createFile(atPath: p, contents: Data(repeating: fill, count: bytes))
        return p
    }

    /// Seconds of the `BENCH … done … tsc=N` line in `serial`, at the host's TSC rate.
    static func benchSeconds(_ serial: String) -> Double? {
        guard let line = serial.split(separator: "\n").first(where: { $0.hasPrefix("BENCH ") && $0.contains(" done ") }),
              let t = line.split(separator: " ").first(where: { $0.hasPrefix("tsc=") }),
              let tsc = Double(t.dropFirst(4)) else { return nil }
        return tsc / (Double(GuestSupport.tscKHz) * 1000)
    }
}

@Suite("Rate limiters and drive updates with the virtio_blk guest over the API (/dev/kvm)", .serialized,
       .enabled(if: GuestSupport.hasKVM && VirtioBlkGuest.image != nil, "needs /dev/kvm and guest/build/virtio_blk.elf"))
struct RateLimitGuestTests {
    typealias Fixture = LifecycleTests.Fixture

    func serial(_ f: Fixture) -> String { (try? String(contentsOfFile: f.serialPath, encoding: .utf8)) ?? "" }

    /// Configures virtio_blk in bench mode on `disk` with `limiter` (JSON or nil) and starts it. The vmm's devices are
    /// on virtio-mmio (Firecracker's default): `mmio` makes the program find its disk in the DSDT.
    func start(_ f: Fixture, bench: String, disk: String, limiter: String?) throws {
        let image = try #require(VirtioBlkGuest.image)
        #expect(try f.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(image)", "boot_args": "mmio \#(bench)"}"#).status == 204)
        #expect(try f.send("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 64}"#).status == 204)
        let rl = limiter.map { #", "rate_limiter": \#($0)"# } ?? ""
        let d = try f.send("PUT", "/drives/data", #"{"drive_id": "data", "path_on_host": "\#(disk)", "is_root_device": false\#(rl)}"#)
        #expect(d.status == 204, "\(d.body)")
        let r = try f.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#)
        #expect(r.status == 204, "InstanceStart: \(r.body)")
    }

    @Test("reading 2 MiB through a 2.56 MB/s drive limit (256 KiB bucket) takes the guest about 0.7 s or more")
    func bandwidthLimit() throws {
        let f = try Fixture()
        defer { f.shutdown() }
        let disk = VirtioBlkGuest.disk(f.dir, "d.img", bytes: 4 << 20, fill: 0x11)
        try start(f, bench: "bench=seqread size=65536 n=32 qd=4", disk: disk,
                  limiter: #"{"bandwidth": {"size": 262144, "refill_time": 100}}"#)
        #expect(GuestSupport.wait(seconds: 120) { f.exit != nil }, "the guest ends\n\(serial(f))")
        let out = serial(f)
        #expect(out.contains("BENCH seqread done ops=32 bytes=2097152 ") && out.contains(" errors=0"), "\(out)")
        #expect(out.contains("ok bench"), "\(out)")
        let seconds = try #require(VirtioBlkGuest.benchSeconds(out), "\(out)")
        // 256 KiB come from the full bucket; the other 1792 KiB need 700 ms of refill (10% margin for
        // the TSC rate estimate; unthrottled, this read takes a few ms).
        #expect(seconds >= 0.63, "2 MiB at 2.56 MB/s took the guest only \(seconds) s\n\(out)")
    }

    @Test("virtio_rng reading 4 × 64 bytes through a 64-byte-per-second entropy limit takes at least 3 s (unlimited: well under 1 s)",
          .enabled(if: VirtioBlkGuest.rngImage != nil, "needs guest/build/virtio_rng.elf"))
    func entropyLimit() throws {
        let f = try Fixture()
        defer { f.shutdown() }
        let image = try #require(VirtioBlkGuest.rngImage)
        #expect(try f.send("PUT", "/boot-source", #"{"kernel_image_path": "\#(image)", "boot_args": "mmio reads=4 size=64"}"#).status == 204)
        #expect(try f.send("PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 64}"#).status == 204)
        #expect(try f.send("PUT", "/entropy", #"{"rate_limiter": {"bandwidth": {"size": 64, "refill_time": 1000}}}"#).status == 204)
        let start = Date()
        #expect(try f.send("PUT", "/actions", #"{"action_type": "InstanceStart"}"#).status == 204)
        #expect(GuestSupport.wait(seconds: 60) { f.exit != nil }, "\(serial(f))")
        let elapsed = Date().timeIntervalSince(start)
        let out = serial(f)
        #expect(out.contains("RESULT pass") && out.contains("fail 0"), "\(out)")
        #expect(out.split(separator: "\n").filter { $0.hasPrefix("RNG ") }.count == 4, "\(out)")
        // The first read comes from the full bucket, each of the other three waits 1 s.
        #expect(elapsed >= 2.9, "4 reads at 64 B/s took only \(elapsed) s\n\(out)")
    }

    @Test("PATCH of the drive's rate limiter at run time releases a guest held by a 10 s-per-request ops limit")
    func runtimePatch() throws {
        let f = try Fixture()
        defer { f.shutdown() }
        let disk = VirtioBlkGuest.disk(f.dir, "d.img", bytes: 1 << 20, fill: 0x22)
        // 20 requests at one per 10 s would take more than 3 minutes.
        try start(f, bench: "bench=seqread size=4096 n=20 qd=1", disk: disk,
                  limiter: #"{"ops": {"size": 1, "refill_time": 10000}}"#)
        #expect(GuestSupport.wait(seconds: 60) { serial(f).contains("BENCH seqread start") }, "\(serial(f))")
        usleep(300_000)
        #expect(f.exit == nil, "still throttled\n\(serial(f))")
        let r = try f.send("PATCH", "/drives/data", #"{"drive_id": "data", "rate_limiter": {"ops": {"size": 0, "refill_time": 0}}}"#)
        #expect(r.status == 204, "\(r.body)")
        #expect(GuestSupport.wait(seconds: 60) { f.exit != nil }, "the guest finishes once the limit is gone\n\(serial(f))")
        let out = serial(f)
        #expect(out.contains("BENCH seqread done ops=20 ") && out.contains(" errors=0"), "\(out)")
    }

    @Test("PATCH path_on_host while the guest writes: a locked image is refused (400 naming it) and the old disk stays; the same image reopens; a new one takes the later writes")
    func replaceImage() throws {
        let f = try Fixture()
        defer { f.shutdown() }
        let a = VirtioBlkGuest.disk(f.dir, "a.img", bytes: 1 << 20, fill: 0xAA)
        let b = VirtioBlkGuest.disk(f.dir, "b.img", bytes: 2 << 20, fill: 0xAA)
        let locked = VirtioBlkGuest.disk(f.dir, "locked.img", bytes: 1 << 20, fill: 0xAA)
        // 20 sequential 4 KiB writes (sectors 0-159) at 5 per second: about 4 s.
        try start(f, bench: "bench=seqwrite size=4096 n=20 qd=1", disk: a, limiter: #"{"ops": {"size": 1, "refill_time": 200}}"#)
        #expect(GuestSupport.wait(seconds: 60) { serial(f).contains("BENCH seqwrite start") }, "\(serial(f))")

        // Another holder writes it, as qemu-io does (QEMU's lock bytes: consistent read and write).
        let holder = try ImageLock(path: locked, permissions: [.consistentRead, .write], unshared: [])
        let refused = try f.send("PATCH", "/drives/data", #"{"drive_id": "data", "path_on_host": "\#(locked)"}"#)
        holder.release()
        #expect(refused.status == 400 && refused.fault?.contains(locked) == true
                && refused.fault?.contains("Is another process using the image") == true, "\(refused.body)")
        #expect(ImageLock.heldBytes(path: a) == [100, 101, 201], "the old disk keeps its locks")
        var drives = try f.send("GET", "/vm/config").json?["drives"] as? [[String: Any]]
        #expect(drives?.first?["path_on_host"] as? String == a)

        // The same image again is a re-open (its lock is already the VM's).
        let same = try f.send("PATCH", "/drives/data", #"{"drive_id": "data", "path_on_host": "\#(a)"}"#)
        #expect(same.status == 204, "\(same.body)")
        let ok = try f.send("PATCH", "/drives/data", #"{"drive_id": "data", "path_on_host": "\#(b)"}"#)
        #expect(ok.status == 204, "\(ok.body)")
        #expect(ImageLock.heldBytes(path: b) == [100, 101, 201], "the new file is locked as QEMU locks a writable raw drive")
        #expect(ImageLock.heldBytes(path: a).isEmpty, "the old one is released")
        drives = try f.send("GET", "/vm/config").json?["drives"] as? [[String: Any]]
        #expect(drives?.first?["path_on_host"] as? String == b)
        #expect(GuestSupport.wait(seconds: 60) { f.exit != nil }, "\(serial(f))")
        let out = serial(f)
        #expect(out.contains("BENCH seqwrite done ops=20 ") && out.contains(" errors=0"), "\(out)")
        // The last request (sectors 152-159) came seconds after the switch: it is in b, not in a.
        let aBytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: a)))
        let bBytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: b)))
        let last = (152 * 512)..<(160 * 512)
        #expect(aBytes[last].allSatisfy { $0 == 0xAA }, "a is no longer written after the switch")
        #expect(!bBytes[last].allSatisfy { $0 == 0xAA }, "b received the last write")
        #expect(bBytes.count == 2 << 20)
        #expect(bBytes[(1 << 20)...].allSatisfy { $0 == 0xAA }, "nothing past the old capacity was written")
        #expect(try [UInt8](Data(contentsOf: URL(fileURLWithPath: locked))).allSatisfy { $0 == 0xAA })
    }
}
