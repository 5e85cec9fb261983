import Foundation
import Testing
@testable import Devices

/// The CFI flash that holds OVMF's variable store.
@Suite("pflash (CFI command set 1)")
struct PFlashTests {
    func read(_ f: PFlashCFI01, _ o: UInt64) -> UInt8 { f.readBytes(o, count: 1)[0] }

    @Test("OVMF's probe (0x50 then 0x70 at offset 0) sees a flash: status 0x00; array mode reads the bytes")
    func probe() {
        let f = PFlashCFI01(bytes: [0x5a] + [UInt8](repeating: 0xff, count: 8191))
        #expect(read(f, 0) == 0x5a)
        f.writeBytes(0, [0x50])
        #expect(read(f, 0) == 0x5a, "clear status leaves array mode on")
        f.writeBytes(0, [0x70])
        #expect(read(f, 0) == 0x00, "QemuFlashDetected: CLEARED_ARRAY_STATUS means flash")
        f.writeBytes(0, [0xff])
        #expect(read(f, 0) == 0x5a)
    }

    @Test("program one byte, erase a 4 KiB block, ID and CFI queries; changes reach the file")
    func programErase() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("pflash-\(getpid()).fd").path
        FileManager.default.createFile(atPath: path, contents: Data(repeating: 0xff, count: 8192))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let fd = open(path, O_RDWR)
        defer { close(fd) }
        let f = PFlashCFI01(bytes: [UInt8](repeating: 0xff, count: 8192), fd: fd)
        f.writeBytes(0x1234, [0x10])
        f.writeBytes(0x1234, [0x42])
        #expect(read(f, 0x1234) & 0x80 != 0, "status: ready after the program")
        f.writeBytes(0, [0xff])
        #expect(read(f, 0x1234) == 0x42)
        #expect(Array(try Data(contentsOf: URL(fileURLWithPath: path)))[0x1234] == 0x42, "written through")
        f.writeBytes(0x1000, [0x20])
        f.writeBytes(0x1000, [0xd0])
        f.writeBytes(0, [0xff])
        #expect(read(f, 0x1234) == 0xff, "the block was erased")
        #expect(Array(try Data(contentsOf: URL(fileURLWithPath: path)))[0x1234] == 0xff)
        f.writeBytes(0, [0x90])
        #expect(read(f, 0) == 0x89 && read(f, 1) == 0x18)
        f.writeBytes(0, [0x98])
        #expect(read(f, 0x10) == 0x51 && read(f, 0x11) == 0x52 && read(f, 0x12) == 0x59 && read(f, 0x27) == 13, "QRY, 2^13 bytes")
        f.writeBytes(0, [0xff])
    }

    @Test("an unconfirmed erase or an unknown command sets error bits and changes nothing; a read-only flash refuses programs")
    func errors() {
        let f = PFlashCFI01(bytes: [UInt8](repeating: 0x11, count: 4096))
        f.writeBytes(0, [0x20])
        f.writeBytes(0, [0x00])
        #expect(read(f, 0) & 0x30 == 0x30)
        f.writeBytes(0, [0xff])
        #expect(read(f, 0) == 0x11)
        f.writeBytes(0, [0x50])
        f.writeBytes(0, [0xee])
        f.writeBytes(0, [0x70])
        #expect(read(f, 0) & 0x30 == 0x30)
        let ro = PFlashCFI01(bytes: [UInt8](repeating: 0x11, count: 4096), writable: false)
        ro.writeBytes(5, [0x40])
        ro.writeBytes(5, [0x00])
        #expect(read(ro, 5) & 0x10 != 0)
        ro.writeBytes(0, [0xff])
        #expect(read(ro, 5) == 0x11)
        f.writeBytes(4096 + 5, [0x10])   // past the end: ignored
        #expect(f.contents.count == 4096)
    }
}
