import ArgumentParser
import DiskImage
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// `swiftkvm img bench`: qemu-img bench's write/read loop through the DiskImage library (synchronous, depth 1).
struct ImgBench: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bench", abstract: "Run a simple I/O benchmark (qemu-img bench options).")
    @Option(name: .customShort("c"), help: "Number of requests.") var count = 75000
    @Option(name: .customShort("s"), help: "Request size (k, M suffixes).") var size = "4k"
    @Option(name: .customShort("S"), help: "Step between request offsets (default: request size).") var step: String?
    @Option(name: .customShort("o"), help: "Start offset.") var start = "0"
    @Flag(name: .customShort("w"), help: "Write instead of read.") var write = false
    @Flag(name: .customLong("random"), help: "Pseudo-random request offsets (aligned to the request size).") var random = false
    @Option(name: .customShort("f")) var format: String?
    @Option(name: .customShort("t"), help: "Cache mode (ignored: always writeback with a final flush).") var cache: String?
    @Option(name: .customShort("d"), help: "Queue depth (ignored: 1).") var depth: Int?
    @Flag(name: .customShort("q")) var quiet = false
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: forceShareHelp) var forceShare = false
    @Argument var file: String

    func run() throws {
        try imgRun {
            if write && forceShare { throw forceShareWriteError(file) }
            let locks = try lockImage(file, format: format, write ? .write : .read(forceShare: forceShare))
            defer { locks.releaseAll() }
            let img = try openDiskImage(path: file, options: .init(readOnly: !write, format: format))
            let len = Int(try parseImgSize(size))
            let stride = try step.map(parseImgSize) ?? UInt64(len)
            var off = try parseImgSize(start)
            guard len > 0, UInt64(len) <= img.size else { throw ValidationError("request size \(len) does not fit the image") }
            var buf = [UInt8](repeating: 0xa5, count: len)
            var x: UInt64 = 0x2545_F491_4F6C_DD1D
            let slots = img.size / UInt64(len)
            let t0 = Date()
            for _ in 0..<count {
                if random {
                    x ^= x << 13; x ^= x >> 7; x ^= x << 17
                    off = (x % slots) * UInt64(len)
                } else if off + UInt64(len) > img.size {
                    off = 0
                }
                if write {
                    try buf.withUnsafeBytes { try img.write($0, at: off) }
                } else {
                    try buf.withUnsafeMutableBytes { try img.read(into: $0, at: off) }
                }
                if !random { off += stride }
            }
            try img.flush()
            try img.close()
            if !quiet { print(cFormat("Run completed in %.3f seconds.", Date().timeIntervalSince(t0))) }
        }
    }
}
