import GuestMemory
#if canImport(Glibc)
import Glibc
#endif

/// A guest-physical range a loader filled, for diagnostics and overlap checks.
public struct LoadRange: Sendable, Equatable, CustomStringConvertible {
    public var start: UInt64
    public var size: UInt64
    public var what: String
    public init(start: UInt64, size: UInt64, what: String) { self.start = start; self.size = size; self.what = what }
    /// One past the last byte.
    public var end: UInt64 { start &+ size }
    func overlaps(_ s: UInt64, _ n: UInt64) -> Bool { n > 0 && size > 0 && s < end && start < s &+ n }
    public var description: String { "\(what) \(hex(start))-\(hex(end))" }
}

/// One ELF program header.
public struct ELFProgramHeader: Sendable, Equatable {
    public var type: UInt32
    public var flags: UInt32
    public var offset: UInt64
    public var vaddr: UInt64
    public var paddr: UInt64
    public var filesz: UInt64
    public var memsz: UInt64
    /// PT_LOAD.
    public static let load: UInt32 = 1
    /// PT_NOTE.
    public static let note: UInt32 = 4
}

/// A parsed ELF executable header and program headers (32- or 64-bit, little-endian, EXEC).
///
/// ELF headers are parsed field by field at their fixed offsets; nothing beyond what loading needs.
public struct ELFImage: Sendable, Equatable {
    /// 64 for ELFCLASS64, 32 for ELFCLASS32.
    public var bits: Int
    /// e_machine (62 = x86-64, 3 = i386).
    public var machine: UInt16
    /// e_entry (a virtual address).
    public var entry: UInt64
    public var programHeaders: [ELFProgramHeader]
    /// The PVH 32-bit entry point (Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY = 18), when present.
    public var pvhEntry: UInt64?

    /// The PT_LOAD headers with a non-zero memory size.
    public var loadSegments: [ELFProgramHeader] { programHeaders.filter { $0.type == ELFProgramHeader.load && $0.memsz > 0 } }

    /// Whether `bytes` starts with the ELF magic.
    public static func isELF(_ bytes: [UInt8]) -> Bool { bytes.starts(with: [0x7f, 0x45, 0x4c, 0x46]) }

