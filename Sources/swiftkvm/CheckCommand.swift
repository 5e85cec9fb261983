import ArgumentParser

/// `swiftkvm check` (placeholder until implemented).
struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "check", abstract: "Not implemented yet.")
    func run() throws { throw ValidationError("swiftkvm check is not implemented yet") }
}
