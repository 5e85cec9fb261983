import GuestMemory
import Synchronization

/// One guest buffer of a descriptor chain, already checked to lie inside guest RAM.
public struct VirtioBuffer: Sendable, Equatable {
    /// Guest-physical address.
    public let address: UInt64
    /// Length in bytes (may be 0).
    public let length: UInt32
    /// Index of the descriptor it came from (in its table) for error messages.
    public let descriptor: UInt16

    public init(address: UInt64, length: UInt32, descriptor: UInt16) {
        self.address = address; self.length = length; self.descriptor = descriptor
    }
}

/// A validated descriptor chain: the device-readable buffers, then the device-writable ones.
public struct DescriptorChain: Sendable, Equatable {
    /// The queue the chain came from.
    public let queue: Int
    /// Head descriptor index (what goes back in the used ring).
    public let head: UInt16
    /// Device-readable buffers, in order.
    public let readable: [VirtioBuffer]
    /// Device-writable buffers, in order.
    public let writable: [VirtioBuffer]

    /// Total bytes of the readable buffers.
    public var readableLength: UInt64 { readable.reduce(0) { $0 + UInt64($1.length) } }
    /// Total bytes of the writable buffers.
    public var writableLength: UInt64 { writable.reduce(0) { $0 + UInt64($1.length) } }
}

/// What `Virtqueue.popAvailable()` found in the available ring.
public enum AvailableItem: Sendable, Equatable {
    /// A well-formed chain.
    case chain(DescriptorChain)
    /// A malformed chain, consumed from the ring: the device should return `head` in the used ring
    /// (written length 0) and log `error`.
    case malformed(head: UInt16, error: VirtioError)
}

/// Guest-physical locations and parameters of one split virtqueue, as the driver configured them.
public struct VirtqueueLayout: Sendable, Equatable {
    /// Queue size (a power of two, 1…32768).
    public var size: UInt16
    /// Descriptor table (16-byte aligned, 16 × size bytes).
    public var descriptorTable: UInt64
    /// Available ring (2-byte aligned, 6 + 2 × size bytes).
    public var availableRing: UInt64
    /// Used ring (4-byte aligned, 6 + 8 × size bytes).
    public var usedRing: UInt64

    public init(size: UInt16, descriptorTable: UInt64, availableRing: UInt64, usedRing: UInt64) {
        self.size = size; self.descriptorTable = descriptorTable
        self.availableRing = availableRing; self.usedRing = usedRing
    }

    /// Bytes of the descriptor table.
    public var descriptorTableBytes: UInt64 { 16 * UInt64(size) }
    /// Bytes of the available ring including `used_event`.
    public var availableRingBytes: UInt64 { 6 + 2 * UInt64(size) }
    /// Bytes of the used ring including `avail_event`.
    public var usedRingBytes: UInt64 { 6 + 8 * UInt64(size) }
}

/// The device side of a split virtqueue (virtio 1.x, section 2.7) over guest memory.
///
/// Every index, address and length the driver provides is checked: descriptor chains are capped
/// (so loops end), buffers must lie in guest RAM, indirect tables must be well formed and not nested,
/// device-readable buffers must precede device-writable ones. The shared ring indices are read with
/// acquire ordering and published with release ordering.
///
/// Not thread-safe: one thread (the device's event-loop thread) uses a queue at a time.
public final class Virtqueue: @unchecked Sendable {
    /// Largest queue size (virtio 1.x).
    public static let maximumSize: UInt16 = 32768

    /// Queue index (for messages).
    public let index: Int
    /// The rings' guest-physical layout.
    public let layout: VirtqueueLayout
    /// Whether VIRTIO_RING_F_EVENT_IDX was negotiated.
    public let eventIdx: Bool
    /// Whether VIRTIO_RING_F_INDIRECT_DESC was negotiated.
    public let indirectAllowed: Bool
    let memory: GuestMemory
    // SAFETY: host pointers to the validated ring ranges; valid while `memory` (held above) lives.
    private let desc: UnsafeMutableRawPointer
    private let avail: UnsafeMutableRawPointer
    private let used: UnsafeMutableRawPointer

