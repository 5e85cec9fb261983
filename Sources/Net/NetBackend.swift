#if canImport(Glibc)
import Glibc
#endif

/// A network backend failure, with what was being done and to which interface.
public struct NetError: Error, CustomStringConvertible, Equatable {
    /// What failed, naming the interface or file.
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }

    /// `what` failed with `errno` (a negative errno is accepted too).
    public static func system(_ what: String, errno e: Int32) -> NetError {
        NetError("\(what): \(String(cString: strerror(abs(e))))")
    }
}

/// Offloads a backend may hand to the guest (the TAP's TUN_F_* flags). The device turns the
/// guest's GUEST_CSUM/GUEST_TSO4/... features into this set.
public struct NetOffloads: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Partial checksums (TUN_F_CSUM).
    public static let checksum = NetOffloads(rawValue: 0x01)
    /// TCPv4 segmentation offload (TUN_F_TSO4).
    public static let tso4 = NetOffloads(rawValue: 0x02)
    /// TCPv6 segmentation offload (TUN_F_TSO6).
    public static let tso6 = NetOffloads(rawValue: 0x04)
    /// TSO with ECN (TUN_F_TSO_ECN).
    public static let tsoECN = NetOffloads(rawValue: 0x08)
    /// UDP fragmentation offload (TUN_F_UFO).
    public static let ufo = NetOffloads(rawValue: 0x10)
}

/// Where a virtio-net device's frames go: a TAP, a bridge port, passt.
///
/// The device owns the data path: it waits for `fd` to be readable or writable on its event
/// loop and calls `receive`/`send` with guest-memory slices (zero copy where the backend allows).
/// One frame per call in both directions.
public protocol NetBackend: AnyObject, Sendable {
    /// A short description for messages and metrics ("tap swk0", "passt").
    var label: String { get }
    /// The descriptor to wait on.
    var fd: Int32 { get }
    /// Whether frames carry the 12-byte virtio_net_hdr (v1, with num_buffers) in front, as a TAP
    /// with IFF_VNET_HDR does. Without it the device adds and strips the header itself.
    var hasVnetHeader: Bool { get }
    /// Offloads the backend can deliver (what the device may offer as GUEST_* features).
    var supportedOffloads: NetOffloads { get }
    /// The largest frame (without header) the backend may deliver regardless of offloads, when it
    /// has its own MTU (passt's is 65520); nil: 1518 bytes, or 65550 with segmentation offloads.
    var maximumFrameSize: Int? { get }
    /// Tells the backend which offloads the guest accepts (TUNSETOFFLOAD).
    func setOffloads(_ offloads: NetOffloads) throws(NetError)
    /// Reads one frame (with its header when `hasVnetHeader`) into `iov`. Returns its length,
    /// or -errno (-EAGAIN: nothing to read). A frame longer than `iov` is truncated.
    func receive(into iov: UnsafeBufferPointer<iovec>) -> Int
    /// Sends one frame (with its header when `hasVnetHeader`) gathered from `iov`. Returns the
    /// bytes taken, or -errno (-EAGAIN: try again when `fd` is writable; nothing was sent).
    func send(_ iov: UnsafeBufferPointer<iovec>) -> Int
    /// Releases the backend (closes the fd, stops helpers). Called once, after the event loop stopped.
    func close()
}

extension NetBackend {
    public var maximumFrameSize: Int? { nil }
}
