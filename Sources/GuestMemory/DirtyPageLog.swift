import Synchronization

/// The guest pages the VMM's own devices wrote (virtio buffers and rings), for diff snapshots:
/// KVM logs only what vCPUs write (`KVM_GET_DIRTY_LOG`), so device writes are recorded here, one
/// bit per 4 KiB page and region. Off until `enable()`; marking then costs a lock per call (devices
/// mark once per completed request, not per byte).
public final class DirtyPageLog: Sendable {
    /// Page size of the log.
    public static let pageSize: UInt64 = 4096

    private let enabled = Atomic<Bool>(false)
    private let layout: [(start: UInt64, size: UInt64)]
    private let bitmaps: Mutex<[[UInt64]]>

    /// A log over regions given as (start, size), in address order.
    public init(regions: [(start: UInt64, size: UInt64)]) {
        layout = regions
        bitmaps = Mutex(regions.map { [UInt64](repeating: 0, count: Int(($0.size / Self.pageSize + 63) / 64)) })
    }

    /// Whether device writes are being logged.
    public var isEnabled: Bool { enabled.load(ordering: .relaxed) }

    /// Starts logging (from a clean log).
    public func enable() {
        _ = take()
        enabled.store(true, ordering: .releasing)
    }

    /// Records that `count` bytes at `gpa` were written (parts outside RAM are ignored).
    public func mark(_ gpa: UInt64, count: UInt64) {
        guard count > 0, isEnabled else { return }
        let (end, overflow) = gpa.addingReportingOverflow(count)
        let last = overflow ? UInt64.max : end - 1
        bitmaps.withLock { maps in
            for (i, r) in layout.enumerated() where gpa < r.start + r.size && last >= r.start {
                let first = (max(gpa, r.start) - r.start) / Self.pageSize
                let final = (min(last, r.start + r.size - 1) - r.start) / Self.pageSize
                for p in first...final { maps[i][Int(p / 64)] |= 1 << (p % 64) }
            }
        }
    }

    /// The pages marked since the last call, per region (bit `i % 64` of word `i / 64` is page
    /// `i`), and a clean log.
    public func take() -> [[UInt64]] {
        bitmaps.withLock { maps in
            let out = maps
            for i in maps.indices { for w in maps[i].indices { maps[i][w] = 0 } }
            return out
        }
    }
}
