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

/// Fixed-size scratch output for streaming decompression, with a running total checked against a limit.
final class ChunkSink {
    let buffer: UnsafeMutableRawPointer
    let capacity: Int
    private(set) var total = 0
    let limit: Int
    let what: String
    let emit: (UnsafeRawBufferPointer) throws -> Void

    init(capacity: Int, limit: Int, what: String, emit: @escaping (UnsafeRawBufferPointer) throws -> Void) throws {
        guard let p = malloc(capacity) else { throw BootError.decompression("\(what): cannot allocate \(capacity) bytes") }
        buffer = p; self.capacity = capacity; self.limit = limit; self.what = what; self.emit = emit
    }
    deinit { free(buffer) }

    /// Hands the first `n` bytes of `buffer` to the consumer.
    func flush(_ n: Int) throws {
        guard n > 0 else { return }
        guard n <= limit - total else {
            throw BootError.decompression("\(what): decompressed data exceeds the limit of \(sizeText(UInt64(limit)))")
        }
        total += n
        try emit(UnsafeRawBufferPointer(start: buffer, count: n))
    }
}

/// Decompresses kernel payloads with the system libraries (zlib, liblzma, liblz4, libzstd).
///
/// Output is streamed in chunks of at most 8 MiB to a consumer and never exceeds `limit` bytes in
/// total, whatever sizes the input claims. Trailing bytes after the end of the compressed stream
/// (the kernel build appends the decompressed size) are ignored.
public enum Decompressor {
    /// Decompresses `input` in `format`, passing the output in order to `consumer` chunk by chunk.
    /// Returns the total number of bytes produced.
    @discardableResult
    public static func decompress(_ input: UnsafeRawBufferPointer, format: CompressionFormat, limit: Int,
                                  consumer: @escaping (UnsafeRawBufferPointer) throws -> Void) throws -> Int {
        let what = "\(format.rawValue) payload"
        let sink = try ChunkSink(capacity: format == .lz4Legacy ? lz4BlockMax : chunk, limit: limit, what: what, emit: consumer)
        switch format {
        case .gzip: try gunzip(input, sink)
        case .xz, .lzma: try unxz(input, sink)
        case .lz4Legacy: try unlz4Legacy(input, sink)
        case .lz4Frame: try unlz4Frame(input, sink)
        case .zstd: try unzstd(input, sink)
        case .uncompressed:
            guard input.count <= limit else {
                throw BootError.decompression("\(what): \(input.count) bytes exceed the limit of \(sizeText(UInt64(limit)))")
            }
            try consumer(input)
            return input.count
        case .bzip2, .lzo:
            throw BootError.unsupported("\(format.rawValue)-compressed kernels cannot be decompressed by the VMM; use the bzImage entry instead")
        }
        return sink.total
    }

