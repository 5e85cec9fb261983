import Devices
import GuestMemory
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

@_silgen_name("getrandom")
private func c_getrandom(_ buf: UnsafeMutableRawPointer, _ len: Int, _ flags: UInt32) -> Int

/// virtio-rng (virtio 1.x, section 5.4): fills device-writable buffers with bytes from the host's
/// `getrandom(2)`. One request is served with at most `maxBytesPerRequest` bytes.
///
/// A `RateLimiter` (bandwidth: the bytes handed out; ops: requests) holds the queue when it runs
/// out of tokens; a timer on the device's event loop resumes it, in order.
public final class VirtioEntropy: VirtioDevice, @unchecked Sendable {
    /// Queue size offered.
    public static let queueSize: UInt16 = 256
    /// Largest amount of entropy returned for one request.
    public static let maxBytesPerRequest = 64 << 10

    let log: VirtioLog
    /// Limits the bytes and requests served.
    public let rateLimiter: RateLimiter
    private let active = Mutex<VirtioActivation?>(nil)
    private let throttleTimer: ThrottleTimer
    /// The request the rate limiter held back (guarded by `active`).
    private let held = HeldRequest()

    /// An entropy device limited by `rateLimit`, whose throttle timer runs on `eventLoop` (nil: a
    /// dispatch timer); guest-caused errors go to `log`.
    public init(rateLimit: RateLimitConfig? = nil, eventLoop: EventLoop? = nil, log: VirtioLog = .discard) {
        self.log = log
        rateLimiter = RateLimiter(rateLimit ?? RateLimitConfig())
        throttleTimer = ThrottleTimer(loop: eventLoop, log: log)
        throttleTimer.setAction { [weak self] in self?.active.withLock { $0 }?.schedule(0) }
    }

    public var deviceType: VirtioDeviceType { .entropy }
    public var deviceFeatures: UInt64 { 0 }
    public var queueMaxSizes: [UInt16] { [Self.queueSize] }
    public var configSize: Int { 0 }
    public func readConfig(offset: Int, data: UnsafeMutableRawBufferPointer) { copyConfig([], offset: offset, into: data) }
    public func writeConfig(offset: Int, data: UnsafeRawBufferPointer) {}

    public func activate(_ activation: VirtioActivation) throws(VirtioError) {
        active.withLock { $0 = activation }
    }

    public func reset() {
        active.withLock { a in
            a = nil
            held.chain = nil
        }
    }

    /// The request the rate limiter holds back.
    public func unconsumedChains(queue index: Int) -> UInt16 {
        active.withLock { _ in index == 0 && held.chain != nil ? 1 : 0 }
    }

    public func processQueue(_ index: Int) throws(VirtioError) {
        let result: Result<Void, VirtioError> = active.withLock { a in
            guard let a, index == 0, let q = a.queues.first ?? nil else { return .success(()) }
            do throws(VirtioError) {
                let added = try q.serve(throttledBy: rateLimiter, timer: throttleTimer, held: held, log: log,
                                        cost: { UInt64(Self.requestLength($0)) }) { chain in
                    var w = ChainWriter(memory: a.memory, chain: chain)
                    do {
                        try w.forEachSegment(Self.requestLength(chain)) { Self.fillRandom($0) }
                    } catch {
                        log.error("virtio-rng: \(error)")
                    }
                    q.addUsed(head: chain.head, length: UInt32(w.written))
                    return true
                }
                if added && q.needsInterrupt() { a.interrupt.signalQueue(0) }
                return .success(())
            } catch { return .failure(error) }
        }
        try result.get()
    }

    /// The bytes one request gets: its writable length, at most `maxBytesPerRequest`.
    static func requestLength(_ chain: DescriptorChain) -> Int {
        Int(min(chain.writableLength, UInt64(maxBytesPerRequest)))
    }

    /// Fills `buffer` from getrandom(2) (blocking only until the host pool is initialized).
    static func fillRandom(_ buffer: UnsafeMutableRawBufferPointer) {
        var done = 0
        while done < buffer.count {
            let n = c_getrandom(buffer.baseAddress! + done, buffer.count - done, 0)
            if n > 0 { done += n; continue }
            if n < 0 && errno == EINTR { continue }
            break
        }
    }
}
