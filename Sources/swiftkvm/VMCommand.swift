import ArgumentParser
import FoundationEssentials
import Manager
#if canImport(Glibc)
import Glibc
#endif

/// `swiftkvm vm`: virsh-like verbs, a client of `swiftkvm daemon`.
struct VMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vm",
        abstract: "Manage VMs through the swiftkvm daemon (define, start, list, console…), as virsh does.",
        discussion: """
        The daemon socket is --socket, else $SWIFTKVM_SOCKET, else daemon.sock in the state \
        directory ($SWIFTKVM_STATE_DIR, default /var/lib/swiftkvm). Errors print one line and exit \
        with 1 (daemon not running, unknown VM, refused action); usage errors exit with 2.
        """,
        subcommands: [VMDefineCommand.self, VMUndefineCommand.self, VMListCommand.self, VMStartCommand.self, VMShutdownCommand.self, VMDestroyCommand.self,
                      VMPauseCommand.self, VMResumeCommand.self, VMSaveCommand.self, VMRestoreCommand.self, VMCloneCommand.self, VMMigrateCommand.self, VMInfoCommand.self, VMConsoleCommand.self, VMAutostartCommand.self, VMSetMemCommand.self, VMEventsCommand.self]
    )

    @OptionGroup var options: VMSocketOptions
}

/// The `--socket` option every `vm` verb takes.
struct VMSocketOptions: ParsableArguments {
    @Option(name: .customLong("socket"), help: "The daemon's API socket (default: $SWIFTKVM_SOCKET or <state dir>/daemon.sock).")
    var socket: String?

    var client: VMClient { VMClient(socketPath: VMClient.socketPath(option: socket)) }
}

/// Runs `body`; a `ManagerError` prints `swiftkvm: error: …` and exits with status 1.
func vmRun(_ body: () throws(ManagerError) -> Void) throws {
    do {
        try body()
    } catch {
        let line = "swiftkvm: error: \(error.message)\n"
        _ = line.withCString { write(STDERR_FILENO, $0, strlen($0)) }
        throw ExitCode(1)
    }
}

/// Prints `text` to stdout at once (the CLI may be piped).
func vmPrint(_ text: String) {
    let line = text.hasSuffix("\n") ? text : text + "\n"
    _ = line.withCString { write(STDOUT_FILENO, $0, strlen($0)) }
}

struct VMDefineCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "define",
        abstract: "Define (or redefine) a VM from a JSON file: a Firecracker config plus \"name\", \"autostart\", \"shutdown_timeout_s\".")
    @ParentCommand var parent: VMCommand
    var options: VMSocketOptions { parent.options }
    @Argument(help: "The definition file.") var file: String

    func run() throws {
        try vmRun { () throws(ManagerError) in
            guard let data = FileManager.default.contents(atPath: file) else {
                throw ManagerError(.invalid, "cannot read the definition file \(file): \(String(cString: strerror(errno)))")
            }
            guard data.count <= 1 << 20 else {
                throw ManagerError(.invalid, "the definition file \(file) is larger than 1 MiB")
            }
            // Checked here first, so that errors name the file (the daemon checks it again).
            _ = try VMDefinition.parse(Array(data), source: file)
            let (vm, replaced) = try options.client.define(Array(data))
            vmPrint("VM '\(vm.name)' \(replaced ? "redefined" : "defined") from \(file)")
        }
    }
}

struct VMUndefineCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "undefine", abstract: "Remove a shut-off VM's definition.")
    @ParentCommand var parent: VMCommand
    var options: VMSocketOptions { parent.options }
    @Argument(help: "The VM's name.") var name: String

    func run() throws {
        try vmRun { () throws(ManagerError) in
            try options.client.undefine(name)
            vmPrint("VM '\(name)' has been undefined")
        }
    }
}

struct VMListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List running and paused VMs (--all: every defined VM).")
    @ParentCommand var parent: VMCommand
    var options: VMSocketOptions { parent.options }
    @Flag(name: .long, help: "Also list the VMs that are shut off.") var all = false

    func run() throws {
        try vmRun { () throws(ManagerError) in
            let vms = try options.client.list(all: all)
            vmPrint(VMFormat.table(vms))
        }
    }
}

/// The shape of the verbs that change a VM's state.
protocol VMStateVerb: ParsableCommand {
    var options: VMSocketOptions { get }
    var name: String { get }
    static var action: String { get }
    static var done: String { get }
}

extension VMStateVerb {
    func change(timeoutS: Double? = nil) throws {
        try vmRun { () throws(ManagerError) in
            _ = try options.client.changeState(name, action: Self.action, timeoutS: timeoutS)
            vmPrint("VM '\(name)' \(Self.done)")
        }
    }
}

