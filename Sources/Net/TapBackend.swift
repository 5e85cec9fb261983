import CNet
#if canImport(Glibc)
import Glibc
#endif

/// A TAP interface (`/dev/net/tun` with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR): frames go to and
/// from the host's network stack on that interface, with a 12-byte virtio_net_hdr
/// (TUNSETVNETHDRSZ) so checksum and segmentation offloads pass through untouched.
///
/// Opened by the name of an existing TAP (`--net tap=NAME`), from an fd that was passed in
/// (`--net fd=N`, as libvirt and Firecracker's jailer hand TAPs over), or created on a bridge
/// (`--net bridge=BR`, QEMU's `-netdev bridge`): a new TAP that lives as long as the VM.
public final class TapBackend: NetBackend, @unchecked Sendable {
    /// The interface name.
    public let interface: String
    public let fd: Int32
    public var label: String { "tap \(interface)" }
    public var hasVnetHeader: Bool { true }
    public let supportedOffloads: NetOffloads
    private var closed = false

    /// The virtio_net_hdr size used (virtio 1.x always has num_buffers).
    public static let vnetHeaderSize = 12

    /// Attaches to the existing TAP `name`. Fails, naming the interface, when it does not exist,
    /// is not a TAP, or is in use by another process.
    public convenience init(name: String) throws(NetError) {
        try Self.checkName(name)
        guard Self.interfaceExists(name) else {
            throw NetError("TAP '\(name)' does not exist (create it with `ip tuntap add dev \(name) mode tap`, or use --net bridge=BR)")
        }
        guard Self.isTun(name) else { throw NetError("'\(name)' is not a TAP interface") }
        var actual = [CChar](repeating: 0, count: 16)
        let fd = cnet_tap_open(name, 1, &actual)
        guard fd >= 0 else {
            if -fd == EBUSY { throw NetError("TAP '\(name)' is busy: another process (a VM?) has it open") }
            if -fd == EINVAL { throw NetError("TAP '\(name)' cannot be attached (is it a multi-queue or TUN device?)") }
            throw .system("cannot attach to TAP '\(name)'", errno: fd)
        }
        do { try self.init(fd: fd, interface: name) } catch { Glibc.close(fd); throw error }
    }

    /// Takes over an open `/dev/net/tun` fd that is attached to a TAP (the caller passed it in).
    /// IFF_VNET_HDR is required: the fd must have been attached with it.
    public convenience init(passedFD fd: Int32) throws(NetError) {
        var name = [CChar](repeating: 0, count: 16)
        var flags: Int32 = 0
        let r = cnet_tap_get_iff(fd, &name, &flags)
        guard r == 0 else { throw .system("fd \(fd) is not an attached TAP (TUNGETIFF)", errno: r) }
        let iface = String(cString: name)
        guard flags & cnet_iff_tap() != 0 else { throw NetError("fd \(fd) is a TUN device ('\(iface)'), not a TAP") }
        guard flags & cnet_iff_vnet_hdr() != 0 else {
            throw NetError("fd \(fd) (TAP '\(iface)') was opened without IFF_VNET_HDR")
        }
        guard flags & cnet_iff_no_pi() != 0 else { throw NetError("fd \(fd) (TAP '\(iface)') was opened without IFF_NO_PI") }
        let fl = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, fl | O_NONBLOCK)
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        try self.init(fd: fd, interface: iface)
    }

    /// Creates a new TAP (a kernel-chosen name, removed when the VM's fd closes), adds it to the
    /// existing bridge `bridge` and brings it up, as QEMU's bridge helper does.
    public static func onBridge(_ bridge: String) throws(NetError) -> TapBackend {
        try checkName(bridge)
        guard interfaceExists(bridge) else { throw NetError("bridge '\(bridge)' does not exist") }
        var st = stat()
        guard stat("/sys/class/net/\(bridge)/bridge", &st) == 0 else { throw NetError("'\(bridge)' is not a bridge") }
        var actual = [CChar](repeating: 0, count: 16)
        let fd = cnet_tap_open("", 1, &actual)
        guard fd >= 0 else { throw .system("cannot create a TAP for bridge '\(bridge)'", errno: fd) }
        let name = String(cString: actual)
        do throws(NetError) {
            let tap = try TapBackend(fd: fd, interface: name)
            let a = cnet_bridge_add_if(bridge, name)
            guard a == 0 else { throw NetError.system("cannot add TAP '\(name)' to bridge '\(bridge)'", errno: a) }
            let u = cnet_if_set_up(name)
            guard u == 0 else { throw NetError.system("cannot bring TAP '\(name)' up", errno: u) }
            return tap
        } catch {
            Glibc.close(fd)
            throw error
        }
    }

    private init(fd: Int32, interface: String) throws(NetError) {
        let r = cnet_tap_set_vnet_hdr_size(fd, Int32(Self.vnetHeaderSize))
        guard r == 0 else { throw .system("TAP '\(interface)': TUNSETVNETHDRSZ", errno: r) }
        // Probe the offloads this kernel's TAP takes; UFO is refused by some kernels.
        var supported: NetOffloads = []
        let all: NetOffloads = [.checksum, .tso4, .tso6, .tsoECN, .ufo]
        if cnet_tap_set_offload(fd, all.rawValue) == 0 {
            supported = all
        } else if cnet_tap_set_offload(fd, all.subtracting(.ufo).rawValue) == 0 {
            supported = all.subtracting(.ufo)
        } else if cnet_tap_set_offload(fd, NetOffloads.checksum.rawValue) == 0 {
            supported = .checksum
        }
        // Nothing is enabled until the guest asks for it.
        _ = cnet_tap_set_offload(fd, 0)
        self.fd = fd
        self.interface = interface
        self.supportedOffloads = supported
    }

    deinit { close() }

    public func setOffloads(_ offloads: NetOffloads) throws(NetError) {
        let r = cnet_tap_set_offload(fd, offloads.intersection(supportedOffloads).rawValue)
        guard r == 0 else { throw .system("TAP '\(interface)': TUNSETOFFLOAD", errno: r) }
    }

    public func receive(into iov: UnsafeBufferPointer<iovec>) -> Int {
        while true {
            let n = cnet_readv(fd, iov.baseAddress, Int32(iov.count))
            if n == -Int(EINTR) { continue }
            return n
        }
    }

    public func send(_ iov: UnsafeBufferPointer<iovec>) -> Int {
        while true {
            let n = cnet_writev(fd, iov.baseAddress, Int32(iov.count))
            if n == -Int(EINTR) { continue }
            return n
        }
    }

    public func close() {
        guard !closed else { return }
        closed = true
        Glibc.close(fd)
    }

    static func checkName(_ name: String) throws(NetError) {
        guard !name.isEmpty, name.utf8.count < 16, !name.contains("/"), name != ".", name != "..",
              !name.contains(where: { $0.isWhitespace }) else {
            throw NetError("'\(name)' is not a valid interface name (1 to 15 bytes, no '/' or spaces)")
        }
    }

    static func interfaceExists(_ name: String) -> Bool { cnet_if_index(name) > 0 }

    static func isTun(_ name: String) -> Bool {
        var st = stat()
        return stat("/sys/class/net/\(name)/tun_flags", &st) == 0
    }
}
