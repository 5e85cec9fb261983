import ArgumentParser

/// `swiftkvm img` (placeholder until implemented).
struct ImgCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "img", abstract: "Not implemented yet.")
    func run() throws { throw ValidationError("swiftkvm img is not implemented yet") }
}