struct VMStartCommand: VMStateVerb {
    static let configuration = CommandConfiguration(commandName: "start", abstract: "Start a defined VM (its own swiftkvm vmm process).")
    static let action = "start", done = "started"
    @ParentCommand var parent: VMCommand
    var options: VMSocketOptions { parent.options }
    @Argument(help: "The VM's name.") var name: String
    func run() throws { try change() }
}

struct VMShutdownCommand: VMStateVerb {
    static let configuration = CommandConfiguration(
        commandName: "shutdown",
        abstract: "Ask the guest to shut down (Ctrl+Alt+Del); destroy it if it has not stopped after the timeout.")
    static let action = "shutdown", done = "shut off"
    @ParentCommand var parent: VMCommand
    var options: VMSocketOptions { parent.options }
    @Argument(help: "The VM's name.") var name: String
    @Option(help: "Seconds to wait before destroying (default: the definition's shutdown_timeout_s, else 30).")
    var timeout: Double?

    func validate() throws {
        if let timeout, !(timeout >= 0 && timeout.isFinite) {
            throw ValidationError("invalid --timeout \(timeout): expected seconds >= 0")
        }
    }
    func run() throws { try change(timeoutS: timeout) }
}

struct VMDestroyCommand: VMStateVerb {
    static let configuration = CommandConfiguration(commandName: "destroy", abstract: "Stop a VM at once (SIGTERM, then SIGKILL).")
    static let action = "destroy", done = "destroyed"
    @ParentCommand var parent: VMCommand
    var options: VMSocketOptions { parent.options }
    @Argument(help: "The VM's name.") var name: String
    func run() throws { try change() }
}

struct VMPauseCommand: VMStateVerb {
    static let configuration = CommandConfiguration(commandName: "pause", abstract: "Pause a running VM's vCPUs.")
    static let action = "pause", done = "paused"
    @ParentCommand var parent: VMCommand
    var options: VMSocketOptions { parent.options }
    @Argument(help: "The VM's name.") var name: String
    func run() throws { try change() }
}

struct VMResumeCommand: VMStateVerb {
    static let configuration = CommandConfiguration(commandName: "resume", abstract: "Resume a paused VM.")
    static let action = "resume", done = "resumed"
    @ParentCommand var parent: VMCommand
    var options: VMSocketOptions { parent.options }
    @Argument(help: "The VM's name.") var name: String
    func run() throws { try change() }
}

/// An absolute form of `path` (the daemon's working directory is not the caller's).
func absolutePath(_ path: String) -> String {
    path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
}

struct VMSaveCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "save",
        abstract: "Save a running or paused VM into a snapshot directory and stop it (virsh save).",
        discussion: "DIR gets the files snapshot (vCPU and device state), memory (guest RAM, sparse) and definition.json. `swiftkvm vm restore DIR` starts it again where it stopped; `swiftkvm run --restore DIR` runs it outside the daemon.")
    @ParentCommand var parent: VMCommand
    var options: VMSocketOptions { parent.options }
    @Argument(help: "The VM's name.") var name: String
    @Argument(help: "The snapshot directory (created when missing).") var directory: String

    func run() throws {
        try vmRun { () throws(ManagerError) in
            _ = try options.client.save(name, to: absolutePath(directory))
            vmPrint("VM '\(name)' saved to \(directory)")
        }
    }
}

struct VMMigrateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate",
        abstract: "Live-migrate a running VM to a `swiftkvm vmm --incoming ADDR` (virsh migrate --live).",
        discussion: "Prints the report (passes, bytes sent, downtime) as JSON. On success the VM runs at the destination and is shut off here; on a failure it keeps running here. Disks stay where they are: the destination must see the same image files (one host, or shared storage); it refuses the VM otherwise.")
    @ParentCommand var parent: VMCommand
    var options: VMSocketOptions { parent.options }
    @Argument(help: "The VM's name.") var name: String
    @Option(help: "Where the target waits: unix:PATH or tcp:HOST:PORT.") var to: String
    @Option(name: .customLong("max-downtime"), help: "Longest pause for the last pass, in milliseconds (default 300).") var maxDowntime: Int?

    func run() throws {
        try vmRun { () throws(ManagerError) in
            vmPrint(try options.client.migrate(name, to: to, maxDowntimeMs: maxDowntime))
        }
    }
}

struct VMRestoreCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore",
        abstract: "Start a VM from a snapshot directory written by `vm save` (virsh restore); it runs at once.")
    @ParentCommand var parent: VMCommand
    var options: VMSocketOptions { parent.options }
    @Argument(help: "The snapshot directory.") var directory: String

    func run() throws {
        try vmRun { () throws(ManagerError) in
            let vm = try options.client.restore(from: absolutePath(directory))
            vmPrint("VM '\(vm.name)' restored from \(directory)")
        }
    }
}

