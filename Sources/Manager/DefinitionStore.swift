import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import Logging

/// Durable small files: write a temp file in the same directory, fsync it, rename it over the
/// target, fsync the directory (a crash leaves the old or the new content, never a mix).
public enum AtomicFile {
    /// Writes `bytes` to `path` atomically (mode 0644).
    public static func write(_ bytes: [UInt8], to path: String) throws(ManagerError) {
        let slash = path.lastIndex(of: "/")
        let dir = slash.map { $0 == path.startIndex ? "/" : String(path[..<$0]) } ?? "."
        let file = slash.map { String(path[path.index(after: $0)...]) } ?? path
        let temp = "\(dir)/.\(file).tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let fd = open(temp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw ManagerError(.host, "cannot create \(temp): \(ManagerError.errnoText())") }
        var ok = false
        defer { if !ok { unlink(temp) } }
        var written = 0
        while written < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + written, $0.count - written) }
            if n < 0 {
                if errno == EINTR { continue }
                let text = ManagerError.errnoText()
                close(fd)
                throw ManagerError(.host, "cannot write \(temp): \(text)")
            }
            written += n
        }
        guard fsync(fd) == 0 else {
            let text = ManagerError.errnoText()
            close(fd)
            throw ManagerError(.host, "cannot fsync \(temp): \(text)")
        }
        close(fd)
        guard rename(temp, path) == 0 else { throw ManagerError(.host, "cannot rename \(temp) to \(path): \(ManagerError.errnoText())") }
        ok = true
        let dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dfd >= 0 { fsync(dfd); close(dfd) }
    }

    /// Reads a whole file (at most `limit` bytes).
    public static func read(_ path: String, limit: Int = 1 << 20) throws(ManagerError) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw ManagerError(.host, "cannot open \(path): \(ManagerError.errnoText())") }
        defer { close(fd) }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, $0.count) }
            if n < 0 { if errno == EINTR { continue }; throw ManagerError(.host, "cannot read \(path): \(ManagerError.errnoText())") }
            if n == 0 { break }
            out += buf[0..<n]
            if out.count > limit { throw ManagerError(.invalid, "\(path) is larger than \(limit) bytes") }
        }
        return out
    }

    /// Creates `path` and its parents (mode 0755) if missing.
    public static func makeDirectory(_ path: String) throws(ManagerError) {
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        } catch {
            throw ManagerError(.host, "cannot create the directory \(path): \(error)")
        }
    }
}

/// The definitions in `STATE/vms/NAME.json`.
public struct DefinitionStore: Sendable {
    /// The `vms` directory.
    public let directory: String

    public init(directory: String) {
        self.directory = directory
    }

    /// The file of VM `name`.
    public func path(of name: String) -> String { "\(directory)/\(name).json" }

    /// Stores `definition` (normalized JSON, atomically).
    public func save(_ definition: VMDefinition) throws(ManagerError) {
        try AtomicFile.makeDirectory(directory)
        try AtomicFile.write(definition.normalizedJSON(), to: path(of: definition.name))
    }

    /// Removes the definition of `name`.
    public func remove(_ name: String) throws(ManagerError) {
        guard unlink(path(of: name)) == 0 || errno == ENOENT else {
            throw ManagerError(.host, "cannot remove \(path(of: name)): \(ManagerError.errnoText())")
        }
    }

    /// Loads every `*.json` definition. A bad file is not fatal: it is returned in `errors`
    /// (the message names the file) and skipped. A file whose `name` differs from its file name
    /// is an error too.
    public func loadAll() -> (definitions: [VMDefinition], errors: [ManagerError]) {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: directory) else { return ([], []) }
        var defs: [VMDefinition] = [], errors: [ManagerError] = []
        for file in names.sorted() where file.hasSuffix(".json") && !file.hasPrefix(".") {
            let full = "\(directory)/\(file)"
            do throws(ManagerError) {
                let def = try VMDefinition.parse(try AtomicFile.read(full), source: full)
                guard "\(def.name).json" == file else {
                    throw ManagerError(.invalid, "invalid definition (\(full)): its name '\(def.name)' does not match the file name")
                }
                defs.append(def)
            } catch {
                errors.append(error)
            }
        }
        return (defs, errors)
    }
}
