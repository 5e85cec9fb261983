import API
import CKVM
import ArgumentParser
#if canImport(Glibc)
import Glibc
#endif

/// The `swiftkvm` command: a KVM virtual machine monitor, disk-image tool and manager.
@main
struct SwiftKVM: ParsableCommand {
    /// The release this binary belongs to (`swiftkvm --version`, `swiftkvm img --version`).
    static let version = "swiftkvm 0.6.0"

    static let configuration = CommandConfiguration(
        commandName: "swiftkvm",
        abstract: "A virtualization stack on Linux KVM.",
        version: version,
        subcommands: [RunCommand.self, KVMCommand.self, CheckCommand.self, ImgCommand.self, SnapshotCommand.self, VMMCommand.self, VMCommand.self, NetCommand.self, DaemonCommand.self, JailerCommand.self]
    )

    /// Parses and runs the command. Usage errors (unknown options, bad values) print one line
    /// and exit with status 2, the code SwiftKVM documents for bad usage or input.
    static func main() {
        // Log lines carry a local timestamp, and glibc's strftime calls tzset(), which stats
        // /etc/localtime on every call while TZ is unset: a log line on a vCPU thread (whose seccomp
        // filter has no stat) then killed the process. With TZ naming the same zone file, tzset()
        // reads it once.
        if getenv("TZ") == nil { setenv("TZ", ":/etc/localtime", 0) }
        // `swiftkvm vmm` / `firecracker` with the usual options: skip ArgumentParser's reflection
        // (a quarter of the start-up CPU time); anything else is parsed below as before.
        let args = arguments
        let isFirecracker = args.first.map { $0 == "firecracker" || $0.hasSuffix("/firecracker") } ?? false
        if isFirecracker || (args.count > 1 && args[1] == "vmm"),
           let options = VMMArguments.parse(args.dropFirst(isFirecracker ? 1 : 2)) {
            Glibc.exit(VMMProcess.run(options))
        }
        // Installed as (or symlinked to) `firecracker`: behave as `swiftkvm vmm`.
        if isFirecracker { runAlone(VMMCommand.self, as: "firecracker", args) }
        // Installed as (or symlinked to) `jailer`: behave as `swiftkvm jailer`.
        if args.first.map({ $0 == "jailer" || $0.hasSuffix("/jailer") }) ?? false { runAlone(JailerCommand.self, as: "jailer", args) }
        // Installed as (or symlinked to) `kvm` or `qemu-system-x86_64`: QEMU's command line.
        if let name = args.first?.split(separator: "/").last.map(String.init), ["kvm", "qemu-system-x86_64"].contains(name) {
            runAlone(KVMCommand.self, as: name, args)
        }
        do {
            var command = try parseAsRoot(Array(args.dropFirst()))
            try command.run()
        } catch {
            if exitCode(for: error) == .validationFailure {
                let line = "swiftkvm: error: \(message(for: error))\n"
                _ = line.withCString { write(2, $0, strlen($0)) }
                // `img check` keeps 2 for "corruptions found", as qemu-img does: its usage errors exit 1.
                Glibc.exit(args.dropFirst().starts(with: ["img", "check"]) ? 1 : 2)
            }
            exit(withError: error)
        }
    }

    /// The program's arguments. Swift's `CommandLine.arguments` reads /proc/self/cmdline on Linux, so a process
    /// in a jail without /proc (a jailed `swiftkvm vmm`) would see none: then glibc's argv is used.
    static var arguments: [String] {
        let fromSwift = CommandLine.arguments
        guard fromSwift.isEmpty, ckvm_argc() > 0, let argv = ckvm_argv() else { return fromSwift }
        return (0..<Int(ckvm_argc())).compactMap { argv[$0].map { String(cString: $0) } }
    }

    /// Runs `command` as the whole program (the binary was installed under its name): a usage error
    /// prints one line prefixed with `name` and exits 2.
    static func runAlone<C: ParsableCommand>(_ command: C.Type, as name: String, _ args: [String]) -> Never {
        do {
            var parsed = try C.parseAsRoot(Array(args.dropFirst()))
            try parsed.run()
            Glibc.exit(0)
        } catch {
            if C.exitCode(for: error) == .validationFailure {
                let line = "\(name): error: \(C.message(for: error))\n"
                _ = line.withCString { write(2, $0, strlen($0)) }
                Glibc.exit(2)
            }
            C.exit(withError: error)
        }
    }
}
