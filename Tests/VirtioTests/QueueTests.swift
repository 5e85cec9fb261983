import GuestMemory
import Testing
@testable import Virtio

private func expectChain(_ item: AvailableItem?) throws -> DescriptorChain {
    guard case .chain(let c)? = item else {
        Issue.record("expected a chain, got \(String(describing: item))")
        throw VirtioError.badRequest(queue: -1, head: 0, reason: "test")
    }
    return c
}

private func expectMalformed(_ item: AvailableItem?) -> VirtioError? {
    guard case .malformed(_, let e)? = item else {
        Issue.record("expected a malformed chain, got \(String(describing: item))")
        return nil
    }
    return e
}

@Suite("Split virtqueue")
struct QueueTests {
    @Test("a readable + writable chain is parsed in order and returned with its written length")
    func normalChain() throws {
        let mem = try makeMemory()
        let drv = MockDriverQueue(memory: mem, size: 8)
        let q = try drv.deviceQueue()
        let a = try drv.alloc(16, fill: Array(0..<16)), b = try drv.alloc(512), c = try drv.alloc(1)
        let head = try drv.addChain([(a, 16, false), (b, 512, true), (c, 1, true)])
        let chain = try expectChain(try q.popAvailable())
        #expect(chain.head == head)
        #expect(chain.readable == [VirtioBuffer(address: a, length: 16, descriptor: 0)])
        #expect(chain.writable.map(\.address) == [b, c])
        #expect(chain.writableLength == 513)
        #expect(try q.popAvailable() == nil)
        q.addUsed(head: head, length: 513)
        let used = try drv.takeUsed()
        #expect(used.count == 1)
        #expect(used.first?.id == UInt32(head))
        #expect(used.first?.len == 513)
    }

    @Test("with the dirty-page log on, using a chain marks the pages of its writable buffers and the used ring, not its readable buffers; with it off nothing is marked")
    func dirtyLog() throws {
        let mem = try makeMemory()
        let drv = MockDriverQueue(memory: mem, size: 8)
        let q = try drv.deviceQueue()
        func pages(_ maps: [[UInt64]]) -> [UInt64] {
            (0..<UInt64(maps[0].count * 64)).filter { maps[0][Int($0 / 64)] & (1 << ($0 % 64)) != 0 }
        }
        let r0 = try drv.alloc(16), w0 = try drv.alloc(512)
        var head = try drv.addChain([(r0, 16, false), (w0, 512, true)])
        _ = try q.popAvailable()
        q.addUsed(head: head, length: 512)
        #expect(pages(mem.dirtyLog.take()).isEmpty, "off by default")

        mem.dirtyLog.enable()
        let readable = 0x20_0000 as UInt64, writable = 0x30_0ff0 as UInt64   // the writable buffer spans two pages
        head = try drv.addChain([(readable, 4096, false), (writable, 32, true)])
        _ = try q.popAvailable()
        #expect(pages(mem.dirtyLog.take()).isEmpty, "taking a chain marks nothing yet")
        q.addUsed(head: head, length: 32)
        let usedPage = drv.layout.usedRing / 4096
        #expect(pages(mem.dirtyLog.take()) == [usedPage, 0x300, 0x301].sorted())
        #expect(pages(mem.dirtyLog.take()).isEmpty, "take clears the log")

        // A chain taken while the log was off and used after it came on (a migration starting with
        // a request in flight) has its writable buffers marked too: the device may write them after
        // the first pass copied their pages.
        mem.dirtyLog.disable()
        head = try drv.addChain([(readable, 16, false), (0x38_0000, 512, true)])
        _ = try q.popAvailable()
        mem.dirtyLog.enable()
        q.addUsed(head: head, length: 512)
        #expect(pages(mem.dirtyLog.take()) == [usedPage, 0x380].sorted())
    }

    @Test("an indirect table is followed and its buffers returned")
    func indirect() throws {
        let mem = try makeMemory()
        let drv = MockDriverQueue(memory: mem, size: 4)
        let q = try drv.deviceQueue()
        let a = try drv.alloc(16), b = try drv.alloc(4096), s = try drv.alloc(1)
        let head = try drv.addIndirectChain([(a, 16, false), (b, 4096, false), (s, 1, true)])
        let chain = try expectChain(try q.popAvailable())
        #expect(chain.head == head)
        #expect(chain.readable.map(\.address) == [a, b])
        #expect(chain.writable.map(\.address) == [s])
        #expect(chain.readableLength == 4112)
    }

