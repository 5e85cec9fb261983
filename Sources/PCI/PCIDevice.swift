/// A device (one function) on the PCI bus.
///
/// The PCI root serves configuration accesses from `configuration` and forwards accesses that
/// hit one of the device's decoded BARs to `barRead`/`barWrite` (offset relative to the BAR).
public protocol PCIDevice: AnyObject, Sendable {
    /// The device's configuration space.
    var configuration: PCIConfiguration { get }
    /// A guest read of `data.count` bytes at `offset` inside BAR `index` (fill every byte).
    func barRead(index: Int, offset: UInt64, data: UnsafeMutableRawBufferPointer)
    /// A guest write of `data.count` bytes at `offset` inside BAR `index`.
    func barWrite(index: Int, offset: UInt64, data: UnsafeRawBufferPointer)
    /// Called (outside any PCI lock) after a BAR's decoded address changed (nil = no longer decoded).
    func barRemapped(index: Int, from old: UInt64?, to new: UInt64?)
}

extension PCIDevice {
    /// Default: nothing to do when a BAR moves.
    public func barRemapped(index: Int, from old: UInt64?, to new: UInt64?) {}
}

/// Delivers one MSI/MSI-X vector (the VMM implements it with a GSI route and an irqfd; tests
/// record the calls).
public protocol MSIVector: AnyObject, Sendable {
    /// The guest programmed (or changed) the vector's message; called only when it actually
    /// changed, and before the first `fire()` with that message.
    func program(address: UInt64, data: UInt32)
    /// Delivers the message (an eventfd write for irqfd: cheap, callable from any thread).
    func fire()
}

/// Creates MSI vectors (one per MSI-X table entry).
public protocol MSIController: Sendable {
    /// A new, unprogrammed vector.
    func makeVector() throws -> any MSIVector
}
