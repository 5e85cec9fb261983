import KVM
import Synchronization

/// Counts of vCPU exits by reason and of unhandled device accesses, merged from every vCPU thread.
public final class ExitStatistics: Sendable {
    /// A slot per exit kind (`VCPUExit.kindNames`), so that adding a vCPU's counts allocates nothing, and
    /// the rare other counts (unknown exit reasons, fix-ups, unhandled accesses) by name.
    private struct Counts {
        var kinds = [UInt64](repeating: 0, count: VCPUExit.kindNames.count)
        var other: [String: UInt64] = [:]
    }
    private let counts = Mutex(Counts())
    private let dispatch = Mutex<(exits: UInt64, ns: UInt64)>((0, 0))

    public init() {}

    /// Adds counts by name (fix-ups and unhandled accesses at exit, unknown exit reasons, tests).
    public func merge(_ local: [String: UInt64]) {
        counts.withLock { c in
            for (k, v) in local {
                if let i = VCPUExit.kindNames.firstIndex(of: k) { c.kinds[i] &+= v } else { c.other[k, default: 0] &+= v }
            }
        }
    }

    /// Adds `slots` (one count per `VCPUExit.kindNames` entry) without allocating.
    func add(kindSlots slots: UnsafeMutablePointer<UInt64>) {
        counts.withLock { c in
            for i in 0..<c.kinds.count { c.kinds[i] &+= slots[i] }
        }
    }

    /// Adds a vCPU's user-space dispatch time: `ns` nanoseconds spent between `KVM_RUN` returning and the next
    /// `KVM_RUN`, over `exits` exits.
    func mergeDispatch(exits: UInt64, ns: UInt64) {
        dispatch.withLock { $0.exits += exits; $0.ns += ns }
    }

    /// Mean user-space time per exit in nanoseconds (the VMM's own share of an exit), nil before any exit.
    public var dispatchNsPerExit: Double? {
        dispatch.withLock { $0.exits == 0 ? nil : Double($0.ns) / Double($0.exits) }
    }

    /// A snapshot of all counts (zero counts left out).
    public var snapshot: [String: UInt64] {
        counts.withLock { c in
            var out = c.other
            for (i, n) in c.kinds.enumerated() where n != 0 { out[VCPUExit.kindNames[i], default: 0] += n }
            return out
        }
    }

    /// One line, sorted by count: "io=120 mmio=3 …".
    public var summary: String {
        snapshot.sorted { $0.value != $1.value ? $0.value > $1.value : $0.key < $1.key }
            .map { "\($0.key)=\($0.value)" }.joined(separator: " ")
    }
}

/// One vCPU thread's exit counts since they were last taken: a slot per exit kind, so counting an exit allocates
/// nothing (the per-exit path must not; a test counts allocator calls over 200,000 exits).
final class ExitCounts {
    private let slots: UnsafeMutablePointer<UInt64>
    private var unknownReasons: [String: UInt64] = [:]
    /// Time in user space between `KVM_RUN` returning and the next call, and the exits it covers.
    var dispatchNs: UInt64 = 0
    var dispatched: UInt64 = 0

    init() {
        slots = .allocate(capacity: VCPUExit.kindNames.count)
        slots.initialize(repeating: 0, count: VCPUExit.kindNames.count)
    }

    deinit { slots.deallocate() }

    /// Counts `exit` (unknown reasons by their number, in a dictionary: they are rare).
    @inline(__always)
    func record(_ exit: VCPUExit) {
        if case .unknown = exit {
            unknownReasons[exit.name, default: 0] += 1
        } else {
            slots[exit.kindIndex] &+= 1
        }
    }

    /// Adds the counts to `statistics` and resets them to zero; allocates nothing unless an unknown
    /// exit reason was counted. (Called at every kick, about every 100 ms.)
    func flush(into statistics: ExitStatistics) {
        statistics.add(kindSlots: slots)
        for i in 0..<VCPUExit.kindNames.count { slots[i] = 0 }
        if !unknownReasons.isEmpty {
            statistics.merge(unknownReasons)
            unknownReasons.removeAll(keepingCapacity: true)
        }
    }
}
