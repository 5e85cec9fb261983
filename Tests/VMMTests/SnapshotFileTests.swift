import Foundation
import Testing
@testable import VMM

/// The snapshot file format without KVM: header, version, length and checksum checks.
@Suite("snapshot file format")
struct SnapshotFileTests {
    static let sample = MachineSnapshot(
        config: VMConfiguration(payload: .kernel(path: "/k", initrd: nil, cmdline: "", modules: [])), memorySize: 64 << 20,
        vcpus: [VCPUState(id: 0, regs: Data([1, 2, 3]), sregs: Data([4]), xsave: Data(repeating: 7, count: 16), xcrs: nil,
                          debugRegs: Data([9]), msrs: [MSRValue(index: 0x10, value: 42)], lapic: Data([5]), mpState: 0,
                          events: Data([6]))],
        vm: VMKernelState(picMaster: Data([1]), picSlave: Data([2]), ioapic: Data([3]), pit: Data([4]), clock: Data([5])),
        devices: [SavedDevice(id: "serial0", version: 1, state: Data("{}".utf8))], quirks: ["guest LSTAR": 0xffff_ffff_8100_0000])

    @Test("encode then decode gives the same snapshot; the same snapshot gives the same bytes")
    func roundTrip() throws {
        let bytes = try SnapshotFile.encode(Self.sample)
        #expect(Array(bytes.prefix(8)) == Array("SKVMSNAP".utf8))
        #expect(try SnapshotFile.decode(bytes, path: "s") == Self.sample)
        #expect(try SnapshotFile.encode(Self.sample) == bytes)
    }

    @Test("every damaged file is refused with a reason naming the file", arguments: ["magic", "version", "truncated", "extended", "flipped", "empty", "json"])
    func damaged(kind: String) throws {
        var b = try SnapshotFile.encode(Self.sample)
        var expect = ""
        switch kind {
        case "magic": b[0] = 0x41; expect = "SKVMSNAP"
        case "version": b[8] = 2; expect = "version 2"
        case "truncated": b.removeLast(10); expect = "truncated"
        case "extended": b += [0, 0]; expect = "truncated or extended"
        case "flipped": b[b.count - 5] ^= 1; expect = "checksum"
        case "empty": b = []; expect = "SKVMSNAP"
        default:
            // A valid header over a payload that is not a snapshot.
            let payload = Array(#"{"config": 1}"#.utf8)
            b = Array(b.prefix(32))
            b.putLE(UInt64(payload.count), at: 16)
            b.putLE(SnapshotFile.crc32(payload), at: 24)
            b += payload
            expect = "unreadable state"
        }
        #expect {
            _ = try SnapshotFile.decode(b, path: "/tmp/bad.snap")
        } throws: { error in
            let text = "\(error)"
            return text.contains("/tmp/bad.snap") && text.contains(expect)
        }
    }
}
