import Foundation
import Testing
import VMM

/// The lean Linux guest's virtio_balloon driver against our device, driven through Firecracker's
/// `/balloon` API and judged by the vmm's host RSS and the guest's /proc/meminfo.
@Suite("Linux: virtio-balloon returns guest memory to the host", .serialized,
       .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"),
       .enabled(if: !LinuxBoot.skipRequested, "SWIFTKVM_SKIP_LINUX=1"))
struct LinuxBalloonTests {
    /// A booted lean guest in a `swiftkvm vmm` with a balloon configured by `balloon` (JSON).
    final class Guest {
        let dir = MCTempDir(prefix: "lbal")
        let vmm: MCChild
        var sock: String { dir.path + "/a.sock" }

        init(balloon: String) throws {
            let root = GuestTestEnvironment.repoRoot.path
            let kernel = root + "/assets/lean/vmlinux", initrd = root + "/assets/" + DefaultGuest.initrdName
            try #require(FileManager.default.fileExists(atPath: kernel), "assets/lean/vmlinux missing: run scripts/guest-kernel")
            try #require(FileManager.default.fileExists(atPath: initrd), "assets/initramfs.cpio missing: run scripts/guest-assets")
            let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath, "swiftkvm executable not found")
            let args = DefaultGuest.leanCmdline + " " + TimeDilation.cmdlineParameters(factor: 10, hostTSCkHz: MCSupport.tscKHz)
            vmm = try MCChild(swiftkvm, ["vmm", "--api-sock", dir.path + "/a.sock", "--level", "Info"], stdinPipe: true)
            try #require(MCSupport.wait(seconds: 10) { FileManager.default.fileExists(atPath: dir.path + "/a.sock") })
            try #require(MCSupport.apiCall(sock, "PUT", "/boot-source",
                                           #"{"kernel_image_path": "\#(kernel)", "initrd_path": "\#(initrd)", "boot_args": "\#(args)"}"#) == "204")
            try #require(MCSupport.apiCall(sock, "PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 256}"#) == "204")
            try #require(MCSupport.apiCall(sock, "PUT", "/balloon", balloon) == "204")
            try #require(MCSupport.apiCall(sock, "PUT", "/actions", #"{"action_type": "InstanceStart"}"#) == "204")
            let ready = vmm.stdout.waitFor(LinuxBoot.readyMarker, timeout: LinuxBoot.bootTimeout)
            try #require(ready, "no \(LinuxBoot.readyMarker): \(vmm.stdout.text.suffix(2000))")
            Thread.sleep(forTimeInterval: 2)
        }

        deinit {
            vmm.stop()
            dir.remove()
        }

        private var serial = 0
        /// Runs `command` in the guest's shell and returns what it printed (up to the end marker).
        func shell(_ command: String, timeout: Double = 180) -> String? {
            serial += 1
            let marker = "done-\(serial)-\(serial * 7)"
            let start = vmm.stdout.text.count
            vmm.writeInput("\(command); echo done-\(serial)-$((\(serial)*7))\n")
            guard vmm.stdout.waitFor(marker, timeout: timeout) else { return nil }
            return String(vmm.stdout.text.dropFirst(start))
        }

        /// The guest's MemTotal in KiB.
        func memTotalKiB() -> Int? {
            guard let out = shell("grep MemTotal /proc/meminfo") else { return nil }
            for line in out.split(whereSeparator: \.isNewline) where line.hasPrefix("MemTotal:") {
                return Int(line.split(separator: " ").dropFirst().first ?? "")
            }
            return nil
        }

        var rssMiB: Int { (MCSupport.rssKiB(vmm.pid) ?? 0) / 1024 }

        /// A GET's JSON object (nil: failed).
        func get(_ path: String) -> [String: Any]? {
            guard let body = MCSupport.apiGet(sock, path) else { return nil }
            return (try? JSONSerialization.jsonObject(with: Data(body.utf8))) as? [String: Any]
        }

