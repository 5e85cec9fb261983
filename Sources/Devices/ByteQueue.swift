/// A bounded first-in first-out byte queue backed by a ring buffer.
///
/// Used for UART FIFOs and host input buffers. `push` on a full queue either refuses the
/// byte or drops the oldest one, as the caller chooses.
struct ByteQueue: Sendable {
    private var storage: [UInt8]
    private var head = 0
    /// Number of bytes queued.
    private(set) var count = 0

    /// Creates an empty queue holding at most `capacity` bytes (at least one).
    init(capacity: Int) {
        storage = [UInt8](repeating: 0, count: max(1, capacity))
    }

    /// Maximum number of bytes the queue holds.
    var capacity: Int { storage.count }
    var isEmpty: Bool { count == 0 }
    var isFull: Bool { count == storage.count }

    /// Appends `byte`; returns false (and drops `byte`) when the queue is full.
    @discardableResult
    mutating func push(_ byte: UInt8) -> Bool {
        guard count < storage.count else { return false }
        storage[(head + count) % storage.count] = byte
        count += 1
        return true
    }

    /// Appends `byte`, discarding the oldest byte when full. Returns true when a byte was dropped.
    @discardableResult
    mutating func pushDroppingOldest(_ byte: UInt8) -> Bool {
        if count < storage.count {
            push(byte)
            return false
        }
        storage[head] = byte
        head = (head + 1) % storage.count
        return true
    }

    /// Inserts `byte` at the front (it becomes the next one popped); false when full.
    @discardableResult
    mutating func pushFront(_ byte: UInt8) -> Bool {
        guard count < storage.count else { return false }
        head = (head + storage.count - 1) % storage.count
        storage[head] = byte
        count += 1
        return true
    }

    /// Removes and returns the oldest byte.
    mutating func pop() -> UInt8? {
        guard count > 0 else { return nil }
        let b = storage[head]
        head = (head + 1) % storage.count
        count -= 1
        return b
    }

    /// The oldest byte, without removing it.
    func peek() -> UInt8? { count > 0 ? storage[head] : nil }

    /// The queued bytes, oldest first.
    var contents: [UInt8] { (0..<count).map { storage[(head + $0) % storage.count] } }

    mutating func removeAll() {
        head = 0
        count = 0
    }
}
