import Devices
import GuestMemory
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// virtio-balloon (virtio 1.x, section 5.5): the host asks the guest to give back `targetPages`
/// 4 KiB pages; the guest hands their frame numbers over the inflate queue and the host discards
/// them (`madvise`), so the memory returns to the host. Deflating hands them back (nothing to do:
/// the guest touches them again). With the stats queue the guest reports its memory statistics
/// when the host returns the stats buffer (every `statsInterval` seconds); with free page reporting
/// the guest reports free ranges, which the host discards too.
///
/// The guest is untrusted: page numbers outside RAM, odd-sized buffers and ranges that are not page
/// aligned are counted and skipped, never followed.
public final class VirtioBalloon: VirtioDevice, @unchecked Sendable {
    /// Feature bits (section 5.5.3).
    public enum Feature {
        public static let mustTellHost: UInt64 = 1 << 0
        public static let statsVQ: UInt64 = 1 << 1
        public static let deflateOnOOM: UInt64 = 1 << 2
        public static let pageReporting: UInt64 = 1 << 5
    }

    /// Statistics tags (section 5.5.6.3) and their names in Firecracker's `/balloon/statistics`.
    public static let statNames: [UInt16: String] = [
        0: "swap_in", 1: "swap_out", 2: "major_faults", 3: "minor_faults", 4: "free_memory", 5: "total_memory",
        6: "available_memory", 7: "disk_caches", 8: "hugetlb_allocations", 9: "hugetlb_failures",
    ]

    /// Page size of the balloon protocol.
    public static let pageSize: UInt64 = 4096
    /// Queue size offered for each queue.
    public static let queueSize: UInt16 = 256

    /// What the host asked for and what the guest reports.
    public struct Status: Sendable, Equatable, Codable {
        /// Pages the host wants the guest to give back (config `num_pages`).
        public var targetPages: UInt32
        /// Pages the guest says it gave back (config `actual`).
        public var actualPages: UInt32
        /// Pages discarded through the inflate queue (cumulative).
        public var inflatedPages: UInt64
        /// Pages handed back through the deflate queue (cumulative).
        public var deflatedPages: UInt64
        /// Bytes discarded through free page reporting (cumulative).
        public var reportedBytes: UInt64
        /// Page numbers or ranges the guest gave that were not guest RAM (skipped).
        public var invalidEntries: UInt64
    }

    let log: VirtioLog
    private let offered: UInt64
    private let statsTimer: ThrottleTimer?
    private struct State {
        var active: VirtioActivation?
        var negotiated: UInt64 = 0
        var status = Status(targetPages: 0, actualPages: 0, inflatedPages: 0, deflatedPages: 0, reportedBytes: 0, invalidEntries: 0)
        /// The stats buffer the driver left with the device, returned to ask for new figures.
        var statsHead: UInt16?
        var stats: [UInt16: UInt64] = [:]
        var statsInterval: UInt32
    }
    private let state: Mutex<State>

    /// A balloon device. `deflateOnOOM` offers VIRTIO_BALLOON_F_DEFLATE_ON_OOM; the stats queue is
    /// always offered and polled every `statsInterval` seconds on `eventLoop` (0: not polled);
    /// `freePageReporting` offers VIRTIO_BALLOON_F_PAGE_REPORTING.
    public init(deflateOnOOM: Bool, statsInterval: UInt32, freePageReporting: Bool, eventLoop: EventLoop?,
                log: VirtioLog = .discard) {
        self.log = log
        var f: UInt64 = Feature.statsVQ
        if deflateOnOOM { f |= Feature.deflateOnOOM }
        if freePageReporting { f |= Feature.pageReporting }
        offered = f
        state = Mutex(State(statsInterval: statsInterval))
        statsTimer = eventLoop.map { ThrottleTimer(loop: $0, log: log) }
        statsTimer?.setAction { [weak self] in self?.requestStats() }
    }

    public var deviceType: VirtioDeviceType { .balloon }
    public var deviceFeatures: UInt64 { offered }
    /// inflateq, deflateq, statsq, reporting_vq (free page hinting is not offered, so the driver
    /// numbers the reporting queue 3, or 2 without the stats queue).
    public var queueMaxSizes: [UInt16] { [Self.queueSize, Self.queueSize, Self.queueSize, Self.queueSize] }
    public var configSize: Int { 8 }

