import ArgumentParser

/// The `swiftkvm` command: a KVM virtual machine monitor, disk-image tool and manager.
@main
struct SwiftKVM: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "swiftkvm",
        abstract: "A virtualization stack on Linux KVM.",
        subcommands: [RunCommand.self, CheckCommand.self, ImgCommand.self]
    )
}
