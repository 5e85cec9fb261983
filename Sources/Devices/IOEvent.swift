/// Registers eventfds that the hypervisor signals when the guest writes to an address, without a
/// VM exit to user space (KVM_IOEVENTFD). Devices use it for fast queue notifications and must still
/// handle ordinary writes to the same address (the registration is an optimization).
public protocol IOEventRegistry: Sendable {
    /// Signals `eventFD` on guest writes of `length` bytes (1, 2, 4 or 8) at `address` (an I/O port
    /// when `pio`, else guest-physical MMIO), only when the value equals `datamatch` if given.
    func register(address: UInt64, length: Int, datamatch: UInt64?, eventFD: EventFD, pio: Bool) throws
    /// Removes a registration made with the same arguments.
    func unregister(address: UInt64, length: Int, datamatch: UInt64?, eventFD: EventFD, pio: Bool) throws
}
