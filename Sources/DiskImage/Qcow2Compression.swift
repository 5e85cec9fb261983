import CZlib
import CZstd

/// Compression and decompression of qcow2 compressed clusters: zlib raw deflate (window 4 KiB, as QEMU) and zstd.
enum Qcow2Codec {
    /// Decompresses `input` into exactly `output.count` bytes. Trailing input (sector padding) is ignored.
    static func decompress(_ type: Qcow2CompressionType, _ input: [UInt8], into output: UnsafeMutableRawBufferPointer,
                           path: String, offset: UInt64) throws {
        func fail(_ why: String) -> DiskImageError {
            .corrupt(path, "compressed cluster at offset \(offset) (\(input.count) bytes) cannot be decompressed: \(why)")
        }
        switch type {
        case .zlib:
            var s = z_stream()
            var rc = inflateInit2_(&s, -12, zlibVersion(), Int32(MemoryLayout<z_stream>.size))
            guard rc == Z_OK else { throw fail("inflateInit2 returned \(rc)") }
            defer { inflateEnd(&s) }
            try input.withUnsafeBytes { inp in
                s.next_in = UnsafeMutablePointer(mutating: inp.bindMemory(to: Bytef.self).baseAddress)
                s.avail_in = uInt(inp.count)
                s.next_out = output.bindMemory(to: Bytef.self).baseAddress
                s.avail_out = uInt(output.count)
                rc = inflate(&s, Z_FINISH)
                // QEMU accepts a stream that filled the whole cluster even if the end marker was not reached.
                if !(rc == Z_STREAM_END || (rc == Z_BUF_ERROR && s.avail_out == 0)) || s.avail_out != 0 {
                    throw fail("zlib inflate returned \(rc) with \(s.avail_out) bytes of the cluster missing")
                }
            }
        case .zstd:
            guard let ds = ZSTD_createDStream() else { throw fail("ZSTD_createDStream failed") }
            defer { ZSTD_freeDStream(ds) }
            try input.withUnsafeBytes { inp in
                var ib = ZSTD_inBuffer(src: inp.baseAddress, size: inp.count, pos: 0)
                var ob = ZSTD_outBuffer(dst: output.baseAddress, size: output.count, pos: 0)
                while ob.pos < ob.size {
                    let before = (ib.pos, ob.pos)
                    let r = ZSTD_decompressStream(ds, &ob, &ib)
                    if ZSTD_isError(r) != 0 { throw fail("zstd: \(String(cString: ZSTD_getErrorName(r)))") }
                    if r == 0 && ob.pos < ob.size { throw fail("zstd frame ended after \(ob.pos) bytes") }
                    if before == (ib.pos, ob.pos) { throw fail("zstd made no progress at input byte \(ib.pos)") }
                }
            }
        }
    }

    /// Compresses one cluster. Returns nil when the result would not be smaller than the cluster.
    static func compress(_ type: Qcow2CompressionType, _ input: UnsafeRawBufferPointer) -> [UInt8]? {
        let cap = input.count - 1
        guard cap > 0 else { return nil }
        var out = [UInt8](repeating: 0, count: cap)
        switch type {
        case .zlib:
            var s = z_stream()
            guard deflateInit2_(&s, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY,
                                zlibVersion(), Int32(MemoryLayout<z_stream>.size)) == Z_OK else { return nil }
            defer { deflateEnd(&s) }
            let n: Int? = out.withUnsafeMutableBytes { ob in
                s.next_in = UnsafeMutablePointer(mutating: input.bindMemory(to: Bytef.self).baseAddress)
                s.avail_in = uInt(input.count)
                s.next_out = ob.bindMemory(to: Bytef.self).baseAddress
                s.avail_out = uInt(ob.count)
                let rc = deflate(&s, Z_FINISH)
                return rc == Z_STREAM_END ? ob.count - Int(s.avail_out) : nil
            }
            guard let n else { return nil }
            out.removeSubrange(n...)
            return out
        case .zstd:
            let n = out.withUnsafeMutableBytes { ob in
                ZSTD_compress(ob.baseAddress, ob.count, input.baseAddress, input.count, 3)
            }
            if ZSTD_isError(n) != 0 { return nil }
            out.removeSubrange(n...)
            return out
        }
    }
}
