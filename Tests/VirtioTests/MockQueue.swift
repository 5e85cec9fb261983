import GuestMemory
@testable import Virtio

/// Guest memory for tests: one anonymous region at guest address 0.
func makeMemory(size: UInt64 = 4 << 20) throws -> GuestMemory {
    try GuestMemory(regions: [GuestRegion(start: 0, size: size)])
}

/// The driver's side of a split virtqueue laid out in guest memory, for unit tests.
///
/// Rings live at `base`; data buffers are allocated upwards from `dataBase`. Chains are described
/// as lists of (address, length, writable) and published with `publish`.
final class MockDriverQueue {
    let memory: GuestMemory
    let size: UInt16
    let layout: VirtqueueLayout
    var nextFree: UInt16 = 0
    var availIdx: UInt16 = 0
    var usedSeen: UInt16 = 0
    var dataNext: UInt64

    init(memory: GuestMemory, size: UInt16, base: UInt64 = 0x1000, dataBase: UInt64 = 0x10_0000) {
        self.memory = memory
        self.size = size
        let desc = base
        let avail = desc + 16 * UInt64(size)
        let used = (avail + 6 + 2 * UInt64(size) + 3) & ~3
        layout = VirtqueueLayout(size: size, descriptorTable: desc, availableRing: avail, usedRing: used)
        dataNext = dataBase
    }

    /// Allocates `count` bytes of data space (16-byte aligned) and optionally fills it.
    func alloc(_ count: Int, fill: [UInt8]? = nil) throws -> UInt64 {
        let a = dataNext
        dataNext += UInt64((count + 15) & ~15)
        if let fill { try memory.write(fill, at: a) }
        return a
    }

    /// Writes descriptor `i` of the table at `table` (default: the queue's table).
    func setDescriptor(_ i: UInt16, addr: UInt64, len: UInt32, flags: UInt16, next: UInt16, table: UInt64? = nil) throws {
        let p = (table ?? layout.descriptorTable) + 16 * UInt64(i)
        try memory.writeLE(addr, at: p)
        try memory.writeLE(len, at: p + 8)
        try memory.writeLE(flags, at: p + 12)
        try memory.writeLE(next, at: p + 14)
    }

    /// Adds a chain of direct descriptors (NEXT-linked from consecutive free slots); returns its head.
    @discardableResult
    func addChain(_ bufs: [(addr: UInt64, len: UInt32, writable: Bool)]) throws -> UInt16 {
        let head = nextFree
        for (k, b) in bufs.enumerated() {
            let i = (head &+ UInt16(k)) % size
            let last = k == bufs.count - 1
            try setDescriptor(i, addr: b.addr, len: b.len,
                              flags: (b.writable ? VirtqFlags.write : 0) | (last ? 0 : VirtqFlags.next),
                              next: (i &+ 1) % size)
        }
        nextFree = (head &+ UInt16(bufs.count)) % size
        try publish(head)
        return head
    }

    /// Adds a chain through one indirect table; returns its head.
    @discardableResult
    func addIndirectChain(_ bufs: [(addr: UInt64, len: UInt32, writable: Bool)]) throws -> UInt16 {
        let table = try alloc(16 * bufs.count)
        for (k, b) in bufs.enumerated() {
            let last = k == bufs.count - 1
            try setDescriptor(UInt16(k), addr: b.addr, len: b.len,
                              flags: (b.writable ? VirtqFlags.write : 0) | (last ? 0 : VirtqFlags.next),
                              next: UInt16(k + 1), table: table)
        }
        let head = nextFree
        try setDescriptor(head, addr: table, len: UInt32(16 * bufs.count), flags: VirtqFlags.indirect, next: 0)
        nextFree = (head &+ 1) % size
        try publish(head)
        return head
    }

    /// Puts `head` in the next available slot and bumps avail.idx.
    func publish(_ head: UInt16) throws {
        try memory.writeLE(head, at: layout.availableRing + 4 + 2 * UInt64(availIdx % size))
        availIdx &+= 1
        try memory.writeLE(availIdx, at: layout.availableRing + 2)
    }

    /// Sets avail.idx directly (hostile tests).
    func setAvailIndex(_ v: UInt16) throws {
        availIdx = v
        try memory.writeLE(v, at: layout.availableRing + 2)
    }

    /// Sets avail.flags.
    func setAvailFlags(_ v: UInt16) throws { try memory.writeLE(v, at: layout.availableRing) }

    /// Sets used_event (the avail ring's trailing field).
    func setUsedEvent(_ v: UInt16) throws { try memory.writeLE(v, at: layout.availableRing + 4 + 2 * UInt64(size)) }

    /// avail_event as the device published it.
    func availEvent() throws -> UInt16 { try memory.readLE(at: layout.usedRing + 4 + 8 * UInt64(size)) }

    /// used.idx as the device published it.
    func usedIndex() throws -> UInt16 { try memory.readLE(at: layout.usedRing + 2) }

    /// The used elements added since the last call: (id, len).
    func takeUsed() throws -> [(id: UInt32, len: UInt32)] {
        let idx = try usedIndex()
        var out: [(UInt32, UInt32)] = []
        while usedSeen != idx {
            let e = layout.usedRing + 4 + 8 * UInt64(usedSeen % size)
            out.append((try memory.readLE(at: e), try memory.readLE(at: e + 4)))
            usedSeen &+= 1
        }
        return out
    }

    /// The device-side queue for this layout.
    func deviceQueue(index: Int = 0, eventIdx: Bool = false, indirect: Bool = true) throws -> Virtqueue {
        try Virtqueue(index: index, layout: layout, memory: memory, eventIdx: eventIdx, indirect: indirect)
    }
}
