import Foundation
import GuestMemory
@testable import Boot

/// Guest memory of `size` bytes laid out as on a PC (PCI hole at 3 GiB).
func makeMemory(_ size: UInt64) throws -> GuestMemory { try GuestMemory.allocate(size: size) }

/// A test ELF segment.
struct TestSegment {
    var paddr: UInt64
    var vaddr: UInt64
    var data: [UInt8]
    var memsz: UInt64
    var type: UInt32 = 1
}

/// Builds a little-endian ELF64 (class 2) or ELF32 (class 1) executable.
/// With `alignData`, each segment's file data starts at a file offset congruent to its physical address modulo
/// 4096, as linkers lay out loadable segments (`makeELF` packs the data otherwise).
func makeELF(bits: Int = 64, machine: UInt16 = 62, type: UInt16 = 2, entry: UInt64, segments: [TestSegment],
             alignData: Bool = false) -> [UInt8] {
    let is64 = bits == 64
    let ehsize = is64 ? 64 : 52, phentsize = is64 ? 56 : 32
    var b = [UInt8](repeating: 0, count: ehsize)
    b.replaceSubrange(0..<4, with: [0x7f, 0x45, 0x4c, 0x46])
    b[4] = is64 ? 2 : 1; b[5] = 1; b[6] = 1
    b.putLE(type, at: 16); b.putLE(machine, at: 18); b.putLE(UInt32(1), at: 20)
    let phoff = ehsize
    var dataOffset = phoff + phentsize * segments.count
    var offsets: [Int] = []
    for s in segments {
        if alignData { dataOffset += Int((s.paddr &- UInt64(dataOffset)) & 0xfff) }
        offsets.append(dataOffset)
        dataOffset += s.data.count
    }
    if is64 {
        b.putLE(entry, at: 24); b.putLE(UInt64(phoff), at: 32)
        b.putLE(UInt16(ehsize), at: 52); b.putLE(UInt16(phentsize), at: 54); b.putLE(UInt16(segments.count), at: 56)
    } else {
        b.putLE(UInt32(entry), at: 24); b.putLE(UInt32(phoff), at: 28)
        b.putLE(UInt16(ehsize), at: 40); b.putLE(UInt16(phentsize), at: 42); b.putLE(UInt16(segments.count), at: 44)
    }
    for (i, s) in segments.enumerated() {
        let o = phoff + i * phentsize
        if is64 {
            b.putLE(s.type, at: o); b.putLE(UInt32(7), at: o + 4); b.putLE(UInt64(offsets[i]), at: o + 8)
            b.putLE(s.vaddr, at: o + 16); b.putLE(s.paddr, at: o + 24)
            b.putLE(UInt64(s.data.count), at: o + 32); b.putLE(s.memsz, at: o + 40); b.putLE(UInt64(0x1000), at: o + 48)
        } else {
            b.putLE(s.type, at: o); b.putLE(UInt32(offsets[i]), at: o + 4)
            b.putLE(UInt32(s.vaddr), at: o + 8); b.putLE(UInt32(s.paddr), at: o + 12)
            b.putLE(UInt32(s.data.count), at: o + 16); b.putLE(UInt32(s.memsz), at: o + 20)
            b.putLE(UInt32(7), at: o + 24); b.putLE(UInt32(0x1000), at: o + 28)
        }
    }
    for (i, s) in segments.enumerated() {
        b += [UInt8](repeating: 0, count: offsets[i] - b.count)
        b += s.data
    }
    return b
}

/// A small "vmlinux": code at 0x1000000 (virtual 0xffffffff81000000) with BSS, entry at +0x40.
func makeVmlinux() -> [UInt8] {
    var text = [UInt8](repeating: 0x90, count: 0x3000)
    text[0x40] = 0xf4
    return makeELF(entry: 0xffff_ffff_8100_0040, segments: [
        TestSegment(paddr: 0x100_0000, vaddr: 0xffff_ffff_8100_0000, data: text, memsz: 0x5000),
    ])
}

