import Foundation
import Testing
import VMM

/// One boot of the lean Linux guest (no virtio devices) through `swiftkvm vmm`'s API, snapshotted
/// at its shell right after a command's output (timers armed: the shell waits for the terminal's
/// answer to its cursor query), then loaded into a second `swiftkvm vmm` process: the restored
/// shell answers a command within seconds, and its clock went on (uptime larger than at the
/// snapshot, not reset). Before the LAPIC was restored ahead of the MSRs, this hung: the
/// TSC-deadline timer was lost.
@Suite("Linux: a guest snapshotted at its shell answers in a new process", .serialized,
       .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"),
       .enabled(if: !LinuxBoot.skipRequested, "SWIFTKVM_SKIP_LINUX=1"))
struct LinuxSnapshotTests {
    @Test("boot, shell, pause, snapshot/create; a new vmm loads it with resume_vm and the shell runs a command in seconds",
          .timeLimit(.minutes(20)))
    func restoreAtShell() throws {
        let root = GuestTestEnvironment.repoRoot.path
        let kernel = root + "/assets/lean/vmlinux", initrd = root + "/assets/" + DefaultGuest.initrdName
        try #require(FileManager.default.fileExists(atPath: kernel), "assets/lean/vmlinux missing: run scripts/guest-kernel")
        try #require(FileManager.default.fileExists(atPath: initrd), "assets/initramfs.cpio missing: run scripts/guest-assets")
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath, "swiftkvm executable not found")
        let dir = MCTempDir(prefix: "lsnap")
        defer { dir.remove() }
        let args = DefaultGuest.leanCmdline + " " + TimeDilation.cmdlineParameters(factor: 10, hostTSCkHz: MCSupport.tscKHz)

        let first = try MCChild(swiftkvm, ["vmm", "--api-sock", dir.path + "/a.sock", "--level", "Info"], stdinPipe: true)
        defer { first.stop() }
        #expect(MCSupport.wait(seconds: 10) { FileManager.default.fileExists(atPath: dir.path + "/a.sock") })
        #expect(MCSupport.apiCall(dir.path + "/a.sock", "PUT", "/boot-source",
                                  #"{"kernel_image_path": "\#(kernel)", "initrd_path": "\#(initrd)", "boot_args": "\#(args)"}"#) == "204")
        #expect(MCSupport.apiCall(dir.path + "/a.sock", "PUT", "/machine-config", #"{"vcpu_count": 1, "mem_size_mib": 256}"#) == "204")
        #expect(MCSupport.apiCall(dir.path + "/a.sock", "PUT", "/actions", #"{"action_type": "InstanceStart"}"#) == "204")
        let ready = first.stdout.waitFor(LinuxBoot.readyMarker, timeout: LinuxBoot.bootTimeout)
        try #require(ready, "no \(LinuxBoot.readyMarker): \(first.stdout.text.suffix(2000))")
        Thread.sleep(forTimeInterval: 2)
        first.writeInput("cat /proc/uptime; echo before-$((1+1))\n")
        #expect(first.stdout.waitFor("before-2", timeout: 120), "\(first.stdout.text.suffix(500))")
        // Paused right after the command's output, while the shell is still writing its prompt and
        // has a timer armed for the terminal's answer to its cursor query (ESC[6n).
        let uptimeBefore = Self.lastUptime(first.stdout.text)
        #expect(MCSupport.apiCall(dir.path + "/a.sock", "PATCH", "/vm", #"{"state": "Paused"}"#) == "204")
        #expect(MCSupport.apiCall(dir.path + "/a.sock", "PUT", "/snapshot/create",
                                  #"{"snapshot_path": "\#(dir.path)/vm.snap", "mem_file_path": "\#(dir.path)/vm.mem"}"#) == "204")
        first.stop()

        let second = try MCChild(swiftkvm, ["vmm", "--api-sock", dir.path + "/b.sock", "--level", "Info"], stdinPipe: true)
        defer { second.stop() }
        #expect(MCSupport.wait(seconds: 10) { FileManager.default.fileExists(atPath: dir.path + "/b.sock") })
        let loadStart = Date()
        #expect(MCSupport.apiCall(dir.path + "/b.sock", "PUT", "/snapshot/load",
                                  #"{"snapshot_path": "\#(dir.path)/vm.snap", "mem_backend": {"backend_type": "File", "backend_path": "\#(dir.path)/vm.mem"}, "resume_vm": true}"#) == "204")
        // The shell may have been waiting for the answer to its cursor-position query (ESC[6n) at the
        // snapshot and take the first line as that answer: send the command again until it runs.
        var answered = false
        for _ in 0..<12 where !answered {
            second.writeInput("cat /proc/uptime; echo restored-$((40+2))\n")
            answered = second.stdout.waitFor("restored-42", timeout: 5)
        }
        let seconds = Date().timeIntervalSince(loadStart)
        #expect(answered, "the restored shell did not answer: \(second.stdout.text.suffix(1000)) / \(second.stderr.text.suffix(500))")
        #expect(seconds < 30, "the restored shell answered after \(seconds) s")
        let uptimeAfter = Self.lastUptime(second.stdout.text)
        #expect(uptimeBefore != nil && uptimeAfter != nil && uptimeAfter! >= uptimeBefore!,
                "the guest clock went on: uptime \(String(describing: uptimeBefore)) before, \(String(describing: uptimeAfter)) after")
        #expect(!second.stdout.text.contains("Kernel panic"))
    }

    /// The first number of the last `/proc/uptime` line in `text`.
    static func lastUptime(_ text: String) -> Double? {
        text.split(whereSeparator: \.isNewline).reversed().lazy.compactMap { line -> Double? in
            let parts = line.split(separator: " ")
            guard parts.count == 2, let a = Double(parts[0]), Double(parts[1]) != nil else { return nil }
            return a
        }.first
    }
}
