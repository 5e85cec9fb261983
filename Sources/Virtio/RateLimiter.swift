import Devices
import Dispatch
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Parameters of one token bucket, as Firecracker's `TokenBucket`: `size` tokens, refilled from
/// empty to full in `refillTimeMs` milliseconds, plus `oneTimeBurst` extra tokens at the start
/// that are never refilled. A bucket with `size` 0 or `refillTimeMs` 0 does not limit anything.
public struct TokenBucketConfig: Codable, Sendable, Equatable {
    /// Capacity in tokens (bytes for a bandwidth bucket, operations for an ops bucket).
    public var size: UInt64
    /// Extra tokens available once, before the regular budget is used.
    public var oneTimeBurst: UInt64
    /// Milliseconds to refill the bucket from empty to full.
    public var refillTimeMs: UInt64

    public init(size: UInt64, oneTimeBurst: UInt64 = 0, refillTimeMs: UInt64) {
        self.size = size; self.oneTimeBurst = oneTimeBurst; self.refillTimeMs = refillTimeMs
    }

    /// Whether the bucket limits anything (Firecracker treats size 0 or refill time 0 as none).
    public var isLimiting: Bool { size > 0 && refillTimeMs > 0 }
}

/// A rate limit of a device: a bandwidth bucket (bytes) and an ops bucket (requests), either
/// of which may be absent.
public struct RateLimitConfig: Codable, Sendable, Equatable {
    /// Bytes transferred.
    public var bandwidth: TokenBucketConfig?
    /// Requests.
    public var ops: TokenBucketConfig?

    public init(bandwidth: TokenBucketConfig? = nil, ops: TokenBucketConfig? = nil) {
        self.bandwidth = bandwidth; self.ops = ops
    }
}

/// One token bucket's state (Firecracker's algorithm): starts full, refills continuously at
/// `size / refillTime`, never above `size`. A value type driven by an explicit clock (ns).
public struct TokenBucketState: Sendable, Equatable {
    /// The parameters.
    public let config: TokenBucketConfig
    /// Tokens available now (after the last `refill`). Negative after an oversized request.
    public private(set) var budget: Int64
    /// One-time burst tokens left.
    public private(set) var oneTimeBurst: UInt64
    private var lastUpdate: UInt64
    private let refillNs: UInt64

    /// A full bucket at time `now` (nanoseconds of a monotonic clock). `config` must be limiting.
    public init(_ config: TokenBucketConfig, now: UInt64) {
        self.config = config
        budget = Int64(clamping: config.size)
        oneTimeBurst = config.oneTimeBurst
        lastUpdate = now
        let (ns, o) = config.refillTimeMs.multipliedReportingOverflow(by: 1_000_000)
        refillNs = o ? UInt64.max : max(1, ns)
    }

    private var size: Int64 { Int64(clamping: config.size) }

    /// Adds the tokens earned since the last update, up to `size`.
    public mutating func refill(now: UInt64) {
        guard now > lastUpdate else { return }
        if budget >= size { lastUpdate = now; return }
        let elapsed = now - lastUpdate
        let earned = UInt128(elapsed) * UInt128(config.size) / UInt128(refillNs)
        guard earned > 0 else { return }
        let room = UInt128(Int128(size) - Int128(budget))
        if earned >= room {
            budget = size
            lastUpdate = now
        } else {
            budget += Int64(earned)
            // Advance by exactly the time those tokens took, keeping the fraction for later.
            lastUpdate += UInt64(earned * UInt128(refillNs) / UInt128(config.size))
        }
    }

    /// Whether `tokens` can be taken now (after `refill`): from the one-time burst and the budget
    /// together, or, for more tokens than the bucket holds, when the bucket is full.
    public func canTake(_ tokens: UInt64) -> Bool {
        if tokens <= oneTimeBurst { return true }
        let rest = tokens - oneTimeBurst
        if rest > config.size { return budget >= size }
        return budget >= Int64(clamping: rest)
    }

    /// Takes `tokens` (call only when `canTake` is true): the one-time burst first, then the
    /// budget, which goes negative for a request larger than the bucket (the debt is refilled
    /// before anything else is served, as Firecracker's over-consumption blocks the limiter).
    public mutating func take(_ tokens: UInt64) {
        let fromBurst = min(tokens, oneTimeBurst)
        oneTimeBurst -= fromBurst
        budget -= Int64(clamping: tokens - fromBurst)
    }

    /// Nanoseconds from the last update until `tokens` can be taken (0 if now).
    public func waitTime(for tokens: UInt64) -> UInt64 {
        if canTake(tokens) { return 0 }
        let rest = tokens - oneTimeBurst
        let target = rest > config.size ? size : Int64(clamping: rest)
        let deficit = UInt128(Int128(target) - Int128(budget))
        let ns = (deficit * UInt128(refillNs) + UInt128(config.size) - 1) / UInt128(config.size)
        return ns > UInt128(UInt64.max) ? UInt64.max : UInt64(ns)
    }

