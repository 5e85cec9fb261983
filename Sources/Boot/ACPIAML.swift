/// A small encoder for ACPI Machine Language (ACPI 6.x, chapter 20) and resource descriptors
/// (chapter 6.4): just what SwiftKVM's DSDT needs.
///
/// Every function returns the encoded bytes of one term, so a table is built by nesting calls:
///
///     AML.scope("\\_SB_", [AML.device("PCI0", [AML.name("_HID", AML.eisaID("PNP0A03"))])])
///
/// Names are 1–4 character segments (`[A-Z_][A-Z0-9_]*`, padded with `_`), optionally joined by
/// `.` and prefixed by `\` (root) or `^` (parent). All names come from SwiftKVM's own code, so a
/// malformed one is a programming error (precondition), never guest or user input.
public enum AML {
    // Opcodes (ACPI 6.5, 20.3).
    static let zeroOp: UInt8 = 0x00, oneOp: UInt8 = 0x01, onesOp: UInt8 = 0xff
    static let nameOp: UInt8 = 0x08, bytePrefix: UInt8 = 0x0a, wordPrefix: UInt8 = 0x0b
    static let dwordPrefix: UInt8 = 0x0c, stringPrefix: UInt8 = 0x0d, qwordPrefix: UInt8 = 0x0e
    static let scopeOp: UInt8 = 0x10, bufferOp: UInt8 = 0x11, packageOp: UInt8 = 0x12, methodOp: UInt8 = 0x14
    static let extOpPrefix: UInt8 = 0x5b, deviceOp: UInt8 = 0x82, returnOp: UInt8 = 0xa4
    static let dualNamePrefix: UInt8 = 0x2e, multiNamePrefix: UInt8 = 0x2f, rootChar: UInt8 = 0x5c, parentPrefix: UInt8 = 0x5e

    /// One 4-byte NameSeg: `name` (1–4 characters) padded with `_`.
    public static func nameSeg(_ name: String) -> [UInt8] {
        let chars = Array(name.utf8)
        precondition(!chars.isEmpty && chars.count <= 4, "AML name segment '\(name)' must have 1 to 4 characters")
        for (i, c) in chars.enumerated() {
            let upper = c >= 0x41 && c <= 0x5a, digit = c >= 0x30 && c <= 0x39, underscore = c == 0x5f
            precondition(upper || underscore || (digit && i > 0), "AML name segment '\(name)' has an invalid character")
        }
        return chars + [UInt8](repeating: 0x5f, count: 4 - chars.count)
    }

    /// A NameString: optional `\` or `^` prefixes, then dot-separated segments (`"\\_SB_.PCI0"`, `"_S5"`).
    public static func nameString(_ path: String) -> [UInt8] {
        var out: [UInt8] = []
        var rest = Substring(path)
        if rest.first == "\\" { out.append(rootChar); rest = rest.dropFirst() }
        while rest.first == "^" { out.append(parentPrefix); rest = rest.dropFirst() }
        let segs = rest.isEmpty ? [] : rest.split(separator: ".", omittingEmptySubsequences: false).map { nameSeg(String($0)) }
        switch segs.count {
        case 0: out.append(0x00)               // NullName
        case 1: out += segs[0]
        case 2: out.append(dualNamePrefix); out += segs[0] + segs[1]
        default:
            precondition(segs.count <= 255, "AML name path '\(path)' has too many segments")
            out.append(multiNamePrefix); out.append(UInt8(segs.count)); out += segs.flatMap { $0 }
        }
        return out
    }

    /// PkgLength encoding for a package whose contents after the PkgLength are `bodyLength` bytes
    /// (the encoded length counts the PkgLength bytes themselves).
    public static func pkgLength(_ bodyLength: Int) -> [UInt8] {
        precondition(bodyLength >= 0 && bodyLength < (1 << 28) - 4, "AML package of \(bodyLength) bytes is too large")
        if bodyLength + 1 < 0x40 { return [UInt8(bodyLength + 1)] }
        let n = bodyLength + 2 < (1 << 12) ? 2 : (bodyLength + 3 < (1 << 20) ? 3 : 4)
        let total = bodyLength + n
        var out = [UInt8((n - 1) << 6) | UInt8(total & 0xf)]
        for i in 1..<n { out.append(UInt8(truncatingIfNeeded: total >> (4 + 8 * (i - 1)))) }
        return out
    }