struct VMCloneCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "clone",
        abstract: "Start a running copy of a running or paused VM from a snapshot of it (a live clone).",
        discussion: """
        The source pauses while its snapshot is written and its writable disks are copied (to \
        DIR/STEM-NEWNAME.EXT beside each image, reflinked where the file system can), then runs on. \
        The clone gets its own definition, disks, vsock socket, TAPs on the same networks, and MACs \
        derived from its name. Inside, its guest goes on from the same instant as the source: it keeps \
        the source's MAC and IP addresses until it reboots (a guest reads its MAC when it boots). \
        VMs with network-interfaces on host TAPs cannot be cloned: use `nics`.
        """)
    @ParentCommand var parent: VMCommand
    var options: VMSocketOptions { parent.options }
    @Argument(help: "The VM to clone.") var name: String
    @Argument(help: "The clone's name.") var newName: String

    func run() throws {
        try vmRun { () throws(ManagerError) in
            let vm = try options.client.clone(name, as: newName)
            vmPrint("VM '\(vm.name)' cloned from '\(name)'\(vm.pid.map { ", vmm pid \($0)" } ?? "")")
        }
    }
}

struct VMInfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "info", abstract: "Show a VM's state, process, sizes, sockets and logs.")
    @ParentCommand var parent: VMCommand
    var options: VMSocketOptions { parent.options }
    @Argument(help: "The VM's name.") var name: String

    func run() throws {
        try vmRun { () throws(ManagerError) in
            vmPrint(VMFormat.info(try options.client.info(name)))
        }
    }
}

struct VMConsoleCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "console",
        abstract: "Attach to a running VM's serial console (Ctrl-] detaches; with pipes, stdin is sent until EOF).")
    @ParentCommand var parent: VMCommand
    var options: VMSocketOptions { parent.options }
    @Argument(help: "The VM's name.") var name: String

    func run() throws {
        var fd: Int32 = -1
        try vmRun { () throws(ManagerError) in
            let vm = try options.client.info(name)
            guard vm.isActive, let path = vm.consoleSocket else {
                throw ManagerError(.conflict, "vm '\(name)' is not running (state: \(vm.state))")
            }
            fd = try ConsoleAttach.connect(socketPath: path, vm: name)
        }
        _ = ConsoleAttach.run(socket: fd)
    }
}

struct VMAutostartCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "autostart", abstract: "Start the VM whenever the daemon starts (--disable: don't).")
    @ParentCommand var parent: VMCommand
    var options: VMSocketOptions { parent.options }
    @Argument(help: "The VM's name.") var name: String
    @Flag(name: .long, help: "Turn autostart off.") var disable = false

    func run() throws {
        try vmRun { () throws(ManagerError) in
            _ = try options.client.setAutostart(name, !disable)
            vmPrint("VM '\(name)' \(disable ? "unmarked as autostarted" : "marked as autostarted")")
        }
    }
}

struct VMSetMemCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "setmem",
        abstract: "Set the memory a running VM's guest keeps (virsh setmem): its balloon device takes the rest.",
        discussion: "The definition needs a \"balloon\" section (Firecracker's: amount_mib, deflate_on_oom, …).")
    @ParentCommand var parent: VMCommand
    var options: VMSocketOptions { parent.options }
    @Argument(help: "The VM's name.") var name: String
    @Argument(help: "MiB the guest keeps (1 to its memory size).") var mib: Int

    func run() throws {
        try vmRun { () throws(ManagerError) in
            _ = try options.client.setMemory(name, currentMiB: mib)
            vmPrint("VM '\(name)' memory set to \(mib) MiB")
        }
    }
}

struct VMEventsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "events",
        abstract: "Print the daemon's events (one JSON object a line) as they happen.")
    @ParentCommand var parent: VMCommand
    var options: VMSocketOptions { parent.options }
    @Option(help: "Stop after this many events.") var count: Int?
    @Option(help: "Stop after this many seconds.") var timeout: Double?
    @Option(help: "First replay the stored events with a sequence number above this.") var since: Int?

    func validate() throws {
        if let count, count <= 0 { throw ValidationError("invalid --count \(count): expected a positive number") }
        if let timeout, !(timeout > 0 && timeout.isFinite) { throw ValidationError("invalid --timeout \(timeout): expected seconds > 0") }
        if let since, since < 0 { throw ValidationError("invalid --since \(since): expected a sequence number >= 0") }
    }

    func run() throws {
        let limit = count
        final class Counter: @unchecked Sendable { var seen = 0 }
        let counter = Counter()
        try vmRun { () throws(ManagerError) in
            try options.client.events(since: since, duration: timeout) { line in
                guard !line.isEmpty else { return true }
                vmPrint(line)
                counter.seen += 1
                return limit.map { counter.seen < $0 } ?? true
            }
        }
    }
}
