import CLZ4
import CLZMA
import CZlib
import CZstd
#if canImport(Glibc)
import Glibc
#endif

/// Compression formats of a bzImage payload, recognised by their magic bytes.
public enum CompressionFormat: String, Sendable, Equatable, CaseIterable {
    case gzip, xz, lzma, lz4Legacy = "lz4-legacy", lz4Frame = "lz4", zstd, bzip2, lzo, uncompressed

    /// Detects the format from the first bytes (`uncompressed` means a plain ELF).
    public static func detect(_ bytes: some Collection<UInt8>) -> CompressionFormat? {
        let b = Array(bytes.prefix(6))
        func starts(_ m: [UInt8]) -> Bool { b.count >= m.count && Array(b.prefix(m.count)) == m }
        if starts([0x1f, 0x8b]) { return .gzip }
        if starts([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]) { return .xz }
        if starts([0x02, 0x21, 0x4c, 0x18]) { return .lz4Legacy }
        if starts([0x04, 0x22, 0x4d, 0x18]) { return .lz4Frame }
        if starts([0x28, 0xb5, 0x2f, 0xfd]) { return .zstd }
        if starts([0x42, 0x5a, 0x68]) { return .bzip2 }
        if starts([0x89, 0x4c, 0x5a, 0x4f]) { return .lzo }
        if starts([0x7f, 0x45, 0x4c, 0x46]) { return .uncompressed }
        if starts([0x5d, 0x00]) { return .lzma }
        return nil
    }

    /// Whether `Decompressor` can decompress this format.
    public var isSupported: Bool {
        switch self {
        case .bzip2, .lzo: return false
        default: return true
        }
    }
}

/// A growable malloc'd output buffer with a hard size limit.
final class OutputBuffer {
    private(set) var base: UnsafeMutableRawPointer
    private(set) var capacity: Int
    var count = 0
    let limit: Int
    let what: String

    init(initialCapacity: Int, limit: Int, what: String) throws {
        let cap = max(4096, min(initialCapacity, limit))
        guard let p = malloc(cap) else { throw BootError.decompression("\(what): cannot allocate \(cap) bytes") }
        base = p; capacity = cap; self.limit = limit; self.what = what
    }
    deinit { free(base) }

    /// Ensures at least `n` free bytes (fewer if the limit is reached; returns the free space).
    @discardableResult
    func reserve(_ n: Int) throws -> Int {
        if capacity - count >= n { return capacity - count }
        if capacity >= limit {
            if capacity - count > 0 { return capacity - count }
            throw BootError.decompression("\(what): decompressed data exceeds the limit of \(sizeText(UInt64(limit)))")
        }
        var newCap = capacity
        while newCap - count < n && newCap < limit { newCap = min(limit, newCap * 2) }
        guard let p = realloc(base, newCap) else {
            throw BootError.decompression("\(what): cannot allocate \(newCap) bytes")
        }
        base = p; capacity = newCap
        return capacity - count
    }

    var freeSpace: Int { capacity - count }
    var end: UnsafeMutableRawPointer { base + count }
    func toArray() -> [UInt8] { Array(UnsafeRawBufferPointer(start: base, count: count)) }
}

/// Decompresses kernel payloads with the system libraries (zlib, liblzma, liblz4, libzstd).
///
/// Output never grows past `limit` bytes, whatever sizes the input claims. Trailing bytes after
/// the end of the compressed stream (the kernel build appends the decompressed size) are ignored.
public enum Decompressor {
    /// Decompresses `input` in `format`. `sizeHint` (for example the size the kernel build appends)
    /// only sets the initial buffer, capped by `limit`.
    public static func decompress(_ input: UnsafeRawBufferPointer, format: CompressionFormat,
                                  limit: Int, sizeHint: Int? = nil) throws -> [UInt8] {
        let what = "\(format.rawValue) payload"
        let initial = sizeHint.map { $0 + 4096 } ?? input.count * 4
        let out = try OutputBuffer(initialCapacity: initial, limit: limit, what: what)
        switch format {
        case .gzip: try gunzip(input, out)
        case .xz, .lzma: try unxz(input, out)
        case .lz4Legacy: try unlz4Legacy(input, out)
        case .lz4Frame: try unlz4Frame(input, out)
        case .zstd: try unzstd(input, out)
        case .uncompressed: return Array(input)
        case .bzip2, .lzo:
            throw BootError.unsupported("\(format.rawValue)-compressed kernels cannot be decompressed by the VMM; use the bzImage entry instead")
        }
        return out.toArray()
    }

