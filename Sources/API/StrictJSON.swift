import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// Any JSON object key (to list the keys a body really has).
struct AnyKey: CodingKey {
    var stringValue: String
    var intValue: Int?
    init(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { self.stringValue = String(intValue); self.intValue = intValue }
}

extension Decoder {
    /// A keyed container that rejects keys outside `Keys` (like serde's `deny_unknown_fields`).
    func strictContainer<Keys: CodingKey & CaseIterable>(keyedBy: Keys.Type) throws -> KeyedDecodingContainer<Keys> {
        let all = try container(keyedBy: AnyKey.self)
        let allowed = Keys.allCases.map(\.stringValue)
        for key in all.allKeys where !allowed.contains(key.stringValue) {
            throw DecodingError.dataCorrupted(.init(
                codingPath: codingPath + [key],
                debugDescription: "unknown field `\(key.stringValue)`, expected one of \(allowed.map { "`\($0)`" }.joined(separator: ", "))"))
        }
        return try container(keyedBy: Keys.self)
    }
}

extension KeyedDecodingContainer {
    /// Decodes a string that must be one of `allowed` (case-sensitive unless `caseInsensitive`);
    /// returns the matching entry of `allowed`.
    func decodeEnum(_ key: Key, allowed: [String], caseInsensitive: Bool = false) throws -> String? {
        guard let value = try decodeIfPresent(String.self, forKey: key) else { return nil }
        if let match = allowed.first(where: { caseInsensitive ? $0.lowercased() == value.lowercased() : $0 == value }) {
            return match
        }
        throw DecodingError.dataCorruptedError(
            forKey: key, in: self,
            debugDescription: "unknown variant `\(value)`, expected one of \(allowed.map { "`\($0)`" }.joined(separator: ", "))")
    }
}

extension KeyedDecodingContainer {
    /// Decodes an integer field, naming the field when the value is fractional, out of range or
    /// not a number (Foundation reports those without a field path).
    func decodeIntegerIfPresent<T: FixedWidthInteger & Decodable>(_ type: T.Type, forKey key: Key) throws -> T? {
        guard contains(key), try !decodeNil(forKey: key) else { return nil }
        // Firecracker (serde) refuses `2.0` or `1e3` for an integer field; Foundation would take them.
        if let literal = StrictJSON.fractionalNumbers[StrictJSON.pathKey(codingPath + [key])] {
            throw DecodingError.dataCorruptedError(forKey: key, in: self, debugDescription: "expected an integer, got \(literal)")
        }
        // Exactly, when the number is one (a Double would round values near the type's limits).
        if let v = try? decode(T.self, forKey: key) { return v }
        let d: Double
        do {
            d = try decode(Double.self, forKey: key)
        } catch {
            throw DecodingError.typeMismatch(T.self, .init(codingPath: codingPath + [key], debugDescription: "expected an integer"))
        }
        throw DecodingError.dataCorruptedError(
            forKey: key, in: self, debugDescription: "expected an integer from \(T.min) to \(T.max), got \(d)")
    }

    /// A required integer field (see `decodeIntegerIfPresent`).
    func decodeInteger<T: FixedWidthInteger & Decodable>(_ type: T.Type, forKey key: Key) throws -> T {
        guard let v = try decodeIntegerIfPresent(T.self, forKey: key) else {
            if contains(key) {
                throw DecodingError.valueNotFound(T.self, .init(codingPath: codingPath + [key], debugDescription: "null"))
            }
            throw DecodingError.keyNotFound(key, .init(codingPath: codingPath, debugDescription: "missing"))
        }
        return v
    }
}

/// JSON body decoding with Firecracker-style error messages naming the field.
public enum StrictJSON {
    /// Prefix of every body-decoding error (as Firecracker's).
    static let prefix = "An error occurred when deserializing the json body of a request: "

    /// The number literals with a fraction or an exponent in the body being decoded, by field path
    /// (`pathKey`), for the integer decoders (set for the duration of `decode`).
    @TaskLocal static var fractionalNumbers: [String: String] = [:]

    /// A field path as `fractionalNumbers` keys it: object keys and `#index` for arrays, joined by dots.
    static func pathKey(_ keys: [any CodingKey]) -> String {
        keys.map { $0.intValue.map { "#\($0)" } ?? $0.stringValue }.joined(separator: ".")
    }

