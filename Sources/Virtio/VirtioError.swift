/// Errors of the virtio layer. Every message names the queue, the descriptor (or head) index and the
/// guest address involved, so a log line is enough to find what the driver did wrong.
public enum VirtioError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A queue's configuration is unusable (size, alignment or rings outside guest memory).
    case queueConfiguration(queue: Int, reason: String)
    /// The driver moved `avail.idx` more than the queue size past the last entry the device consumed.
    case availIndexJump(queue: Int, availIndex: UInt16, lastSeen: UInt16, size: UInt16)
    /// A head index in the available ring is not below the queue size.
    case headOutOfRange(queue: Int, head: UInt16, size: UInt16)
    /// A `next` index (or an indirect table entry index) is out of range.
    case descriptorIndexOutOfRange(queue: Int, head: UInt16, index: UInt16, limit: Int)
    /// The chain has more descriptors than allowed (a loop, or longer than the queue / indirect table).
    case chainTooLong(queue: Int, head: UInt16, limit: Int)
    /// A buffer (or indirect table) lies outside guest RAM.
    case bufferOutsideMemory(queue: Int, head: UInt16, descriptor: UInt16, address: UInt64, length: UInt64)
    /// A malformed indirect descriptor.
    case badIndirect(queue: Int, head: UInt16, descriptor: UInt16, reason: String)
    /// A device-readable descriptor follows a device-writable one.
    case readableAfterWritable(queue: Int, head: UInt16, descriptor: UInt16)
    /// A request is malformed for the device (wrong direction, too short, missing status byte…).
    case badRequest(queue: Int, head: UInt16, reason: String)
    /// A guest memory access failed although the chain was validated (should not happen).
    case memory(queue: Int, head: UInt16, address: UInt64, length: UInt64)
    /// A snapshot's device state does not fit the device.
    case deviceState(String)

    public var description: String {
        func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
        switch self {
        case .queueConfiguration(let q, let r):
            return "virtqueue \(q): unusable configuration: \(r)"
        case .availIndexJump(let q, let a, let l, let s):
            return "virtqueue \(q): avail.idx \(a) is \(a &- l) entries past the last one seen (\(l)), more than the queue size \(s)"
        case .headOutOfRange(let q, let h, let s):
            return "virtqueue \(q): available ring names head descriptor \(h), not below the queue size \(s)"
        case .descriptorIndexOutOfRange(let q, let h, let i, let l):
            return "virtqueue \(q), chain at head \(h): next descriptor index \(i) is not below \(l)"
        case .chainTooLong(let q, let h, let l):
            return "virtqueue \(q), chain at head \(h): more than \(l) descriptors (a loop?)"
        case .bufferOutsideMemory(let q, let h, let d, let a, let l):
            return "virtqueue \(q), chain at head \(h): descriptor \(d) buffer \(hex(a)) + \(l) bytes is not in guest RAM"
        case .badIndirect(let q, let h, let d, let r):
            return "virtqueue \(q), chain at head \(h): descriptor \(d): \(r)"
        case .readableAfterWritable(let q, let h, let d):
            return "virtqueue \(q), chain at head \(h): descriptor \(d) is device-readable but follows a device-writable one"
        case .badRequest(let q, let h, let r):
            return "virtqueue \(q), request at head \(h): \(r)"
        case .memory(let q, let h, let a, let l):
            return "virtqueue \(q), request at head \(h): guest memory \(hex(a)) + \(l) bytes is not accessible"
        case .deviceState(let r):
            return "device state: \(r)"
        }
    }
}
