import Boot
import Devices
import GuestMemory
import KVM
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// Firmware boots (issue 14, part 2): the image mapped below 4 GiB and SeaBIOS's debug console.
extension Machine {
    /// KVM memory slot of the firmware image (RAM uses the low slots, the PVM fix-ups slot 100).
    static let firmwareSlot: UInt32 = 90
    /// `KVM_MEM_READONLY`: guest writes to the slot exit as MMIO instead of changing it.
    static let memReadOnly: UInt32 = 1 << 1

    /// Maps `image` (if any) so that it ends at 4 GiB, read-only when KVM supports it.
    static func mapFirmware(_ image: [UInt8]?, vm: VirtualMachine, kvm: KVMSystem, logger: Logger) throws -> GuestRegion? {
        guard let image else { return nil }
        let size = UInt64(image.count)
        let rom = try GuestRegion(start: FirmwareLoader.romAddress(size: size), size: size)
        image.withUnsafeBytes { rom.host.copyMemory(from: $0.baseAddress!, byteCount: image.count) }
        let readOnly = ((try? kvm.checkExtension(.readonlyMem)) ?? 0) > 0
        if !readOnly { logger.info("firmware: KVM has no read-only memory slots; the image is mapped writable") }
        try vm.setUserMemoryRegion(slot: firmwareSlot, guestPhys: rom.start, size: rom.size, host: rom.host,
                                   flags: readOnly ? memReadOnly : 0)
        return rom
    }

    /// SeaBIOS's debug console on port 0x402 (firmware boots only): with `--log-level info` or
    /// lower its lines go to stderr as "firmware: LINE". (Written with write(2): the logger's
    /// timestamping reads time-zone files, which the vCPU threads' seccomp filter forbids.)
    func setUpFirmwareDebugConsole() throws {
        guard firmwareROM != nil else { return }
        let show = logger.logLevel <= .info
        try ioBus.insert(DebugConsole { line in
            guard show else { return }
            let bytes = Array("firmware: \(line)\n".utf8)
            bytes.withUnsafeBytes { _ = Glibc.write(2, $0.baseAddress, $0.count) }
        }, base: DebugConsole.defaultPort, length: 1)
    }
}