    @Test("chain reader and writer cross buffer boundaries and count written bytes")
    func readerWriter() throws {
        let mem = try makeMemory()
        let drv = MockDriverQueue(memory: mem, size: 8)
        let q = try drv.deviceQueue()
        let a = try drv.alloc(3, fill: [1, 2, 3]), b = try drv.alloc(5, fill: [4, 5, 6, 7, 8])
        let w1 = try drv.alloc(2), w2 = try drv.alloc(4)
        try drv.addChain([(a, 3, false), (b, 5, false), (w1, 2, true), (w2, 4, true)])
        let chain = try expectChain(try q.popAvailable())
        var r = ChainReader(memory: mem, chain: chain)
        #expect(try r.read(4) == [1, 2, 3, 4])
        #expect(r.remaining == 4)
        #expect(try r.read(4) == [5, 6, 7, 8])
        #expect(throws: VirtioError.self) { try r.read(1) }
        var w = ChainWriter(memory: mem, chain: chain)
        try w.write([9, 9, 9])
        #expect(w.written == 3)
        #expect(try mem.read(at: w1, count: 2) == [9, 9])
        #expect(try mem.read(at: w2, count: 1) == [9])
        #expect(throws: VirtioError.self) { try w.write([0, 0, 0, 0]) }
    }

    @Test("16-bit avail and used indices wrap around")
    func wrapAround() throws {
        let mem = try makeMemory()
        let drv = MockDriverQueue(memory: mem, size: 4)
        let q = try drv.deviceQueue()
        let buf = try drv.alloc(8)
        for i in 0..<(65536 + 10) {
            let head = try drv.addChain([(buf, 8, true)])
            let chain = try expectChain(try q.popAvailable())
            #expect(chain.head == head)
            q.addUsed(head: head, length: UInt32(i & 0xff))
            if i >= 65530 {
                let used = try drv.takeUsed()
                #expect(used.last?.len == UInt32(i & 0xff))
            } else {
                drv.usedSeen = try drv.usedIndex()
            }
        }
        #expect(q.lastAvailIndex == 10)
        #expect(q.nextUsedIndex == 10)
    }

    @Test("EVENT_IDX: interrupts follow used_event and avail_event is published")
    func eventIdx() throws {
        let mem = try makeMemory()
        let drv = MockDriverQueue(memory: mem, size: 8)
        let q = try drv.deviceQueue(eventIdx: true)
        let buf = try drv.alloc(8)
        for _ in 0..<3 { try drv.addChain([(buf, 8, true)]) }
        try drv.setUsedEvent(1) // interrupt once used idx passes 1 (i.e. becomes 2)
        var heads: [UInt16] = []
        try q.drain { item in if case .chain(let c) = item { heads.append(c.head) } }
        #expect(heads.count == 3)
        #expect(try drv.availEvent() == 3)
        q.addUsed(head: heads[0], length: 1)
        #expect(q.needsInterrupt()) // first notification always goes out
        q.addUsed(head: heads[1], length: 1)
        #expect(q.needsInterrupt()) // used idx 1 → 2 crosses used_event 1
        q.addUsed(head: heads[2], length: 1)
        #expect(!q.needsInterrupt()) // 2 → 3 does not
        #expect(Virtqueue.needEvent(eventIndex: 0xffff, new: 1, old: 0xfffe))
        #expect(!Virtqueue.needEvent(eventIndex: 5, new: 1, old: 0xfffe))
    }

    @Test("without EVENT_IDX, VIRTQ_AVAIL_F_NO_INTERRUPT suppresses interrupts")
    func noInterruptFlag() throws {
        let mem = try makeMemory()
        let drv = MockDriverQueue(memory: mem, size: 8)
        let q = try drv.deviceQueue(eventIdx: false)
        let buf = try drv.alloc(8)
        let h = try drv.addChain([(buf, 8, true)])
        _ = try q.popAvailable()
        q.addUsed(head: h, length: 0)
        #expect(q.needsInterrupt())
        try drv.setAvailFlags(VirtqFlags.availNoInterrupt)
        q.addUsed(head: h, length: 0)
        #expect(!q.needsInterrupt())
    }

