import Foundation
import Testing

private let kvmAvailable = FileManager.default.fileExists(atPath: "/dev/kvm")
private let binaryAvailable = ProcessRunner.swiftkvmPath != nil

@Suite("swiftkvm check", .enabled(if: binaryAvailable, "needs the swiftkvm executable (swift build)"), .serialized)
struct CheckCommandTests {
    @Test("on this host check passes, runs the probe and names what it found", .enabled(if: kvmAvailable, "needs /dev/kvm"))
    func realHost() throws {
        let r = try ProcessRunner.runSwiftKVM(["check"], timeout: 120)
        #expect(!r.timedOut)
        #expect(r.status == 0, "stdout:\n\(r.stdout)\nstderr:\n\(r.stderr)")
        let lines = r.stdout.split(separator: "\n").map(String.init)
        let checks = lines.filter { $0.hasPrefix("SwiftKVM: Checking ") }
        #expect(checks.count >= 15)
        for l in checks {
            #expect(l.contains(" ... : PASS") || l.contains(" ... : WARN") || l.contains(" ... : FAIL"), "\(l)")
        }
        #expect(checks.contains { $0.contains("KVM API version") && $0.contains(": PASS (12)") })
        #expect(checks.contains { $0.contains("capability IRQCHIP") })
        #expect(checks.contains { $0.contains("for hardware virtualization") })
        let userMode = try #require(checks.first { $0.contains("Checking guest user mode ") })
        #expect(userMode.contains("works natively") || userMode.contains("only through the PVM SYSCALL fix-up"), "\(userMode)")
        if FileManager.default.fileExists(atPath: "/sys/module/kvm_pvm") {
            // This project's hosts (HOST-KVM.md): syscall stays at CPL3 unless fixed up.
            #expect(checks.contains { $0.contains("syscall without fix-up") && $0.contains("CPL3") })
            #expect(checks.contains { $0.contains("syscall with PVM fix-up") && $0.contains(": PASS") && $0.contains("CPL0") })
            #expect(r.stdout.contains("PVM fix-ups active"))
        }
    }

    @Test("--output json gives the same verdict as a JSON document", .enabled(if: kvmAvailable, "needs /dev/kvm"))
    func json() throws {
        let r = try ProcessRunner.runSwiftKVM(["check", "--output", "json"], timeout: 120)
        #expect(r.status == 0, "\(r.stderr)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any])
        #expect(object["canRunGuests"] as? Bool == true)
        let report = try #require(object["report"] as? [String: Any])
        let items = try #require(report["items"] as? [[String: Any]])
        #expect(items.contains { ($0["what"] as? String) == "KVM API version" && ($0["status"] as? String) == "PASS" })
        let mode = report["userMode"] as? String
        #expect(mode == "native" || mode == "pvm-fixup")
    }

    @Test("a missing KVM device fails the host check with exit status 1 (swiftkvm-test-helper check-device)")
    func missingDevice() throws {
        let swiftkvm = try #require(ProcessRunner.swiftkvmPath, "swiftkvm executable not found")
        let helper = URL(fileURLWithPath: swiftkvm).deletingLastPathComponent().appendingPathComponent("swiftkvm-test-helper").path
        try #require(FileManager.default.isExecutableFile(atPath: helper), "\(helper) not built (swift build)")
        let r = try ProcessRunner.run(helper, ["check-device", "/nonexistent/kvm"], timeout: 60)
        #expect(r.status == 1, "\(r.stdout)\(r.stderr)")
        #expect(r.stdout.contains("SwiftKVM: Checking /nonexistent/kvm exists"))
        #expect(r.stdout.contains(": FAIL (not found"))
    }

    @Test("a bad --output value is a usage error (status 2, one line)")
    func badOutput() throws {
        let r = try ProcessRunner.runSwiftKVM(["check", "--output", "yaml"], timeout: 60)
        #expect(r.status == 2)
        #expect(r.stderrLines.count == 1, "\(r.stderr)")
    }
}
