import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Testing
import VMM

/// Network boot (issue 14): SeaBIOS finds iPXE in the virtio-net device's expansion ROM BAR and boots it; iPXE takes a
/// DHCP lease and TFTP files from dnsmasq inside a test namespace (NetworkNamespace: tap0 at 10.0.2.1/24, swiftkvm run
/// inside it, so no packet leaves), runs the iPXE script dnsmasq names, and that multiboot-loads a guest program with
/// a command line; the program reports through debug-exit.
/// Debian's dnsmasq (package dnsmasq-base).
private let dnsmasqPath = "/usr/sbin/dnsmasq"

@Suite("network boot: iPXE from the NIC's option ROM over DHCP and TFTP in a test namespace", .serialized,
       .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"),
       .enabled(if: FileManager.default.fileExists(atPath: "/usr/share/seabios/bios.bin"), "needs Debian's seabios"),
       .enabled(if: FileManager.default.fileExists(atPath: NetSpec.defaultROM), "needs Debian's ipxe-qemu (scripts/install-deps)"),
       .enabled(if: FileManager.default.isExecutableFile(atPath: dnsmasqPath), "needs dnsmasq-base (scripts/install-deps)"),
       .enabled(if: NetworkNamespace.available, "\(NetworkNamespace.unavailableReason ?? "")"))
struct NetworkBootTests {
    /// A namespace with tap0 and dnsmasq serving DHCP (10.0.2.10–20) and TFTP from a fresh directory holding the
    /// guest program `boot.elf` and `boot.ipxe`, the script DHCP names, which boots it with `cmdline`.
    struct Network {
        let ns: NetworkNamespace
        let tftp: URL
        let server: NetChild

        init(tag: String, cmdline: String) throws {
            ns = try NetworkNamespace(tag: tag)
            tftp = FileManager.default.temporaryDirectory.appendingPathComponent("swiftkvm-pxe-\(getpid())-\(tag)")
            do {
                try ns.addTap("tap0", address: "10.0.2.1/24")
                try FileManager.default.createDirectory(at: tftp, withIntermediateDirectories: true)
                try FileManager.default.copyItem(atPath: GuestTestEnvironment.guestImage("boot"), toPath: tftp.appendingPathComponent("boot.elf").path)
                try "#!ipxe\nkernel tftp://10.0.2.1/boot.elf \(cmdline)\nboot\n"
                    .write(to: tftp.appendingPathComponent("boot.ipxe"), atomically: true, encoding: .utf8)
                server = try ns.spawn([dnsmasqPath, "--no-daemon", "--conf-file=/dev/null", "--port=0",
                                       "--interface=tap0", "--bind-interfaces", "--dhcp-range=10.0.2.10,10.0.2.20,1h",
                                       "--dhcp-leasefile=\(tftp.path)/leases", "--enable-tftp", "--tftp-root=\(tftp.path)",
                                       "--dhcp-boot=boot.ipxe"])
            } catch {
                ns.remove()
                try? FileManager.default.removeItem(at: tftp)
                throw error
            }
            #expect(server.waitFor("TFTP root is", timeout: 10), "dnsmasq started: \(server.output)")
        }

        func remove() {
            ns.remove()
            try? FileManager.default.removeItem(at: tftp)
        }

        /// Runs `swiftkvm` with `args` inside the namespace.
        func run(_ args: [String], timeout: TimeInterval = 300) throws -> GuestReport {
            let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath, "swiftkvm executable not found")
            if let error = GuestTestEnvironment.guestBuildError { Issue.record("\(error)") }
            let start = Date()
            let child = try ns.spawn([swiftkvm] + args)
            let status = child.waitForExit(timeout: timeout)
            let report = GuestReport(status: status, output: child.output, command: child.commandLine)
            print("# network boot \(args.joined(separator: " ")): \(String(format: "%.1f", Date().timeIntervalSince(start))) s, status \(String(describing: status))")
            if status == nil { Issue.record("timed out after \(Int(timeout)) s: \(report.command)\n\(report.output)") }
            return report
        }
    }

    @Test("--boot n: SeaBIOS runs iPXE from the NIC's ROM BAR before an empty disk; iPXE gets a lease and TFTPs a script that multiboot-loads the program with its command line; the kvm front end's -boot n does the same")
    func pxe() throws {
        let net = try Network(tag: "pxe", cmdline: "booted-from=net")
        defer { net.remove() }
        let empty = net.tftp.appendingPathComponent("empty.raw").path
        _ = FileManager.default.createFile(atPath: empty, contents: Data(count: 16 << 20))
        let r = try net.run(["run", "--bios", "--memory", "128M", "--serial", "stdio", "--log-level", "info",
                             "--disk", "path=\(empty),format=raw", "--net", "tap=tap0", "--boot", "nc"])
        expectPass(r, checks: ["multiboot-magic", "cmdline"])
        #expect(r.output.contains("\"tftp://10.0.2.1/boot.elf booted-from=net\""), "\(r.output)")
        #expect(r.output.contains("firmware boot order: /pci@i0cf8/ethernet@2 /pci@i0cf8/scsi@1/disk@0,0"), "\(r.output)")
        #expect(r.output.contains("iPXE") && r.output.contains("using virtio-net"), "\(r.output)")
        #expect(net.server.output.contains("sent \(net.tftp.path)/boot.elf to 10.0.2."), "dnsmasq served the program: \(net.server.output)")

        // QEMU's command line: bootindex on the NIC puts it before the disk without -boot.
        let k = try net.run(["kvm", "-m", "128", "-hda", empty, "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
                             "-device", "virtio-net-pci,netdev=n0,bootindex=0", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        expectPass(k, checks: ["multiboot-magic", "cmdline"])
    }

    @Test("bad network-boot input exits 2 naming it: --boot n without a NIC, a missing romfile, a file that is no option ROM, bootindex on a NIC without a ROM",
          arguments: [("nonic", "'n' names no device"), ("missing", "romfile=/nonexistent.rom"), ("notrom", "not a PCI option ROM"),
                      ("norom", "has no boot ROM")])
    func badInput(kind: String, message: String) throws {
        let ns = try NetworkNamespace(tag: "pxebad")
        defer { ns.remove() }
        try ns.addTap("tap0")
        let junk = FileManager.default.temporaryDirectory.appendingPathComponent("swiftkvm-notrom-\(getpid()).bin").path
        _ = FileManager.default.createFile(atPath: junk, contents: Data(count: 4096))
        defer { unlink(junk) }
        let net: [String] = switch kind {
        case "nonic": []
        case "missing": ["--net", "tap=tap0,romfile=/nonexistent.rom"]
        case "notrom": ["--net", "tap=tap0,romfile=\(junk)"]
        default: ["--net", "tap=tap0,romfile=,bootindex=1"]
        }
        let swiftkvm = try #require(GuestTestEnvironment.swiftkvmPath, "swiftkvm executable not found")
        let child = try ns.spawn([swiftkvm, "run", "--bios", "--memory", "32M", "--boot", "n"] + net)
        let status = child.waitForExit(timeout: 60)
        #expect(status == 2, "status \(String(describing: status))\n\(child.output)")
        #expect(child.output.contains(message), "\(child.output)")
    }
}