    /// Parses and validates an ELF executable. `bits` and `machine` are the expected class and
    /// machine; `what` names the file in messages (for example "kernel ELF").
    ///
    /// With `streamed`, `bytes` is only a prefix of the file (headers included) and segment file
    /// ranges are checked later by the streaming loader.
    public init(parsing bytes: [UInt8], bits expectedBits: Int, machine expectedMachine: UInt16, what: String,
                streamed: Bool = false) throws {
        guard bytes.count >= 16, ELFImage.isELF(bytes) else {
            throw BootError.invalidImage("\(what): no ELF magic at offset 0")
        }
        let cls = bytes[4]
        guard cls == 1 || cls == 2 else { throw BootError.invalidImage("\(what): unknown ELF class \(cls) at offset 4") }
        let bits = cls == 2 ? 64 : 32
        guard bits == expectedBits else {
            throw BootError.invalidImage("\(what): ELF class is \(bits)-bit at offset 4, expected \(expectedBits)-bit")
        }
        guard bytes[5] == 1 else { throw BootError.invalidImage("\(what): ELF data encoding \(bytes[5]) at offset 5 is not little-endian") }
        let ehsize = bits == 64 ? 64 : 52
        guard bytes.count >= ehsize else {
            throw BootError.invalidImage("\(what): truncated ELF header (\(bytes.count) bytes, need \(ehsize))")
        }
        let type = bytes.getLE(UInt16.self, at: 16)!
        guard type == 2 else { throw BootError.invalidImage("\(what): ELF type \(type) at offset 16 is not an executable (ET_EXEC = 2)") }
        let machine = bytes.getLE(UInt16.self, at: 18)!
        guard machine == expectedMachine else {
            throw BootError.invalidImage("\(what): ELF machine \(machine) at offset 18, expected \(expectedMachine)")
        }
        let entry: UInt64, phoff: UInt64, phentsize: Int, phnum: Int
        if bits == 64 {
            entry = bytes.getLE(UInt64.self, at: 24)!
            phoff = bytes.getLE(UInt64.self, at: 32)!
            phentsize = Int(bytes.getLE(UInt16.self, at: 54)!)
            phnum = Int(bytes.getLE(UInt16.self, at: 56)!)
        } else {
            entry = UInt64(bytes.getLE(UInt32.self, at: 24)!)
            phoff = UInt64(bytes.getLE(UInt32.self, at: 28)!)
            phentsize = Int(bytes.getLE(UInt16.self, at: 42)!)
            phnum = Int(bytes.getLE(UInt16.self, at: 44)!)
        }
        let minEntSize = bits == 64 ? 56 : 32
        guard phnum > 0 else { throw BootError.invalidImage("\(what): ELF has no program headers (e_phnum = 0)") }
        guard phentsize >= minEntSize else {
            throw BootError.invalidImage("\(what): ELF program header size \(phentsize) is smaller than \(minEntSize)")
        }
        guard phoff <= UInt64(bytes.count), UInt64(phnum * phentsize) <= UInt64(bytes.count) - phoff else {
            throw BootError.invalidImage("\(what): ELF program headers at offset \(hex(phoff)) (\(phnum) × \(phentsize) bytes) extend past the end of the file (\(bytes.count) bytes)")
        }
        var headers: [ELFProgramHeader] = []
        for i in 0..<phnum {
            let o = Int(phoff) + i * phentsize
            if bits == 64 {
                headers.append(.init(type: bytes.getLE(UInt32.self, at: o)!, flags: bytes.getLE(UInt32.self, at: o + 4)!,
                                     offset: bytes.getLE(UInt64.self, at: o + 8)!, vaddr: bytes.getLE(UInt64.self, at: o + 16)!,
                                     paddr: bytes.getLE(UInt64.self, at: o + 24)!, filesz: bytes.getLE(UInt64.self, at: o + 32)!,
                                     memsz: bytes.getLE(UInt64.self, at: o + 40)!))
            } else {
                headers.append(.init(type: bytes.getLE(UInt32.self, at: o)!, flags: bytes.getLE(UInt32.self, at: o + 24)!,
                                     offset: UInt64(bytes.getLE(UInt32.self, at: o + 4)!), vaddr: UInt64(bytes.getLE(UInt32.self, at: o + 8)!),
                                     paddr: UInt64(bytes.getLE(UInt32.self, at: o + 12)!), filesz: UInt64(bytes.getLE(UInt32.self, at: o + 16)!),
                                     memsz: UInt64(bytes.getLE(UInt32.self, at: o + 20)!)))
            }
        }
        self.bits = bits
        self.machine = machine
        self.entry = entry
        self.programHeaders = headers
        self.pvhEntry = nil
        for (i, h) in headers.enumerated() where h.type == ELFProgramHeader.load {
            guard h.filesz <= h.memsz else {
                throw BootError.invalidImage("\(what): ELF segment \(i) has p_filesz \(hex(h.filesz)) larger than p_memsz \(hex(h.memsz))")
            }
            guard streamed || (h.offset <= UInt64(bytes.count) && h.filesz <= UInt64(bytes.count) - h.offset) else {
                throw BootError.invalidImage("\(what): ELF segment \(i) file data at offset \(hex(h.offset))+\(hex(h.filesz)) extends past the end of the file (\(bytes.count) bytes)")
            }
            guard h.offset.addingReportingOverflow(h.filesz).overflow == false,
                  h.paddr.addingReportingOverflow(h.memsz).overflow == false else {
                throw BootError.invalidImage("\(what): ELF segment \(i) at \(hex(h.paddr))+\(hex(h.memsz)) wraps around the address space")
            }
        }
        self.pvhEntry = ELFImage.findPVHNote(bytes, headers)
    }

