import GuestMemory

/// Reads the device-readable bytes of a chain in order, across buffer boundaries.
public struct ChainReader {
    let memory: GuestMemory
    let chain: DescriptorChain
    private var buffer = 0
    private var offset: UInt64 = 0

    /// A reader positioned at the first readable byte.
    public init(memory: GuestMemory, chain: DescriptorChain) {
        self.memory = memory
        self.chain = chain
    }

    /// Readable bytes not consumed yet.
    public var remaining: UInt64 {
        var n: UInt64 = 0
        for (i, b) in chain.readable.enumerated() where i >= buffer { n += UInt64(b.length) - (i == buffer ? offset : 0) }
        return n
    }

    /// Copies the next `count` bytes out. Throws `.badRequest` when fewer remain.
    public mutating func read(_ count: Int) throws(VirtioError) -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(count)
        try forEachSegment(count) { out.append(contentsOf: UnsafeRawBufferPointer($0)) }
        return out
    }

    /// Hands the next `count` readable bytes to `body` as guest-memory slices (zero copy).
    public mutating func forEachSegment(_ count: Int, _ body: (UnsafeMutableRawBufferPointer) throws -> Void) throws(VirtioError) {
        let left = UInt64(count)
        guard remaining >= left else {
            throw .badRequest(queue: chain.queue, head: chain.head, reason: "needs \(count) readable bytes, the chain has \(remaining) left")
        }
        try walkSegments(chain.readable, count: left, buffer: &buffer, offset: &offset, chain: chain, memory: memory, body)
    }
}

/// Writes into the device-writable buffers of a chain in order and counts the bytes written
/// (the used-ring length).
public struct ChainWriter {
    let memory: GuestMemory
    let chain: DescriptorChain
    private var buffer = 0
    private var offset: UInt64 = 0
    /// Bytes written so far (everything before the cursor).
    public var written: UInt64 {
        chain.writable.prefix(buffer).reduce(0) { $0 + UInt64($1.length) } + offset
    }

    /// A writer positioned at the first writable byte.
    public init(memory: GuestMemory, chain: DescriptorChain) {
        self.memory = memory
        self.chain = chain
    }

    /// Writable bytes left.
    public var remaining: UInt64 { chain.writableLength - written }

    /// Copies `bytes` in. Throws `.badRequest` when they do not fit.
    public mutating func write(_ bytes: [UInt8]) throws(VirtioError) {
        var done = 0
        try forEachSegment(bytes.count) { dst in
            bytes.withUnsafeBytes { src in
                dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[done..<(done + dst.count)]))
            }
            done += dst.count
        }
    }

    /// Hands the next `count` writable bytes to `body` as guest-memory slices (zero copy); they count
    /// as written.
    public mutating func forEachSegment(_ count: Int, _ body: (UnsafeMutableRawBufferPointer) throws -> Void) throws(VirtioError) {
        let left = UInt64(count)
        guard remaining >= left else {
            throw .badRequest(queue: chain.queue, head: chain.head, reason: "needs \(count) writable bytes, the chain has \(remaining) left")
        }
        try walkSegments(chain.writable, count: left, buffer: &buffer, offset: &offset, chain: chain, memory: memory, body)
    }
}

/// Hands `count` bytes of `buffers`, starting at the cursor (`buffer`, `offset`), to `body` as guest-memory
/// slices and advances the cursor. The caller has checked that `count` bytes remain.
private func walkSegments(_ buffers: [VirtioBuffer], count: UInt64, buffer: inout Int, offset: inout UInt64,
                          chain: DescriptorChain, memory: GuestMemory,
                          _ body: (UnsafeMutableRawBufferPointer) throws -> Void) throws(VirtioError) {
    var left = count
    while left > 0 {
        let b = buffers[buffer]
        let n = min(left, UInt64(b.length) - offset)
        if n > 0 {
            let a = b.address + offset
            do {
                try memory.withBytes(at: a, count: Int(n)) { try body($0) }
            } catch let e as VirtioError { throw e } catch {
                throw .memory(queue: chain.queue, head: chain.head, address: a, length: n)
            }
        }
        offset += n
        left -= n
        if offset == UInt64(b.length) { buffer += 1; offset = 0 }
    }
}
