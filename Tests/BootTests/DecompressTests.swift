import Testing
@testable import Boot

@Suite("Payload decompression")
struct DecompressTests {
    static let formats: [(CompressionFormat, String, [String])] = [
        (.gzip, "gzip", ["-9", "-c"]),
        (.xz, "xz", ["--check=crc32", "-c"]),
        (.lzma, "xz", ["--format=lzma", "-c"]),
        (.lz4Legacy, "lz4", ["-l", "-9", "-c"]),
        (.lz4Frame, "lz4", ["-c"]),
        (.zstd, "zstd", ["-c", "-q"]),
    ]

    @Test("each supported format round-trips data compressed by its CLI tool, with the size trailer",
          arguments: formats.map { $0.0 })
    func roundTrip(format: CompressionFormat) throws {
        let (_, tool, args) = try #require(Self.formats.first { $0.0 == format })
        try #require(haveTool(tool), "\(tool) is not installed")
        let data = testData(1 << 20)
        let packed = try compress(data, tool: tool, args: args)
        #expect(CompressionFormat.detect(packed) == format)
        let out = try Decompressor.decompress(packed, format: format, limit: 64 << 20, sizeHint: data.count)
        #expect(out.count == data.count)
        #expect(out == data)
    }

    @Test("legacy lz4 with several 8 MiB blocks decompresses completely")
    func lz4ManyBlocks() throws {
        try #require(haveTool("lz4"), "lz4 is not installed")
        let data = testData(17 << 20)
        let packed = try compress(data, tool: "lz4", args: ["-l", "-c"])
        let out = try Decompressor.decompress(packed, format: .lz4Legacy, limit: 64 << 20)
        #expect(out == data)
    }

    @Test("output beyond the limit is an error, not an allocation", arguments: formats.map { $0.0 })
    func limit(format: CompressionFormat) throws {
        let (_, tool, args) = try #require(Self.formats.first { $0.0 == format })
        try #require(haveTool(tool), "\(tool) is not installed")
        let data = [UInt8](repeating: 0x41, count: 4 << 20)
        let packed = try compress(data, tool: tool, args: args)
        let message = bootError { _ = try Decompressor.decompress(packed, format: format, limit: 1 << 20, sizeHint: Int(UInt32.max)) }
        #expect(message?.contains("exceeds the limit") == true, "\(message ?? "no error")")
    }

    @Test("truncated input is reported with its format", arguments: formats.map { $0.0 })
    func truncated(format: CompressionFormat) throws {
        let (_, tool, args) = try #require(Self.formats.first { $0.0 == format })
        try #require(haveTool(tool), "\(tool) is not installed")
        let packed = try compress(testData(1 << 20), tool: tool, args: args, appendSize: false)
        let cut = Array(packed.prefix(packed.count / 2))
        let message = bootError { _ = try Decompressor.decompress(cut, format: format, limit: 64 << 20) }
        #expect(message != nil)
    }

    @Test("garbage after a valid magic is a decompression error")
    func garbage() {
        var bad: [UInt8] = [0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 3]
        bad += [UInt8](repeating: 0xff, count: 100)
        #expect(bootError { _ = try Decompressor.decompress(bad, format: .gzip, limit: 1 << 20) }?.contains("gzip") == true)
    }

    @Test("magic detection recognises every format and refuses unknown bytes")
    func detect() {
        #expect(CompressionFormat.detect([0x42, 0x5a, 0x68, 0x39]) == .bzip2)
        #expect(CompressionFormat.detect([0x89, 0x4c, 0x5a, 0x4f]) == .lzo)
        #expect(CompressionFormat.detect([0x7f, 0x45, 0x4c, 0x46]) == .uncompressed)
        #expect(CompressionFormat.detect([0x00, 0x01]) == nil)
        #expect(CompressionFormat.bzip2.isSupported == false)
        #expect(bootError { _ = try Decompressor.decompress([0x42, 0x5a, 0x68], format: .bzip2, limit: 100) }?.contains("bzImage entry") == true)
    }
}
