/// The `key=value` items of a comma-separated option value (`--disk`, `--net`, `--vsock`,
/// `--memory`): each must be `key=value`, and a key may be given once unless it is `repeatable`.
/// Unknown keys are the caller's to refuse (it knows what each key means).
enum OptionItems {
    static func pairs<S: Sequence>(_ items: S, keys: [String], repeatable: Set<String> = [],
                                   bad: (String) -> VMMError) throws -> [(key: String, value: String)]
        where S.Element: StringProtocol {
        var seen = Set<String>()
        return try items.map { item in
            guard let eq = item.firstIndex(of: "=") else {
                throw bad("'\(item)' is not key=value (keys: \(keys.joined(separator: ", ")))")
            }
            let key = String(item[..<eq]), value = String(item[item.index(after: eq)...])
            guard repeatable.contains(key) || seen.insert(key).inserted else { throw bad("key '\(key)' given twice") }
            return (key, value)
        }
    }
}
