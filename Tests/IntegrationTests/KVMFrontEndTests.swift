import Foundation
import Testing

/// `swiftkvm kvm`: QEMU's command line (the ISO boots through it are in FirmwareISOTests).
@Suite("kvm front end", .enabled(if: GuestTestEnvironment.kvmAvailable, "needs /dev/kvm"))
struct KVMFrontEndTests {
    @Test("-no-acpi: no RSDP, and the MP table lists both CPUs, which the program starts (-kernel, -append, -smp, isa-debug-exit)")
    func noACPI() throws {
        if let error = GuestTestEnvironment.guestBuildError { Issue.record("\(error)") }
        let r = try ProcessRunner.runSwiftKVM(["kvm", "-no-acpi", "-smp", "2", "-m", "64", "-kernel", GuestTestEnvironment.guestImage("smp"),
                                               "-append", "cpus=2 noacpi", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                                               "-nographic", "-enable-kvm", "-cpu", "host", "-no-reboot"], timeout: 120)
        #expect(r.status == 33, "\(r.stdout)\n\(r.stderr)")
        #expect(r.stdout.contains("ok no-acpi: RSDP 0x0, CPUs from MP table") && r.stdout.contains("ok all-aps-started"), "\(r.stdout)")
        let acpi = try ProcessRunner.runSwiftKVM(["kvm", "-smp", "2", "-m", "64", "-kernel", GuestTestEnvironment.guestImage("smp"),
                                                  "-append", "cpus=2", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"], timeout: 120)
        #expect(acpi.status == 33 && acpi.stdout.contains("CPUs from ACPI MADT"), "\(acpi.stdout)\n\(acpi.stderr)")
    }

    @Test("an unknown option, a bad -drive key or device exits 2 with a message naming it", arguments: [
        (["-usbdevice", "tablet"], "Unknown option '-usbdevice'"), (["-drive", "file=x.img,aio=native"], "unknown key 'aio'"),
        (["-device", "e1000"], "unknown or unsupported device 'e1000'"), (["-boot", "q"], "unknown boot device 'q'"),
    ])
    func refused(args: [String], message: String) throws {
        let r = try ProcessRunner.runSwiftKVM(["kvm"] + args, timeout: 60)
        #expect(r.status == 2, "status \(r.status)\n\(r.stderr)")
        #expect(r.stderr.contains(message), "\(r.stderr)")
    }
}
