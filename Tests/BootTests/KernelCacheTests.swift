import Foundation
import GuestMemory
import Synchronization
import Testing
@testable import Boot

/// A temporary cache directory (parent removed at the end of the test).
private final class TempDir {
    let root: String
    init() throws {
        root = FileManager.default.temporaryDirectory.appendingPathComponent("kcache-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: root) }
    /// A cache in `root/kernels` (not created yet) that caches every payload size.
    var cache: KernelCache { KernelCache(directory: root + "/kernels", minimumPayload: 0) }
    /// The files in `sub`, without the verified markers (`.<entry>.verified`).
    func files(_ sub: String = "kernels") -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: root + "/" + sub)) ?? []).filter { !$0.hasSuffix(".verified") }.sorted()
    }
}

@Suite("decompressed-kernel cache")
struct KernelCacheTests {
    /// A gzip bzImage whose vmlinux carries `seed` in its text, so different seeds give different payloads.
    func kernel(seed: UInt8 = 0x90) throws -> [UInt8] {
        var elf = makeVmlinux()
        for i in 0x200..<0x400 { elf[i] = seed &+ UInt8(truncatingIfNeeded: i) }
        return try makeBzImage(payload: compress(elf, tool: "gzip", args: ["-c"]))
    }

    /// Loads `image` with `cache` into fresh 64 MiB memory; returns the result and the kernel's 1 MiB region.
    func load(_ image: [UInt8], cache: KernelCache?) throws -> (LoadedKernel, [UInt8]) {
        let mem = try makeMemory(64 << 20)
        let k = try BzImageLoader.load(image, name: "test", initrd: nil, cmdline: "console=ttyS0", memory: mem,
                                       options: BootOptions(), cache: cache)
        return (k, try mem.read(at: 0x100_0000, count: 1 << 20) + mem.read(at: 0, count: 0x10_0000))
    }

    func entryPath(_ image: [UInt8], _ cache: KernelCache) throws -> String {
        let h = try SetupHeader(parsing: image)
        let start = h.setupSize + Int(h.payloadOffset)
        let payload = Array(image[start..<start + Int(h.payloadLength)])
        return payload.withUnsafeBytes { cache.path(for: KernelCache.Key(payload: $0, format: .gzip)) }
    }

    @Test("a miss writes an entry and a second load hits it with byte-identical memory and entry point")
    func missThenHit() throws {
        try #require(haveTool("gzip"))
        let dir = try TempDir()
        let image = try kernel()
        let (plain, plainMem) = try load(image, cache: nil)
        let (first, firstMem) = try load(image, cache: dir.cache)
        let path = try entryPath(image, dir.cache)
        #expect(first.notes.contains("kernel cache miss (no entry): wrote \(path)"))
        #expect(dir.files() == [(path as NSString).lastPathComponent])
        let (second, secondMem) = try load(image, cache: dir.cache)
        #expect(second.notes.contains { $0.hasPrefix("kernel cache hit: \(path) (") })
        #expect(firstMem == plainMem && secondMem == plainMem)
        #expect(first.entry == plain.entry && second.entry == plain.entry && second.entry.rip == 0x100_0040)
        #expect(second.ranges == plain.ranges)
        // The entry is the header followed by exactly the decompressed vmlinux.
        let data = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        #expect(try Array(data.dropFirst(KernelCache.Header.size)) == makeVmlinuxFrom(image))
        // Directory 0700, entry 0600.
        let dmode = try FileManager.default.attributesOfItem(atPath: dir.cache.directory)[.posixPermissions] as? Int
        let fmode = try FileManager.default.attributesOfItem(atPath: path)[.posixPermissions] as? Int
        #expect(dmode == 0o700 && fmode == 0o600)
    }

