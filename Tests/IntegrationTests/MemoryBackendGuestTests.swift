import Foundation
import Testing

/// `swiftkvm run --memory SIZE,ksm=on,hugepages=… --memory-backend memfd|file=PATH` with a real
/// guest: the ticker runs to its end on each backend, and with a file backend the guest's RAM
/// (its loaded code and strings) is in the file.
@Suite("Guest RAM backends under swiftkvm run", .serialized,
       .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"))
struct MemoryBackendGuestTests {
    static let tickerArgs = MCSupport.tickerArgs(ticks: 3)

    @Test("the ticker runs to its end on memfd, on a file (which then holds its RAM), with KSM and with transparent huge pages")
    func backends() throws {
        let ticker = try #require(MCSupport.ticker, "guest programs not built: \(GuestTestEnvironment.guestBuildError ?? "")")
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("swk-membackend-\(getpid())").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let ram = dir + "/guest.ram"
        for (memory, backend) in [("64M", "memfd"), ("64M,ksm=on", "file=\(ram)"), ("64M,hugepages=thp", "anon")] {
            let r = try ProcessRunner.runSwiftKVM(["run", "--kernel", ticker, "--cmdline", Self.tickerArgs,
                                                   "--memory", memory, "--memory-backend", backend])
            #expect(r.status == 0, "--memory \(memory) --memory-backend \(backend): status \(r.status)\n\(r.stderr.suffix(600))")
            #expect(r.stdout.contains("TICKER-DONE"), "\(r.stdout.suffix(300))")
        }
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: ram)))
        #expect(bytes.count == 64 << 20, "the file is the guest's 64 MiB of RAM")
        let needle = Array("TICKER-DONE".utf8)
        let found = bytes.indices.dropLast(needle.count).contains { i in bytes[i] == needle[0] && Array(bytes[i..<i + needle.count]) == needle }
        #expect(found, "the ticker's strings, loaded into guest RAM, are in the backing file")
    }

    @Test("bad backends exit 2 naming the option, and leave no file behind", arguments: [
        (["--memory", "64M,ksm=maybe"], "ksm=maybe"),
        (["--memory", "64M,hugepages=giant"], "hugepages=giant"),
        (["--memory", "64M,color=red"], "color"),
        (["--memory-backend", "tape"], "--memory-backend"),
        (["--memory-backend", "file="], "--memory-backend"),
        (["--memory", "64M,hugepages=hugetlbfs", "--memory-backend", "file=/tmp/swk-never-created.ram"], "hugetlbfs"),
    ])
    func badInput(args: [String], mentions: String) throws {
        let ticker = try #require(MCSupport.ticker, "guest programs not built: \(GuestTestEnvironment.guestBuildError ?? "")")
        let r = try ProcessRunner.runSwiftKVM(["run", "--kernel", ticker, "--cmdline", Self.tickerArgs] + args)
        #expect(r.status == 2, "\(args): status \(r.status) \(r.stderr)")
        #expect(r.stderr.contains(mentions), "\(args): \(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: "/tmp/swk-never-created.ram"))
    }
}
