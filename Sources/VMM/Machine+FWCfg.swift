import Boot
import Devices
import GuestMemory

/// QEMU's fw_cfg device on every machine (issue 14, part 1).
extension Machine {
    /// The fw_cfg items of this machine: RAM size, CPU counts, NUMA (no nodes), UUID (zero),
    /// no graphics, the boot menu of `--boot menu=`, no IRQ 0 override, and the files `bootorder` (`BootOrder.lines`
    /// of `bootDevices` and `--boot`), `etc/e820`, `etc/sercon-port` (COM1) and the ACPI tables with their
    /// `etc/table-loader` (not with `--no-acpi`); with a firmware boot's kernel, the `-kernel` items (`addFirmwareKernel`), whose
    /// option ROM boots first.
    static func firmwareConfigItems(config: VMConfiguration, memory: GuestMemory, acpi: ACPIConfiguration,
                                    bootDevices: [BootDevice] = []) throws -> FWCfgItems {
        typealias Key = FWCfgItems.Key
        var items = FWCfgItems()
        items.set(Key.ramSize, le: memory.totalSize)
        items.set(Key.nbCPUs, le: UInt16(config.cpus))
        items.set(Key.maxCPUs, le: UInt16(config.cpus))
        // FW_CFG_NUMA: the node count (0), then one node number per CPU, all 0.
        items.set(Key.numa, bytes: [UInt8](repeating: 0, count: 8 * (1 + config.cpus)))
        items.set(Key.uuid, bytes: [UInt8](repeating: 0, count: 16))
        items.set(Key.noGraphic, le: UInt16(1))
        items.set(Key.bootMenu, le: UInt16(config.boot?.menu == true ? 1 : 0))
        // KVM's default routing wires the PIT (IRQ 0) to I/O APIC pin 0, as our MP table and MADT say.
        items.set(Key.irq0Override, le: UInt32(0))
        var bootorder = try BootOrder.lines(devices: bootDevices, spec: config.boot)
        // KVM's TSS and identity-map pages are reserved, as QEMU reserves its own.
        let kvmPages = (address: identityMapAddress, size: tssAddress + 3 * 0x1000 - identityMapAddress)
        try items.addFile("etc/e820", bytes: E820Map.firmwareTable(for: memory, reserved: [kvmPages]))
        try items.addFile("etc/sercon-port", bytes: [0xf8, 0x03])
        // Without ACPI (--no-acpi) firmware gets no tables and writes only its MP table, as with QEMU's -no-acpi.
        if config.hasACPI {
            let tables = try FirmwareACPI(acpi)
            try items.addFile(FirmwareACPI.tablesFile, bytes: tables.tables)
            try items.addFile(FirmwareACPI.rsdpFile, bytes: tables.rsdp)
            try items.addFile(FirmwareACPI.loaderFile, bytes: tables.loader.bytes)
        }
        if case .firmware(let spec) = config.payload, let kernel = spec.kernel {
            try addFirmwareKernel(kernel, initrd: spec.initrd, cmdline: spec.cmdline, memory: memory, to: &items)
            bootorder.insert("/rom@\(linuxBootROMFile)", at: 0)
        }
        try items.addFile("bootorder", bytes: Array(bootorder.map { $0 + "\n" }.joined().utf8))
        return items
    }

    /// QEMU's option ROM that loads a Linux kernel from fw_cfg (Debian package qemu-system-data).
    static let linuxBootROM = "/usr/share/qemu/linuxboot_dma.bin"
    /// Its fw_cfg name: SeaBIOS runs every `genroms/` file as an option ROM.
    static let linuxBootROMFile = "genroms/linuxboot_dma.bin"

    /// The `-kernel` items for firmware: a bzImage split into setup and kernel, the initrd and the
    /// command line (FW_CFG_SETUP_*, KERNEL_*, INITRD_*, CMDLINE_*) and QEMU's linuxboot_dma.bin as an
    /// option ROM (the caller puts it first in `bootorder`).
    static func addFirmwareKernel(_ path: String, initrd: String?, cmdline: String, memory: GuestMemory,
                                  to items: inout FWCfgItems) throws {
        typealias Key = FWCfgItems.Key
        let image = try readFile(path, limit: memory.totalSize, what: "kernel")
        guard KernelFormat.detect(image) == .bzImage else {
            throw BootError.unsupported("\(path): only a bzImage can be loaded through firmware (fw_cfg -kernel)")
        }
        let initrdBytes = try initrd.map { try readFile($0, limit: memory.totalSize, what: "initrd") } ?? []
        let k = try FirmwareKernel(image: image, initrd: initrdBytes, cmdline: cmdline, lowRAM: E820Map.lowRAMEnd(of: memory))
        let rom = try readFile(linuxBootROM, limit: 1 << 20, what: "option ROM (Debian package qemu-system-data)", limitName: "an option ROM's largest size")
        items.set(Key.setupAddr, le: FirmwareKernel.setupAddress)
        items.set(Key.setupSize, le: UInt32(k.setup.count))
        items.set(Key.setupData, bytes: k.setup)
        items.set(Key.kernelAddr, le: FirmwareKernel.kernelAddress)
        items.set(Key.kernelSize, le: UInt32(k.kernel.count))
        items.set(Key.kernelData, bytes: k.kernel)
        items.set(Key.initrdAddr, le: k.initrdAddress)
        items.set(Key.initrdSize, le: UInt32(k.initrd.count))
        items.set(Key.initrdData, bytes: k.initrd)
        items.set(Key.cmdlineAddr, le: FirmwareKernel.cmdlineAddress)
        items.set(Key.cmdlineSize, le: UInt32(k.cmdline.count))
        items.set(Key.cmdlineData, bytes: k.cmdline)
        try items.addFile(linuxBootROMFile, bytes: rom)
    }

    /// Logs (info) the fw_cfg DMA traffic of the run, when there was any.
    func logFirmwareConfigTraffic() {
        guard let f = firmwareConfig, f.dmaAccesses > 0 else { return }
        let us = f.dmaNanoseconds / 1000
        let rate = f.dmaNanoseconds > 0 ? f.dmaBytes * 1000 / f.dmaNanoseconds : 0   // bytes/ns * 1000 = MB/s
        logger.info("fw_cfg: \(f.dmaAccesses) DMA accesses, \(f.dmaBytes) bytes read in \(us) µs (\(rate) MB/s)")
    }

    /// Puts fw_cfg on the port bus at 0x510 (selector, data, DMA address).
    func setUpFirmwareConfig(acpi: ACPIConfiguration) throws {
        let items = try Self.firmwareConfigItems(config: config, memory: memory, acpi: acpi, bootDevices: virtio.bootDevices)
        if let order = items.file("bootorder"), !order.isEmpty {
            logger.info("firmware boot order: \(String(decoding: order, as: UTF8.self).split(separator: "\n").joined(separator: " "))")
        }
        let fwcfg = FWCfg(items: items, memory: memory)
        firmwareConfig = fwcfg
        try ioBus.insert(fwcfg, base: FWCfg.defaultBase, length: FWCfg.portCount)
        devices.register(fwcfg, id: "fw-cfg")
    }
}
