import CJail
#if canImport(Glibc)
import Glibc
#endif

/// The jailer's work, in order (docs/ARCHITECTURE.md "Jailer"): builds the chroot, copies the exec file
/// into it, creates the device nodes, joins the cgroups, sets the rlimits, joins the network namespace,
/// pivots into the chroot in a new mount namespace, optionally forks into a new PID namespace, detaches,
/// closes inherited descriptors, drops to the uid/gid without capabilities and execs. Only returns by
/// throwing; what it created before a failure is removed again when that is still possible.
public struct Jail {
    public let config: JailerConfiguration
    /// /proc/mounts (for the cgroup hierarchies).
    public var mountsPath = "/proc/mounts"
    /// The device nodes created inside the jail, from the host's nodes of the same path.
    public static let devices = ["/dev/kvm", "/dev/net/tun", "/dev/urandom"]

    public init(config: JailerConfiguration) { self.config = config }

    /// Runs the jailer to the exec of the exec file. `startTimeUs`/`startCPUTimeUs` are passed on as
    /// Firecracker's jailer does (its `--start-time-us` and `--start-time-cpu-us`).
    public func run(startTimeUs: UInt64, startCPUTimeUs: UInt64) throws -> Never {
        // Everything that can be refused is checked before the first change.
        let plan = try CgroupPlan.make(config, mounts: CgroupMount.parse(mounts: readSmallFile(mountsPath) ?? ""))
        var hostDevices: [(path: String, rdev: UInt64)] = []
        for dev in Self.devices {
            var st = stat()
            guard stat(dev, &st) == 0, (st.st_mode & S_IFMT) == S_IFCHR else {
                throw JailerError.system(step: "find host device", path: dev, errno: errno == 0 ? ENODEV : errno)
            }
            hostDevices.append((dev, UInt64(st.st_rdev)))
        }
        var netnsFD: Int32 = -1
        if let netns = config.netns {
            netnsFD = open(netns, O_RDONLY | O_CLOEXEC)
            guard netnsFD >= 0 else { throw JailerError.system(step: "open network namespace", path: netns, errno: errno) }
        }
        // An existing root is kept (as Firecracker's jailer does), so that files the exec file needs (a
        // dynamic loader and libraries, a kernel) can be put there first; one that already has the exec
        // file is a jail in use or left over, and is refused.
        if access(config.execCopyPath, F_OK) == 0 {
            throw JailerError.usage(option: "--id", message: "'\(config.id)': \(config.execCopyPath) already exists (a jail in use or left over: remove \(config.jailDir), or pick another id)")
        }

        // Everything created from here on, in order, so that a failure removes it again.
        var made: [String] = []
        var cgroupDirs: [String] = []
        do {
            made += try makeDirectories(config.chrootDir)
            made.append(config.execCopyPath) // (checked above not to exist: if the copy fails half-way it goes too)
            try copyExecFile()
            for d in hostDevices { try makeDevice(d.path, rdev: d.rdev, made: &made) }
            // /run for the API socket's default path (/run/firecracker.socket).
            try makeOwnedDirectory(config.chrootDir + "/run", made: &made)
            try check(chown(config.chrootDir, config.uid, config.gid), "chown", config.chrootDir)
            cgroupDirs = try plan.apply(pid: getpid())
            for limit in config.resourceLimits {
                var r = rlimit(rlim_cur: rlim_t(limit.value), rlim_max: rlim_t(limit.value))
                try check(setrlimit(__rlimit_resource_t(UInt32(limit.resource.rlimit)), &r), "setrlimit \(limit.resource.rawValue)=\(limit.value)", "")
            }
            if netnsFD >= 0 {
                try check(cjail_setns(netnsFD, cjail_clone_newnet()), "setns (join network namespace)", config.netns ?? "")
                close(netnsFD)
            }
        } catch {
            CgroupPlan.remove(cgroupDirs)
            for path in made.reversed() where rmdir(path) != 0 { unlink(path) }
            throw error
        }

        // /dev/null for --daemonize, opened while the host's /dev is still visible.
        let devNull = config.daemonize ? open("/dev/null", O_RDWR | O_CLOEXEC) : -1
        if config.daemonize && devNull < 0 { throw JailerError.system(step: "open", path: "/dev/null", errno: errno) }

        try pivot()

        if config.newPIDNamespace {
            try check(cjail_unshare(cjail_clone_newpid()), "unshare (new PID namespace)", "")
            let child = cjail_fork()
            guard child >= 0 else { throw JailerError.system(step: "fork into the new PID namespace", path: "", errno: -child) }
            if child > 0 {
                // The parent records the child's PID (as this namespace sees it) in the jail and ends.
                let pidFile = "/" + config.execName + ".pid"
                let fd = open(pidFile, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
                if fd >= 0 {
                    _ = "\(child)".withCString { write(fd, $0, strlen($0)) }
                    close(fd)
                }
                exit(fd >= 0 ? 0 : 1)
            }
        }
        if config.daemonize {
            try check(setsid(), "setsid (--daemonize)", "")
            for target in Int32(0)...2 { try check(dup2(devNull, target), "dup2 /dev/null to", "fd \(target)") }
        }
        try check(cjail_close_from(3), "close inherited descriptors from", "fd 3")
        try dropPrivileges()
        let argv = config.execArgv(startTimeUs: startTimeUs, startCPUTimeUs: startCPUTimeUs)
        var cArgs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        var env: [UnsafeMutablePointer<CChar>?] = [nil]
        execve(config.jailedExecPath, &cArgs, &env)
        throw JailerError.system(step: "execve", path: config.jailedExecPath + " (inside the jail)", errno: errno)
    }

    // MARK: steps

    /// mkdir -p; returns the directories it created, outermost first.
    func makeDirectories(_ path: String) throws -> [String] {
        var created: [String] = []
        var dir = ""
        for part in JailerConfiguration.components(path) {
            dir += "/" + part
            if mkdir(dir, 0o755) == 0 {
                created.append(dir)
            } else if errno != EEXIST {
                let e = errno
                for d in created.reversed() { rmdir(d) }
                throw JailerError.system(step: "mkdir", path: dir, errno: e)
            }
        }
        return created
    }

    func makeOwnedDirectory(_ path: String, made: inout [String]) throws {
        if mkdir(path, 0o755) == 0 {
            made.append(path)
        } else if errno != EEXIST {
            throw JailerError.system(step: "mkdir", path: path, errno: errno)
        }
        try check(chown(path, config.uid, config.gid), "chown", path)
    }

    /// Copies the exec file to `<root>/<exec-name>` (a copy, not a link, as Firecracker does: the jailed
    /// process shares no inode with the host's binary), mode 0755 owned by root.
    func copyExecFile() throws {
        let src = open(config.execFile, O_RDONLY | O_CLOEXEC)
        guard src >= 0 else { throw JailerError.system(step: "open", path: config.execFile, errno: errno) }
        defer { close(src) }
        let dst = open(config.execCopyPath, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o755)
        guard dst >= 0 else { throw JailerError.system(step: "create", path: config.execCopyPath, errno: errno) }
        defer { close(dst) }
        var copied = 0
        while true {
            let n = cjail_copy_file_range(src, dst, 1 << 30)
            if n > 0 { copied += n; continue }
            if n == 0 { return }
            if n == -Int(EINTR) { continue }
            if copied == 0 && (n == -Int(EXDEV) || n == -Int(ENOSYS) || n == -Int(EINVAL) || n == -Int(EOPNOTSUPP)) { break }
            throw JailerError.system(step: "copy exec file to", path: config.execCopyPath, errno: Int32(-n))
        }
        // Fallback: read and write.
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(src, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n >= 0 else { throw JailerError.system(step: "read", path: config.execFile, errno: errno) }
            if n == 0 { return }
            var off = 0
            while off < n {
                let w = buffer.withUnsafeBytes { write(dst, $0.baseAddress! + off, n - off) }
                if w < 0 && errno == EINTR { continue }
                guard w > 0 else { throw JailerError.system(step: "write", path: config.execCopyPath, errno: errno) }
                off += w
            }
        }
    }

    /// `mknod <root><path>` with the host's device number, mode 0600, owned by uid:gid.
    func makeDevice(_ path: String, rdev: UInt64, made: inout [String]) throws {
        let target = config.chrootDir + path
        var dir = config.chrootDir
        for part in JailerConfiguration.components(path).dropLast() {
            dir += "/" + part
            if mkdir(dir, 0o755) == 0 {
                made.append(dir)
            } else if errno != EEXIST {
                throw JailerError.system(step: "mkdir", path: dir, errno: errno)
            }
        }
        let dev = cjail_makedev(cjail_major(rdev), cjail_minor(rdev))
        try check(mknod(target, S_IFCHR | 0o600, dev_t(dev)), "mknod", target)
        made.append(target)
        try check(chown(target, config.uid, config.gid), "chown", target)
    }

    /// A new mount namespace whose root is the chroot: mounts private, the chroot bind-mounted onto
    /// itself, `pivot_root` with the old root put below it, the old root detached and removed.
    func pivot() throws {
        let root = config.chrootDir
        try check(cjail_unshare(cjail_clone_newns()), "unshare (new mount namespace)", "")
        try check(mount(nil, "/", nil, cjail_ms_private_rec(), nil), "make mounts private:", "/")
        try check(mount(root, root, nil, cjail_ms_bind_rec(), nil), "bind-mount the jail onto itself:", root)
        try check(chdir(root), "chdir", root)
        let oldRoot = "old_root"
        if mkdir(oldRoot, 0o700) != 0 && errno != EEXIST { throw JailerError.system(step: "mkdir", path: root + "/" + oldRoot, errno: errno) }
        let r = cjail_pivot_root(".", oldRoot)
        guard r == 0 else { throw JailerError.system(step: "pivot_root", path: root, errno: -r) }
        try check(umount2("/" + oldRoot, cjail_mnt_detach()), "unmount the old root", "/" + oldRoot)
        try check(rmdir("/" + oldRoot), "rmdir", "/" + oldRoot)
        try check(chroot("."), "chroot", ".")
        try check(chdir("/"), "chdir", "/")
    }

    /// No supplementary groups, gid and uid (real, effective, saved), an empty capability bounding set
    /// (dropped while CAP_SETPCAP is still held), no capabilities left, and no new privileges on exec.
    func dropPrivileges() throws {
        try check(setgroups(0, nil), "setgroups (none)", "")
        let dropped = cjail_drop_bounding_set()
        guard dropped >= 0 else { throw JailerError.system(step: "drop the capability bounding set", path: "", errno: -dropped) }
        try check(cjail_setresgid(config.gid), "setresgid", "\(config.gid)")
        try check(cjail_setresuid(config.uid), "setresuid", "\(config.uid)")
        let cleared = cjail_clear_capabilities()
        guard cleared == 0 else { throw JailerError.system(step: "clear capabilities", path: "", errno: -cleared) }
        let nnp = cjail_set_no_new_privs()
        guard nnp == 0 else { throw JailerError.system(step: "prctl(PR_SET_NO_NEW_PRIVS)", path: "", errno: -nnp) }
    }

    func check(_ result: Int32, _ step: String, _ path: String) throws {
        if result < 0 { throw JailerError.system(step: step, path: path, errno: result == -1 ? errno : -result) }
    }
}

/// Removes a directory tree (the jail after a failed start; also used by tests' clean-up). Does not
/// follow symbolic links.
public func removeTree(_ path: String) {
    var st = stat()
    guard lstat(path, &st) == 0 else { return }
    if (st.st_mode & S_IFMT) == S_IFDIR {
        if let d = opendir(path) {
            var names: [String] = []
            while let e = readdir(d) {
                let name = withUnsafePointer(to: e.pointee.d_name) { String(cString: UnsafeRawPointer($0).assumingMemoryBound(to: CChar.self)) }
                if name != "." && name != ".." { names.append(name) }
            }
            closedir(d)
            for n in names { removeTree(path + "/" + n) }
        }
        rmdir(path)
    } else {
        unlink(path)
    }
}