    /// Decompresses into one array (for tests and small payloads). `sizeHint` only sizes the
    /// initial allocation, capped by `limit`.
    public static func decompress(_ input: [UInt8], format: CompressionFormat, limit: Int,
                                  sizeHint: Int? = nil) throws -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(min(limit, sizeHint ?? input.count * 4))
        _ = try input.withUnsafeBytes { buf in
            try decompress(buf, format: format, limit: limit) { out.append(contentsOf: $0) }
        }
        return out
    }

    static let chunk = 1 << 20
    static let lz4BlockMax = 8 << 20

    private static func gunzip(_ input: UnsafeRawBufferPointer, _ out: ChunkSink) throws {
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
            s.next_out = out.buffer.assumingMemoryBound(to: Bytef.self)
            s.avail_out = uInt(out.capacity)
            let rc = inflate(&s, Z_NO_FLUSH)
            try out.flush(out.capacity - Int(s.avail_out))
            if rc == Z_STREAM_END { return }
            if rc == Z_BUF_ERROR && s.avail_in == 0 && consumed == input.count {
                throw BootError.decompression("gzip payload: truncated at input offset \(input.count)")
            }
            if rc != Z_OK && rc != Z_BUF_ERROR {
                let msg = s.msg.map { String(cString: $0) } ?? "error \(rc)"
                throw BootError.decompression("gzip payload: \(msg) at input offset \(Int(s.total_in))")
            }
        }
    }

    private static func unxz(_ input: UnsafeRawBufferPointer, _ out: ChunkSink) throws {
        var s = lzma_stream()
        // lzma_auto_decoder handles .xz and legacy .lzma; 1 GiB memory limit for the dictionary.
        guard lzma_auto_decoder(&s, 1 << 30, 0) == LZMA_OK else {
            throw BootError.decompression("xz payload: lzma_auto_decoder failed")
        }
        defer { lzma_end(&s) }
        s.next_in = input.baseAddress?.assumingMemoryBound(to: UInt8.self)
        s.avail_in = input.count
        while true {
            s.next_out = out.buffer.assumingMemoryBound(to: UInt8.self)
            s.avail_out = out.capacity
            let rc = lzma_code(&s, s.avail_in == 0 ? LZMA_FINISH : LZMA_RUN)
            try out.flush(out.capacity - s.avail_out)
            if rc == LZMA_STREAM_END { return }
            if rc == LZMA_BUF_ERROR || (rc == LZMA_OK && s.avail_in == 0 && s.avail_out != 0) {
                throw BootError.decompression("xz payload: truncated at input offset \(s.total_in)")
            }
            if rc != LZMA_OK {
                throw BootError.decompression("xz payload: liblzma error \(rc.rawValue) at input offset \(s.total_in)")
            }
        }
    }

    /// The legacy LZ4 format written by `lz4 -l` (the kernel's): magic 0x184c2102, then blocks
    /// of a 4-byte little-endian compressed size and data, each decompressing to at most 8 MiB.
    private static func unlz4Legacy(_ input: UnsafeRawBufferPointer, _ out: ChunkSink) throws {
        let magic: UInt32 = 0x184c_2102
        var pos = 4
        func u32(_ at: Int) -> UInt32 { UInt32(littleEndian: input.loadUnaligned(fromByteOffset: at, as: UInt32.self)) }
        var blocks = 0
        while input.count - pos >= 4 {
            let size = u32(pos)
            if size == magic { pos += 4; continue }
            let available = input.count - pos - 4
            if Int(size) > available || size > UInt32(Int32.max) {
                // The kernel build appends the 4-byte decompressed size: it is the last word.
                if available == 0 && blocks > 0 { return }
                throw BootError.decompression("lz4 payload: block at input offset \(pos) claims \(size) bytes but only \(available) remain")
            }
            pos += 4
            let n = LZ4_decompress_safe(input.baseAddress!.advanced(by: pos).assumingMemoryBound(to: CChar.self),
                                        out.buffer.assumingMemoryBound(to: CChar.self), Int32(size), Int32(out.capacity))
            guard n >= 0 else {
                throw BootError.decompression("lz4 payload: corrupt block at input offset \(pos - 4)")
            }
            try out.flush(Int(n))
            blocks += 1
            pos += Int(size)
        }
        if blocks == 0 { throw BootError.decompression("lz4 payload: no data blocks") }
    }

    private static func unlz4Frame(_ input: UnsafeRawBufferPointer, _ out: ChunkSink) throws {
        var ctx: OpaquePointer?
        guard LZ4F_isError(LZ4F_createDecompressionContext(&ctx, UInt32(LZ4F_VERSION))) == 0, let ctx else {
            throw BootError.decompression("lz4 payload: cannot create a decompression context")
        }
        defer { LZ4F_freeDecompressionContext(ctx) }
        var pos = 0
        while true {
            var dstSize = out.capacity
            var srcSize = input.count - pos
            let hint = LZ4F_decompress(ctx, out.buffer, &dstSize, input.baseAddress!.advanced(by: pos), &srcSize, nil)
            if LZ4F_isError(hint) != 0 {
                throw BootError.decompression("lz4 payload: \(String(cString: LZ4F_getErrorName(hint))) near input offset \(pos)")
            }
            try out.flush(dstSize)
            pos += srcSize
            if hint == 0 { return }
            if srcSize == 0 && dstSize == 0 && pos >= input.count {
                throw BootError.decompression("lz4 payload: truncated at input offset \(pos)")
            }
        }
    }

    private static func unzstd(_ input: UnsafeRawBufferPointer, _ out: ChunkSink) throws {
        guard let d = ZSTD_createDCtx() else { throw BootError.decompression("zstd payload: cannot create a context") }
        defer { ZSTD_freeDCtx(d) }
        // The kernel is compressed with a large window (zstd -22 --ultra).
        _ = ZSTD_DCtx_setParameter(d, ZSTD_d_windowLogMax, 31)
        var inb = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
        while true {
            var outb = ZSTD_outBuffer(dst: out.buffer, size: out.capacity, pos: 0)
            let rc = ZSTD_decompressStream(d, &outb, &inb)
            if ZSTD_isError(rc) != 0 {
                throw BootError.decompression("zstd payload: \(String(cString: ZSTD_getErrorName(rc))) near input offset \(inb.pos)")
            }
            try out.flush(outb.pos)
            if rc == 0 { return }
            if inb.pos == inb.size && outb.pos < outb.size {
                throw BootError.decompression("zstd payload: truncated at input offset \(inb.pos)")
            }
        }
    }
}
