import GuestMemory

/// `swiftkvm run --memory SIZE[,ksm=on|off][,hugepages=off|thp|hugetlbfs]` and
/// `--memory-backend anon|memfd|file=PATH`.
public enum MemoryBackendSpec {
    /// The size (nil when `memory` is nil) and the backend (nil when nothing but a size was given).
    public static func parse(memory: String?, backend: String?) throws -> (size: UInt64, backend: MemoryBackend?) {
        var result = MemoryBackend()
        var customized = false
        var size: UInt64 = 0
        if let memory {
            let parts = memory.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
            size = try SizeParser.parseSize(parts[0], what: "--memory")
            func bad(_ why: String) -> VMMError { .invalidValue(what: "--memory", value: memory, reason: why) }
            for (key, value) in try OptionItems.pairs(parts.dropFirst(), keys: ["ksm", "hugepages"], bad: bad) {
                switch key {
                case "ksm":
                    guard ["on", "off"].contains(value) else { throw bad("ksm=\(value): expected on or off") }
                    result.mergeable = value == "on"
                case "hugepages":
                    switch value {
                    case "off": result.hugePages = .none
                    case "thp", "on": result.hugePages = .transparent
                    case "hugetlbfs": result.hugePages = .hugetlbfs
                    default: throw bad("hugepages=\(value): expected off, thp or hugetlbfs")
                    }
                default:
                    throw bad("unknown key '\(key)' (keys: ksm, hugepages)")
                }
                customized = true
            }
        }
        if let backend {
            func bad(_ why: String) -> VMMError { .invalidValue(what: "--memory-backend", value: backend, reason: why) }
            switch backend {
            case "anon", "anonymous": result.kind = .anonymous
            case "memfd": result.kind = .memfd
            default:
                guard backend.hasPrefix("file="), backend.count > 5 else { throw bad("expected anon, memfd or file=PATH") }
                result.kind = .file
                result.path = String(backend.dropFirst(5))
            }
            customized = true
        }
        if result.hugePages == .hugetlbfs, result.kind == .file {
            throw VMMError.invalidValue(what: "--memory-backend", value: backend ?? "", reason: "hugepages=hugetlbfs takes anon or memfd; for a file, put it on a hugetlbfs mount")
        }
        return (size, customized ? result : nil)
    }
}
