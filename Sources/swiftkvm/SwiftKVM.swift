import API
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
        subcommands: [RunCommand.self, CheckCommand.self, ImgCommand.self, VMMCommand.self, VMCommand.self, NetCommand.self, DaemonCommand.self]
    )

    /// Parses and runs the command. Usage errors (unknown options, bad values) print one line
    /// and exit with status 2, the code SwiftKVM documents for bad usage or input.
    static func main() {
        // `swiftkvm vmm` / `firecracker` with the usual options: skip ArgumentParser's reflection
        // (a quarter of the start-up CPU time); anything else is parsed below as before.
        let args = CommandLine.arguments
        let isFirecracker = args.first.map { $0 == "firecracker" || $0.hasSuffix("/firecracker") } ?? false
        if isFirecracker || (args.count > 1 && args[1] == "vmm"),
           let options = VMMArguments.parse(args.dropFirst(isFirecracker ? 1 : 2)) {
            Glibc.exit(VMMProcess.run(options))
        }
        // Installed as (or symlinked to) `firecracker`: behave as `swiftkvm vmm`.
        if isFirecracker {
            do {
                var command = try VMMCommand.parseAsRoot(Array(CommandLine.arguments.dropFirst()))
                try command.run()
            } catch {
                if VMMCommand.exitCode(for: error) == .validationFailure {
                    let line = "firecracker: error: \(VMMCommand.message(for: error))\n"
                    _ = line.withCString { write(2, $0, strlen($0)) }
                    Glibc.exit(2)
                }
                VMMCommand.exit(withError: error)
            }
        }
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch {
            if exitCode(for: error) == .validationFailure {
                let line = "swiftkvm: error: \(message(for: error))\n"
                _ = line.withCString { write(2, $0, strlen($0)) }
                // `img check` keeps 2 for "corruptions found", as qemu-img does: its usage errors exit 1.
                Glibc.exit(CommandLine.arguments.dropFirst().starts(with: ["img", "check"]) ? 1 : 2)
            }
            exit(withError: error)
        }
    }
}
