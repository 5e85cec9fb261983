import Foundation
import Testing

/// Process start-up: Foundation (with ICU) costs a large share of `swiftkvm vmm`'s start-up, so the
/// product code uses FoundationEssentials only. This keeps a stray `import Foundation` out.
@Suite("Start-up dependencies")
struct StartupDependencyTests {
    static let sources = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Sources")

    @Test("no Swift file under Sources/ imports Foundation (FoundationEssentials only)")
    func noFoundationImport() throws {
        let files = try #require(FileManager.default.enumerator(atPath: Self.sources.path)?.allObjects as? [String])
            .filter { $0.hasSuffix(".swift") }
        #expect(files.count > 50, "the Sources folder was not found at \(Self.sources.path)")
        var offenders: [String] = []
        for file in files {
            let text = try String(contentsOf: Self.sources.appendingPathComponent(file), encoding: .utf8)
            for line in text.split(separator: "\n") {
                let words = line.split(separator: " ").filter { !$0.hasPrefix("@") }
                if words.count >= 2, words[0] == "import" || words.dropFirst().first == "import" {
                    let module = words.last.map { $0.split(separator: ".").first.map(String.init) ?? "" } ?? ""
                    if module == "Foundation" { offenders.append("\(file): \(line)") }
                }
            }
        }
        #expect(offenders.isEmpty, "import FoundationEssentials instead: \(offenders)")
    }
}