    /// The time of the last update (the base of `waitTime`).
    public var updatedAt: UInt64 { lastUpdate }

    /// Gives back tokens taken by a request that was not carried out (never above `size`).
    public mutating func giveBack(_ tokens: UInt64) {
        budget = min(size, budget &+ Int64(clamping: tokens))
    }
}

/// A device's rate limiter: optional bandwidth and ops buckets, thread-safe. Each request asks
/// `consume(bytes:)` for one op and its bytes from both buckets at once: either both have
/// enough and the request goes ahead, or nothing is taken and the answer says how long to wait.
public final class RateLimiter: Sendable {
    /// What `consume` decided.
    public enum Decision: Sendable, Equatable {
        /// Go ahead (the tokens were taken).
        case allowed
        /// Not now: retry after this many nanoseconds (at least 1 ms).
        case throttled(retryAfterNs: UInt64)
    }
    /// How an update changes one bucket (Firecracker's `BucketUpdate`).
    public enum BucketUpdate: Sendable, Equatable {
        /// Keep the bucket as it is.
        case keep
        /// Remove the bucket (no limit).
        case disable
        /// Replace the bucket by a new, full one.
        case set(TokenBucketConfig)

        /// `.set` for a limiting configuration, `.disable` for size or refill time 0, `.keep` for nil.
        public init(_ config: TokenBucketConfig?) {
            guard let config else { self = .keep; return }
            self = config.isLimiting ? .set(config) : .disable
        }
    }

    /// A monotonic clock in nanoseconds.
    public typealias Clock = @Sendable () -> UInt64

    private struct Buckets: Sendable {
        var bandwidth: TokenBucketState?
        var ops: TokenBucketState?
    }
    private let buckets: Mutex<Buckets>
    private let clock: Clock

    /// Shortest retry delay handed out (a timer per request would cost more than it saves).
    public static let minimumRetryNs: UInt64 = 1_000_000

    /// The system's CLOCK_MONOTONIC in nanoseconds.
    public static let monotonicClock: Clock = {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// A limiter for `config` (buckets that are absent or not limiting are left out).
    public init(_ config: RateLimitConfig, clock: @escaping Clock = RateLimiter.monotonicClock) {
        self.clock = clock
        let now = clock()
        buckets = Mutex(Buckets(bandwidth: config.bandwidth.flatMap { $0.isLimiting ? TokenBucketState($0, now: now) : nil },
                                ops: config.ops.flatMap { $0.isLimiting ? TokenBucketState($0, now: now) : nil }))
    }

    /// Whether any bucket is active.
    public var isLimiting: Bool { buckets.withLock { $0.bandwidth != nil || $0.ops != nil } }

    /// The current configuration (absent buckets are nil).
    public var configuration: RateLimitConfig {
        buckets.withLock { RateLimitConfig(bandwidth: $0.bandwidth?.config, ops: $0.ops?.config) }
    }

    /// Asks for one operation of `bytes` bytes.
    public func consume(bytes: UInt64, ops: UInt64 = 1) -> Decision {
        let now = clock()
        return buckets.withLock { b in
            b.bandwidth?.refill(now: now)
            b.ops?.refill(now: now)
            let bwOK = b.bandwidth?.canTake(bytes) ?? true
            let opsOK = b.ops?.canTake(ops) ?? true
            if bwOK && opsOK {
                b.bandwidth?.take(bytes)
                b.ops?.take(ops)
                return .allowed
            }
            func wait(_ s: TokenBucketState?, _ n: UInt64) -> UInt64 {
                guard let s else { return 0 }
                let w = s.waitTime(for: n)
                let since = now > s.updatedAt ? now - s.updatedAt : 0
                return w > since ? w - since : 0
            }
            let ns = max(wait(b.bandwidth, bytes), wait(b.ops, ops), Self.minimumRetryNs)
            return .throttled(retryAfterNs: ns)
        }
    }

    /// Charges `bytes` (and `ops`) that were already used, whatever the buckets hold: the budget
    /// may go negative, which holds later requests back until it is refilled. For work whose size
    /// is known only afterwards (a received frame).
    public func charge(bytes: UInt64, ops: UInt64 = 0) {
        let now = clock()
        buckets.withLock { b in
            b.bandwidth?.refill(now: now)
            b.ops?.refill(now: now)
            b.bandwidth?.take(bytes)
            b.ops?.take(ops)
        }
    }

    /// Changes the buckets at run time; a new bucket starts full.
    public func update(bandwidth: BucketUpdate, ops: BucketUpdate) {
        let now = clock()
        buckets.withLock { b in
            switch bandwidth {
            case .keep: break
            case .disable: b.bandwidth = nil
            case .set(let c): b.bandwidth = TokenBucketState(c, now: now)
            }
            switch ops {
            case .keep: break
            case .disable: b.ops = nil
            case .set(let c): b.ops = TokenBucketState(c, now: now)
            }
        }
    }

    /// Bucket states (for tests and diagnostics).
    public var state: (bandwidth: TokenBucketState?, ops: TokenBucketState?) {
        buckets.withLock { ($0.bandwidth, $0.ops) }
    }
}

@_silgen_name("timerfd_create")
private func c_timerfd_create(_ clock: Int32, _ flags: Int32) -> Int32
@_silgen_name("timerfd_settime")
private func c_timerfd_settime(_ fd: Int32, _ flags: Int32, _ new: UnsafePointer<itimerspec>,
                               _ old: UnsafeMutablePointer<itimerspec>?) -> Int32

/// A one-shot timer that asks a device to process its queue again once a rate limiter has
/// tokens: a timerfd watched by the device's event loop when there is one, a dispatch timer
/// otherwise (devices built without a loop, unit tests).
public final class ThrottleTimer: Sendable {
    private let timerFD: EventFD?
    private let token: EventLoop.Token?
    private let loop: EventLoop?
    private let action = ActionBox()