    @Test("queue layouts that are unaligned, not a power of two or outside RAM are refused")
    func badLayouts() throws {
        let mem = try makeMemory(size: 1 << 20)
        let good = VirtqueueLayout(size: 16, descriptorTable: 0x1000, availableRing: 0x2000, usedRing: 0x3000)
        _ = try Virtqueue(index: 0, layout: good, memory: mem, eventIdx: false, indirect: false)
        var l = good; l.size = 12
        #expect(throws: VirtioError.self) { try Virtqueue(index: 0, layout: l, memory: mem, eventIdx: false, indirect: false) }
        l = good; l.size = 0
        #expect(throws: VirtioError.self) { try Virtqueue(index: 0, layout: l, memory: mem, eventIdx: false, indirect: false) }
        l = good; l.descriptorTable = 0x1008
        #expect(throws: VirtioError.self) { try Virtqueue(index: 0, layout: l, memory: mem, eventIdx: false, indirect: false) }
        l = good; l.usedRing = 0x3002
        #expect(throws: VirtioError.self) { try Virtqueue(index: 0, layout: l, memory: mem, eventIdx: false, indirect: false) }
        l = good; l.usedRing = (1 << 20) - 8
        #expect(throws: VirtioError.self) { try Virtqueue(index: 0, layout: l, memory: mem, eventIdx: false, indirect: false) }
        l = good; l.availableRing = UInt64.max - 1
        #expect(throws: VirtioError.self) { try Virtqueue(index: 0, layout: l, memory: mem, eventIdx: false, indirect: false) }
    }
}

@Suite("Split virtqueue against hostile drivers")
struct HostileQueueTests {
    @Test("a descriptor loop ends at the queue size and is reported as malformed")
    func loop() throws {
        let mem = try makeMemory()
        let drv = MockDriverQueue(memory: mem, size: 8)
        let q = try drv.deviceQueue()
        let buf = try drv.alloc(8)
        try drv.setDescriptor(0, addr: buf, len: 8, flags: VirtqFlags.next, next: 1)
        try drv.setDescriptor(1, addr: buf, len: 8, flags: VirtqFlags.next, next: 0)
        try drv.publish(0)
        let e = expectMalformed(try q.popAvailable())
        #expect(e == .chainTooLong(queue: 0, head: 0, limit: 8))
        // The queue goes on working.
        drv.nextFree = 2
        try drv.addChain([(buf, 8, true)])
        _ = try expectChain(try q.popAvailable())
    }

    @Test("next indices and heads out of range are errors")
    func outOfRangeIndices() throws {
        let mem = try makeMemory()
        let drv = MockDriverQueue(memory: mem, size: 8)
        let q = try drv.deviceQueue()
        let buf = try drv.alloc(8)
        try drv.setDescriptor(0, addr: buf, len: 8, flags: VirtqFlags.next, next: 8)
        try drv.publish(0)
        #expect(expectMalformed(try q.popAvailable()) == .descriptorIndexOutOfRange(queue: 0, head: 0, index: 8, limit: 8))
        try drv.publish(200)
        #expect(throws: VirtioError.headOutOfRange(queue: 0, head: 200, size: 8)) { try q.popAvailable() }
    }

    @Test("avail.idx jumping more than the queue size ahead is a queue error")
    func availJump() throws {
        let mem = try makeMemory()
        let drv = MockDriverQueue(memory: mem, size: 8)
        let q = try drv.deviceQueue()
        try drv.setAvailIndex(9)
        #expect(throws: VirtioError.availIndexJump(queue: 0, availIndex: 9, lastSeen: 0, size: 8)) { try q.popAvailable() }
        try drv.setAvailIndex(0xffff)
        #expect(throws: VirtioError.self) { try q.popAvailable() }
    }

    @Test("buffers outside guest RAM, including 4 GiB lengths and address wrap, are refused; zero-length buffers are empty")
    func buffersOutsideMemory() throws {
        let mem = try makeMemory(size: 4 << 20)
        let drv = MockDriverQueue(memory: mem, size: 8)
        let q = try drv.deviceQueue()
        try drv.addChain([(0x10_0000, 0xffff_ffff, false)])
        #expect(expectMalformed(try q.popAvailable()) == .bufferOutsideMemory(queue: 0, head: 0, descriptor: 0, address: 0x10_0000, length: 0xffff_ffff))
        try drv.addChain([(UInt64.max - 3, 8, true)])
        if case .bufferOutsideMemory? = expectMalformed(try q.popAvailable()) {} else { Issue.record("wrap not refused") }
        try drv.addChain([(4 << 20, 1, true)])
        if case .bufferOutsideMemory? = expectMalformed(try q.popAvailable()) {} else { Issue.record("end of RAM not refused") }
        try drv.addChain([(0x10_0000, 0, false), (0x10_0000, 4, true)])
        let c = try expectChain(try q.popAvailable())
        #expect(c.readableLength == 0)
        #expect(c.writableLength == 4)
    }