    /// An integer constant in its shortest encoding (Zero, One, Ones, Byte/Word/DWord/QWord).
    public static func integer(_ value: UInt64) -> [UInt8] {
        switch value {
        case 0: return [zeroOp]
        case 1: return [oneOp]
        case UInt64.max: return [onesOp]
        case ...0xff: return [bytePrefix, UInt8(value)]
        case ...0xffff: return [wordPrefix] + le(value, 2)
        case ...0xffff_ffff: return [dwordPrefix] + le(value, 4)
        default: return [qwordPrefix] + le(value, 8)
        }
    }

    /// A string constant (ASCII, NUL-terminated).
    public static func string(_ s: String) -> [UInt8] {
        let chars = Array(s.utf8)
        precondition(chars.allSatisfy { $0 > 0 && $0 < 0x80 }, "AML string '\(s)' must be non-NUL ASCII")
        return [stringPrefix] + chars + [0]
    }

    /// A compressed EISA ID (`"PNP0A08"` → DWord 0x080AD041), as `EisaId()` in ASL.
    public static func eisaID(_ id: String) -> [UInt8] {
        let c = Array(id.utf8)
        precondition(c.count == 7 && c[0..<3].allSatisfy { $0 >= 0x41 && $0 <= 0x5a }
                     && c[3..<7].allSatisfy { UInt8(ascii: "0")...UInt8(ascii: "9") ~= $0 || UInt8(ascii: "A")...UInt8(ascii: "F") ~= $0 },
                     "EISA ID '\(id)' must be three capital letters and four hex digits")
        func hexDigit(_ b: UInt8) -> UInt8 { b <= 0x39 ? b - 0x30 : b - 0x41 + 10 }
        let l0 = c[0] - 0x40, l1 = c[1] - 0x40, l2 = c[2] - 0x40
        let bytes: [UInt8] = [(l0 << 2) | (l1 >> 3), ((l1 & 7) << 5) | l2,
                              (hexDigit(c[3]) << 4) | hexDigit(c[4]), (hexDigit(c[5]) << 4) | hexDigit(c[6])]
        let value = UInt64(bytes[0]) | UInt64(bytes[1]) << 8 | UInt64(bytes[2]) << 16 | UInt64(bytes[3]) << 24
        return integer(value)
    }

    /// `Name(path, value)`.
    public static func name(_ path: String, _ value: [UInt8]) -> [UInt8] {
        [nameOp] + nameString(path) + value
    }

    /// `Package() { elements }` (at most 255 elements).
    public static func package(_ elements: [[UInt8]]) -> [UInt8] {
        precondition(elements.count <= 255, "AML package of \(elements.count) elements: VarPackage is not supported")
        let body = [UInt8(elements.count)] + elements.flatMap { $0 }
        return [packageOp] + pkgLength(body.count) + body
    }

    /// `Buffer() { bytes }`.
    public static func buffer(_ bytes: [UInt8]) -> [UInt8] {
        let body = integer(UInt64(bytes.count)) + bytes
        return [bufferOp] + pkgLength(body.count) + body
    }

    /// `Scope(path) { terms }`.
    public static func scope(_ path: String, _ terms: [[UInt8]]) -> [UInt8] {
        let body = nameString(path) + terms.flatMap { $0 }
        return [scopeOp] + pkgLength(body.count) + body
    }

    /// `Device(path) { terms }`.
    public static func device(_ path: String, _ terms: [[UInt8]]) -> [UInt8] {
        let body = nameString(path) + terms.flatMap { $0 }
        return [extOpPrefix, deviceOp] + pkgLength(body.count) + body
    }

    /// `Method(path, argumentCount, Serialized/NotSerialized) { terms }` (sync level 0).
    public static func method(_ path: String, arguments: Int = 0, serialized: Bool = false, _ terms: [[UInt8]]) -> [UInt8] {
        precondition((0...7).contains(arguments), "AML method '\(path)' with \(arguments) arguments (0 to 7 allowed)")
        let flags = UInt8(arguments) | (serialized ? 0x08 : 0)
        let body = nameString(path) + [flags] + terms.flatMap { $0 }
        return [methodOp] + pkgLength(body.count) + body
    }

    /// `Return(value)`.
    public static func `return`(_ value: [UInt8]) -> [UInt8] { [returnOp] + value }

    /// `ResourceTemplate() { descriptors }`: a buffer of descriptors closed by an End Tag with checksum 0.
    public static func resourceTemplate(_ descriptors: [[UInt8]]) -> [UInt8] {
        buffer(descriptors.flatMap { $0 } + [0x79, 0x00])
    }

    static func le(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
}

/// ACPI resource descriptors (ACPI 6.5, 6.4), for `AML.resourceTemplate`.
public enum AMLResource {
    /// Address-space descriptor resource types.
    public enum AddressSpace: UInt8, Sendable { case memory = 0, io = 1, busNumber = 2 }

