import Foundation
import Testing
import VMM

// The PC pieces standard x86 test kernels expect (issue 14): fw_cfg, the RTC's update cycle and
// interrupts, and the ACPI PM timer, each checked by a freestanding guest program.
@Suite("PC devices under swiftkvm run (fw_cfg, RTC, PM timer)", .serialized,
       .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"))
struct PCGuestTests {
    @Test("fwcfg: signature, ID with DMA, CPU count, RAM size, the file directory and DMA reads reach the guest",
          arguments: [(1, 64), (3, 192)])
    func fwcfg(cpus: Int, ramMB: Int) throws {
        let r = try runGuestProgram(programArguments("fwcfg", cmdline: "cpus=\(cpus) ram_mb=\(ramMB)")
                                    + ["--cpus", "\(cpus)", "--memory", "\(ramMB)M"])
        expectPass(r, checks: ["signature", "id-dma", "dma-signature", "cpu-count", "ram-size", "numa-none", "file-dir",
                               "dma-read", "e820-ram", "dma-skip", "dma-write-refused"])
        #expect(r.lines.contains("FWCFG cpus=\(cpus) ram=\(ramMB << 20) files=6"), "\(r.output)")
    }

    @Test("rtc_irq: UIP rises and falls once per RTC second; the alarm, update-ended and periodic interrupts arrive on IRQ 8")
    func rtcInterrupts() throws {
        let r = try runGuestProgram(programArguments("rtc_irq", cmdline: "timeout=20000"), timeout: 240)
        expectPass(r, checks: ["uip-cycle", "alarm-irq", "update-irq", "periodic-irq"])
    }

    @Test("pmtimer: the FADT's 32-bit PM timer counts at 3.579545 MHz against the TSC (20 % tolerance: the host is noisy)")
    func pmTimer() throws {
        let khz = TimeDilation.hostTSCkHz()
        let r = try runGuestProgram(programArguments("pmtimer", cmdline: "tsc_khz=\(khz) tolerance=20"), timeout: 240)
        expectPass(r, checks: ["fadt", "pmtimer-fadt", "pmtimer-monotonic", "tsc-rate-known", "pmtimer-rate"])
    }
}
