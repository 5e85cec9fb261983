import ArgumentParser
import DiskImage
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// Deterministic write plan shared by the crash writer and the tests that verify its output: write `i` goes to a
/// distinct slot of 96 KiB at a pseudo-random offset inside the slot (crossing cluster boundaries), with a
/// pseudo-random length of 1 B … 64 KiB and a pattern derived from `i`.
enum CrashPlan {
    static let slot: UInt64 = 96 << 10

    static func write(_ i: Int, seed: UInt64) -> (offset: UInt64, length: Int) {
        var x = seed &+ UInt64(i) &* 0x9E37_79B9_7F4A_7C15
        x = (x ^ (x >> 30)) &* 0xBF58_476D_1CE4_E5B9
        x = (x ^ (x >> 27)) &* 0x94D0_49BB_1331_11EB
        x ^= x >> 31
        return (UInt64(i) * slot + x % (32 << 10), Int((x >> 20) % (64 << 10)) + 1)
    }

    static func pattern(_ i: Int, length: Int) -> [UInt8] {
        (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ i &* 13) | 1 }
    }
}

/// Hidden test helper: writes the crash plan into an image, flushing every few writes and printing
/// "FLUSHED n" after writes 0..<n are durable. Tests SIGKILL it at random moments.
struct ImgCrashWriter: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "crash-writer", shouldDisplay: false)
    @Option var seed: UInt64 = 1
    @Option var count = 200
    @Option var flushEvery = 5
    @Argument var file: String

    func run() throws {
        let img = try openDiskImage(path: file, options: .init(readOnly: false))
        for i in 0..<count {
            let (off, len) = CrashPlan.write(i, seed: seed)
            guard off + UInt64(len) <= img.size else { break }
            try img.write(CrashPlan.pattern(i, length: len), at: off)
            if (i + 1) % flushEvery == 0 {
                try img.flush()
                writeText("FLUSHED \(i + 1)\n", to: STDOUT_FILENO)
            }
        }
        try img.close()
        writeText("DONE\n", to: STDOUT_FILENO)
    }
}
