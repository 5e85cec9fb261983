import GuestMemory
import Testing

@Suite("Dirty page log")
struct DirtyPageLogTests {
    @Test("marks cover every page a range touches, in the right region; ranges outside RAM or across the end are clipped; nothing is marked while off")
    func marking() throws {
        let log = DirtyPageLog(regions: [(0, 1 << 20), (1 << 32, 1 << 20)])
        log.mark(0x1000, count: 4096)
        #expect(log.take().allSatisfy { $0.allSatisfy { $0 == 0 } }, "off")
        log.enable()
        log.mark(0x1fff, count: 2)                 // pages 1 and 2
        log.mark((1 << 32) + 0xff000, count: 1 << 20) // last page of region 1, the rest is outside RAM
        log.mark(0xc000_0000, count: 4096)          // the hole: nothing
        log.mark(UInt64.max - 10, count: 100)       // overflow: nothing, no trap
        log.mark(0x5000, count: 0)                  // empty: nothing
        let maps = log.take()
        #expect(maps.count == 2)
        #expect(maps[0][0] == 0b110)
        #expect(maps[1][3] == 1 << 63 && maps[1].dropLast().allSatisfy { $0 == 0 })
        #expect(log.take().allSatisfy { $0.allSatisfy { $0 == 0 } }, "take clears")
    }
}
