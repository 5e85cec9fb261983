/// A minimal ordered JSON value for `img` output (key order as qemu-img prints it).
indirect enum ImgJSON {
    case object([(String, ImgJSON)])
    case array([ImgJSON])
    case string(String)
    case int(Int64)
    case uint(UInt64)
    case bool(Bool)

    /// Pretty-printed with 4-space indentation, like qemu-img.
    func render(indent: Int = 0) -> String {
        let pad = String(repeating: " ", count: indent + 4)
        let end = String(repeating: " ", count: indent)
        switch self {
        case .object(let kv):
            if kv.isEmpty { return "{}" }
            return "{\n" + kv.map { "\(pad)\(Self.quote($0.0)): \($0.1.render(indent: indent + 4))" }.joined(separator: ",\n") + "\n\(end)}"
        case .array(let a):
            if a.isEmpty { return "[]" }
            return "[\n" + a.map { pad + $0.render(indent: indent + 4) }.joined(separator: ",\n") + "\n\(end)]"
        case .string(let s): return Self.quote(s)
        case .int(let i): return String(i)
        case .uint(let u): return String(u)
        case .bool(let b): return b ? "true" : "false"
        }
    }

    static func quote(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\t": out += "\\t"
            case "\r": out += "\\r"
            default:
                if u.value < 0x20 { out += cFormat("\\u%04x", u.value) } else { out.unicodeScalars.append(u) }
            }
        }
        return out + "\""
    }
}

import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
