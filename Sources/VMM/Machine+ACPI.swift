#if canImport(Glibc)
import Glibc
#endif
import Boot
import Devices
import GuestMemory
import KVM

/// ACPI tables, the ACPI PM device and the vCPU count limits (issue 4, part 1).
extension Machine {
    /// Base of the PCIe ECAM window of the contract; MCFG describes it when a device decodes it.
    static let ecamBase: UInt64 = 0xe000_0000

    /// Checks `cpus` against 1…min(`VMConfiguration.maximumCPUs`, KVM_CAP_MAX_VCPUS); a usage error otherwise.
    static func checkCPUCount(_ cpus: Int, kvm: KVMSystem) throws {
        // KVM_CAP_MAX_VCPUS, else KVM_CAP_NR_VCPUS (older kernels), else no KVM limit known.
        var kvmMax = VMConfiguration.maximumCPUs
        if let n = try? kvm.checkExtension(.maxVCPUs), n > 0 {
            kvmMax = Int(n)
        } else if let n = try? kvm.checkExtension(.nrVCPUs), n > 0 {
            kvmMax = Int(n)
        }
        let limit = min(VMConfiguration.maximumCPUs, kvmMax)
        guard cpus >= 1, cpus <= limit else {
            throw VMMError.invalidValue(what: "--cpus", value: "\(cpus)",
                                        reason: "must be between 1 and \(limit) (SwiftKVM supports \(VMConfiguration.maximumCPUs), KVM_CAP_MAX_VCPUS is \(kvmMax))")
        }
    }

    /// Writes the ACPI tables into the BIOS area, points a Linux zero page at the RSDP, writes
    /// the MP table for multiboot guests too, and puts the PM device (`ACPIPower`) on the port
    /// bus at `ACPIPorts.base`; fw_cfg gets the same tables as files (`setUpFirmwareConfig`). Called at the end of `init`, after every device is attached.
    ///
    /// A flat guest whose image covers the table area gets no tables (logged).
    /// `writeTables` false (a restore): guest RAM, tables included, comes from the snapshot.
    func setUpACPI(writeTables: Bool = true) throws {
        var acpi = ACPIConfiguration(cpus: config.cpus)
        // MCFG only when the PCI module really decodes ECAM there.
        if mmioBus.find(Self.ecamBase) != nil { acpi.ecamBase = Self.ecamBase }
        acpi.virtioMMIODevices = virtio.mmioDevices.map(\.acpi)

        let area = (start: BootLayout.acpiTablesAddress, end: BootLayout.acpiTablesEnd)
        let covered = loaded.ranges.contains { $0.start < area.end && area.start < $0.end && $0.size > 0 }
        if !writeTables {
            logger.debug("restore: the ACPI tables are in the snapshot's memory")
            // Where they are (the layout is a function of the configuration): the FACS holds the S3 waking vector.
            if loaded.format != .firmware, config.hasACPI, !covered { facsAddress = try? ACPITables.build(acpi).addresses["FACS"] }
        } else if loaded.format == .firmware {
            logger.debug("boot: no ACPI tables in memory: firmware builds them from fw_cfg's etc/table-loader")
        } else if !config.hasACPI {
            // The MP table describes the CPUs and interrupts instead (bzImage and ELF loads wrote it already).
            logger.info("no ACPI tables (--no-acpi)")
            if loaded.format == .multiboot, !loaded.ranges.contains(where: { $0.start < BootLayout.lowMemoryEnd && BootLayout.mpTableAddress < $0.end }) {
                try MPTable.write(cpus: config.cpus, into: memory)
            }
        } else if covered {
            logger.info("no ACPI tables: the guest image covers \(hex(area.start))-\(hex(area.end))")
        } else if memory.regions.contains(where: { $0.start <= area.start && area.end <= $0.end }) {
            let image = try ACPITables.write(acpi, into: memory)
            facsAddress = image.addresses["FACS"]
            logger.debug("boot: ACPI tables at \(hex(image.base)) (\(image.bytes.count) bytes): \(image.addresses.keys.sorted().joined(separator: " "))")
            switch loaded.format {
            case .bzImage, .elf64:
                try memory.writeLE(image.rsdp, at: BootLayout.zeroPageAddress + UInt64(ZeroPage.Offset.acpiRsdpAddr))
            case .multiboot:
                let mpCovered = loaded.ranges.contains { $0.start < BootLayout.lowMemoryEnd && BootLayout.mpTableAddress < $0.end }
                if !mpCovered { try MPTable.write(cpus: config.cpus, into: memory) }
            case .flat, .firmware:
                break
            }
        }
        setUpAMDHWCR()
        try setUpFirmwareConfig(acpi: acpi)
        let pm = ACPIPower(control: controller, s5SleepType: ACPIPorts.s5SleepType, s3SleepType: ACPIPorts.s3SleepType,
                           resetValue: ACPIPorts.resetValue)
        acpiPower = pm
        try ioBus.insert(pm, base: UInt64(ACPIPorts.base), length: UInt64(ACPIPorts.length))
        devices.register(pm, id: "acpi-pm")
    }
}