        /// `actual_mib` from GET /balloon/statistics.
        func actualMiB() -> Int? { get("/balloon/statistics")?["actual_mib"] as? Int }
    }

    /// 160 MiB written to and deleted from the guest's RAM-backed root file system: host RSS
    /// holds those pages until something gives them back.
    static let fill = "dd if=/dev/zero of=/fill bs=1M count=160 2>/dev/null; rm /fill"

    @Test("inflate: the guest hands over 160 MiB (actual_mib, MemTotal drop) and host RSS falls; deflate: they come back and RSS grows when the guest uses them; stats arrive",
          .timeLimit(.minutes(20)))
    func inflateDeflate() throws {
        let g = try Guest(balloon: #"{"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1}"#)
        let totalBefore = try #require(g.memTotalKiB(), "no MemTotal: \(g.vmm.stdout.text.suffix(500))")
        #expect(g.shell(Self.fill) != nil, "the fill did not finish: \(g.vmm.stdout.text.suffix(500))")
        let rssFull = g.rssMiB

        #expect(MCSupport.apiCall(g.sock, "PATCH", "/balloon", #"{"amount_mib": 160}"#) == "204")
        #expect(MCSupport.wait(seconds: 120) { g.actualMiB() == 160 }, "actual_mib \(String(describing: g.actualMiB())) after 120 s")
        let rssInflated = g.rssMiB
        let totalInflated = try #require(g.memTotalKiB())
        print("# balloon: RSS \(rssFull) MiB after the fill, \(rssInflated) MiB inflated to 160 MiB; MemTotal \(totalBefore) → \(totalInflated) KiB")
        #expect(rssFull - rssInflated >= 100, "host RSS fell from \(rssFull) to \(rssInflated) MiB only")
        #expect(totalBefore - totalInflated >= 150 * 1024, "MemTotal \(totalBefore) → \(totalInflated) KiB")

        let stats = g.get("/balloon/statistics") ?? [:]
        #expect((stats["total_memory"] as? Int ?? 0) > 0 && stats["free_memory"] is Int && stats["target_mib"] as? Int == 160,
                "statistics: \(stats)")
        #expect(g.get("/balloon")?["amount_mib"] as? Int == 160)

        #expect(MCSupport.apiCall(g.sock, "PATCH", "/balloon", #"{"amount_mib": 0}"#) == "204")
        #expect(MCSupport.wait(seconds: 120) { g.actualMiB() == 0 }, "actual_mib \(String(describing: g.actualMiB())) after 120 s")
        let totalDeflated = try #require(g.memTotalKiB())
        #expect(totalDeflated == totalBefore, "MemTotal \(totalBefore) → \(totalDeflated) KiB after deflating")
        #expect(g.shell(Self.fill) != nil)
        let rssRefilled = g.rssMiB
        print("# balloon: deflated, refilled: RSS \(rssRefilled) MiB")
        #expect(rssRefilled - rssInflated >= 100, "host RSS grew from \(rssInflated) to \(rssRefilled) MiB only")

        // Bad input: more than the guest has, and a field Firecracker does not know.
        #expect(MCSupport.apiCall(g.sock, "PATCH", "/balloon", #"{"amount_mib": 4096}"#) == "400")
        #expect(MCSupport.apiCall(g.sock, "PATCH", "/balloon", #"{"amount_mib": 1, "bogus": 2}"#) == "400")
        #expect(!g.vmm.stdout.text.contains("Kernel panic"))
    }

    @Test("free page reporting: memory the guest frees goes back to the host without any request",
          .timeLimit(.minutes(20)))
    func freePageReporting() throws {
        let g = try Guest(balloon: #"{"amount_mib": 0, "deflate_on_oom": true, "free_page_reporting": true}"#)
        let rssStart = g.rssMiB
        #expect(g.shell("dd if=/dev/zero of=/fill bs=1M count=160 2>/dev/null") != nil)
        let rssFull = g.rssMiB
        #expect(rssFull - rssStart >= 100, "the fill raised host RSS from \(rssStart) to \(rssFull) MiB only")
        #expect(g.shell("rm /fill") != nil)
        let returned = MCSupport.wait(seconds: 60) { rssFull - g.rssMiB >= 100 }
        print("# balloon: free page reporting: RSS \(rssStart) → \(rssFull) after the fill → \(g.rssMiB) MiB after rm")
        #expect(returned, "host RSS stayed at \(g.rssMiB) MiB (\(rssFull) after the fill) 60 s after the guest freed 160 MiB")
    }
}
