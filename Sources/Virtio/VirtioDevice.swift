import GuestMemory
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// How a device tells the driver that it used buffers or changed its configuration.
/// The transport implements it (MSI-X vector or INTx with the ISR register).
public protocol VirtioInterrupt: Sendable {
    /// Used buffers were added to queue `queue`.
    func signalQueue(_ queue: Int)
    /// The device configuration changed.
    func signalConfigChange()
}

/// Where virtio errors caused by the guest are reported; the VMM connects it to its logger.
public typealias VirtioLogSink = @Sendable (String) -> Void

/// Rate-limited logging of guest-caused errors: at most `burst` messages per second, then a
/// count of the ones dropped.
public final class VirtioLog: Sendable {
    private let sink: VirtioLogSink
    private let burst: Int
    private let state = Mutex<(second: Int, count: Int, dropped: Int)>((0, 0, 0))

    /// A log sending at most `burst` messages per second to `sink`.
    public init(burst: Int = 10, sink: @escaping VirtioLogSink) {
        self.sink = sink
        self.burst = burst
    }

    /// A log that discards everything.
    public static let discard = VirtioLog { _ in }

    /// Reports `message` unless the limit for this second was reached.
    public func error(_ message: @autoclosure () -> String) {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        let now = Int(ts.tv_sec)
        let (emit, dropped) = state.withLock { s -> (Bool, Int) in
            var dropped = 0
            if s.second != now {
                dropped = s.dropped
                s = (now, 0, 0)
            }
            if s.count < burst { s.count += 1; return (true, dropped) }
            s.dropped += 1
            return (false, dropped)
        }
        if dropped > 0 { sink("virtio: \(dropped) more errors were not logged") }
        if emit { sink(message()) }
    }
}

/// What a device receives when the driver sets DRIVER_OK.
public struct VirtioActivation: Sendable {
    /// Guest RAM.
    public let memory: GuestMemory
    /// One entry per queue of the device: nil when the driver did not enable it.
    public let queues: [Virtqueue?]
    /// The negotiated features.
    public let features: UInt64
    /// Interrupt delivery.
    public let interrupt: any VirtioInterrupt
    /// Asks for `processQueue(i)` to run soon on the device's event-loop thread (for work that
    /// does not come from a driver notification, e.g. console input).
    public let schedule: @Sendable (Int) -> Void

    public init(memory: GuestMemory, queues: [Virtqueue?], features: UInt64, interrupt: any VirtioInterrupt,
                schedule: @escaping @Sendable (Int) -> Void) {
        self.memory = memory; self.queues = queues; self.features = features
        self.interrupt = interrupt; self.schedule = schedule
    }
}

/// A virtio device model, independent of the transport.
///
/// The transport negotiates features, tracks the device status and the queues' configuration,
/// and calls `activate` once the driver sets DRIVER_OK. `processQueue` runs on the device's
/// event-loop thread, never concurrently with `activate` or `reset` (the transport serializes
/// them).
public protocol VirtioDevice: AnyObject, Sendable {
    /// The device type (the PCI device ID is 0x1040 + type).
    var deviceType: VirtioDeviceType { get }
    /// Device-specific feature bits offered (the transport adds `VirtioFeature.common`).
    var deviceFeatures: UInt64 { get }
    /// Maximum size of each queue (the count is the number of queues).
    var queueMaxSizes: [UInt16] { get }
    /// Size of the device-specific configuration space in bytes.
    var configSize: Int { get }
    /// A driver read of the device configuration (`offset` + `data.count` ≤ `configSize`).
    func readConfig(offset: Int, data: UnsafeMutableRawBufferPointer)
    /// A driver write to the device configuration.
    func writeConfig(offset: Int, data: UnsafeRawBufferPointer)
    /// Starts the device with the driver's queues and negotiated features.
    func activate(_ activation: VirtioActivation) throws(VirtioError)
    /// Handles new buffers in queue `index`. A thrown error makes the transport set DEVICE_NEEDS_RESET.
    func processQueue(_ index: Int) throws(VirtioError)
    /// Stops using the queues and returns to the initial state.
    func reset()
    /// The VM is going away: reset and release threads or other resources.
    func shutdown()

    // Snapshots (the transport calls these while the device's event loop is paused).

    /// Finishes the requests in flight, so that their completions are in the used rings and no
    /// thread of the device touches guest memory until the loop runs again.
    func quiesce()
    /// How many chains the device took from queue `index` and holds unserved (the most recent
    /// ones it popped): a snapshot gives them back to the available ring.
    func unconsumedChains(queue index: Int) -> UInt16
    /// The device was activated from a snapshot (its queues continue from saved indices), before
    /// its event loop runs.
    func restored()
    /// What the device itself must keep across a snapshot beyond the transport's registers and
    /// rings (nil: nothing), e.g. the balloon's target size.
    func savedDeviceState() -> [UInt8]?
    /// Puts back what `savedDeviceState` returned, before the device is activated from the snapshot.
    func restoreDeviceState(_ bytes: [UInt8]) throws(VirtioError)
}

extension VirtioDevice {
    /// Default: a reset.
    public func shutdown() { reset() }
    /// Default: nothing runs outside the event loop.
    public func quiesce() {}
    /// Default: the device holds no chains.
    public func unconsumedChains(queue index: Int) -> UInt16 { 0 }
    /// Default: nothing to do.
    public func restored() {}
    /// Default: the device keeps nothing of its own.
    public func savedDeviceState() -> [UInt8]? { nil }
    /// Default: a device that keeps nothing refuses state it did not write.
    public func restoreDeviceState(_ bytes: [UInt8]) throws(VirtioError) {
        guard bytes.isEmpty else { throw .deviceState("\(deviceType) keeps no device state, the snapshot has \(bytes.count) bytes") }
    }
}

extension Virtqueue {
    /// Serves every available chain with `handler`, which returns the number of bytes it wrote
    /// (the used length). Malformed chains are logged and returned with length 0. Signals the
    /// interrupt when the driver wants one. Queue-fatal errors are thrown.
    public func serve(log: VirtioLog, interrupt: any VirtioInterrupt,
                      _ handler: (DescriptorChain) -> UInt32) throws(VirtioError) {
        var added = false
        try drain { item in
            switch item {
            case .chain(let chain):
                addUsed(head: chain.head, length: handler(chain))
            case .malformed(let head, let error):
                log.error("\(error)")
                addUsed(head: head, length: 0)
            }
            added = true
        }
        if added && needsInterrupt() { interrupt.signalQueue(index) }
    }
}

/// Reads `data.count` bytes at `offset` of a configuration image (bytes past its end read 0).
func copyConfig(_ bytes: [UInt8], offset: Int, into data: UnsafeMutableRawBufferPointer) {
    for i in 0..<data.count {
        let o = offset + i
        data[i] = o >= 0 && o < bytes.count ? bytes[o] : 0
    }
}
