#if canImport(Glibc)
import Glibc
#endif

/// One line of /proc/mounts that is a cgroup hierarchy.
public struct CgroupMount: Equatable, Sendable {
    public var path: String
    /// 1 for `cgroup`, 2 for `cgroup2`.
    public var version: Int
    /// The v1 mount options (the controllers among them); empty for v2.
    public var options: [String]

    public init(path: String, version: Int, options: [String]) {
        self.path = path
        self.version = version
        self.options = options
    }

    /// The cgroup mounts in the text of /proc/mounts (octal escapes such as `\040` in paths decoded).
    public static func parse(mounts text: String) -> [CgroupMount] {
        text.split(separator: "\n").compactMap { line in
            let f = line.split(separator: " ")
            guard f.count >= 4 else { return nil }
            let version: Int
            switch f[2] {
            case "cgroup": version = 1
            case "cgroup2": version = 2
            default: return nil
            }
            return CgroupMount(path: unescape(String(f[1])), version: version,
                               options: version == 1 ? f[3].split(separator: ",").map(String.init) : [])
        }
    }

    static func unescape(_ s: String) -> String {
        guard s.contains("\\") else { return s }
        var out: [UInt8] = []
        let b = Array(s.utf8)
        var i = 0
        while i < b.count {
            if b[i] == 0x5c, i + 4 <= b.count,
               let v = UInt8(String(decoding: b[(i + 1)..<(i + 4)], as: UTF8.self), radix: 8) {
                out.append(v)
                i += 4
            } else {
                out.append(b[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}

/// Puts a process into the cgroups of `--cgroup` settings, Firecracker's jailer layout:
/// `<hierarchy>/<parent-cgroup>/<id>`, one per v1 hierarchy that holds a named controller, or one in the
/// v2 hierarchy (whose ancestors get the controllers enabled in `cgroup.subtree_control`). The mount
/// table is given, so tests run it against directories that stand in for cgroup file systems.
public struct CgroupPlan: Equatable, Sendable {
    /// A cgroup directory to create and the settings written into it.
    public struct Group: Equatable, Sendable {
        /// The hierarchy's mount point.
        public var mount: String
        /// `<mount>/<parent-cgroup>/<id>`.
        public var directory: String
        public var settings: [CgroupSetting]
        /// v2: controllers to enable on each ancestor below the mount point.
        public var enable: [String]
    }

    public var groups: [Group]

    /// The groups for `config`'s `--cgroup` settings; throws a usage error naming `--cgroup` (or
    /// `--cgroup-version`) when a controller is not there. No settings: no groups (as Firecracker).
    public static func make(_ config: JailerConfiguration, mounts: [CgroupMount]) throws -> CgroupPlan {
        guard !config.cgroups.isEmpty else { return CgroupPlan(groups: []) }
        if config.cgroupVersion == 2 {
            guard let m = mounts.first(where: { $0.version == 2 }) else {
                throw JailerError.usage(option: "--cgroup-version", message: "2: no cgroup2 file system is mounted (/proc/mounts)")
            }
            let available = (readSmallFile(m.path + "/cgroup.controllers") ?? "")
                .split(whereSeparator: { $0 == " " || $0 == "\n" }).map(String.init)
            var enable: [String] = []
            for s in config.cgroups where s.controller != "cgroup" {
                guard available.contains(s.controller) else {
                    throw JailerError.usage(option: "--cgroup", message: "'\(s.file)': controller '\(s.controller)' is not available in the cgroup v2 hierarchy at \(m.path) (cgroup.controllers: \(available.isEmpty ? "none" : available.joined(separator: " ")))")
                }
                if !enable.contains(s.controller) { enable.append(s.controller) }
            }
            return CgroupPlan(groups: [Group(mount: m.path, directory: m.path + "/" + config.cgroupRelativePath,
                                             settings: config.cgroups, enable: enable)])
        }
        var groups: [Group] = []
        for s in config.cgroups {
            guard let m = mounts.first(where: { $0.version == 1 && $0.options.contains(s.controller) }) else {
                let mounted = mounts.filter { $0.version == 1 }.flatMap(\.options).filter { !["rw", "ro", "relatime", "nosuid", "nodev", "noexec"].contains($0) }
                throw JailerError.usage(option: "--cgroup", message: "'\(s.file)': controller '\(s.controller)' is not mounted as a cgroup v1 hierarchy (mounted: \(mounted.isEmpty ? "none" : mounted.joined(separator: " ")))")
            }
            if let i = groups.firstIndex(where: { $0.mount == m.path }) {
                groups[i].settings.append(s)
            } else {
                groups.append(Group(mount: m.path, directory: m.path + "/" + config.cgroupRelativePath, settings: [s], enable: []))
            }
        }
        return CgroupPlan(groups: groups)
    }

    /// Creates the directories, writes the settings and then `pid` into each group's `cgroup.procs`.
    /// Returns the directories it created (deepest last). On failure it removes them again and throws:
    /// a usage error when a setting's file does not exist in the new group, else a system error.
    @discardableResult
    public func apply(pid: Int32) throws -> [String] {
        var created: [String] = []
        do {
            for g in groups {
                let relative = g.directory.dropFirst(g.mount.count + 1).split(separator: "/").map(String.init)
                var dir = g.mount
                for part in relative {
                    if !g.enable.isEmpty {
                        // v2: the children of `dir` may use the controllers (a no-op when already enabled).
                        let have = (readSmallFile(dir + "/cgroup.subtree_control") ?? "").split(whereSeparator: { $0 == " " || $0 == "\n" })
                        for c in g.enable where !have.contains(Substring(c)) {
                            try writeFile(dir + "/cgroup.subtree_control", "+" + c, step: "enable controller \(c) in")
                        }
                    }
                    dir += "/" + part
                    if mkdir(dir, 0o755) == 0 {
                        created.append(dir)
                    } else if errno != EEXIST {
                        throw JailerError.system(step: "mkdir", path: dir, errno: errno)
                    }
                }
                for s in g.settings {
                    let file = g.directory + "/" + s.file
                    guard access(file, F_OK) == 0 else {
                        throw JailerError.usage(option: "--cgroup", message: "'\(s.file)': no such file in the cgroup \(g.directory) (the controller has no file of that name)")
                    }
                    try writeFile(file, s.value, step: "write '\(s.value)' to")
                }
                try writeFile(g.directory + "/cgroup.procs", String(pid), step: "join cgroup")
            }
        } catch {
            Self.remove(created)
            throw error
        }
        return created
    }

    /// Removes cgroup directories (deepest first); leaves any that still have processes.
    public static func remove(_ directories: [String]) {
        for d in directories.reversed() { rmdir(d) }
    }
}

/// Writes `text` to an existing file (cgroup and proc files: no create), naming `step` and the path on failure.
func writeFile(_ path: String, _ text: String, step: String) throws {
    let fd = open(path, O_WRONLY | O_TRUNC | O_CLOEXEC)
    guard fd >= 0 else { throw JailerError.system(step: step, path: path, errno: errno) }
    defer { close(fd) }
    let n = text.withCString { write(fd, $0, strlen($0)) }
    guard n >= 0 else { throw JailerError.system(step: step, path: path, errno: errno) }
}

/// A small text file (cgroup, proc) or nil.
func readSmallFile(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { break }
        bytes += buffer[0..<n]
        if bytes.count > 1 << 20 { break }
    }
    return String(decoding: bytes, as: UTF8.self)
}
