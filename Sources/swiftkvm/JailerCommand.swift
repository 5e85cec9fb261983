import ArgumentParser
import Jailer
#if canImport(Glibc)
import Glibc
#endif

/// `swiftkvm jailer`: Firecracker's jailer command line (also run as `jailer`).
struct JailerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "jailer",
        abstract: "Start a program (normally `swiftkvm vmm`) confined: chroot, namespaces, cgroups, rlimits, an unprivileged uid/gid.",
        discussion: """
        Firecracker's jailer: builds <chroot-base-dir>/<exec-file name>/<id>/root, copies the exec file into it, \
        creates /dev/kvm, /dev/net/tun and /dev/urandom there (owned by uid:gid) and /run, joins the cgroups of \
        --cgroup (<hierarchy>/<parent-cgroup>/<id>), sets the resource limits (no-file=2048 when none is given), \
        joins --netns, pivots into the chroot in a new mount namespace, forks into a new PID namespace with \
        --new-pid-ns (the child's PID goes to /<exec-file name>.pid), detaches with --daemonize, closes inherited \
        descriptors, drops to uid:gid without supplementary groups or capabilities (bounding set emptied, \
        no_new_privs), and execs /<exec-file name> with the arguments after `--`, then --id=<id> and \
        Firecracker's --start-time-us/--start-time-cpu-us. Paths given to the exec file are inside the jail. \
        The exec file must be statically linked, or its loader and libraries copied into the jail first \
        (docs/ARCHITECTURE.md "Jailer"). Exit status 2 for a bad option (nothing is created), 1 when a step \
        fails. A binary or symlink named `jailer` behaves like `swiftkvm jailer`.
        """)

    @Option(help: "Unique VM id: letters, digits and hyphens, at most 64 characters.")
    var id: String?
    @Option(name: .customLong("exec-file"), help: "The program to exec in the jail (a copy of swiftkvm, e.g. named firecracker).")
    var execFile: String?
    @Option(help: "The user id the program runs as.")
    var uid: String?
    @Option(help: "The group id the program runs as.")
    var gid: String?
    @Option(name: .customLong("chroot-base-dir"), help: "Where jails are built.")
    var chrootBaseDir: String = "/srv/jailer"
    @Option(help: "Path of a network namespace to join (e.g. /var/run/netns/NAME).")
    var netns: String?
    @Flag(help: "Detach: setsid() and stdin, stdout and stderr to /dev/null.")
    var daemonize = false
    @Flag(name: .customLong("new-pid-ns"), help: "Exec the program as PID 1 of a new PID namespace.")
    var newPIDNamespace = false
    @Option(name: .customLong("cgroup"), help: "<controller>.<file>=<value> written in the VM's cgroup (repeatable).")
    var cgroups: [String] = []
    @Option(name: .customLong("cgroup-version"), help: "Cgroup hierarchy: 1 or 2.")
    var cgroupVersion: String = "1"
    @Option(name: .customLong("parent-cgroup"), help: "Cgroup path the VM's cgroup <id> is created in (default: the exec file's name).")
    var parentCgroup: String?
    @Option(name: .customLong("resource-limit"), help: "fsize=<bytes> or no-file=<count> (repeatable).")
    var resourceLimits: [String] = []
    @Argument(parsing: .postTerminator, help: "Arguments for the exec file, after `--`.")
    var execArguments: [String] = []

    func run() throws {
        let start = Self.microseconds(CLOCK_MONOTONIC), startCPU = Self.microseconds(CLOCK_PROCESS_CPUTIME_ID)
        var a = JailerArguments()
        a.id = id
        a.execFile = execFile
        a.uid = uid
        a.gid = gid
        a.chrootBaseDir = chrootBaseDir
        a.netns = netns
        a.daemonize = daemonize
        a.newPIDNamespace = newPIDNamespace
        a.cgroups = cgroups
        a.cgroupVersion = cgroupVersion
        a.parentCgroup = parentCgroup
        a.resourceLimits = resourceLimits
        a.execArguments = execArguments
        do {
            let config = try JailerConfiguration.validate(a)
            try Jail(config: config).run(startTimeUs: start, startCPUTimeUs: startCPU)
        } catch let error as JailerError {
            let line = "jailer: error: \(error)\n"
            _ = line.withCString { write(2, $0, strlen($0)) }
            Glibc.exit(error.exitCode)
        }
    }

    static func microseconds(_ clock: clockid_t) -> UInt64 {
        var ts = timespec()
        clock_gettime(clock, &ts)
        return UInt64(ts.tv_sec) * 1_000_000 + UInt64(ts.tv_nsec) / 1000
    }
}
