import ArgumentParser
#if canImport(Glibc)
import Glibc
#endif

/// The `swiftkvm` command: a KVM virtual machine monitor, disk-image tool and manager.
@main
struct SwiftKVM: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "swiftkvm",
        abstract: "A virtualization stack on Linux KVM.",
        subcommands: [RunCommand.self, CheckCommand.self, ImgCommand.self]
    )

    /// Parses and runs the command. Usage errors (unknown options, bad values) print one line
    /// and exit with status 2, the code SwiftKVM documents for bad usage or input.
    static func main() {
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch {
            if exitCode(for: error) == .validationFailure {
                let line = "swiftkvm: error: \(message(for: error))\n"
                _ = line.withCString { write(2, $0, strlen($0)) }
                Glibc.exit(2)
            }
            exit(withError: error)
        }
    }
}
