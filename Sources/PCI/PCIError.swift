/// Errors from the PCI module: each message names what was wrong and where.
public enum PCIError: Error, Equatable, CustomStringConvertible, Sendable {
    /// Every slot of bus 0 is taken.
    case busFull(slots: Int)
    /// A slot number outside 0–31 or one already in use.
    case slotUnavailable(slot: Int, reason: String)
    /// A BAR does not fit in the address window.
    case windowFull(what: String, size: UInt64, windowBase: UInt64, windowSize: UInt64)
    /// An MSI-X table with a vector count outside 1–2048.
    case invalidVectorCount(Int)
    /// The MSI controller could not create a vector.
    case vectorUnavailable(index: Int, reason: String)
    /// An expansion ROM image that is empty or larger than 16 MiB.
    case romTooLarge(slot: Int, size: Int)

    public var description: String {
        switch self {
        case .busFull(let n):
            return "PCI bus 0 is full: all \(n) device slots are in use"
        case .slotUnavailable(let s, let reason):
            return "PCI slot \(s) cannot be used: \(reason)"
        case .windowFull(let what, let size, let base, let wsize):
            return "\(what) (0x\(String(size, radix: 16)) bytes) does not fit in the PCI window 0x\(String(base, radix: 16))+0x\(String(wsize, radix: 16))"
        case .invalidVectorCount(let n):
            return "MSI-X vector count \(n) is outside 1–2048"
        case .vectorUnavailable(let i, let reason):
            return "MSI-X vector \(i) could not be created: \(reason)"
        case .romTooLarge(let slot, let size):
            return "the expansion ROM of PCI slot \(slot) has \(size) bytes: it must have 1 byte to 16 MiB"
        }
    }
}