    /// Next available-ring entry to consume.
    public private(set) var lastAvailIndex: UInt16 = 0
    /// Next used-ring entry to fill.
    public private(set) var nextUsedIndex: UInt16 = 0
    /// The used index when the driver was last notified (nil: never).
    private var signalledUsed: UInt16?
    /// The device-writable buffers of each chain taken and not yet returned, by head: marked dirty
    /// when the chain is used with dirty-page logging on. Kept whether or not logging is on, so a
    /// chain taken just before logging starts and served after it is marked too (its buffers may
    /// be written after the first pass copied their pages).
    private var writableByHead: [[VirtioBuffer]] = []

    /// Validates the layout against guest memory: size a power of two ≤ 32768, natural alignment,
    /// all three rings inside guest RAM.
    public init(index: Int, layout: VirtqueueLayout, memory: GuestMemory, eventIdx: Bool, indirect: Bool) throws(VirtioError) {
        func fail(_ why: String) -> VirtioError { .queueConfiguration(queue: index, reason: why) }
        let s = layout.size
        guard s > 0, s <= Self.maximumSize, s & (s - 1) == 0 else { throw fail("size \(s) is not a power of two from 1 to 32768") }
        guard layout.descriptorTable % 16 == 0 else { throw fail("descriptor table 0x\(String(layout.descriptorTable, radix: 16)) is not 16-byte aligned") }
        guard layout.availableRing % 2 == 0 else { throw fail("available ring 0x\(String(layout.availableRing, radix: 16)) is not 2-byte aligned") }
        guard layout.usedRing % 4 == 0 else { throw fail("used ring 0x\(String(layout.usedRing, radix: 16)) is not 4-byte aligned") }
        func map(_ what: String, _ a: UInt64, _ n: UInt64) throws(VirtioError) -> UnsafeMutableRawPointer {
            do { return try memory.translate(a, count: n) } catch {
                throw fail("\(what) 0x\(String(a, radix: 16)) + \(n) bytes is not in guest RAM")
            }
        }
        desc = try map("descriptor table", layout.descriptorTable, layout.descriptorTableBytes)
        avail = try map("available ring", layout.availableRing, layout.availableRingBytes)
        used = try map("used ring", layout.usedRing, layout.usedRingBytes)
        self.index = index
        self.layout = layout
        self.memory = memory
        self.eventIdx = eventIdx
        self.indirectAllowed = indirect
    }

    /// Queue size.
    public var size: UInt16 { layout.size }

    /// The device-side ring position a snapshot saves (the rings themselves are in guest memory).
    public struct SavedIndices: Codable, Sendable, Equatable {
        /// Next available-ring entry the device will consume.
        public var lastAvail: UInt16
        /// Next used-ring entry the device will fill.
        public var nextUsed: UInt16
        /// The used index at the last interrupt (nil: none yet).
        public var signalledUsed: UInt16?
        public init(lastAvail: UInt16, nextUsed: UInt16, signalledUsed: UInt16?) {
            self.lastAvail = lastAvail; self.nextUsed = nextUsed; self.signalledUsed = signalledUsed
        }
    }

    /// The device-side indices, with the last `unconsumed` popped chains given back to the
    /// available ring (chains the device took but had not served: a restore takes them again).
    public func savedIndices(unconsumed: UInt16 = 0) -> SavedIndices {
        SavedIndices(lastAvail: lastAvailIndex &- unconsumed, nextUsed: nextUsedIndex, signalledUsed: signalledUsed)
    }

    /// Continues from saved indices (a queue rebuilt by a restore, before any use). Any values
    /// are safe: a driver index that then looks impossible is caught as usual (`pendingCount`).
    public func restoreIndices(_ saved: SavedIndices) {
        lastAvailIndex = saved.lastAvail
        nextUsedIndex = saved.nextUsed
        signalledUsed = saved.signalledUsed
    }

    // MARK: Shared-memory accessors

    private func load16(_ p: UnsafeMutableRawPointer, _ off: Int) -> UInt16 {
        UInt16(littleEndian: (p + off).loadUnaligned(as: UInt16.self))
    }
    private func store16(_ p: UnsafeMutableRawPointer, _ off: Int, _ v: UInt16) {
        (p + off).storeBytes(of: v.littleEndian, as: UInt16.self)
    }

    /// `avail.idx`, read with acquire ordering (ring entries read afterwards are at least as new).
    public func availableIndex() -> UInt16 {
        let v = load16(avail, 2)
        atomicMemoryFence(ordering: .acquiring)
        return v
    }

    /// `avail.flags`.
    public var availableFlags: UInt16 { load16(avail, 0) }