    /// Looks for the Xen PVH entry note (name "Xen", type 18) in PT_NOTE segments.
    private static func findPVHNote(_ bytes: [UInt8], _ headers: [ELFProgramHeader]) -> UInt64? {
        for h in headers where h.type == ELFProgramHeader.note {
            guard h.offset <= UInt64(bytes.count), h.filesz <= UInt64(bytes.count) - h.offset else { continue }
            var o = Int(h.offset)
            let end = o + Int(h.filesz)
            while end - o >= 12 {
                let namesz = Int(bytes.getLE(UInt32.self, at: o)!), descsz = Int(bytes.getLE(UInt32.self, at: o + 4)!)
                let type = bytes.getLE(UInt32.self, at: o + 8)!
                let nameStart = o + 12
                guard namesz <= end - nameStart else { break }
                let descStart = nameStart + ((namesz + 3) & ~3)
                guard descStart <= end, descsz <= end - descStart else { break }
                let name = bytes[nameStart..<nameStart + namesz]
                if type == 18, name.starts(with: Array("Xen".utf8)) {
                    if descsz >= 8 { return bytes.getLE(UInt64.self, at: descStart) }
                    if descsz >= 4 { return bytes.getLE(UInt32.self, at: descStart).map(UInt64.init) }
                }
                o = descStart + ((descsz + 3) & ~3)
            }
        }
        return nil
    }

    /// The physical address of the entry point: `e_entry` translated through the PT_LOAD segment
    /// whose virtual range contains it (`e_entry - p_vaddr + p_paddr`); otherwise `e_entry` itself
    /// when it lies in a segment's physical range (Linux's vmlinux has `e_entry` = phys_startup_64).
    public func physicalEntry(what: String) throws -> UInt64 {
        for s in loadSegments where entry >= s.vaddr && entry - s.vaddr < s.memsz {
            return entry - s.vaddr + s.paddr
        }
        for s in loadSegments where entry >= s.paddr && entry - s.paddr < s.memsz {
            return entry
        }
        throw BootError.invalidImage("\(what): ELF entry point \(hex(entry)) is not inside any loadable segment")
    }

    /// Checks that every PT_LOAD segment lies in guest RAM, avoids `avoid` and no other segment.
    public func checkPlacement(in memory: GuestMemory, avoiding avoid: [LoadRange], what: String) throws -> [LoadRange] {
        var ranges: [LoadRange] = []
        for (i, h) in programHeaders.enumerated() where h.type == ELFProgramHeader.load && h.memsz > 0 {
            guard memory.contains(h.paddr, count: h.memsz) else {
                throw BootError.doesNotFit("\(what) segment \(i) at \(hex(h.paddr))+\(hex(h.memsz)) is outside guest RAM (\(sizeText(memory.totalSize)))")
            }
            for r in avoid where r.overlaps(h.paddr, h.memsz) {
                throw BootError.doesNotFit("\(what) segment \(i) at \(hex(h.paddr))+\(hex(h.memsz)) overlaps the \(r.what) at \(hex(r.start))-\(hex(r.end))")
            }
            for r in ranges where r.overlaps(h.paddr, h.memsz) {
                throw BootError.invalidImage("\(what) segment \(i) at \(hex(h.paddr))+\(hex(h.memsz)) overlaps \(r.what)")
            }
            ranges.append(LoadRange(start: h.paddr, size: h.memsz, what: "\(what) segment \(i)"))
        }
        guard !ranges.isEmpty else { throw BootError.invalidImage("\(what): ELF has no loadable segment") }
        return ranges
    }

    /// Copies every PT_LOAD segment to its physical address and zeroes its BSS. Each segment must lie
    /// in guest RAM and not overlap `avoid` (boot structures already placed).
    @discardableResult
    public func load(from bytes: [UInt8], into memory: GuestMemory, avoiding avoid: [LoadRange], what: String) throws -> [LoadRange] {
        let ranges = try checkPlacement(in: memory, avoiding: avoid, what: what)
        for (i, h) in programHeaders.enumerated() where h.type == ELFProgramHeader.load && h.memsz > 0 {
            try guarded("\(what) segment \(i)", at: h.paddr) {
                try memory.withBytes(at: h.paddr, count: Int(h.memsz)) { dst in
                    bytes.withUnsafeBytes { src in
                        let n = Int(h.filesz)
                        if n > 0 { dst.baseAddress!.copyMemory(from: src.baseAddress! + Int(h.offset), byteCount: n) }
                        if Int(h.memsz) > n { (dst.baseAddress! + n).initializeMemory(as: UInt8.self, repeating: 0, count: Int(h.memsz) - n) }
                    }
                }
            }
        }
        return ranges
    }
}

