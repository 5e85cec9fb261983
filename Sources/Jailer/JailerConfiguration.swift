#if canImport(Glibc)
import Glibc
#endif

/// The jailer's command line (Firecracker's `jailer` options), as given, before validation.
public struct JailerArguments: Sendable {
    public var id: String?
    public var execFile: String?
    public var uid: String?
    public var gid: String?
    public var chrootBaseDir = "/srv/jailer"
    public var netns: String?
    public var daemonize = false
    public var newPIDNamespace = false
    public var cgroups: [String] = []
    public var cgroupVersion = "1"
    public var parentCgroup: String?
    public var resourceLimits: [String] = []
    /// Everything after `--`: passed to the exec file.
    public var execArguments: [String] = []

    public init() {}
}

/// One `--resource-limit`: the resource and its value (soft and hard limit alike).
public struct ResourceLimit: Equatable, Sendable {
    public enum Resource: String, CaseIterable, Sendable {
        case fsize = "fsize"
        case noFile = "no-file"

        var rlimit: Int32 {
            switch self {
            case .fsize: return Int32(RLIMIT_FSIZE.rawValue)
            case .noFile: return Int32(RLIMIT_NOFILE.rawValue)
            }
        }
    }

    public var resource: Resource
    public var value: UInt64

    public init(resource: Resource, value: UInt64) {
        self.resource = resource
        self.value = value
    }

    /// Firecracker's jailer bounds `no-file` to 2048 when no limit is given.
    public static let defaultLimits = [ResourceLimit(resource: .noFile, value: 2048)]
}

/// One `--cgroup KEY=VALUE`: the cgroup file (`<controller>.<name>`) and what is written to it.
public struct CgroupSetting: Equatable, Sendable {
    public var file: String
    public var value: String

    /// The controller the file belongs to: the part before the first dot (`pids` for `pids.max`).
    public var controller: String { String(file.prefix { $0 != "." }) }
}

/// A validated jailer configuration: every option checked, nothing created yet.
public struct JailerConfiguration: Equatable, Sendable {
    public var id: String
    public var execFile: String
    public var uid: UInt32
    public var gid: UInt32
    public var chrootBaseDir: String
    public var netns: String?
    public var daemonize: Bool
    public var newPIDNamespace: Bool
    public var cgroups: [CgroupSetting]
    public var cgroupVersion: Int
    public var parentCgroup: String
    public var resourceLimits: [ResourceLimit]
    public var execArguments: [String]

    /// The longest `--id` Firecracker's jailer accepts.
    public static let maxIDLength = 64

    /// The exec file's last path component (`firecracker` for `/usr/bin/firecracker`).
    public var execName: String { Self.lastComponent(execFile) }

    /// `<chroot-base>/<exec-name>/<id>`: the directory the jailer creates for this VM (removing it cleans up).
    public var jailDir: String { Self.join(chrootBaseDir, execName, id) }
    /// `<jailDir>/root`: the new root of the jailed process.
    public var chrootDir: String { jailDir + "/root" }
    /// The exec file as the jailed process sees it.
    public var jailedExecPath: String { "/" + execName }
    /// The same file from outside.
    public var execCopyPath: String { chrootDir + jailedExecPath }
    /// The cgroup directory below a hierarchy's mount point: `<parent-cgroup>/<id>`.
    public var cgroupRelativePath: String { parentCgroup + "/" + id }

    /// The arguments the exec file gets after its name: the ones given after `--`, then `--id=<id>` and
    /// Firecracker's start-time options (`swiftkvm vmm` accepts and ignores them). They come last so that a
    /// `swiftkvm` copy still sees its `vmm` subcommand first.
    public func execArgv(startTimeUs: UInt64, startCPUTimeUs: UInt64) -> [String] {
        [jailedExecPath] + execArguments + ["--id=\(id)", "--start-time-us=\(startTimeUs)", "--start-time-cpu-us=\(startCPUTimeUs)"]
    }

