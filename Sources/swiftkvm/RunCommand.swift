import ArgumentParser

/// `swiftkvm run` (placeholder until implemented).
struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "run", abstract: "Not implemented yet.")
    func run() throws { throw ValidationError("swiftkvm run is not implemented yet") }
}
