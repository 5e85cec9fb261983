import CKVM

extension VirtualMachine {
    // Flags of struct kvm_ioeventfd (the header defines them as shifts of an enum, which Swift does not import).
    static let ioeventfdFlagDatamatch: UInt32 = 1 << 0
    static let ioeventfdFlagPIO: UInt32 = 1 << 1
    static let ioeventfdFlagDeassign: UInt32 = 1 << 2

    /// `KVM_IOEVENTFD`: KVM signals eventfd `fd` when the guest writes `length` bytes (0 = any length,
    /// MMIO only; else 1, 2, 4 or 8) at `address` (an I/O port when `pio`), only when the written
    /// value equals `datamatch` if given. The write then causes no exit to user space.
    public func registerIOEventFD(fd: Int32, address: UInt64, length: UInt32, datamatch: UInt64?, pio: Bool) throws {
        try ioeventfd(eventFD: fd, address: address, length: length, datamatch: datamatch, pio: pio, deassign: false)
    }

    /// Removes a `registerIOEventFD` registration (same arguments).
    public func unregisterIOEventFD(fd: Int32, address: UInt64, length: UInt32, datamatch: UInt64?, pio: Bool) throws {
        try ioeventfd(eventFD: fd, address: address, length: length, datamatch: datamatch, pio: pio, deassign: true)
    }

    private func ioeventfd(eventFD: Int32, address: UInt64, length: UInt32, datamatch: UInt64?, pio: Bool, deassign: Bool) throws {
        guard [0, 1, 2, 4, 8].contains(length), !(pio && length == 0) else {
            throw KVMError(operation: "KVM_IOEVENTFD", errno: 0, detail: "invalid length \(length) at 0x\(String(address, radix: 16))")
        }
        var e = kvm_ioeventfd()
        e.datamatch = datamatch ?? 0
        e.addr = address
        e.len = length
        e.fd = eventFD
        e.flags = (datamatch != nil ? Self.ioeventfdFlagDatamatch : 0) | (pio ? Self.ioeventfdFlagPIO : 0)
            | (deassign ? Self.ioeventfdFlagDeassign : 0)
        let what = "KVM_IOEVENTFD(\(deassign ? "deassign " : "")\(pio ? "port" : "mmio") 0x\(String(address, radix: 16)), len \(length))"
        try ioctlStruct(self.fd, CKVM_IOEVENTFD, &e, what)
    }
}
