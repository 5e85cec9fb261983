import Devices
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// `--seccomp-filter FILE`: seccomp filters in Firecracker's seccompiler JSON format, one per thread kind.
///
/// ```
/// { "vmm": { "default_action": "trap", "filter_action": "allow",
///            "filter": [ { "syscall": "read" },
///                        { "syscall": "ioctl", "args": [ { "index": 1, "type": "dword", "op": "eq",
///                                                          "val": 44672, "comment": "KVM_RUN" } ] } ] },
///   "api": {…}, "vcpu": {…}, "device": {…}, "console": {…} }
/// ```
/// Every thread kind (`ThreadKind`) must have a filter. Actions: `allow`, `trap`, `log`, `kill_thread`,
/// `kill_process` (also `kill`), `{"errno": N}`, `{"trace": N}`. Conditions: `index`/`arg_index` 0-5,
/// `type`/`arg_type` `dword` or `qword`, `op` one of `eq`, `ne`, `lt`, `le`, `gt`, `ge` or
/// `{"masked_eq": MASK}`, `val`, optional `comment`. Rules are or-ed, a rule's conditions and-ed.
public enum SeccompFile {
    /// Largest filter file read.
    public static let maxSize = 1 << 20

    /// Reads and checks `path`; errors name the file and what is wrong in it.
    public static func load(_ path: String) throws(SeccompError) -> [ThreadKind: SeccompFilter] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SeccompError("cannot read the seccomp filter file \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw SeccompError("cannot read the seccomp filter file \(path): \(String(cString: strerror(errno)))") }
            if n == 0 { break }
            bytes += chunk[..<n]
            guard bytes.count <= maxSize else { throw SeccompError("the seccomp filter file \(path) is larger than \(maxSize) bytes") }
        }
        do {
            return try parse(bytes)
        } catch {
            throw SeccompError("the seccomp filter file \(path) is invalid: \(error.description)")
        }
    }

    /// Decodes and compiles (without installing) the filters in `bytes`.
    public static func parse(_ bytes: [UInt8]) throws(SeccompError) -> [ThreadKind: SeccompFilter] {
        let file: [String: FilterDTO]
        do {
            file = try JSONDecoder().decode([String: FilterDTO].self, from: Data(bytes))
        } catch let e as DecodingError {
            throw SeccompError(StrictJSON.describe(e))
        } catch {
            throw SeccompError("\(error)")
        }
        for key in file.keys.sorted() where ThreadKind(rawValue: key) == nil {
            throw SeccompError("unknown thread kind '\(key)' (expected \(ThreadKind.allCases.map { "'\($0.rawValue)'" }.joined(separator: ", ")))")
        }
        var filters: [ThreadKind: SeccompFilter] = [:]
        for kind in ThreadKind.allCases {
            guard let dto = file[kind.rawValue] else { throw SeccompError("no filter for thread kind '\(kind.rawValue)'") }
            let filter = SeccompFilter(defaultAction: dto.defaultAction.action, filterAction: dto.filterAction.action,
                                       rules: dto.filter.map { SeccompRule($0.syscall, ($0.args ?? []).map(\.condition)) })
            try Seccomp.validate(filter, kind: kind)
            filters[kind] = filter
        }
        return filters
    }

    /// Turns confinement on for this process: off with `disabled`, else the filters of `filterFile` or the
    /// built-in ones. Threads of the kinds in `exempt` stay unconfined. Throws on a bad file (exit 2).
    public static func enable(disabled: Bool, filterFile: String?, exempt: Set<ThreadKind> = []) throws(SeccompError) {
        guard !disabled else { return }
        let filters = try filterFile.map { p throws(SeccompError) in try load(p) } ?? SeccompPolicy.builtIn
        try Seccomp.configure(filters, exempt: exempt)
    }

    struct FilterDTO: Decodable {
        var defaultAction: ActionDTO
        var filterAction: ActionDTO
        var filter: [RuleDTO]
        enum CodingKeys: String, CodingKey, CaseIterable {
            case defaultAction = "default_action", filterAction = "filter_action", filter
        }
        init(from decoder: any Decoder) throws {
            let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
            defaultAction = try c.decode(ActionDTO.self, forKey: .defaultAction)
            filterAction = try c.decode(ActionDTO.self, forKey: .filterAction)
            filter = try c.decode([RuleDTO].self, forKey: .filter)
        }
    }

    struct ActionDTO: Decodable {
        var action: SeccompAction
        static let names = ["allow", "trap", "log", "kill_thread", "kill_process", "kill"]
        init(from decoder: any Decoder) throws {
            if let c = try? decoder.singleValueContainer(), let name = try? c.decode(String.self) {
                switch name.lowercased() {
                case "allow": action = .allow
                case "trap": action = .trap
                case "log": action = .log
                case "kill_thread": action = .killThread
                case "kill_process", "kill": action = .killProcess
                default:
                    throw DecodingError.dataCorruptedError(in: c, debugDescription: "unknown action `\(name)`, expected one of \(Self.names.map { "`\($0)`" }.joined(separator: ", ")), {\"errno\": N} or {\"trace\": N}")
                }
                return
            }
            enum Keys: String, CodingKey, CaseIterable { case errno, trace }
            let c = try decoder.strictContainer(keyedBy: Keys.self)
            if let e = try c.decodeIntegerIfPresent(UInt32.self, forKey: .errno) {
                action = .errno(e)
            } else if let t = try c.decodeIntegerIfPresent(UInt32.self, forKey: .trace) {
                action = .trace(t)
            } else {
                throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: "an action object needs `errno` or `trace`"))
            }
        }
    }

    struct RuleDTO: Decodable {
        var syscall: String
        var args: [ConditionDTO]?
        enum CodingKeys: String, CodingKey, CaseIterable { case syscall, args, comment }
        init(from decoder: any Decoder) throws {
            let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
            syscall = try c.decode(String.self, forKey: .syscall)
            args = try c.decodeIfPresent([ConditionDTO].self, forKey: .args)
            _ = try c.decodeIfPresent(String.self, forKey: .comment)
        }
    }

    struct ConditionDTO: Decodable {
        var condition: SeccompCondition
        enum CodingKeys: String, CodingKey, CaseIterable {
            case index, argIndex = "arg_index", type, argType = "arg_type", op, val, comment
        }
        enum MaskKeys: String, CodingKey, CaseIterable { case maskedEq = "masked_eq" }
        init(from decoder: any Decoder) throws {
            let c = try decoder.strictContainer(keyedBy: CodingKeys.self)
            guard let index = try c.decodeIntegerIfPresent(UInt32.self, forKey: .index)
                    ?? c.decodeIntegerIfPresent(UInt32.self, forKey: .argIndex) else {
                throw DecodingError.keyNotFound(CodingKeys.index, .init(codingPath: decoder.codingPath, debugDescription: "missing `index` (or `arg_index`)"))
            }
            guard index <= 5 else {
                throw DecodingError.dataCorruptedError(forKey: .index, in: c, debugDescription: "argument index \(index) is not 0-5")
            }
            let typeKey: CodingKeys = c.contains(.argType) ? .argType : .type
            let type = try c.decodeEnum(typeKey, allowed: ["dword", "qword"]) ?? "qword"
            let value = try c.decodeInteger(UInt64.self, forKey: .val)
            let op: SeccompCondition.Operator
            if let name = try? c.decode(String.self, forKey: .op) {
                switch name {
                case "eq": op = .eq
                case "ne": op = .ne
                case "lt": op = .lt
                case "le": op = .le
                case "gt": op = .gt
                case "ge": op = .ge
                default:
                    throw DecodingError.dataCorruptedError(forKey: .op, in: c, debugDescription: "unknown operator `\(name)`, expected one of `eq`, `ne`, `lt`, `le`, `gt`, `ge` or {\"masked_eq\": MASK}")
                }
            } else {
                let m = try c.nestedContainer(keyedBy: MaskKeys.self, forKey: .op)
                op = .maskedEq(try m.decodeInteger(UInt64.self, forKey: .maskedEq))
            }
            _ = try c.decodeIfPresent(String.self, forKey: .comment)
            condition = SeccompCondition(index: index, op: op, value: value, dword: type == "dword")
        }
    }
}
