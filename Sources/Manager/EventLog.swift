import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// One state change of a VM or a network (`GET /events`, `DIR/events.log`).
public struct VMEvent: Codable, Sendable, Equatable {
    /// Increasing sequence number (continues across daemon restarts).
    public var seq: UInt64
    /// ISO 8601 time.
    public var time: String
    /// The VM's name (empty for a network's event).
    public var vm: String
    /// The network's name, for network events (`defined`, `undefined`, `started`, `stopped`,
    /// `start-failed`, `reattached`, `dnsmasq-restarted`); absent for VM events.
    public var network: String?
    /// `defined`, `undefined`, `starting`, `started`, `paused`, `resumed`, `shutting-down`,
    /// `stopped`, `reattached`, `start-failed`.
    public var event: String
    /// Free text (exit reason, error).
    public var detail: String

    public init(seq: UInt64, time: String, vm: String, network: String? = nil, event: String, detail: String) {
        self.seq = seq; self.time = time; self.vm = vm; self.network = network; self.event = event; self.detail = detail
    }

    /// The event as one JSON line (with its newline).
    public var jsonLine: [UInt8] {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return Array((try? e.encode(self)) ?? Data()) + [UInt8(ascii: "\n")]
    }
}

/// ISO 8601 timestamps with milliseconds (UTC).
enum Timestamp {
    static func now() -> String { string(Date()) }
    static func string(_ date: Date) -> String {
        date.formatted(style)
    }
    /// The date `text` (as written by `string`) names, if it parses.
    static func date(_ text: String) -> Date? {
        try? style.parse(text)
    }
    private static let style = Date.ISO8601FormatStyle(includingFractionalSeconds: true)
}

/// The event log: appends each event as a JSON line to a file, keeps the recent ones in memory
/// for replay (`since`), and calls subscribers as events happen.
public final class EventLog: Sendable {
    /// The JSON-lines file.
    public let path: String
    /// How many events are kept in memory for replay.
    public static let memoryLimit = 10_000

    private struct State {
        var seq: UInt64 = 0
        var recent: [VMEvent] = []
        var subscribers: [UInt64: @Sendable (VMEvent) -> Void] = [:]
        var nextID: UInt64 = 0
    }
    private let state = Mutex(State())

    /// Opens the log at `path`, continuing its sequence numbers (unparsable lines are skipped).
    public init(path: String) {
        self.path = path
        let text = (try? AtomicFile.read(path, limit: 64 << 20)).map { String(decoding: $0, as: UTF8.self) } ?? ""
        var recent: [VMEvent] = []
        var seq: UInt64 = 0
        let decoder = JSONDecoder()
        for line in text.split(separator: "\n") {
            if let e = try? decoder.decode(VMEvent.self, from: Data(line.utf8)) {
                recent.append(e)
                seq = max(seq, e.seq)
            }
        }
        if recent.count > Self.memoryLimit { recent.removeFirst(recent.count - Self.memoryLimit) }
        state.withLock { $0.seq = seq; $0.recent = recent }
    }

    /// The last sequence number used.
    public var lastSeq: UInt64 { state.withLock { $0.seq } }

    /// Records an event: appended to the file, then given to every subscriber.
    @discardableResult
    public func emit(vm: String, _ event: String, _ detail: String = "") -> VMEvent {
        emit(vm: vm, network: nil, event, detail)
    }

    /// Records a network's event (`vm` is empty, `network` names it).
    @discardableResult
    public func emit(network: String, _ event: String, _ detail: String = "") -> VMEvent {
        emit(vm: "", network: network, event, detail)
    }

    private func emit(vm: String, network: String?, _ event: String, _ detail: String) -> VMEvent {
        let (e, subscribers) = state.withLock { s -> (VMEvent, [@Sendable (VMEvent) -> Void]) in
            s.seq += 1
            let e = VMEvent(seq: s.seq, time: Timestamp.now(), vm: vm, network: network, event: event, detail: detail)
            s.recent.append(e)
            if s.recent.count > Self.memoryLimit { s.recent.removeFirst(s.recent.count - Self.memoryLimit) }
            // Appended under the lock so the file's order is the sequence order.
            let fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o644)
            if fd >= 0 {
                let line = e.jsonLine
                _ = line.withUnsafeBytes { write(fd, $0.baseAddress!, $0.count) }
                close(fd)
            }
            return (e, Array(s.subscribers.values))
        }
        for s in subscribers { s(e) }
        return e
    }

    /// Stored events with `seq > since`, oldest first.
    public func events(since: UInt64) -> [VMEvent] {
        state.withLock { $0.recent.filter { $0.seq > since } }
    }

    /// Subscribes `handler` to new events; when `since` is given, first returns the stored events
    /// after it (atomically with the subscription, so none is missed or doubled).
    public func subscribe(since: UInt64?, _ handler: @escaping @Sendable (VMEvent) -> Void) -> (id: UInt64, replay: [VMEvent]) {
        state.withLock { s in
            s.nextID += 1
            s.subscribers[s.nextID] = handler
            let replay = since.map { n in s.recent.filter { $0.seq > n } } ?? []
            return (s.nextID, replay)
        }
    }

    /// Ends a subscription.
    public func unsubscribe(_ id: UInt64) {
        _ = state.withLock { $0.subscribers.removeValue(forKey: id) }
    }
}
