/// Deterministic write plan shared by `swiftkvm-test-helper crash-writer` and the tests that check what survived a
/// crash: write `i` goes to a distinct slot of 96 KiB at a pseudo-random offset inside the slot (crossing cluster
/// boundaries), with a pseudo-random length of 1 B … 64 KiB and a pattern derived from `i`.
public enum CrashPlan {
    /// The distance between the slots of consecutive writes.
    public static let slot: UInt64 = 96 << 10

    /// Where write `i` of the plan with `seed` goes, and how long it is.
    public static func write(_ i: Int, seed: UInt64) -> (offset: UInt64, length: Int) {
        var x = seed &+ UInt64(i) &* 0x9E37_79B9_7F4A_7C15
        x = (x ^ (x >> 30)) &* 0xBF58_476D_1CE4_E5B9
        x = (x ^ (x >> 27)) &* 0x94D0_49BB_1331_11EB
        x ^= x >> 31
        return (UInt64(i) * slot + x % (32 << 10), Int((x >> 20) % (64 << 10)) + 1)
    }

    /// The bytes of write `i` (never zero, so a lost write shows).
    public static func pattern(_ i: Int, length: Int) -> [UInt8] {
        (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ i &* 13) | 1 }
    }
}
