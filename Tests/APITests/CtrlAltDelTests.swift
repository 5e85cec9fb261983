import Devices
import Synchronization
import Testing

/// Records the keyboard interrupt line.
final class RecordingLine: InterruptLine, @unchecked Sendable {
    let level = Mutex(false)
    let raises = Mutex(0)
    func set(level v: Bool) {
        level.withLock { l in
            if v && !l { raises.withLock { $0 += 1 } }
            l = v
        }
    }
}

struct NoControl: MachineControl { func request(_ request: MachineRequest) {} }

@Suite("Ctrl+Alt+Del through the i8042 (SendCtrlAltDel)")
struct CtrlAltDelTests {
    func readAll(_ dev: I8042) -> [UInt8] {
        var out: [UInt8] = []
        for _ in 0..<32 {
            var status: UInt8 = 0
            withUnsafeMutableBytes(of: &status) { dev.read(offset: 4, data: $0) }
            guard status & 1 != 0 else { break }
            var b: UInt8 = 0
            withUnsafeMutableBytes(of: &b) { dev.read(offset: 0, data: $0) }
            out.append(b)
        }
        return out
    }

    @Test("with translation on (the default) the guest reads set-1 codes and IRQ 1 rises")
    func translated() {
        let line = RecordingLine()
        let dev = I8042(keyboardInterrupt: line, control: NoControl())
        dev.pressCtrlAltDel()
        #expect(line.level.withLock { $0 })
        #expect(readAll(dev) == [0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D])
        #expect(line.raises.withLock { $0 } == 8, "one edge per byte")
        #expect(!line.level.withLock { $0 })
    }

    @Test("with translation off the guest reads set-2 codes")
    func untranslated() {
        let dev = I8042(keyboardInterrupt: RecordingLine(), control: NoControl())
        let cmd: [UInt8] = [0x60], value: [UInt8] = [0x01] // command byte: keyboard interrupt only
        cmd.withUnsafeBytes { dev.write(offset: 4, data: $0) }
        value.withUnsafeBytes { dev.write(offset: 0, data: $0) }
        dev.pressCtrlAltDel()
        #expect(readAll(dev) == [0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14])
    }
}
