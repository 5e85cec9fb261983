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

    /// The UEFI variable store of `spec` (OVMF's VARS), as a CFI flash right below the firmware image: the file is
    /// opened read-write and locked (another VM using it is refused), its bytes read (a whole number of 4 KiB
    /// blocks, at most 4 MiB), and the flash inserted on the MMIO bus. Errors name the file.
    func setUpVariableStore(_ spec: FirmwareSpec, romSize: UInt64) throws {
        guard let path = spec.vars else { return }
        func bad(_ why: String) -> VMMError { .invalidValue(what: "UEFI variable store", value: path, reason: why) }
        let fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw bad(String(cString: strerror(errno))) }
        var ok = false
        defer { if !ok { close(fd) } }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else { throw bad("in use by another VM (locked)") }
        var st = stat()
        guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { throw bad("not a regular file") }
        let size = Int(st.st_size)
        guard size > 0, size % PFlashCFI01.blockSize == 0, size <= 4 << 20 else {
            throw bad("\(size) bytes: a variable store is whole 4 KiB blocks, at most 4 MiB (OVMF_VARS_4M.fd is 528 KiB)")
        }
        guard UInt64(size) + romSize <= FirmwareLoader.maximumSize else {
            throw bad("with the \(romSize)-byte firmware it does not fit the \(FirmwareLoader.maximumSize)-byte window below 4 GiB")
        }
        var bytes = [UInt8](repeating: 0, count: size)
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, size, 0) }
        guard n == size else { throw bad("short read") }
        let flash = PFlashCFI01(bytes: bytes, fd: fd) { [logger] in logger.error("\($0)") }
        let base = FirmwareLoader.romAddress(size: romSize) - UInt64(size)
        try mmioBus.insert(flash, base: base, length: UInt64(size))
        variableStore = (flash, fd)
        ok = true
        logger.info("firmware: UEFI variable store \(path) (\(size) bytes) as CFI flash at 0x\(String(base, radix: 16))")
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