    /// A timer on `loop` (nil, or when no timerfd can be made: a dispatch timer, and the failure
    /// goes to `log`). Call `setAction` before `arm`.
    public init(loop: EventLoop?, log: VirtioLog = .discard) {
        self.loop = loop
        var fd: EventFD?
        var token: EventLoop.Token?
        if let loop {
            // 0o4000 = TFD_NONBLOCK, 0o2000000 = TFD_CLOEXEC (the values of O_NONBLOCK, O_CLOEXEC).
            let f = c_timerfd_create(CLOCK_MONOTONIC, Int32(O_NONBLOCK | O_CLOEXEC))
            if f >= 0 {
                let timer = EventFD(adopting: f)
                do {
                    token = try loop.add(timer) { [action] in action.run() }
                    fd = timer
                } catch {
                    log.error("rate limiter: cannot watch a timerfd (\(error)); using a dispatch timer")
                }
            } else {
                log.error("rate limiter: \(EventError(operation: "timerfd_create", errno: errno)); using a dispatch timer")
            }
        }
        timerFD = fd
        self.token = token
    }

    deinit {
        if let token { loop?.remove(token) }
    }

    /// What runs when the timer fires (on the event-loop thread, or a dispatch thread).
    public func setAction(_ body: @escaping @Sendable () -> Void) { action.set(body) }

    /// Fires once after `ns` nanoseconds (re-arming replaces an earlier deadline).
    public func arm(afterNs ns: UInt64) {
        let ns = max(ns, 1)
        if let timerFD {
            var spec = itimerspec()
            spec.it_value.tv_sec = Int(min(ns / 1_000_000_000, UInt64(Int32.max)))
            spec.it_value.tv_nsec = Int(ns % 1_000_000_000)
            _ = c_timerfd_settime(timerFD.fd, 0, &spec, nil)
        } else {
            let deadline = DispatchTime.now() + .nanoseconds(Int(min(ns, UInt64(Int32.max) * 1_000_000_000)))
            DispatchQueue.global().asyncAfter(deadline: deadline) { [action] in action.run() }
        }
    }
}

/// The timer's action, shared with the event-loop handler.
private final class ActionBox: Sendable {
    private let body = Mutex<(@Sendable () -> Void)?>(nil)
    func set(_ b: @escaping @Sendable () -> Void) { body.withLock { $0 = b } }
    func run() { body.withLock { $0 }?() }
}

/// The request a rate limiter held back: it goes first the next time its queue is served.
/// Guarded by the owning device's lock.
final class HeldRequest: @unchecked Sendable {
    var chain: DescriptorChain?
}

extension Virtqueue {
    /// Serves the queue under `limiter`: takes requests (the held one first) while the limiter
    /// admits them, charging `cost(chain)` bytes and one op each, and hands each to `handle`,
    /// which returns whether it added a used entry. Malformed chains are logged and returned with
    /// length 0. When the limiter says wait, the request is held and `timer` armed: the ring is
    /// left as it is, so no request is lost or reordered. Returns whether used entries were added.
    func serve(throttledBy limiter: RateLimiter, timer: ThrottleTimer, held: HeldRequest, log: VirtioLog,
               cost: (DescriptorChain) -> UInt64, handle: (DescriptorChain) -> Bool) throws(VirtioError) -> Bool {
        var added = false
        repeat {
            while true {
                let item: AvailableItem
                if let h = held.chain {
                    held.chain = nil
                    item = .chain(h)
                } else if let next = try popAvailable() {
                    item = next
                } else {
                    break
                }
                switch item {
                case .chain(let chain):
                    if case .throttled(let ns) = limiter.consume(bytes: cost(chain)) {
                        held.chain = chain
                        timer.arm(afterNs: ns)
                        return added
                    }
                    if handle(chain) { added = true }
                case .malformed(let head, let error):
                    log.error("\(error)")
                    addUsed(head: head, length: 0)
                    added = true
                }
            }
        } while enableNotification()
        return added
    }
}