    /// Finds the number literals written with a fraction or an exponent in a JSON document, by field path.
    /// Malformed input ends the scan early (the decoder then reports it).
    static func scanFractionalNumbers(_ b: [UInt8]) -> [String: String] {
        var found: [String: String] = [:]
        // The container stack: an object (its current key) or an array (its next index).
        enum Frame { case object(String?), array(Int) }
        var stack: [Frame] = []
        var i = 0
        func path() -> String {
            stack.map { f -> String in
                switch f {
                case .object(let k): return k ?? ""
                case .array(let n): return "#\(n)"
                }
            }.joined(separator: ".")
        }
        func readString() -> String? {
            guard i < b.count, b[i] == UInt8(ascii: "\"") else { return nil }
            i += 1
            var out: [UInt8] = []
            while i < b.count, b[i] != UInt8(ascii: "\"") {
                if b[i] == UInt8(ascii: "\\") { i += 1 }
                if i < b.count { out.append(b[i]) }
                i += 1
            }
            i += 1
            return String(decoding: out, as: UTF8.self)
        }
        func valueDone() {
            if case .array(let n)? = stack.last { stack[stack.count - 1] = .array(n + 1) }
        }
        while i < b.count {
            let c = b[i]
            switch c {
            case UInt8(ascii: "{"): stack.append(.object(nil)); i += 1
            case UInt8(ascii: "["): stack.append(.array(0)); i += 1
            case UInt8(ascii: "}"), UInt8(ascii: "]"):
                stack.removeLast(stack.isEmpty ? 0 : 1)
                valueDone()
                i += 1
            case UInt8(ascii: "\""):
                guard let str = readString() else { return found }
                // A key when an object awaits one and a colon follows.
                var j = i
                while j < b.count, b[j] == 0x20 || b[j] == 0x0a || b[j] == 0x0d || b[j] == 0x09 { j += 1 }
                if case .object? = stack.last, j < b.count, b[j] == UInt8(ascii: ":") {
                    stack[stack.count - 1] = .object(str)
                    i = j + 1
                } else {
                    valueDone()
                }
            case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"):
                let start = i
                var fractional = false
                while i < b.count, [UInt8(ascii: "-"), UInt8(ascii: "+"), UInt8(ascii: "."), UInt8(ascii: "e"), UInt8(ascii: "E")].contains(b[i]) || (b[i] >= 0x30 && b[i] <= 0x39) {
                    if b[i] == UInt8(ascii: ".") || b[i] == UInt8(ascii: "e") || b[i] == UInt8(ascii: "E") { fractional = true }
                    i += 1
                }
                if fractional { found[path()] = String(decoding: b[start..<i], as: UTF8.self) }
                valueDone()
            case UInt8(ascii: "t"), UInt8(ascii: "f"), UInt8(ascii: "n"):
                while i < b.count, b[i] >= UInt8(ascii: "a"), b[i] <= UInt8(ascii: "z") { i += 1 }
                valueDone()
            default:
                i += 1 // whitespace, commas, colons
            }
        }
        return found
    }

    /// Decodes `T` from `body`; errors are 400s naming the field and the problem.
    static func decode<T: Decodable>(_ type: T.Type, from body: [UInt8]) throws(APIError) -> T {
        do {
            return try $fractionalNumbers.withValue(scanFractionalNumbers(body)) {
                try JSONDecoder().decode(T.self, from: Data(body))
            }
        } catch let error as DecodingError {
            throw APIError.badRequest(prefix + describe(error) + ".")
        } catch {
            throw APIError.badRequest(prefix + "\(error).")
        }
    }

    /// The dotted field path, e.g. `rate_limiter.bandwidth.size`.
    static func path(_ keys: [any CodingKey]) -> String {
        keys.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }
            .joined(separator: ".").replacing(".[", with: "[")
    }

    /// A one-line description of a decoding error naming the field.
    public static func describe(_ error: DecodingError) -> String {
        switch error {
        case .keyNotFound(let key, let ctx):
            let full = path(ctx.codingPath + [key])
            return "missing field `\(full)`"
        case .typeMismatch(let type, let ctx):
            let p = path(ctx.codingPath)
            let what = p.isEmpty ? "the body" : "field `\(p)`"
            return "invalid type for \(what): expected \(typeName(type))"
        case .valueNotFound(let type, let ctx):
            return "field `\(path(ctx.codingPath))` is null: expected \(typeName(type))"
        case .dataCorrupted(let ctx):
            let p = path(ctx.codingPath)
            if p.isEmpty {
                var detail = ctx.debugDescription
                if let underlying = ctx.underlyingError { detail += " (\(underlying))" }
                while detail.hasSuffix(".") { detail.removeLast() }
                return "malformed JSON: \(detail)"
            }
            if ctx.debugDescription.hasPrefix("unknown field") { return ctx.debugDescription }
            if ctx.debugDescription.contains("does not fit") {
                return "invalid value for field `\(p)`: \(ctx.debugDescription)"
            }
            return "invalid value for field `\(p)`: \(ctx.debugDescription)"
        @unknown default:
            return "\(error)"
        }
    }

    static func typeName(_ type: Any.Type) -> String {
        switch type {
        case is String.Type: return "a string"
        case is Bool.Type: return "a boolean"
        case is Int.Type, is UInt.Type, is Int64.Type, is UInt64.Type, is UInt32.Type, is UInt8.Type, is UInt16.Type:
            return "an integer"
        case is [Any].Type: return "an array"
        default:
            let name = "\(type)"
            if name.hasPrefix("Array") { return "an array" }
            if name.hasPrefix("Dictionary") || name.contains("KeyedDecodingContainer") { return "an object" }
            return "an object"
        }
    }
}