    /// Number of entries the driver has made available and the device has not consumed yet.
    /// Throws when the driver moved the index more than the queue size ahead.
    public func pendingCount() throws(VirtioError) -> Int {
        let a = availableIndex()
        let n = a &- lastAvailIndex
        guard n <= size else { throw .availIndexJump(queue: index, availIndex: a, lastSeen: lastAvailIndex, size: size) }
        return Int(n)
    }

    /// Takes the next available chain, or nil when the ring is empty.
    ///
    /// A malformed chain is consumed and returned as `.malformed` (the device gives it back with
    /// length 0). Errors that make the whole queue unusable (an avail index jump, a head index out of
    /// range) are thrown: the device should then set DEVICE_NEEDS_RESET.
    public func popAvailable() throws(VirtioError) -> AvailableItem? {
        guard try pendingCount() > 0 else { return nil }
        let slot = Int(lastAvailIndex % size)
        let head = load16(avail, 4 + 2 * slot)
        guard head < size else { throw .headOutOfRange(queue: index, head: head, size: size) }
        lastAvailIndex &+= 1
        do {
            let chain = try parseChain(head: head)
            if writableByHead.isEmpty { writableByHead = Array(repeating: [], count: Int(size)) }
            writableByHead[Int(head)] = chain.writable
            return .chain(chain)
        } catch {
            return .malformed(head: head, error: error)
        }
    }

    /// Walks the chain starting at `head`, following NEXT and one level of INDIRECT.
    func parseChain(head: UInt16) throws(VirtioError) -> DescriptorChain {
        var readable: [VirtioBuffer] = []
        var writable: [VirtioBuffer] = []
        var idx = head
        var count = 0
        let limit = Int(size)
        while true {
            count += 1
            guard count <= limit else { throw .chainTooLong(queue: index, head: head, limit: limit) }
            let d = readDescriptor(desc, idx)
            if d.flags & VirtqFlags.indirect != 0 {
                guard indirectAllowed else {
                    throw .badIndirect(queue: index, head: head, descriptor: idx, reason: "INDIRECT flag without the negotiated feature")
                }
                guard d.flags & VirtqFlags.next == 0 else {
                    throw .badIndirect(queue: index, head: head, descriptor: idx, reason: "INDIRECT and NEXT set together")
                }
                try walkIndirect(head: head, descriptor: idx, address: d.addr, length: d.len, budget: limit - (count - 1),
                                 readable: &readable, writable: &writable)
                break
            }
            try append(d, number: idx, head: head, readable: &readable, writable: &writable)
            guard d.flags & VirtqFlags.next != 0 else { break }
            guard d.next < size else {
                throw .descriptorIndexOutOfRange(queue: index, head: head, index: d.next, limit: limit)
            }
            idx = d.next
        }
        return DescriptorChain(queue: index, head: head, readable: readable, writable: writable)
    }

    /// Follows an indirect table; together with the `limit - budget` direct descriptors before it,
    /// the chain may not be longer than the queue size.
    private func walkIndirect(head: UInt16, descriptor: UInt16, address: UInt64, length: UInt32, budget: Int,
                              readable: inout [VirtioBuffer], writable: inout [VirtioBuffer]) throws(VirtioError) {
        guard length > 0, length % 16 == 0 else {
            throw .badIndirect(queue: index, head: head, descriptor: descriptor, reason: "indirect table length \(length) is not a non-zero multiple of 16")
        }
        let n = Int(length / 16)
        guard n <= budget else {
            throw .badIndirect(queue: index, head: head, descriptor: descriptor,
                               reason: "indirect table of \(n) descriptors makes the chain longer than the queue size \(size)")
        }
        guard let table = try? memory.translate(address, count: UInt64(length)) else {
            throw .bufferOutsideMemory(queue: index, head: head, descriptor: descriptor, address: address, length: UInt64(length))
        }
        var i: UInt16 = 0
        var count = 0
        while true {
            count += 1
            guard count <= n else { throw .chainTooLong(queue: index, head: head, limit: n) }
            let d = readDescriptor(table, i)
            guard d.flags & VirtqFlags.indirect == 0 else {
                throw .badIndirect(queue: index, head: head, descriptor: i, reason: "nested indirect table")
            }
            try append(d, number: i, head: head, readable: &readable, writable: &writable)
            guard d.flags & VirtqFlags.next != 0 else { break }
            guard Int(d.next) < n else {
                throw .descriptorIndexOutOfRange(queue: index, head: head, index: d.next, limit: n)
            }
            i = d.next
        }
    }