/// Loads an ELF64 executable that arrives as a stream of chunks (straight out of a decompressor),
/// copying each chunk's bytes to the segments' physical addresses without buffering the file.
///
/// The ELF and program headers must lie in the first 1 MiB of the stream.
final class ELFStreamLoader {
    let memory: GuestMemory
    let avoid: [LoadRange]
    let what: String
    private var prefix: [UInt8] = []
    private(set) var image: ELFImage?
    private var ranges: [LoadRange] = []
    private var position: UInt64 = 0
    static let headerLimit = 1 << 20

    init(memory: GuestMemory, avoiding avoid: [LoadRange], what: String) {
        self.memory = memory; self.avoid = avoid; self.what = what
    }

    /// Bytes needed before the headers can be parsed, or nil if not known yet.
    private func headerNeed() throws -> Int? {
        guard prefix.count >= 64 else { return nil }
        guard ELFImage.isELF(prefix), prefix[4] == 2 else {
            let magic = prefix.prefix(4).map { String(format2: $0) }.joined(separator: " ")
            throw BootError.invalidImage("\(what): decompressed data is not an ELF64 file (starts with \(magic))")
        }
        let phoff = prefix.getLE(UInt64.self, at: 32)!
        let phentsize = UInt64(prefix.getLE(UInt16.self, at: 54)!), phnum = UInt64(prefix.getLE(UInt16.self, at: 56)!)
        let end = phoff.addingReportingOverflow(phentsize * phnum)
        guard !end.overflow, end.partialValue <= UInt64(ELFStreamLoader.headerLimit) else {
            throw BootError.invalidImage("\(what): ELF program headers at \(hex(phoff)) are not in the first 1 MiB")
        }
        return max(64, Int(end.partialValue))
    }

    /// Consumes the next chunk of the stream.
    func feed(_ chunk: UnsafeRawBufferPointer) throws {
        if image != nil { return try dispatch(chunk) }
        prefix.append(contentsOf: chunk)
        guard let need = try headerNeed(), prefix.count >= need else {
            if prefix.count > ELFStreamLoader.headerLimit {
                throw BootError.invalidImage("\(what): no ELF header in the first 1 MiB")
            }
            return
        }
        let head = try adoptHeaders()
        try head.withUnsafeBytes { try dispatch($0) }
    }

    /// Parses the ELF headers in `prefix` (which holds at least `headerNeed()` bytes), checks the segments'
    /// placement and makes them the image being loaded. Returns the prefix and empties it.
    private func adoptHeaders() throws -> [UInt8] {
        let img = try ELFImage(parsing: prefix, bits: 64, machine: 62, what: what, streamed: true)
        ranges = try img.checkPlacement(in: memory, avoiding: avoid, what: "kernel ELF")
        image = img
        let head = prefix
        prefix = []
        return head
    }

    /// Copies `count` bytes from `source` to guest address `dst` (part of a kernel segment).
    private func place(_ source: UnsafeRawPointer, at dst: UInt64, count: UInt64) throws {
        try guarded("kernel ELF segment", at: dst) {
            try memory.translate(dst, count: count).copyMemory(from: source, byteCount: Int(count))
        }
    }

    private func dispatch(_ chunk: UnsafeRawBufferPointer) throws {
        guard let image, chunk.count > 0 else { return }
        let o = position, n = UInt64(chunk.count)
        for h in image.loadSegments where h.filesz > 0 {
            let s = max(o, h.offset), e = min(o + n, h.offset + h.filesz)
            guard s < e else { continue }
            try place(chunk.baseAddress! + Int(s - o), at: h.paddr + (s - h.offset), count: e - s)
        }
        position += n
    }