    @Test("a warm start maps the kernel's pages from the entry copy-on-write and checksums a file version only once")
    func warmStartMapsAndTrusts() throws {
        try #require(haveTool("gzip"))
        let dir = try TempDir()
        // A kernel whose segment data is page-aligned in the file, as in a real vmlinux: 64 KiB of text.
        var text = [UInt8](repeating: 0x90, count: 0x10000)
        for i in 0..<text.count { text[i] = UInt8(truncatingIfNeeded: i &* 7) }
        text[0x40] = 0xf4
        let elf = makeELF(entry: 0xffff_ffff_8100_0040, segments: [
            TestSegment(paddr: 0x100_0000, vaddr: 0xffff_ffff_8100_0000, data: text, memsz: 0x12000),
        ], alignData: true)
        let image = try makeBzImage(payload: compress(elf, tool: "gzip", args: ["-c"]))
        let (_, plainMem) = try load(image, cache: nil)
        let path = try entryPath(image, dir.cache)
        let (first, firstMem) = try load(image, cache: dir.cache)
        #expect(first.notes.contains { $0.hasPrefix("kernel cache miss (no entry)") })
        // The writer checksummed what it stored: the next start trusts the same file without reading it.
        let (second, secondMem) = try load(image, cache: dir.cache)
        #expect(second.notes.contains("kernel cache hit: \(path) (verified before, same file)"), "\(second.notes)")
        #expect(second.notes.contains("kernel segments: 65536 bytes mapped copy-on-write from the cache entry, 0 copied"),
                "\(second.notes)")
        #expect(firstMem == plainMem && secondMem == plainMem)
        // A guest write to a mapped page stays private: the entry is unchanged.
        let mem = try makeMemory(64 << 20)
        _ = try BzImageLoader.load(image, name: "test", initrd: nil, cmdline: "", memory: mem, options: BootOptions(), cache: dir.cache)
        try mem.write([0xcc, 0xcc], at: 0x100_1000)
        let entry = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        #expect(Array(entry[(KernelCache.Header.size + 0x1000 + 0x1000)..<(KernelCache.Header.size + 0x1000 + 0x1002)]) == Array(text[0x1000..<0x1002]))
        // The entry rewritten in place (same inode, new modification time) is checksummed again.
        var rewritten = entry
        rewritten[KernelCache.Header.size + 0x3000] ^= 0xff
        let fd = open(path, O_WRONLY)
        try #require(fd >= 0)
        _ = rewritten.withUnsafeBytes { pwrite(fd, $0.baseAddress!, $0.count, 0) }
        close(fd)
        let (third, thirdMem) = try load(image, cache: dir.cache)
        #expect(third.notes.contains { $0.hasPrefix("kernel cache miss (entry data checksum mismatch)") }, "\(third.notes)")
        #expect(thirdMem == plainMem)
        let (fourth, _) = try load(image, cache: dir.cache)
        #expect(fourth.notes.contains("kernel cache hit: \(path) (verified before, same file)"), "\(fourth.notes)")
    }

    @Test("the key of a settled source file's payload is memoized: the same file version skips the checksum, another version, a fresh file or a bad memo computes it")
    func sourceMemo() throws {
        try #require(haveTool("gzip"))
        let dir = try TempDir()
        let image = try kernel()
        let file = dir.root + "/bzImage"
        try Data(image).write(to: URL(fileURLWithPath: file))
        var st = stat()
        try #require(stat(file, &st) == 0)
        let settled = KernelCache.SourceIdentity(st, now: st.st_ctim.tv_sec + 10)
        let fresh = KernelCache.SourceIdentity(st, now: st.st_ctim.tv_sec)
        #expect(settled.settled && !fresh.settled)
        let path = try entryPath(image, dir.cache)
        func load(_ source: KernelCache.SourceIdentity) throws -> LoadedKernel {
            try BzImageLoader.load(image, name: "test", initrd: nil, cmdline: "", memory: makeMemory(64 << 20),
                                   options: BootOptions(), cache: dir.cache, source: source)
        }
        // A file changed moments ago is not memoized (a change within the same timestamp tick could follow).
        _ = try load(fresh)
        #expect(!FileManager.default.fileExists(atPath: dir.cache.sourceMemo(fresh)))
        // A settled one is, with its identity and the key.
        _ = try load(settled)
        let memo = try String(contentsOfFile: dir.cache.sourceMemo(settled), encoding: .utf8)
        let h = try SetupHeader(parsing: image)
        let start = h.setupSize + Int(h.payloadOffset)
        let key = Array(image[start..<start + Int(h.payloadLength)]).withUnsafeBytes { KernelCache.Key(payload: $0, format: .gzip) }
        #expect(memo == settled.text + " gzip \(h.payloadLength) \(String(key.compressedCRC, radix: 16))\n")
        // The memo is what the next load of that version uses: a memo naming another CRC sends it to
        // another (missing) entry, which proves the payload was not checksummed.
        let fields = memo.dropLast().split(separator: " ")
        let forged = fields.dropLast().joined(separator: " ") + " 1234abcd\n"
        try Data(forged.utf8).write(to: URL(fileURLWithPath: dir.cache.sourceMemo(settled)))
        let viaMemo = try load(settled)
        #expect(viaMemo.notes.contains { $0.hasPrefix("kernel cache miss (no entry): wrote ") && $0.contains("-1234abcd.vmlinux") }, "\(viaMemo.notes)")
        // Another version of the file (a new change time) computes the real key and hits the real entry.
        var changed = st
        changed.st_ctim.tv_sec += 1
        let other = try load(KernelCache.SourceIdentity(changed, now: changed.st_ctim.tv_sec + 10))
        #expect(other.notes.contains { $0.hasPrefix("kernel cache hit: \(path) (") }, "\(other.notes)")
        // A memo that does not parse is ignored.
        for junk in ["", "garbage\n", settled.text + " gzip notanumber zz\n", settled.text + " xz 1 1\n"] {
            try Data(junk.utf8).write(to: URL(fileURLWithPath: dir.cache.sourceMemo(settled)))
            let k = try load(settled)
            #expect(k.notes.contains { $0.hasPrefix("kernel cache hit: \(path) (") }, "memo \(junk.debugDescription): \(k.notes)")
        }
    }

    /// The decompressed payload of `image` (gzip).
    func makeVmlinuxFrom(_ image: [UInt8]) throws -> [UInt8] {
        let h = try SetupHeader(parsing: image)
        let start = h.setupSize + Int(h.payloadOffset)
        return try Decompressor.decompress(Array(image[start..<start + Int(h.payloadLength)]), format: .gzip, limit: 1 << 24)
    }

    @Test("a corrupted entry (flipped byte, truncated, wrong header, another kernel's) is ignored and rewritten",
          arguments: ["flipped data byte", "truncated", "bad magic", "flipped header byte", "another kernel's entry", "empty"])
    func corrupted(kind: String) throws {
        try #require(haveTool("gzip"))
        let dir = try TempDir()
        let image = try kernel()
        let (_, plainMem) = try load(image, cache: dir.cache)
        let path = try entryPath(image, dir.cache)
        let good = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        var bad = good
        let expected: String
        switch kind {
        case "flipped data byte": bad[KernelCache.Header.size + 0x250] ^= 0x01; expected = "entry data checksum mismatch"
        case "truncated": bad.removeLast(100); expected = "bytes of data, its header says"
        case "bad magic": bad[0] = 0x41; expected = "entry bad magic"
        case "flipped header byte": bad[33] ^= 0x80; expected = "entry header checksum mismatch"
        case "another kernel's entry":
            let other = try kernel(seed: 0x33)
            _ = try load(other, cache: dir.cache)
            bad = try [UInt8](Data(contentsOf: URL(fileURLWithPath: try entryPath(other, dir.cache))))
            expected = "entry header is for another payload"
        default: bad = []; expected = "entry is truncated (0 bytes)"
        }
        try Data(bad).write(to: URL(fileURLWithPath: path))
        let (k, mem) = try load(image, cache: dir.cache)
        #expect(mem == plainMem && k.entry.rip == 0x100_0040)
        let note = try #require(k.notes.first { $0.hasPrefix("kernel cache") })
        #expect(note.hasPrefix("kernel cache miss (") && note.contains(expected) && note.hasSuffix("wrote \(path)"))
        #expect(try [UInt8](Data(contentsOf: URL(fileURLWithPath: path))) == good)
        #expect(try load(image, cache: dir.cache).0.notes.contains { $0.hasPrefix("kernel cache hit: \(path) (") })
        #expect(!dir.files().contains { $0.hasPrefix(".tmp-") })
    }

    @Test("an unusable cache directory still loads the kernel and leaves nothing behind")
    func unwritable() throws {
        try #require(haveTool("gzip"))
        let dir = try TempDir()
        let image = try kernel()
        let (_, plainMem) = try load(image, cache: nil)
        // The directory's parent is a regular file: mkdir fails with ENOTDIR (even for root).
        _ = FileManager.default.createFile(atPath: dir.root + "/file", contents: Data([1]))
        let blocked = KernelCache(directory: dir.root + "/file/kernels", minimumPayload: 0)
        let (k, mem) = try load(image, cache: blocked)
        #expect(mem == plainMem && k.entry.rip == 0x100_0040)
        #expect(k.notes.contains { $0.hasPrefix("kernel cache not used: cannot use \(dir.root)/file/kernels: Not a directory") })
        // The entry's name is taken by a directory: the rename fails, the temporary file is removed.
        let path = try entryPath(image, dir.cache)
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        let (k2, mem2) = try load(image, cache: dir.cache)
        #expect(mem2 == plainMem)
        #expect(k2.notes.contains { $0.hasPrefix("kernel cache not used: cannot rename") })
        #expect(dir.files() == [(path as NSString).lastPathComponent])
        // A directory writable by others is not trusted.
        let open = dir.root + "/open"
        try FileManager.default.createDirectory(atPath: open, withIntermediateDirectories: true)
        chmod(open, 0o777)
        let (k3, _) = try load(image, cache: KernelCache(directory: open, minimumPayload: 0))
        #expect(k3.notes.contains { $0.contains("writable by others") })
        #expect(dir.files("open").isEmpty)
        // Nor is a valid entry planted there: it is not used.
        try FileManager.default.removeItem(atPath: path)
        _ = try load(image, cache: dir.cache)
        try FileManager.default.copyItem(atPath: path, toPath: open + "/" + (path as NSString).lastPathComponent)
        let (k4, mem4) = try load(image, cache: KernelCache(directory: open, minimumPayload: 0))
        #expect(mem4 == plainMem && !k4.notes.contains { $0.hasPrefix("kernel cache hit") })
        #expect(k4.notes.contains { $0.contains("\(open) is not owned by this user or is writable by others") })
    }

    @Test("SWIFTKVM_KERNEL_CACHE=off disables the cache and the location follows the environment")
    func environment() throws {
        try #require(haveTool("gzip"))
        let dir = try TempDir()
        let env = { (vars: [String: String]) in { (name: String) in vars[name] } }
        #expect(KernelCache.fromEnvironment(env(["SWIFTKVM_KERNEL_CACHE": "off", "SWIFTKVM_CACHE_DIR": dir.root])) == nil)
        #expect(KernelCache.fromEnvironment(env(["SWIFTKVM_KERNEL_CACHE": "OFF"]), isRoot: true) == nil)
        #expect(KernelCache.fromEnvironment(env(["SWIFTKVM_CACHE_DIR": "/x/y", "HOME": "/h"]), isRoot: true)?.directory == "/x/y")
        #expect(KernelCache.fromEnvironment(env(["HOME": "/h"]), isRoot: true)?.directory == "/var/cache/swiftkvm/kernels")
        #expect(KernelCache.fromEnvironment(env(["HOME": "/h", "XDG_CACHE_HOME": "/c"]), isRoot: false)?.directory == "/c/swiftkvm/kernels")
        #expect(KernelCache.fromEnvironment(env(["HOME": "/h"]), isRoot: false)?.directory == "/h/.cache/swiftkvm/kernels")
        #expect(KernelCache.fromEnvironment(env(["HOME": "/h", "SWIFTKVM_KERNEL_CACHE": "on"]), isRoot: false)?.directory == "/h/.cache/swiftkvm/kernels")
        #expect(KernelCache.fromEnvironment(env([:]), isRoot: false) == nil)
        // Disabled: the load decompresses and writes nothing.
        let image = try kernel()
        let (k, _) = try load(image, cache: KernelCache.fromEnvironment(env(["SWIFTKVM_KERNEL_CACHE": "off",
                                                                                "SWIFTKVM_CACHE_DIR": dir.root + "/kernels"])))
        #expect(k.entry.rip == 0x100_0040 && !k.notes.contains { $0.hasPrefix("kernel cache") })
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.root).isEmpty)
    }

    @Test("payloads below the minimum size bypass the cache; entries beyond the limit are pruned")
    func minimumAndPrune() throws {
        try #require(haveTool("gzip"))
        let dir = try TempDir()
        let image = try kernel()
        let (k, _) = try load(image, cache: KernelCache(directory: dir.root + "/kernels"))
        #expect(k.notes.contains { $0.contains("below the 1048576-byte minimum") })
        #expect(dir.files().isEmpty)
        var small = dir.cache
        small.maxEntries = 2
        var paths: [String] = []
        for seed: UInt8 in [1, 2, 3] {
            let img = try kernel(seed: seed)
            _ = try load(img, cache: small)
            let p = try entryPath(img, small)
            // Distinct mtimes, oldest first.
            var times = [timespec(tv_sec: 1_000_000 * Int(seed), tv_nsec: 0), timespec(tv_sec: 1_000_000 * Int(seed), tv_nsec: 0)]
            utimensat(AT_FDCWD, p, &times, 0)
            paths.append(p)
        }
        // The third write pruned seed 1 (the oldest), the fourth seed 2.
        let fourth = try kernel(seed: 4)
        _ = try load(fourth, cache: small)
        let names = Set(dir.files())
        let fourthName = (try entryPath(fourth, small) as NSString).lastPathComponent
        #expect(names.count == 2 && names.contains(fourthName))
        #expect(names.contains((paths[2] as NSString).lastPathComponent))
    }

    @Test("concurrent loads of the same kernel all succeed and leave one valid entry")
    func concurrent() throws {
        try #require(haveTool("gzip"))
        let dir = try TempDir()
        let image = try kernel()
        let (_, plainMem) = try load(image, cache: nil)
        let cache = dir.cache
        let results = Mutex([Bool]())
        DispatchQueue.concurrentPerform(iterations: 6) { _ in
            let ok = (try? load(image, cache: cache)).map { $0.1 == plainMem } ?? false
            results.withLock { $0.append(ok) }
        }
        #expect(results.withLock { $0 } == [Bool](repeating: true, count: 6))
        let path = try entryPath(image, cache)
        #expect(dir.files() == [(path as NSString).lastPathComponent])
        #expect(try load(image, cache: cache).0.notes.contains { $0.hasPrefix("kernel cache hit: \(path) (") })
    }
}