    /// Convenience for byte arrays.
    public static func decompress(_ input: [UInt8], format: CompressionFormat, limit: Int,
                                  sizeHint: Int? = nil) throws -> [UInt8] {
        try input.withUnsafeBytes { try decompress($0, format: format, limit: limit, sizeHint: sizeHint) }
    }

    private static let chunk = 1 << 20

    private static func gunzip(_ input: UnsafeRawBufferPointer, _ out: OutputBuffer) throws {
        var s = z_stream()
        // 16 + MAX_WBITS: gzip wrapper.
        guard inflateInit2_(&s, 16 + 15, zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
            throw BootError.decompression("gzip payload: inflateInit2 failed")
        }
        defer { inflateEnd(&s) }
        var consumed = 0
        while true {
            if s.avail_in == 0 && consumed < input.count, let base = input.baseAddress {
                let n = min(input.count - consumed, 1 << 30)
                s.next_in = UnsafeMutablePointer(mutating: (base + consumed).assumingMemoryBound(to: Bytef.self))
                s.avail_in = uInt(n)
                consumed += n
            }
            try out.reserve(chunk)
            let room = min(out.freeSpace, 1 << 30)
            s.next_out = out.end.assumingMemoryBound(to: Bytef.self)
            s.avail_out = uInt(room)
            let rc = inflate(&s, Z_NO_FLUSH)
            out.count += room - Int(s.avail_out)
            if rc == Z_STREAM_END { return }
            if rc == Z_BUF_ERROR && s.avail_in == 0 && consumed == input.count {
                throw BootError.decompression("gzip payload: truncated at input offset \(input.count)")
            }
            if rc != Z_OK && rc != Z_BUF_ERROR {
                let msg = s.msg.map { String(cString: $0) } ?? "error \(rc)"
                throw BootError.decompression("gzip payload: \(msg) at input offset \(Int(s.total_in))")
            }
            if out.freeSpace == 0 && out.capacity >= out.limit {
                throw BootError.decompression("gzip payload: decompressed data exceeds the limit of \(sizeText(UInt64(out.limit)))")
            }
        }
    }

    private static func unxz(_ input: UnsafeRawBufferPointer, _ out: OutputBuffer) throws {
        var s = lzma_stream()
        // lzma_auto_decoder handles .xz and legacy .lzma; 1 GiB memory limit for the dictionary.
        guard lzma_auto_decoder(&s, 1 << 30, 0) == LZMA_OK else {
            throw BootError.decompression("xz payload: lzma_auto_decoder failed")
        }
        defer { lzma_end(&s) }
        s.next_in = input.baseAddress?.assumingMemoryBound(to: UInt8.self)
        s.avail_in = input.count
        while true {
            try out.reserve(chunk)
            let room = out.freeSpace
            s.next_out = out.end.assumingMemoryBound(to: UInt8.self)
            s.avail_out = room
            let rc = lzma_code(&s, s.avail_in == 0 ? LZMA_FINISH : LZMA_RUN)
            out.count += room - s.avail_out
            if rc == LZMA_STREAM_END { return }
            if rc == LZMA_BUF_ERROR || (rc == LZMA_OK && s.avail_in == 0 && s.avail_out != 0) {
                throw BootError.decompression("xz payload: truncated at input offset \(s.total_in)")
            }
            if rc != LZMA_OK {
                throw BootError.decompression("xz payload: liblzma error \(rc.rawValue) at input offset \(s.total_in)")
            }
            if out.freeSpace == 0 && out.capacity >= out.limit {
                throw BootError.decompression("xz payload: decompressed data exceeds the limit of \(sizeText(UInt64(out.limit)))")
            }
        }
    }

