import ArgumentParser
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif
import VMM

/// `swiftkvm check`: validates the host like `virt-host-validate` — /dev/kvm, API version,
/// capabilities, vCPU and memory-slot limits, hardware vs PVM virtualization, decompression
/// libraries, and a user-mode probe guest run with and without the PVM SYSCALL fix-up.
/// Exits 0 when the host can run guests, 1 otherwise.
struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Check that this host can run SwiftKVM guests.",
        discussion: "Prints one line per check (PASS, WARN or FAIL) and the PVM fix-ups that will be active. "
            + "Exit status 0 when the host can run guests, 1 otherwise.")

    /// Output format.
    enum Format: String, ExpressibleByArgument, CaseIterable { case text, json }

    @Option(name: .customLong("output"), help: "Output format: text or json.")
    var format: Format = .text

    @Flag(name: .customLong("no-probe"), help: "Skip the user-mode probe guest.")
    var noProbe = false

    func run() throws {
        let report = HostCheck.evaluate(LiveHostFacts(), runProbe: !noProbe)
        switch format {
        case .text:
            print(report.text)
        case .json:
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            var data = try encoder.encode(JSONReport(report))
            data.append(0x0a)
            writeText(String(decoding: data, as: UTF8.self), to: STDOUT_FILENO)
        }
        if !report.canRunGuests { throw ExitCode(1) }
    }
}

/// The JSON form of the report (adds the overall verdict).
private struct JSONReport: Encodable {
    let canRunGuests: Bool
    let report: HostCheckReport
    init(_ r: HostCheckReport) { canRunGuests = r.canRunGuests; report = r }
}