    @Test("a readable descriptor after a writable one is refused")
    func wrongOrder() throws {
        let mem = try makeMemory()
        let drv = MockDriverQueue(memory: mem, size: 8)
        let q = try drv.deviceQueue()
        let b = try drv.alloc(8)
        try drv.addChain([(b, 8, true), (b, 8, false)])
        #expect(expectMalformed(try q.popAvailable()) == .readableAfterWritable(queue: 0, head: 0, descriptor: 1))
    }

    @Test("malformed indirect descriptors: bad length, nesting, NEXT with INDIRECT, no feature, loops, outside RAM")
    func badIndirect() throws {
        let mem = try makeMemory()
        let drv = MockDriverQueue(memory: mem, size: 8)
        let q = try drv.deviceQueue(indirect: true)
        let t = try drv.alloc(64), b = try drv.alloc(8)
        func submit(_ addr: UInt64, _ len: UInt32, _ flags: UInt16) throws -> AvailableItem? {
            try drv.setDescriptor(0, addr: addr, len: len, flags: flags, next: 1)
            try drv.setDescriptor(1, addr: b, len: 8, flags: 0, next: 0)
            try drv.publish(0)
            return try q.popAvailable()
        }
        for len: UInt32 in [0, 15, 20] {
            if case .badIndirect? = expectMalformed(try submit(t, len, VirtqFlags.indirect)) {} else { Issue.record("length \(len) accepted") }
        }
        if case .badIndirect? = expectMalformed(try submit(t, 16, VirtqFlags.indirect | VirtqFlags.next)) {} else { Issue.record("INDIRECT|NEXT accepted") }
        // Nested: the table's only entry is itself indirect.
        try drv.setDescriptor(0, addr: t, len: 16, flags: VirtqFlags.indirect, next: 0, table: t)
        if case .badIndirect? = expectMalformed(try submit(t, 16, VirtqFlags.indirect)) {} else { Issue.record("nested accepted") }
        // Loop inside the table: 0 → 1 → 0.
        try drv.setDescriptor(0, addr: b, len: 8, flags: VirtqFlags.next, next: 1, table: t)
        try drv.setDescriptor(1, addr: b, len: 8, flags: VirtqFlags.next, next: 0, table: t)
        #expect(expectMalformed(try submit(t, 32, VirtqFlags.indirect)) == .chainTooLong(queue: 0, head: 0, limit: 2))
        // next out of the table.
        try drv.setDescriptor(1, addr: b, len: 8, flags: VirtqFlags.next, next: 2, table: t)
        #expect(expectMalformed(try submit(t, 32, VirtqFlags.indirect)) == .descriptorIndexOutOfRange(queue: 0, head: 0, index: 2, limit: 2))
        // Table outside RAM.
        if case .bufferOutsideMemory? = expectMalformed(try submit(0xffff_0000_0000, 32, VirtqFlags.indirect)) {} else { Issue.record("outside RAM accepted") }
        // An indirect table longer than the queue (8): 9 valid entries.
        let big = try drv.alloc(16 * 9)
        for i in 0..<9 { try drv.setDescriptor(UInt16(i), addr: b, len: 8, flags: i < 8 ? VirtqFlags.next : 0, next: UInt16(i + 1), table: big) }
        if case .badIndirect? = expectMalformed(try submit(big, 16 * 9, VirtqFlags.indirect)) {} else { Issue.record("chain longer than the queue accepted") }
        // Not negotiated.
        let q2 = try drv.deviceQueue(indirect: false)
        _ = q2
        let drv2 = MockDriverQueue(memory: mem, size: 8, base: 0x8000)
        let q3 = try drv2.deviceQueue(indirect: false)
        try drv2.addIndirectChain([(b, 8, true)])
        if case .badIndirect? = expectMalformed(try q3.popAvailable()) {} else { Issue.record("indirect without feature accepted") }
    }
}
