import Boot
import Devices
import GuestMemory

/// QEMU's fw_cfg device on every machine (issue 14, part 1).
extension Machine {
    /// The fw_cfg items of this machine: RAM size, CPU counts, NUMA (no nodes), UUID (zero),
    /// no graphics, no boot menu, and the files `bootorder` (empty), `etc/e820`, `etc/sercon-port`
    /// (COM1) and the ACPI tables with their `etc/table-loader`.
    static func firmwareConfigItems(config: VMConfiguration, memory: GuestMemory, acpi: ACPIConfiguration) throws -> FWCfgItems {
        typealias Key = FWCfgItems.Key
        var items = FWCfgItems()
        items.set(Key.ramSize, le: memory.totalSize)
        items.set(Key.nbCPUs, le: UInt16(config.cpus))
        items.set(Key.maxCPUs, le: UInt16(config.cpus))
        // FW_CFG_NUMA: the node count (0), then one node number per CPU, all 0.
        items.set(Key.numa, bytes: [UInt8](repeating: 0, count: 8 * (1 + config.cpus)))
        items.set(Key.uuid, bytes: [UInt8](repeating: 0, count: 16))
        items.set(Key.noGraphic, le: UInt16(1))
        items.set(Key.bootMenu, le: UInt16(0))
        try items.addFile("bootorder", bytes: [])
        // KVM's TSS and identity-map pages are reserved, as QEMU reserves its own.
        let kvmPages = (address: identityMapAddress, size: tssAddress + 3 * 0x1000 - identityMapAddress)
        try items.addFile("etc/e820", bytes: E820Map.firmwareTable(for: memory, reserved: [kvmPages]))
        try items.addFile("etc/sercon-port", bytes: [0xf8, 0x03])
        let tables = try FirmwareACPI(acpi)
        try items.addFile(FirmwareACPI.tablesFile, bytes: tables.tables)
        try items.addFile(FirmwareACPI.rsdpFile, bytes: tables.rsdp)
        try items.addFile(FirmwareACPI.loaderFile, bytes: tables.loader.bytes)
        return items
    }

    /// Puts fw_cfg on the port bus at 0x510 (selector, data, DMA address).
    func setUpFirmwareConfig(acpi: ACPIConfiguration) throws {
        let items = try Self.firmwareConfigItems(config: config, memory: memory, acpi: acpi)
        let fwcfg = FWCfg(items: items, memory: memory)
        try ioBus.insert(fwcfg, base: FWCfg.defaultBase, length: FWCfg.portCount)
        devices.register(fwcfg, id: "fw-cfg")
    }
}