extension Machine {
    /// AMD HWCR (MSR 0xC0010015).
    static let amdHWCR: UInt32 = 0xc001_0015
    /// HWCR.TscFreqSel: the TSC counts at the P0 frequency (set on every AMD CPU since family 10h).
    static let tscFreqSel: UInt64 = 1 << 24

    /// On AMD hosts, sets HWCR.TscFreqSel on every vCPU as firmware leaves it on real hardware;
    /// Linux otherwise logs "[Firmware Bug]: TSC doesn't count with P0 frequency!". KVM versions
    /// that do not virtualize the bit refuse the write, which is only logged.
    func setUpAMDHWCR() {
        guard let vendor = try? kvm.supportedCPUID().first(where: { $0.function == 0 }), vendor.ebx == 0x6874_7541 else { return }
        for vcpu in vcpuManager.vcpus {
            do {
                let current = try vcpu.getMSRs([Self.amdHWCR]).first?.value ?? 0
                try vcpu.setMSRs([(Self.amdHWCR, current | Self.tscFreqSel)])
            } catch {
                logger.debug("vCPU \(vcpu.id): HWCR.TscFreqSel not set: \(error)")
            }
        }
    }
}

private func hex<T: BinaryInteger>(_ v: T) -> String { "0x" + String(v, radix: 16) }

/// ACPI S3 (suspend to RAM): the guest writes SLP_TYP(S3) | SLP_EN; the control thread parks the vCPUs, resets them
/// (vCPU 0 to the waking point, the others to wait for INIT-SIPI), sleeps until the RTC alarm rings with
/// PM1_EN.RTC_EN set (or the VM is stopped), sets PM1_STS.WAK_STS and lets them run. Guest RAM and the devices
/// keep their state. The waking point: with firmware, the reset vector, and CMOS byte 0x0F = 0xFE tells SeaBIOS to
/// resume through the FACS waking vector; booted directly, the FACS's 32-bit firmware waking vector in real mode
/// (CS = vector >> 4, IP = vector & 0xF), as firmware would jump there. A guest that set no vector is reset.
extension Machine {
    /// SeaBIOS's CMOS shutdown status for "resume from S3".
    static let cmosShutdownStatus = 0x0f, cmosResumeFromS3: UInt8 = 0xfe

    func suspendToRAM(waitSet: sigset_t) {
        var waitSet = waitSet
        // While suspended the API may not pause, snapshot or resume the vCPUs (`Machine.pause`/`resume`).
        suspended.store(true, ordering: .releasing)
        defer { suspended.store(false, ordering: .releasing) }
        let alarmsBefore = rtc.alarmCount
        guard vcpuManager.pause(timeoutMs: 5000) else {
            vcpuManager.resume()
            controller.stop(.vmmFailure("ACPI S3: the vCPUs did not stop within 5 s"))
            return
        }
        logger.info("ACPI S3: suspended")
        do {
            let entry: EntryState
            if case .firmware = config.payload {
                rtc.setNVRAM(Self.cmosShutdownStatus, Self.cmosResumeFromS3)
                entry = .resetVector()
            } else {
                let vector: UInt32 = try facsAddress.map { try memory.readLE(at: $0 + 12) } ?? 0
                guard vector != 0, vector < 0x10_0000 else {
                    logger.warning("ACPI S3: no real-mode firmware waking vector in the FACS (0x\(String(vector, radix: 16))): resetting")
                    vcpuManager.resume()
                    controller.stop(.reset)
                    return
                }
                entry = .realMode(cs: UInt16(vector >> 4), ip: UInt16(vector & 0xf), sp: 0)
            }
            vcpuManager.resetForWake(entry: entry)
        } catch {
            vcpuManager.resume()
            controller.stop(.vmmFailure("ACPI S3: cannot reset the vCPUs: \(error)"))
            return
        }
        // Sleep until a wake event.
        var byRTC = false
        while !controller.stopRequested {
            if let pm = acpiPower, pm.pm1Enable & ACPIPower.rtcEnable != 0, rtc.alarmCount > alarmsBefore { byRTC = true; break }
            var ts = timespec(tv_sec: 0, tv_nsec: 10_000_000)
            let sig = sigtimedwait(&waitSet, nil, &ts)
            if sig == SIGINT || sig == SIGTERM {
                logger.info("received signal \(sig) while suspended, stopping the VM")
                controller.stop(.signal(sig))
            }
        }
        guard !controller.stopRequested else { vcpuManager.resume(); return }
        acpiPower?.woke(byRTC: byRTC)
        logger.info("ACPI S3: woken by the RTC alarm")
        vcpuManager.resume()
    }
}