    /// `IO(Decode16, min, max, alignment, length)`: small I/O port descriptor.
    public static func io(min: UInt16, max: UInt16, alignment: UInt8, length: UInt8) -> [UInt8] {
        [0x47, 0x01] + AML.le(UInt64(min), 2) + AML.le(UInt64(max), 2) + [alignment, length]
    }

    /// `IRQNoFlags() { irqs }`: small IRQ descriptor (edge, active high, exclusive), IRQs 0–15.
    public static func irqNoFlags(_ irqs: [Int]) -> [UInt8] {
        precondition(irqs.allSatisfy { (0..<16).contains($0) }, "IRQ descriptor with an IRQ above 15: \(irqs)")
        let mask = irqs.reduce(UInt16(0)) { $0 | UInt16(1) << UInt16($1) }
        return [0x22] + AML.le(UInt64(mask), 2)
    }

    /// General flags of a bridge window: ResourceProducer, PosDecode, MinFixed, MaxFixed.
    static let producerFixed: UInt8 = 0x0c

    /// `WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, min, max, 0, count)`.
    public static func wordBusNumber(min: UInt16, max: UInt16) -> [UInt8] {
        wordAddress(.busNumber, typeFlags: 0, min: min, max: max)
    }

    /// `WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, min, max, 0, length)`.
    public static func wordIO(min: UInt16, max: UInt16) -> [UInt8] {
        wordAddress(.io, typeFlags: 0x03, min: min, max: max)
    }

    static func wordAddress(_ space: AddressSpace, typeFlags: UInt8, min: UInt16, max: UInt16) -> [UInt8] {
        precondition(max >= min, "resource range \(min)-\(max) ends before it starts")
        return [0x88] + AML.le(13, 2) + [space.rawValue, producerFixed, typeFlags]
            + AML.le(0, 2) + AML.le(UInt64(min), 2) + AML.le(UInt64(max), 2) + AML.le(0, 2)
            + AML.le(UInt64(max) - UInt64(min) + 1, 2)
    }

    /// `DWordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, min, max, 0, length)`.
    public static func dwordIO(min: UInt32, max: UInt32) -> [UInt8] {
        dwordAddress(.io, typeFlags: 0x03, min: min, max: max)
    }

    /// `DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable|Cacheable, ReadWrite, 0, min, max, 0, length)`.
    public static func dwordMemory(min: UInt32, max: UInt32, cacheable: Bool = false) -> [UInt8] {
        dwordAddress(.memory, typeFlags: 0x01 | (cacheable ? 0x02 : 0), min: min, max: max)
    }

    static func dwordAddress(_ space: AddressSpace, typeFlags: UInt8, min: UInt32, max: UInt32) -> [UInt8] {
        precondition(max >= min, "resource range \(min)-\(max) ends before it starts")
        return [0x87] + AML.le(23, 2) + [space.rawValue, producerFixed, typeFlags]
            + AML.le(0, 4) + AML.le(UInt64(min), 4) + AML.le(UInt64(max), 4) + AML.le(0, 4)
            + AML.le(UInt64(max) - UInt64(min) + 1, 4)
    }

    /// `QWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable|Cacheable, ReadWrite, 0, min, max, 0, length)`.
    public static func qwordMemory(min: UInt64, max: UInt64, cacheable: Bool = false) -> [UInt8] {
        precondition(max >= min && max - min < UInt64.max, "resource range \(min)-\(max) is empty or the whole space")
        return [0x8a] + AML.le(43, 2) + [AddressSpace.memory.rawValue, producerFixed, 0x01 | (cacheable ? 0x02 : 0)]
            + AML.le(0, 8) + AML.le(min, 8) + AML.le(max, 8) + AML.le(0, 8) + AML.le(max - min + 1, 8)
    }

    /// `Memory32Fixed(ReadWrite, base, length)`.
    public static func memory32Fixed(base: UInt32, length: UInt32) -> [UInt8] {
        [0x86] + AML.le(9, 2) + [0x01] + AML.le(UInt64(base), 4) + AML.le(UInt64(length), 4)
    }

    /// `Interrupt(ResourceConsumer, Level|Edge, ActiveHigh|ActiveLow, Exclusive|Shared) { gsi }`:
    /// extended interrupt descriptor with one interrupt.
    public static func extendedInterrupt(_ gsi: UInt32, level: Bool, activeLow: Bool, shared: Bool) -> [UInt8] {
        let flags: UInt8 = 0x01 | (level ? 0 : 0x02) | (activeLow ? 0x04 : 0) | (shared ? 0x08 : 0)
        return [0x89] + AML.le(6, 2) + [flags, 1] + AML.le(UInt64(gsi), 4)
    }
}
