import Foundation
import Testing
import VMM
#if canImport(Glibc)
import Glibc
#endif

// One Linux boot as a VM of the daemon on a nat network the daemon made, all inside a test
// network namespace (NetDaemon): the default initramfs on the lean kernel runs udhcpc on eth0,
// dnsmasq hands out the lease, `swiftkvm net dhcp-leases` lists it, and the guest pings its gateway.

@Suite("swiftkvm net with a Linux guest: a DHCP lease from the daemon's dnsmasq", .serialized,
       .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"),
       .enabled(if: !LinuxBoot.skipRequested, "SWIFTKVM_SKIP_LINUX=1"),
       .enabled(if: NetDaemon.unavailableReason == nil, "\(NetDaemon.unavailableReason ?? "")"))
struct NetManagerLinuxTests {
    @Test("the lean guest, a daemon VM with a NIC on a nat network, gets a DHCP lease that net dhcp-leases lists, and pings the gateway",
          .timeLimit(.minutes(20)))
    func leaseFromNetwork() throws {
        let root = GuestTestEnvironment.repoRoot
        let kernel = root.appendingPathComponent("assets/lean/vmlinux").path
        let initrd = root.appendingPathComponent("assets/initramfs.cpio").path
        try #require(FileManager.default.fileExists(atPath: kernel), "assets/lean/vmlinux missing: run scripts/guest-kernel")
        try #require(FileManager.default.fileExists(atPath: initrd), "assets/initramfs.cpio missing: run scripts/guest-assets")
        let d = try NetDaemon(tag: "netlin")
        defer { d.stop() }
        _ = try d.net(["define", d.file("lab.json", NetManagerTests.natDefinition)])
        #expect(try d.net(["start", "lab"]).status == 0)
        // The vmm has no --time-dilation: its command-line half (no kvmclock, a 10x TSC) goes in boot_args.
        let cmdline = DefaultGuest.leanCmdline + " " + TimeDilation.cmdlineParameters(factor: 10, hostTSCkHz: TimeDilation.hostTSCkHz())
        let mac = "52:54:00:77:00:99"
        let def = d.file("linux.json", """
            {"name": "linux", "nics": [{"network": "lab", "mac": "\(mac)"}], "shutdown_timeout_s": 5,
             "boot-source": {"kernel_image_path": "\(kernel)", "initrd_path": "\(initrd)", "boot_args": "\(cmdline)"},
             "machine-config": {"vcpu_count": 1, "mem_size_mib": 256}}
            """)
        #expect(try d.vm(["define", def]).status == 0)
        let r = try d.vm(["start", "linux"])
        #expect(r.status == 0, "\(r.stderr)")
        let serialLog = d.dir.path + "/logs/linux.serial.log"
        func serial() -> String { ((try? String(contentsOfFile: serialLog, encoding: .utf8)) ?? "").replacingOccurrences(of: "\r", with: "") }
        let ready = MCSupport.wait(seconds: LinuxBoot.bootTimeout) { serial().contains(LinuxBoot.readyMarker) }
        try #require(ready, "no \(LinuxBoot.readyMarker): \(serial().suffix(3000))")
        // init prints "init: eth0 MAC ADDRESS/PREFIX" once udhcpc configured it.
        let line = serial().split(separator: "\n").first { $0.hasPrefix("init: eth0 ") }.map(String.init) ?? ""
        let guestIP = line.split(separator: " ").dropFirst(3).first.map { String($0.split(separator: "/")[0]) } ?? ""
        #expect(line.contains(mac) && guestIP.hasPrefix("10.77.0."), "\(line)\n\(serial().suffix(2000))")

        let leases = try d.net(["dhcp-leases", "lab"])
        let row = leases.stdout.split(separator: "\n").first { $0.contains(mac) }.map(String.init) ?? ""
        #expect(!guestIP.isEmpty && row.contains("\(guestIP)/24") && row.contains("ipv4"), "\(leases.stdout)\(leases.stderr)")

        let console = try MCConsoleClient(path: d.dir.path + "/run/linux/console.sock")
        defer { console.close() }
        console.send("ping -c 2 -W 10 10.77.0.1 >/dev/null && echo gw-ok-$((40+2))\n")
        let pinged = MCSupport.wait(seconds: 240) { console.reader?.text.contains("gw-ok-42") == true }
        #expect(pinged, "the guest should reach its gateway: \(console.reader?.text.suffix(1000) ?? "")")

        #expect(try d.vm(["destroy", "linux"]).status == 0)
        #expect(MCSupport.wait(seconds: 5) { d.links().sorted() == ["lo", "swk-lab"] }, "the TAP goes with the VM: \(d.links())")
        #expect(try d.net(["stop", "lab"]).status == 0)
        #expect(d.links().sorted() == ["lo"] && !d.nftTables().contains("swiftkvm"))
    }
}