    /// The current figures.
    public var status: Status { state.withLock { $0.status } }
    /// The guest's last statistics, by Firecracker's names (empty before the first report).
    public var statistics: [String: UInt64] {
        state.withLock { s in
            var out: [String: UInt64] = [:]
            for (tag, v) in s.stats { out[Self.statNames[tag] ?? "tag_\(tag)"] = v }
            return out
        }
    }

    /// Asks the guest for `pages` pages in total and tells it (configuration change).
    public func setTarget(pages: UInt32) {
        let a = state.withLock { s -> VirtioActivation? in
            s.status.targetPages = pages
            return s.active
        }
        a?.interrupt.signalConfigChange()
    }

    /// Changes the statistics polling interval (seconds, 0: off).
    public func setStatsInterval(_ seconds: UInt32) {
        state.withLock { $0.statsInterval = seconds }
        armStatsTimer()
    }

    public func readConfig(offset: Int, data: UnsafeMutableRawBufferPointer) {
        let s = state.withLock { $0.status }
        var c = [UInt8](repeating: 0, count: 8)
        c.putLE(s.targetPages, at: 0)
        c.putLE(s.actualPages, at: 4)
        copyConfig(c, offset: offset, into: data)
    }

    public func writeConfig(offset: Int, data: UnsafeRawBufferPointer) {
        // Only `actual` (offset 4, 4 bytes) is the driver's to write.
        guard offset >= 4, offset + data.count <= 8 else { return }
        state.withLock { s in
            var bytes = [UInt8](repeating: 0, count: 8)
            bytes.putLE(s.status.actualPages, at: 4)
            for i in 0..<data.count { bytes[offset + i] = data[i] }
            s.status.actualPages = bytes.getLE(UInt32.self, at: 4) ?? s.status.actualPages
        }
    }

    public func activate(_ activation: VirtioActivation) throws(VirtioError) {
        guard activation.queues.count >= 2, activation.queues[0] != nil, activation.queues[1] != nil else {
            throw .queueConfiguration(queue: 0, reason: "virtio-balloon needs its inflate and deflate queues enabled")
        }
        state.withLock { s in
            s.active = activation
            s.negotiated = activation.features
            s.statsHead = nil
        }
    }

    public func reset() {
        state.withLock { s in
            s.active = nil
            s.statsHead = nil
        }
    }

    /// The stats buffer the device holds goes back to the available ring in a snapshot.
    public func unconsumedChains(queue index: Int) -> UInt16 {
        state.withLock { s in index == 2 && role(of: 2, s.negotiated) == 2 && s.statsHead != nil ? 1 : 0 }
    }

    /// A snapshot keeps the host's target and the driver's `actual` (8 bytes, little-endian) and the
    /// polling interval (4 more).
    public func savedDeviceState() -> [UInt8]? {
        state.withLock { s in
            var b = [UInt8](repeating: 0, count: 12)
            b.putLE(s.status.targetPages, at: 0)
            b.putLE(s.status.actualPages, at: 4)
            b.putLE(s.statsInterval, at: 8)
            return b
        }
    }

    public func restoreDeviceState(_ bytes: [UInt8]) throws(VirtioError) {
        guard bytes.count == 12, let target = bytes.getLE(UInt32.self, at: 0), let actual = bytes.getLE(UInt32.self, at: 4),
              let interval = bytes.getLE(UInt32.self, at: 8) else {
            throw .deviceState("virtio-balloon: \(bytes.count) bytes of device state, expected 12")
        }
        state.withLock { s in
            s.status.targetPages = target
            s.status.actualPages = actual
            s.statsInterval = interval
        }
    }

    /// Queue index of the stats and reporting queues under the negotiated features.
    private func role(of index: Int, _ features: UInt64) -> Int {
        let stats = features & Feature.statsVQ != 0
        switch index {
        case 0, 1: return index
        case 2: return stats ? 2 : (features & Feature.pageReporting != 0 ? 4 : -1)
        case 3: return stats && features & Feature.pageReporting != 0 ? 4 : -1
        default: return -1
        }
    }

    public func processQueue(_ index: Int) throws(VirtioError) {
        let result: Result<Void, VirtioError> = state.withLock { s in
            guard let a = s.active, index < a.queues.count, let q = a.queues[index] else { return .success(()) }
            do throws(VirtioError) {
                switch role(of: index, s.negotiated) {
                case 0, 1: try pageNumbers(&s, q, a, inflate: index == 0)
                case 2: try takeStats(&s, q, a)
                case 4: try freePages(&s, q, a)
                default: break
                }
            } catch { return .failure(error) }
            return .success(())
        }
        try result.get()
    }

