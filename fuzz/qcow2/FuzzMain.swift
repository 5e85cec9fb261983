// libFuzzer target for the qcow2 header, table and snapshot parsers, the read path, and the write paths on a
// mutated image: check -r all, then (when the repair reports a clean image) a write, a snapshot and a resize, after
// which the image must still check clean.
// Built by scripts/fuzz-qcow2 with `swiftc -sanitize=fuzzer,address` together with Sources/DiskImage.
import Foundation

private let scratch = "/dev/shm/swiftkvm-fuzz-\(getpid()).qcow2"

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = [UInt8](UnsafeBufferPointer(start: data, count: size))
    // 1. The header parser alone, with the input's own length as the file size.
    _ = try? Qcow2Header(bytes: bytes, path: "fuzz", fileSize: UInt64(size))
    // 2. The whole open/read/check path on the input as a file.
    guard FileManager.default.createFile(atPath: scratch, contents: Data(bytes)) else { return 0 }
    defer { unlink(scratch) }
    if let img = try? Qcow2Image(path: scratch, options: .init(readOnly: true, allowBackingFiles: false)) {
        _ = try? img.read(at: 0, count: Int(min(img.size, 256 << 10)))
        if img.size > 4096 { _ = try? img.read(at: img.size - 4096, count: 4096) }
        _ = try? img.snapshots()
        _ = try? img.check()
        _ = try? img.blockStatus(at: 0, maxLength: img.size)
        try? img.close()
    }
    // 3. Repair, then write on what the repair calls clean: a repair that claims success must be true.
    var o = ImageOpenOptions(readOnly: false, allowBackingFiles: false, ignoreBackingFile: true)
    o.forCheck = true
    if let img = try? Qcow2Image(path: scratch, options: o) {
        if let r = try? img.check(repair: .all), r.corruptions == 0, r.leaks == 0, r.checkErrors == 0 {
            if img.size >= 4096 { try? img.write([UInt8](repeating: 0xa5, count: 4096), at: img.size - 4096) }
            try? img.createSnapshot(name: "fuzz")
            try? img.resize(to: img.size + 65536, allowShrink: false)
            if let after = try? img.check(), after.corruptions != 0 || after.checkErrors != 0 {
                fatalError("a repaired image became corrupt after writes: \(after.messages.prefix(5))")
            }
        }
        try? img.close()
    }
    return 0
}