    /// Loads a whole decompressed kernel that sits in the file `fd` at `dataOffset` (page-aligned) and is mapped
    /// at `data`: the headers are parsed and checked as in `feed`, then each segment's whole pages are mapped from
    /// the file over guest RAM, private and copy-on-write (`MAP_PRIVATE | MAP_FIXED`), and only the partial pages
    /// at its ends are copied. A segment whose file offset and guest address differ modulo the page size, or
    /// whose pages cannot be mapped, is copied. Returns the bytes mapped and copied; `finish()` follows as after
    /// `feed`.
    @discardableResult
    func load(mapping fd: Int32, dataOffset: Int, data: UnsafeRawBufferPointer) throws -> (mapped: Int, copied: Int) {
        precondition(image == nil && position == 0, "load(mapping:) on a loader that was fed")
        prefix = Array(data.prefix(ELFStreamLoader.headerLimit))
        guard let need = try headerNeed(), prefix.count >= need else {
            throw BootError.invalidImage("\(what): decompressed data (\(data.count) bytes) is too short for the ELF headers")
        }
        _ = try adoptHeaders()
        let page = UInt64(max(4096, sysconf(Int32(_SC_PAGESIZE))))
        var mapped = 0, copied = 0
        func copy(_ dst: UInt64, _ src: UInt64, _ n: UInt64) throws {
            guard n > 0 else { return }
            try place(data.baseAddress! + Int(src), at: dst, count: n)
            copied += Int(n)
        }
        for (i, h) in image!.loadSegments.enumerated() where h.filesz > 0 {
            guard h.offset <= UInt64(data.count), h.filesz <= UInt64(data.count) - h.offset else {
                throw BootError.invalidImage("\(what): ELF segment \(i) file data at \(hex(h.offset))+\(hex(h.filesz)) extends past the end of the decompressed data (\(data.count) bytes)")
            }
            let fileOffset = UInt64(dataOffset) + h.offset
            guard fileOffset % page == h.paddr % page else {
                try copy(h.paddr, h.offset, h.filesz)
                continue
            }
            let end = h.paddr + h.filesz
            let midStart = min((h.paddr + page - 1) / page * page, end)
            let midEnd = max(midStart, end / page * page)
            try copy(h.paddr, h.offset, midStart - h.paddr)
            if midEnd > midStart {
                let host = try memory.translate(midStart, count: midEnd - midStart)
                let result = mmap(host, Int(midEnd - midStart), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd,
                                  off_t(fileOffset + (midStart - h.paddr)))
                if result == host {
                    mapped += Int(midEnd - midStart)
                } else {
                    try copy(midStart, h.offset + (midStart - h.paddr), midEnd - midStart)
                }
            }
            try copy(midEnd, h.offset + (midEnd - h.paddr), end - midEnd)
        }
        position = UInt64(data.count)
        return (mapped, copied)
    }

    /// Checks that every segment's file data arrived, zeroes the BSS parts, and returns the image
    /// and the ranges loaded.
    func finish() throws -> (ELFImage, [LoadRange]) {
        guard let image else {
            throw BootError.invalidImage("\(what): decompressed data (\(prefix.count) bytes) is too short for the ELF headers")
        }
        for (i, h) in image.programHeaders.enumerated() where h.type == ELFProgramHeader.load && h.memsz > 0 {
            guard position >= h.offset + h.filesz else {
                throw BootError.invalidImage("\(what): ELF segment \(i) file data at \(hex(h.offset))+\(hex(h.filesz)) extends past the end of the decompressed data (\(position) bytes)")
            }
            if h.memsz > h.filesz {
                try guarded("kernel ELF segment \(i) BSS", at: h.paddr + h.filesz) {
                    try memory.zero(at: h.paddr + h.filesz, count: Int(h.memsz - h.filesz))
                }
            }
        }
        return (image, ranges)
    }
}

