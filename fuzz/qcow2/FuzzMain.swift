// libFuzzer target for the qcow2 header, table and snapshot parsers and the read path.
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
    return 0
}
