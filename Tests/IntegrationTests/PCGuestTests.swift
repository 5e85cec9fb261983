import Foundation
import Testing

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
}