    /// The legacy LZ4 format written by `lz4 -l` (the kernel's): magic 0x184c2102, then blocks
    /// of a 4-byte little-endian compressed size and data, each decompressing to at most 8 MiB.
    private static func unlz4Legacy(_ input: UnsafeRawBufferPointer, _ out: OutputBuffer) throws {
        let magic: UInt32 = 0x184c_2102
        let blockMax = 8 << 20
        var pos = 4
        func u32(_ at: Int) -> UInt32 { UInt32(littleEndian: input.loadUnaligned(fromByteOffset: at, as: UInt32.self)) }
        while input.count - pos >= 4 {
            let size = u32(pos)
            if size == magic { pos += 4; continue }
            let available = input.count - pos - 4
            if Int(size) > available {
                // The kernel build appends the 4-byte decompressed size: it is the last word.
                if available == 0 && out.count > 0 { return }
                throw BootError.decompression("lz4 payload: block at input offset \(pos) claims \(size) bytes but only \(available) remain")
            }
            pos += 4
            try out.reserve(blockMax)
            let room = min(out.freeSpace, blockMax)
            let n = LZ4_decompress_safe(input.baseAddress!.advanced(by: pos).assumingMemoryBound(to: CChar.self),
                                        out.end.assumingMemoryBound(to: CChar.self), Int32(size), Int32(room))
            guard n >= 0 else {
                if room < blockMax {
                    throw BootError.decompression("lz4 payload: decompressed data exceeds the limit of \(sizeText(UInt64(out.limit)))")
                }
                throw BootError.decompression("lz4 payload: corrupt block at input offset \(pos - 4)")
            }
            out.count += Int(n)
            pos += Int(size)
        }
        if out.count == 0 { throw BootError.decompression("lz4 payload: no data blocks") }
    }

    private static func unlz4Frame(_ input: UnsafeRawBufferPointer, _ out: OutputBuffer) throws {
        var ctx: OpaquePointer?
        guard LZ4F_isError(LZ4F_createDecompressionContext(&ctx, UInt32(LZ4F_VERSION))) == 0, let ctx else {
            throw BootError.decompression("lz4 payload: cannot create a decompression context")
        }
        defer { LZ4F_freeDecompressionContext(ctx) }
        var pos = 0
        while true {
            try out.reserve(chunk)
            var dstSize = out.freeSpace
            var srcSize = input.count - pos
            let hint = LZ4F_decompress(ctx, out.end, &dstSize, input.baseAddress!.advanced(by: pos), &srcSize, nil)
            if LZ4F_isError(hint) != 0 {
                throw BootError.decompression("lz4 payload: \(String(cString: LZ4F_getErrorName(hint))) near input offset \(pos)")
            }
            out.count += dstSize
            pos += srcSize
            if hint == 0 { return }
            if srcSize == 0 && dstSize == 0 && pos >= input.count {
                throw BootError.decompression("lz4 payload: truncated at input offset \(pos)")
            }
            if out.freeSpace == 0 && out.capacity >= out.limit {
                throw BootError.decompression("lz4 payload: decompressed data exceeds the limit of \(sizeText(UInt64(out.limit)))")
            }
        }
    }

    private static func unzstd(_ input: UnsafeRawBufferPointer, _ out: OutputBuffer) throws {
        guard let d = ZSTD_createDCtx() else { throw BootError.decompression("zstd payload: cannot create a context") }
        defer { ZSTD_freeDCtx(d) }
        // The kernel is compressed with a large window (zstd -22 --ultra).
        _ = ZSTD_DCtx_setParameter(d, ZSTD_d_windowLogMax, 31)
        var inb = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
        while true {
            try out.reserve(chunk)
            var outb = ZSTD_outBuffer(dst: out.end, size: out.freeSpace, pos: 0)
            let rc = ZSTD_decompressStream(d, &outb, &inb)
            out.count += outb.pos
            if ZSTD_isError(rc) != 0 {
                throw BootError.decompression("zstd payload: \(String(cString: ZSTD_getErrorName(rc))) near input offset \(inb.pos)")
            }
            if rc == 0 { return }
            if inb.pos == inb.size && outb.pos < outb.size {
                throw BootError.decompression("zstd payload: truncated at input offset \(inb.pos)")
            }
            if out.freeSpace == 0 && out.capacity >= out.limit {
                throw BootError.decompression("zstd payload: decompressed data exceeds the limit of \(sizeText(UInt64(out.limit)))")
            }
        }
    }
}
