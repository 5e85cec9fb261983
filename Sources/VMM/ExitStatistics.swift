import Synchronization

/// Counts of vCPU exits by reason and of unhandled device accesses, merged from every vCPU thread.
public final class ExitStatistics: Sendable {
    private let counts = Mutex<[String: UInt64]>([:])

    public init() {}

    /// Adds a vCPU's local counts (called once when its thread ends, and by tests).
    public func merge(_ local: [String: UInt64]) {
        counts.withLock { c in for (k, v) in local { c[k, default: 0] += v } }
    }

    /// A snapshot of all counts.
    public var snapshot: [String: UInt64] { counts.withLock { $0 } }

    /// One line, sorted by count: "io=120 mmio=3 …".
    public var summary: String {
        snapshot.sorted { $0.value != $1.value ? $0.value > $1.value : $0.key < $1.key }
            .map { "\($0.key)=\($0.value)" }.joined(separator: " ")
    }
}
