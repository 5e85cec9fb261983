import Foundation
import Testing
@testable import GuestMemory

/// Guest RAM backends: memfd and file (shared mappings), KSM and transparent huge pages through
/// madvise, hugetlbfs pages when reserved. Judged through /proc/self/smaps and the backing file.
@Suite("guest memory backends")
struct MemoryBackendTests {
    /// The smaps block of the mapping that starts at `address`.
    func smaps(at address: UnsafeMutableRawPointer) -> String {
        // procfs reports size 0: read to the end instead of by the size.
        let text = FileHandle(forReadingAtPath: "/proc/self/smaps").map { String(decoding: $0.readDataToEndOfFile(), as: UTF8.self) } ?? ""
        let start = String(UInt(bitPattern: address), radix: 16)
        var lines: [Substring] = [], inside = false
        for line in text.split(separator: "\n") {
            if let dash = line.firstIndex(of: "-"), line[..<dash].allSatisfy(\.isHexDigit) {
                inside = String(line[..<dash]) == start
            }
            if inside { lines.append(line) }
        }
        return lines.joined(separator: "\n")
    }

    @Test("memfd: guest RAM is a shared memfd mapping that reads back what was written")
    func memfd() throws {
        let mem = try GuestMemory.allocate(size: 16 << 20, backend: MemoryBackend(kind: .memfd))
        try mem.write(Array("memfd-backed".utf8), at: 0x2000)
        #expect(try mem.read(at: 0x2000, count: 12) == Array("memfd-backed".utf8))
        let info = smaps(at: mem.regions[0].host)
        #expect(info.contains("memfd:swiftkvm-guest-ram"), "\(info.prefix(300))")
        #expect(info.contains(" sh "), "a shared mapping: \(info.split(separator: "\n").last ?? "")")
    }

    @Test("file: guest RAM lives in the file (a write at a guest address is at that offset in it); a file of another size is refused and left as it was")
    func file() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("memback-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/ram"
        do {
            let mem = try GuestMemory.allocate(size: 8 << 20, backend: MemoryBackend(kind: .file, path: path))
            try mem.write(Array("in the file".utf8), at: 0x12345)
        }
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        #expect(bytes.count == 8 << 20)
        #expect(Array(bytes[0x12345..<0x12345 + 11]) == Array("in the file".utf8))
        // Reused at the same size: the content is the guest's RAM again.
        let again = try GuestMemory.allocate(size: 8 << 20, backend: MemoryBackend(kind: .file, path: path))
        #expect(try again.read(at: 0x12345, count: 11) == Array("in the file".utf8))
        // Another size: refused, naming the file and both sizes; the file is untouched.
        #expect {
            _ = try GuestMemory.allocate(size: 16 << 20, backend: MemoryBackend(kind: .file, path: path))
        } throws: { "\($0)".contains(path) && "\($0)".contains("\(8 << 20)") && "\($0)".contains("\(16 << 20)") }
        #expect((try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) == 8 << 20)
        // Not a regular file, and an empty path.
        #expect { _ = try GuestMemory.allocate(size: 8 << 20, backend: MemoryBackend(kind: .file, path: dir)) } throws: { "\($0)".contains(dir) }
        #expect { _ = try GuestMemory.allocate(size: 8 << 20, backend: MemoryBackend(kind: .file, path: "")) } throws: { "\($0)".contains("empty") }
    }

    @Test("ksm=on and transparent huge pages mark the mapping (VmFlags mg, hg)")
    func madviseFlags() throws {
        let ksm = try GuestMemory.allocate(size: 16 << 20, backend: MemoryBackend(mergeable: true))
        let ksmFlags = smaps(at: ksm.regions[0].host).split(separator: "\n").first { $0.hasPrefix("VmFlags:") } ?? ""
        #expect(ksmFlags.contains(" mg"), "\(ksmFlags)")
        let thp = try GuestMemory.allocate(size: 16 << 20, backend: MemoryBackend(hugePages: .transparent))
        let thpFlags = smaps(at: thp.regions[0].host).split(separator: "\n").first { $0.hasPrefix("VmFlags:") } ?? ""
        #expect(thpFlags.contains(" hg"), "\(thpFlags)")
    }

    @Test("hugetlbfs pages: with none reserved the error says so; with some, the RAM is in huge pages")
    func hugetlbfs() throws {
        let reserved = Int(FileHandle(forReadingAtPath: "/proc/sys/vm/nr_hugepages").map {
            String(decoding: $0.readDataToEndOfFile(), as: UTF8.self) }?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "0") ?? 0
        for kind in [MemoryBackend.Kind.anonymous, .memfd] {
            if reserved * (2 << 20) < 8 << 20 {
                #expect {
                    _ = try GuestMemory.allocate(size: 8 << 20, backend: MemoryBackend(kind: kind, hugePages: .hugetlbfs))
                } throws: { "\($0)".contains("huge pages") }
            } else {
                let mem = try GuestMemory.allocate(size: 8 << 20, backend: MemoryBackend(kind: kind, hugePages: .hugetlbfs))
                try mem.write([1], at: 0)
                #expect(smaps(at: mem.regions[0].host).contains("KernelPageSize:     2048 kB"))
            }
        }
    }
}
