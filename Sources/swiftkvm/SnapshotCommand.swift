import ArgumentParser
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// `swiftkvm snapshot`: tools for snapshot files (docs/SNAPSHOT.md).
struct SnapshotCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "Inspect snapshot files and merge Diff snapshots onto their base.",
        subcommands: [SnapshotInfoCommand.self, SnapshotMergeCommand.self])
}

/// Prints one line to stderr and exits with `code`.
private func snapshotFail(_ error: any Error, code: Int32) -> ExitCode {
    let line = "swiftkvm: error: \(error)\n"
    _ = line.withCString { write(STDERR_FILENO, $0, strlen($0)) }
    return ExitCode(code)
}

struct SnapshotInfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info",
        abstract: "Show what a snapshot state file holds (checked: header, version, checksum).",
        discussion: "Exit status 0, or 2 when the file is not a readable snapshot (the message names the problem).")
    @Argument(help: "The state file (snapshot_path, or DIR/snapshot).") var path: String

    func run() throws {
        let s: MachineSnapshot
        do { s = try SnapshotFile.read(path) } catch { throw snapshotFail(error, code: 2) }
        var lines = [
            "kind:     \(s.diffRanges == nil ? "Full" : "Diff")",
            "memory:   \(s.memorySize) bytes (\(s.memorySize >> 20) MiB)",
            "vCPUs:    \(s.vcpus.count)",
            "devices:  \(s.devices.map(\.id).joined(separator: ", "))",
        ]
        if let ranges = s.diffRanges {
            lines.append("diff:     \(ranges.reduce(0) { $0 + $1.length }) bytes in \(ranges.count) ranges")
        }
        if case .kernel(let kernel, _, _, _) = s.config.payload { lines.append("kernel:   \(kernel)") }
        if !s.config.disks.isEmpty { lines.append("disks:    \(s.config.disks.map(\.path).joined(separator: ", "))") }
        print(lines.joined(separator: "\n"))
    }
}

struct SnapshotMergeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "merge",
        abstract: "Copy a Diff snapshot's pages onto the memory file of its base (Firecracker's rebase-snap).",
        discussion: """
        BASE-MEMORY is written in place: afterwards it holds guest RAM as of the Diff, and loads with the \
        Diff's state file (PUT /snapshot/load). Apply Diffs in the order they were taken. Exit status 0, or 2 \
        with a message naming the file and the problem: a file missing or of the wrong size, or a state file \
        that is not a Diff (checked before anything is written), or a read or write that failed.
        """)
    @Argument(help: "The base's memory file (a Full snapshot's, or one already merged).") var baseMemory: String
    @Argument(help: "The Diff snapshot's state file.") var diffSnapshot: String
    @Argument(help: "The Diff snapshot's memory file.") var diffMemory: String

    func run() throws {
        do {
            let r = try SnapshotIO.mergeDiff(baseMemory: baseMemory, diffState: diffSnapshot, diffMemory: diffMemory)
            print("merged \(r.bytes) bytes in \(r.ranges) ranges into \(baseMemory)")
        } catch let e as VMMError where e.isUsageError {
            throw snapshotFail(e, code: 2)
        } catch {
            throw snapshotFail(error, code: 1)
        }
    }
}
