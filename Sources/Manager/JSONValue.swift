import API
import FoundationEssentials

/// Any JSON value, decoded and encoded with Codable (the manager splits a definition into its
/// own keys and the Firecracker part without Foundation's JSONSerialization). Integers stay
/// integers, so a re-encoded `"mem_size_mib": 128` is still an integer for strict decoders.
public enum JSONValue: Codable, Sendable, Equatable {
    case null
    case bool(Bool)
    case int(Int64)
    case unsigned(UInt64)
    case double(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() { self = .null }
        else if let b = try? c.decode(Bool.self) { self = .bool(b) }
        else if let i = try? c.decode(Int64.self) { self = .int(i) }
        else if let u = try? c.decode(UInt64.self) { self = .unsigned(u) }
        else if let d = try? c.decode(Double.self) { self = .double(d) }
        else if let s = try? c.decode(String.self) { self = .string(s) }
        else if let a = try? c.decode([JSONValue].self) { self = .array(a) }
        else { self = .object(try c.decode([String: JSONValue].self)) }
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .null: try c.encodeNil()
        case .bool(let v): try c.encode(v)
        case .int(let v): try c.encode(v)
        case .unsigned(let v): try c.encode(v)
        case .double(let v): try c.encode(v)
        case .string(let v): try c.encode(v)
        case .array(let v): try c.encode(v)
        case .object(let v): try c.encode(v)
        }
    }

    /// The string, if this is one.
    public var stringValue: String? { if case .string(let s) = self { return s } else { return nil } }
    /// The members, if this is an object.
    public var objectValue: [String: JSONValue]? { if case .object(let o) = self { return o } else { return nil } }
    /// The elements, if this is an array.
    public var arrayValue: [JSONValue]? { if case .array(let a) = self { return a } else { return nil } }
    /// Whether this is `null`.
    public var isNull: Bool { self == .null }

    /// Decodes a JSON object's members (nil when `bytes` is not valid JSON or not an object).
    public static func object(from bytes: [UInt8]) -> [String: JSONValue]? {
        try? JSONDecoder().decode([String: JSONValue].self, from: Data(bytes))
    }
}

extension JSONValue {
    /// The top level of a definition file (VM or network): a JSON object of at most `maxSize` bytes.
    /// Failures go through `bad`, which adds the definition kind and its source.
    static func definitionObject(_ bytes: [UInt8], maxSize: Int,
                                 bad: (String) -> ManagerError) throws(ManagerError) -> [String: JSONValue] {
        guard bytes.count <= maxSize else { throw bad("larger than \(maxSize) bytes") }
        do {
            return try JSONDecoder().decode([String: JSONValue].self, from: Data(bytes))
        } catch DecodingError.typeMismatch {
            throw bad("expected a JSON object")
        } catch {
            if let e = error as? DecodingError { throw bad(StrictJSON.describe(e)) }
            throw bad("malformed JSON: \(error)")
        }
    }
}