/// Fields of a synthesized bzImage.
struct BzOptions {
    var version: UInt16 = 0x020f
    var xloadflags: UInt16 = 0x3
    var setupSects: UInt8 = 4
    var cmdlineSize: UInt32 = 2047
    var initrdAddrMax: UInt32 = 0x7fff_ffff
    var kernelAlignment: UInt32 = 0x20_0000
    var prefAddress: UInt64 = 0x100_0000
    var initSize: UInt32 = 0x80_0000
    var loadflags: UInt8 = 0x01
    var payloadOffsetOverride: UInt32? = nil
    var payloadLengthOverride: UInt32? = nil
}

/// Builds a bzImage: boot sector + setup sectors with a setup header, a "kernel_version" string,
/// and a protected-mode part of 0x200 bytes of stub followed by `payload`.
func makeBzImage(payload: [UInt8], _ o: BzOptions = BzOptions()) -> [UInt8] {
    let setupSize = (Int(o.setupSects == 0 ? 4 : o.setupSects) + 1) * 512
    var b = [UInt8](repeating: 0, count: setupSize)
    b[0x1f1] = o.setupSects
    b.putLE(UInt16(0xffff), at: 0x1fa)
    b.putLE(UInt16(0xaa55), at: 0x1fe)
    b[0x200] = 0xeb; b[0x201] = 0x6a  // jump over the header: header ends at 0x26c
    b.putLE(UInt32(0x5372_6448), at: 0x202)
    b.putLE(o.version, at: 0x206)
    let versionText = Array("6.1.0-test (swiftkvm@test) #1".utf8) + [0]
    b.replaceSubrange(0x300..<0x300 + versionText.count, with: versionText)
    b.putLE(UInt16(0x300 - 0x200), at: 0x20e)
    b[0x211] = o.loadflags
    b.putLE(UInt32(0x100000), at: 0x214)
    b.putLE(o.initrdAddrMax, at: 0x22c)
    b.putLE(o.kernelAlignment, at: 0x230)
    b[0x234] = 1
    b.putLE(o.xloadflags, at: 0x236)
    b.putLE(o.cmdlineSize, at: 0x238)
    let stub = [UInt8](repeating: 0xf4, count: 0x200)
    b.putLE(o.payloadOffsetOverride ?? UInt32(stub.count), at: 0x248)
    b.putLE(o.payloadLengthOverride ?? UInt32(payload.count), at: 0x24c)
    b.putLE(o.prefAddress, at: 0x258)
    b.putLE(o.initSize, at: 0x260)
    let pm = stub + payload
    b.putLE(UInt32((pm.count + 15) / 16), at: 0x1f4)
    return b + pm
}

/// Runs a compression CLI on `data` and returns its output (plus the kernel build's 4-byte size trailer).
func compress(_ data: [UInt8], tool: String, args: [String], appendSize: Bool = true) throws -> [UInt8] {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("boottests-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: dir) }
    let input = dir.appendingPathComponent("in")
    try Data(data).write(to: input)
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = [tool] + args + [input.path]
    let pipe = Pipe()
    p.standardOutput = pipe
    p.standardError = FileHandle.nullDevice
    try p.run()
    let out = pipe.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    guard p.terminationStatus == 0 else { throw CocoaError(.fileReadUnknown) }
    var bytes = [UInt8](out)
    if appendSize { bytes.putLE(UInt32(truncatingIfNeeded: data.count), at: bytes.count) }
    return bytes
}

/// Whether a command exists on PATH.
func haveTool(_ name: String) -> Bool {
    (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":").contains {
        FileManager.default.isExecutableFile(atPath: "\($0)/\(name)")
    }
}

/// Deterministic, moderately compressible test data.
func testData(_ count: Int) -> [UInt8] {
    [UInt8](unsafeUninitializedCapacity: count) { buf, n in
        var x: UInt32 = 12345
        for i in 0..<count {
            x = x &* 1103515245 &+ 12345
            buf[i] = i % 7 == 0 ? UInt8(truncatingIfNeeded: x >> 16) : UInt8(truncatingIfNeeded: i >> 6)
        }
        n = count
    }
}

/// Expects `body` to throw a BootError whose message contains every string in `parts`.
func bootError(_ body: () throws -> Void) -> String? {
    do { try body(); return nil } catch let e as BootError { return e.description } catch { return "non-BootError: \(error)" }
}
