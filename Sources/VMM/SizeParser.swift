/// Parses sizes and numbers given on the command line.
public enum SizeParser {
    /// Parses a byte size: a decimal number with an optional K, M, G or T suffix (binary units,
    /// case-insensitive, optional trailing "B" or "iB"), e.g. `512M`, `1G`, `65536`, `2GiB`.
    /// - Parameter what: the option name, for the error message.
    public static func parseSize(_ text: String, what: String = "size") throws -> UInt64 {
        var s = text.trimmingWhitespace().uppercased()
        guard !s.isEmpty else { throw VMMError.invalidValue(what: what, value: text, reason: "empty") }
        if s.hasSuffix("IB") { s.removeLast(2) } else if s.hasSuffix("B") { s.removeLast() }
        var shift: UInt64 = 0
        if let last = s.last, let sh = ["K": 10, "M": 20, "G": 30, "T": 40][String(last)] {
            shift = UInt64(sh)
            s.removeLast()
        }
        guard !s.isEmpty, s.allSatisfy({ $0.isASCII && $0.isNumber }), let n = UInt64(s) else {
            throw VMMError.invalidValue(what: what, value: text, reason: "expected a number with an optional K, M, G or T suffix")
        }
        let (r, overflow) = n.multipliedReportingOverflow(by: 1 << shift)
        guard !overflow else { throw VMMError.invalidValue(what: what, value: text, reason: "too large") }
        return r
    }

    /// Parses an unsigned integer in decimal or hex (`0x` prefix), optionally with `_` separators.
    public static func parseInteger(_ text: String, what: String, max: UInt64 = .max) throws -> UInt64 {
        let t = text.trimmingWhitespace().lowercased().filter { $0 != "_" }
        let value: UInt64?
        if t.hasPrefix("0x") { value = UInt64(t.dropFirst(2), radix: 16) } else { value = UInt64(t, radix: 10) }
        guard let value, !t.isEmpty else {
            throw VMMError.invalidValue(what: what, value: text, reason: "expected a decimal or 0x-prefixed hex number")
        }
        guard value <= max else {
            throw VMMError.invalidValue(what: what, value: text, reason: "larger than the maximum 0x\(String(max, radix: 16))")
        }
        return value
    }

    /// Formats a byte count compactly (`512 MiB`, `4 KiB`, `123 bytes`).
    public static func format(_ bytes: UInt64) -> String {
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB")] where bytes >= 1 << UInt64(shift) && bytes % (1 << UInt64(shift)) == 0 {
            return "\(bytes >> UInt64(shift)) \(unit)"
        }
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB")] where bytes >= 1 << UInt64(shift) {
            let tenths = (bytes &* 10) >> UInt64(shift)
            return "\(tenths / 10).\(tenths % 10) \(unit)"
        }
        if bytes >= 1024 && bytes % 1024 == 0 { return "\(bytes >> 10) KiB" }
        return "\(bytes) bytes"
    }
}

extension String {
    func trimmingWhitespace() -> String {
        var s = Substring(self)
        while let f = s.first, f.isWhitespace { s.removeFirst() }
        while let l = s.last, l.isWhitespace { s.removeLast() }
        return String(s)
    }

}