    /// Inflate: discard each listed page; deflate: count them (the guest uses them again).
    private func pageNumbers(_ s: inout State, _ q: Virtqueue, _ a: VirtioActivation, inflate: Bool) throws(VirtioError) {
        var invalid: UInt64 = 0, pages: UInt64 = 0
        try q.serve(log: log, interrupt: a.interrupt) { chain in
            var r = ChainReader(memory: a.memory, chain: chain)
            let count = Int(min(r.remaining, 1 << 20)) / 4
            guard let bytes = try? r.read(count * 4) else { invalid += 1; return 0 }
            for i in 0..<count {
                let pfn = UInt64(bytes.getLE(UInt32.self, at: 4 * i) ?? 0)
                let gpa = pfn * Self.pageSize
                guard a.memory.contains(gpa, count: Self.pageSize) else { invalid += 1; continue }
                pages += 1
                if inflate { discard(a.memory, gpa, Self.pageSize) }
            }
            return 0
        }
        if inflate { s.status.inflatedPages += pages } else { s.status.deflatedPages += pages }
        s.status.invalidEntries += invalid
        if invalid > 0 { log.error("virtio-balloon: \(invalid) page numbers outside guest RAM skipped") }
    }

    /// Free page reporting: each device-writable buffer is a free range of guest RAM; discard it.
    private func freePages(_ s: inout State, _ q: Virtqueue, _ a: VirtioActivation) throws(VirtioError) {
        var bytes: UInt64 = 0, invalid: UInt64 = 0
        try q.serve(log: log, interrupt: a.interrupt) { chain in
            for b in chain.writable {
                let len = UInt64(b.length)
                guard b.address % Self.pageSize == 0, len % Self.pageSize == 0, len > 0 else { invalid += 1; continue }
                discard(a.memory, b.address, len)
                bytes += len
            }
            return 0
        }
        s.status.reportedBytes += bytes
        s.status.invalidEntries += invalid
    }

    /// Stats: read the guest's figures and keep the buffer until the next poll returns it.
    private func takeStats(_ s: inout State, _ q: Virtqueue, _ a: VirtioActivation) throws(VirtioError) {
        while let item = try q.popAvailable() {
            switch item {
            case .malformed(let head, let error):
                log.error("virtio-balloon: \(error)")
                q.addUsed(head: head, length: 0)
            case .chain(let chain):
                var r = ChainReader(memory: a.memory, chain: chain)
                let n = Int(min(r.remaining, 4096)) / 10
                if let bytes = try? r.read(n * 10) {
                    for i in 0..<n {
                        let tag = bytes.getLE(UInt16.self, at: 10 * i) ?? 0
                        s.stats[tag] = bytes.getLE(UInt64.self, at: 10 * i + 2) ?? 0
                    }
                }
                if let old = s.statsHead { q.addUsed(head: old, length: 0) } // a second buffer: give the first back
                s.statsHead = chain.head
            }
        }
        _ = q.enableNotification()
        armStatsTimer(&s)
    }

    /// Returns the stats buffer, asking the guest for new figures (the poll timer).
    private func requestStats() {
        let a: VirtioActivation? = state.withLock { s in
            guard let a = s.active, let head = s.statsHead, role(of: 2, s.negotiated) == 2, let q = a.queues[2] else { return nil }
            s.statsHead = nil
            q.addUsed(head: head, length: 0)
            return q.needsInterrupt() ? a : nil
        }
        a?.interrupt.signalQueue(2)
    }

    private func armStatsTimer() { state.withLock { armStatsTimer(&$0) } }

    private func armStatsTimer(_ s: inout State) {
        guard s.statsInterval > 0, s.statsHead != nil else { return }
        statsTimer?.arm(afterNs: UInt64(s.statsInterval) * 1_000_000_000)
    }

    /// Gives `count` bytes of guest RAM at `gpa` back to the host (their content is the guest's to
    /// lose). `MADV_REMOVE` frees shared memory (memfd, file backends; it fails on private mappings),
    /// `MADV_DONTNEED` private memory (anonymous, or the copy-on-write copies over a snapshot file).
    private func discard(_ memory: GuestMemory, _ gpa: UInt64, _ count: UInt64) {
        guard let p = try? memory.translate(gpa, count: count) else { return }
        if madvise(p, Int(count), MADV_REMOVE) != 0 { _ = madvise(p, Int(count), MADV_DONTNEED) }
        memory.dirtyLog.mark(gpa, count: count)
    }
}