    private func append(_ d: RawDescriptor, number: UInt16, head: UInt16,
                        readable: inout [VirtioBuffer], writable: inout [VirtioBuffer]) throws(VirtioError) {
        guard memory.contains(d.addr, count: UInt64(d.len)) else {
            throw .bufferOutsideMemory(queue: index, head: head, descriptor: number, address: d.addr, length: UInt64(d.len))
        }
        let b = VirtioBuffer(address: d.addr, length: d.len, descriptor: number)
        if d.flags & VirtqFlags.write != 0 {
            writable.append(b)
        } else {
            guard writable.isEmpty else { throw .readableAfterWritable(queue: index, head: head, descriptor: number) }
            readable.append(b)
        }
    }

    private struct RawDescriptor { var addr: UInt64; var len: UInt32; var flags: UInt16; var next: UInt16 }

    /// SAFETY: `table` covers at least `(i + 1) * 16` bytes (callers check `i` against the table size).
    private func readDescriptor(_ table: UnsafeMutableRawPointer, _ i: UInt16) -> RawDescriptor {
        let p = table + Int(i) * 16
        return RawDescriptor(addr: UInt64(littleEndian: p.loadUnaligned(as: UInt64.self)),
                             len: UInt32(littleEndian: (p + 8).loadUnaligned(as: UInt32.self)),
                             flags: UInt16(littleEndian: (p + 12).loadUnaligned(as: UInt16.self)),
                             next: UInt16(littleEndian: (p + 14).loadUnaligned(as: UInt16.self)))
    }

    // MARK: Used ring

    /// Returns chain `head` to the driver with `length` bytes written, publishing `used.idx` with
    /// release ordering (the element is visible before the index).
    public func addUsed(head: UInt16, length: UInt32) {
        let log = memory.dirtyLog
        let writable = Int(head) < writableByHead.count ? writableByHead[Int(head)] : []
        if !writable.isEmpty { writableByHead[Int(head)] = [] }
        if log.isEnabled {
            // The device may have written any of the chain's writable buffers, and writes the used ring.
            for b in writable { log.mark(b.address, count: UInt64(b.length)) }
            log.mark(layout.usedRing, count: layout.usedRingBytes)
        }
        let slot = Int(nextUsedIndex % size)
        let e = used + 4 + 8 * slot
        e.storeBytes(of: UInt32(head).littleEndian, as: UInt32.self)
        (e + 4).storeBytes(of: length.littleEndian, as: UInt32.self)
        nextUsedIndex &+= 1
        atomicMemoryFence(ordering: .releasing)
        store16(used, 2, nextUsedIndex)
    }

    /// Whether the driver wants an interrupt for the used entries added since the last one:
    /// with EVENT_IDX the `vring_need_event(used_event, new, old)` rule, otherwise the
    /// avail ring's NO_INTERRUPT flag. Call after `addUsed`; records the notification.
    public func needsInterrupt() -> Bool {
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        let new = nextUsedIndex
        if eventIdx {
            let usedEvent = load16(avail, 4 + 2 * Int(size))
            let old = signalledUsed
            signalledUsed = new
            guard let old else { return true }
            return Self.needEvent(eventIndex: usedEvent, new: new, old: old)
        }
        signalledUsed = new
        return availableFlags & VirtqFlags.availNoInterrupt == 0
    }

    /// `vring_need_event`: whether `eventIndex` lies in `[old, new)` (modulo 2^16).
    public static func needEvent(eventIndex: UInt16, new: UInt16, old: UInt16) -> Bool {
        (new &- eventIndex &- 1) < (new &- old)
    }

    /// With EVENT_IDX, publishes `avail_event` = the next entry the device will read (asking for a
    /// notification when the driver adds it), then re-checks the ring. Returns true when entries
    /// arrived meanwhile (the caller should keep processing).
    public func enableNotification() -> Bool {
        if eventIdx {
            store16(used, 4 + 8 * Int(size), lastAvailIndex)
            memory.dirtyLog.mark(layout.usedRing, count: layout.usedRingBytes)
        }
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        return availableIndex() != lastAvailIndex
    }

    /// Calls `body` for every available item until the ring stays empty after re-enabling
    /// notifications. Queue-fatal errors are thrown (the device then needs a reset).
    public func drain(_ body: (AvailableItem) -> Void) throws(VirtioError) {
        repeat {
            while let item = try popAvailable() { body(item) }
        } while enableNotification()
    }
}
