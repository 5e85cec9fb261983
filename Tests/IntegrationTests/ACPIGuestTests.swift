import Foundation
import Testing

// SMP and ACPI under `swiftkvm run` (issue 4, part 1): the acpi guest program reads the tables
// as an OS does and powers off through the PM1a control register (S5) or resets through
// RESET_REG; the smp program (GuestProgramTests.swift) starts every AP from the MADT.

@Suite("ACPI power-off and --cpus limits", .serialized,
       .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"))
struct ACPIGuestTests {
    @Test("acpi: the tables pass an OS's checks and an S5 write powers the machine off at once (exit status 0)",
          arguments: [1, 2, 4])
    func poweroff(cpus: Int) throws {
        let r = try runGuestProgram(programArguments("acpi", cmdline: "cpus=\(cpus)") + ["--cpus", "\(cpus)"])
        #expect(r.status == 0, "exit status after an ACPI power-off\n\(r.command)\n\(r.output)")
        #expect(r.failLines.isEmpty, "\(r.output)")
        for check in ["rsdp", "rsdp-v2", "fadt", "fadt-layout", "dsdt", "facs", "reset-register", "s5-package",
                      "madt-cpus", "sci-enabled", "pm1-enable"] {
            #expect(r.okNames.contains(check), "missing `ok \(check)`\n\(r.output)")
        }
        #expect(r.output.contains("ACPI-POWEROFF"), "\(r.output)")
        #expect(!r.output.contains("RESULT"), "the program ran on after the S5 write\n\(r.output)")
    }

    @Test("acpi: without the power-off the program ends through the debug-exit port with every check passed")
    func noop() throws {
        let r = try runGuestProgram(programArguments("acpi", cmdline: "noop cpus=2") + ["--cpus", "2"])
        expectPass(r, checks: ["rsdp", "fadt", "s5-package", "madt-cpus"])
    }

    @Test("acpi: RESET_REG resets the machine (exit status 8 with --on-reboot exit)")
    func reset() throws {
        let r = try runGuestProgram(programArguments("acpi", cmdline: "reset") + ["--on-reboot", "exit"])
        #expect(r.output.contains("ACPI-RESET"), "\(r.output)")
        #expect(r.status == 8, "exit status after a reset\n\(r.command)\n\(r.output)")
    }

    @Test("smp: APs halted with interrupts off while the BSP keeps running are not a power-off")
    func apsHaltedBSPRuns() throws {
        let r = try runGuestProgram(programArguments("smp", cmdline: "cpus=4 linger=500") + ["--cpus", "4"])
        expectPass(r, checks: ["all-aps-started", "bsp-alive"])
    }

    @Test("smp: every vCPU halted with interrupts off, or never started, is a power-off (status 0)",
          arguments: ["cpus=4 haltall", "cpus=4 nostart haltall"])
    func allHalted(cmdline: String) throws {
        let r = try runGuestProgram(programArguments("smp", cmdline: cmdline) + ["--cpus", "4"])
        #expect(r.output.contains("SMP-HALTALL"), "\(r.output)")
        #expect(r.failLines.isEmpty, "\(r.output)")
        #expect(r.status == 0, "exit status after a power-off by halt\n\(r.command)\n\(r.output)")
    }

    @Test("--cpus outside 1...32 is a usage error naming the option and the limit", arguments: ["0", "999", "33", "two"])
    func badCPUCount(value: String) throws {
        let r = try ProcessRunner.runSwiftKVM(["run", "--kernel", GuestTestEnvironment.guestImage("acpi"), "--cpus", value],
                                              timeout: 30)
        #expect(r.status == 2, "status \(r.status), stderr \(r.stderr)")
        #expect(r.stderr.contains("--cpus") && r.stderr.contains("32"), "stderr: \(r.stderr)")
        #expect(r.stdout.isEmpty)
    }
}