    /// Checks every option; throws `JailerError.usage` naming the first bad one. Looks at the file system
    /// (the exec file, the netns handle) but changes nothing.
    public static func validate(_ a: JailerArguments) throws -> JailerConfiguration {
        func bad(_ option: String, _ message: String) -> JailerError { .usage(option: option, message: message) }

        guard let id = a.id else { throw bad("--id", "missing (required)") }
        guard isValidID(id) else {
            throw bad("--id", "invalid id '\(id)': expected 1 to \(maxIDLength) characters, letters, digits and hyphens only")
        }
        guard let execFile = a.execFile, !execFile.isEmpty else { throw bad("--exec-file", "missing (required)") }
        var st = stat()
        guard stat(execFile, &st) == 0 else {
            throw bad("--exec-file", "'\(execFile)': \(String(cString: strerror(errno)))")
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else { throw bad("--exec-file", "'\(execFile)' is not a regular file") }
        guard access(execFile, X_OK) == 0 else { throw bad("--exec-file", "'\(execFile)' is not executable") }
        let name = lastComponent(execFile)
        guard !name.isEmpty, name != ".", name != ".." else { throw bad("--exec-file", "'\(execFile)' has no file name") }

        guard let uidText = a.uid else { throw bad("--uid", "missing (required)") }
        guard let uid = UInt32(uidText), uid != UInt32.max else { throw bad("--uid", "invalid uid '\(uidText)': expected a number from 0 to 4294967294") }
        guard let gidText = a.gid else { throw bad("--gid", "missing (required)") }
        guard let gid = UInt32(gidText), gid != UInt32.max else { throw bad("--gid", "invalid gid '\(gidText)': expected a number from 0 to 4294967294") }

        guard a.chrootBaseDir.hasPrefix("/") else {
            throw bad("--chroot-base-dir", "'\(a.chrootBaseDir)' must be an absolute path")
        }
        guard !components(a.chrootBaseDir).contains("..") else {
            throw bad("--chroot-base-dir", "'\(a.chrootBaseDir)' must not contain '..'")
        }

        if let netns = a.netns {
            var ns = stat()
            guard stat(netns, &ns) == 0 else { throw bad("--netns", "'\(netns)': \(String(cString: strerror(errno)))") }
        }

        guard let version = Int(a.cgroupVersion), version == 1 || version == 2 else {
            throw bad("--cgroup-version", "invalid version '\(a.cgroupVersion)': expected 1 or 2")
        }
        var cgroups: [CgroupSetting] = []
        for item in a.cgroups {
            guard let eq = item.firstIndex(of: "=") else {
                throw bad("--cgroup", "invalid '\(item)': expected <controller>.<file>=<value>, e.g. pids.max=64")
            }
            let file = String(item[..<eq]), value = String(item[item.index(after: eq)...])
            let parts = file.split(separator: ".", omittingEmptySubsequences: false)
            guard parts.count >= 2, parts.allSatisfy({ !$0.isEmpty }), !file.contains("/"), !value.isEmpty,
                  !value.contains("\n") else {
                throw bad("--cgroup", "invalid '\(item)': expected <controller>.<file>=<value>, e.g. pids.max=64")
            }
            cgroups.append(CgroupSetting(file: file, value: value))
        }
        let parent = a.parentCgroup ?? name
        let parentParts = components(parent)
        guard !parent.hasPrefix("/"), !parentParts.isEmpty, !parentParts.contains(".."), !parentParts.contains(".") else {
            throw bad("--parent-cgroup", "invalid '\(parent)': expected a relative path inside the cgroup hierarchy, without '.' or '..'")
        }

        var limits: [ResourceLimit] = []
        for item in a.resourceLimits {
            let pieces = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard pieces.count == 2 else {
                throw bad("--resource-limit", "invalid '\(item)': expected <resource>=<value>, e.g. no-file=1024")
            }
            guard let resource = ResourceLimit.Resource(rawValue: String(pieces[0])) else {
                let known = ResourceLimit.Resource.allCases.map(\.rawValue).joined(separator: ", ")
                throw bad("--resource-limit", "unknown resource '\(pieces[0])' in '\(item)': expected one of \(known)")
            }
            guard let value = UInt64(pieces[1]) else {
                throw bad("--resource-limit", "invalid value '\(pieces[1])' for \(resource.rawValue): expected a non-negative number")
            }
            limits.removeAll { $0.resource == resource }
            limits.append(ResourceLimit(resource: resource, value: value))
        }

        return JailerConfiguration(
            id: id, execFile: execFile, uid: uid, gid: gid, chrootBaseDir: normalize(a.chrootBaseDir), netns: a.netns,
            daemonize: a.daemonize, newPIDNamespace: a.newPIDNamespace, cgroups: cgroups, cgroupVersion: version,
            parentCgroup: parentParts.joined(separator: "/"),
            resourceLimits: limits.isEmpty ? ResourceLimit.defaultLimits : limits, execArguments: a.execArguments)
    }

    /// Firecracker's rule: 1 to 64 characters, ASCII letters, digits and hyphens.
    public static func isValidID(_ id: String) -> Bool {
        !id.isEmpty && id.utf8.count <= maxIDLength && id.utf8.allSatisfy { c in
            (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || c == 0x2d
        }
    }

    static func components(_ path: String) -> [String] { path.split(separator: "/").map(String.init) }
    static func lastComponent(_ path: String) -> String { components(path).last ?? "" }
    static func normalize(_ path: String) -> String { "/" + components(path).joined(separator: "/") }
    static func join(_ parts: String...) -> String {
        parts.enumerated().map { $0.offset == 0 && $0.element == "/" ? "" : $0.element }.joined(separator: "/")
    }
}
