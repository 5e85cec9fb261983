import Devices
import Synchronization

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

/// The INTx line a device drives: goes through its configuration space, so the Interrupt
/// Status bit follows the level and the guest's Interrupt Disable bit gates the wire (the
/// wire itself is the line given to `PCIConfiguration.attachINTx`).
public struct PCIINTxLine: InterruptLine {
    /// The configuration space whose INTx state this line drives.
    public let configuration: PCIConfiguration

    public init(configuration: PCIConfiguration) { self.configuration = configuration }

    public func set(level: Bool) { configuration.setINTx(level: level) }
}

/// A level-triggered line shared by several devices (wired-OR): asserted while any member is.
/// `member()` hands out one `InterruptLine` per device; the wire is driven only on changes.
public final class SharedInterruptLine: Sendable {
    private let wire: any InterruptLine
    private let state = Mutex<(asserted: Set<Int>, next: Int, level: Bool)>((asserted: [], next: 0, level: false))

    /// Shares `wire` (e.g. one IOAPIC GSI).
    public init(wire: any InterruptLine) { self.wire = wire }

    /// A new member line.
    public func member() -> any InterruptLine {
        let id = state.withLock { s in defer { s.next += 1 }; return s.next }
        return Member(shared: self, id: id)
    }

    fileprivate func set(_ id: Int, _ level: Bool) {
        state.withLock { s in
            if level { s.asserted.insert(id) } else { s.asserted.remove(id) }
            let now = !s.asserted.isEmpty
            guard now != s.level else { return }
            s.level = now
            wire.set(level: now) // under the lock: changes reach the wire in order
        }
    }

    private struct Member: InterruptLine {
        let shared: SharedInterruptLine
        let id: Int
        func set(level: Bool) { shared.set(id, level) }
    }
}
