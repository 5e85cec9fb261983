import Testing
@testable import GuestMemory

@Suite("Guest memory")
struct GuestMemoryTests {
    @Test("RAM below 3 GiB is one region; above, it is split around the PCI hole")
    func layout() throws {
        let small = try GuestMemory.layout(ramSize: 512 << 20)
        #expect(small.count == 1 && small[0].start == 0 && small[0].size == 512 << 20)
        let big = try GuestMemory.layout(ramSize: 4 << 30)
        #expect(big.count == 2)
        #expect(big[0].start == 0 && big[0].size == 3 << 30)
        #expect(big[1].start == 4 << 30 && big[1].size == 1 << 30)
    }

    @Test("zero, unaligned and absurd sizes are refused")
    func badSizes() {
        #expect(throws: GuestMemoryError.self) { try GuestMemory.layout(ramSize: 0) }
        #expect(throws: GuestMemoryError.self) { try GuestMemory.layout(ramSize: (1 << 20) + 1) }
        #expect(throws: GuestMemoryError.self) { try GuestMemory.layout(ramSize: UInt64.max & ~0xfff) }
    }

    @Test("reads and writes are bounds-checked, including overflowing addresses")
    func bounds() throws {
        let mem = try GuestMemory.allocate(size: 1 << 20)
        try mem.writeLE(UInt32(0xdeadbeef), at: 0x1000)
        #expect(try mem.readLE(UInt32.self, at: 0x1000) == 0xdeadbeef)
        #expect(try mem.read(at: 0x1000, count: 2) == [0xef, 0xbe])
        try mem.writeLE(UInt16(7), at: (1 << 20) - 2)
        #expect(throws: GuestMemoryError.self) { try mem.writeLE(UInt32(7), at: (1 << 20) - 2) }
        #expect(throws: GuestMemoryError.self) { try mem.read(at: UInt64.max - 1, count: 4) }
        #expect(throws: GuestMemoryError.self) { try mem.read(at: 1 << 20, count: 1) }
        #expect(!mem.contains(UInt64.max, count: 2))
    }

    @Test("overlapping regions are refused")
    func overlap() throws {
        let a = try GuestRegion(start: 0, size: 0x2000)
        let b = try GuestRegion(start: 0x1000, size: 0x2000)
        #expect(throws: GuestMemoryError.self) { try GuestMemory(regions: [a, b]) }
    }

    @Test("little-endian byte-array helpers round-trip")
    func arrayLE() {
        var a: [UInt8] = []
        a.putLE(UInt32(0x11223344), at: 2)
        #expect(a == [0, 0, 0x44, 0x33, 0x22, 0x11])
        #expect(a.getLE(UInt32.self, at: 2) == 0x11223344)
        #expect(a.getLE(UInt32.self, at: 3) == nil)
    }
}
