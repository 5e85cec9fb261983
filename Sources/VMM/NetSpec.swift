import Virtio

/// One `--net` NIC: a virtio-net device and the backend its frames go to.
///
/// Forms (repeatable, in PCI slot order after the disks):
/// - `tap=NAME[,mac=MAC][,id=ID]`: an existing TAP interface;
/// - `fd=N[,mac=…][,id=…]`: a `/dev/net/tun` fd attached to a TAP with IFF_VNET_HDR, inherited
///   from the caller (as libvirt passes TAPs);
/// - `bridge=BR[,mac=…][,id=…]`: a new TAP on the existing bridge BR, removed when the VM stops;
/// - `user[,hostfwd=tcp::HOSTPORT-:GUESTPORT]…[,mac=…][,id=…]`: user-mode NAT through passt.
///
/// For firmware boots, `romfile=PATH` gives the NIC another PXE option ROM than iPXE's
/// (`NetSpec.defaultROM`), `romfile=` none, and `bootindex=N` its place in the boot order.
public struct NetSpec: Codable, Sendable, Equatable {
    /// Where the NIC's frames go.
    public enum Backend: Codable, Sendable, Equatable {
        case tap(name: String)
        case fd(Int32)
        case bridge(name: String)
        case user(forwards: [PortForward])
    }
    /// A `hostfwd` rule of a user-mode NIC: host port → guest port.
    public struct PortForward: Codable, Sendable, Equatable {
        /// "tcp" or "udp".
        public var proto: String
        /// Host address to bind ("" = all).
        public var hostAddress: String
        public var hostPort: UInt16
        public var guestPort: UInt16
        public init(proto: String, hostAddress: String = "", hostPort: UInt16, guestPort: UInt16) {
            self.proto = proto; self.hostAddress = hostAddress; self.hostPort = hostPort; self.guestPort = guestPort
        }
    }

    public var backend: Backend
    /// The guest's MAC address; nil derives a stable one from the VM name and `id`.
    public var mac: [UInt8]?
    /// The NIC's id (Firecracker's iface_id); nil is `netN` by position.
    public var id: String?
    /// Rate limits per direction (bytes, frames); nil: none.
    public var rxRateLimit: RateLimitConfig?
    public var txRateLimit: RateLimitConfig?
    /// The PXE option ROM of a firmware boot: nil for `defaultROM` when it is installed, "" for none.
    public var romFile: String?
    /// The NIC's place in a firmware boot order (QEMU's `bootindex`), nil for `--boot`'s.
    public var bootIndex: Int?

    /// iPXE's ROM for virtio-net (legacy BIOS and UEFI images; Debian package ipxe-qemu), QEMU's default `romfile`.
    public static let defaultROM = "/usr/lib/ipxe/qemu/efi-virtio.rom"

    public init(backend: Backend, mac: [UInt8]? = nil, id: String? = nil,
                rxRateLimit: RateLimitConfig? = nil, txRateLimit: RateLimitConfig? = nil) {
        self.backend = backend; self.mac = mac; self.id = id
        self.rxRateLimit = rxRateLimit; self.txRateLimit = txRateLimit
    }

    /// Keys accepted by `init(parsing:)` besides the backend.
    public static let keys = ["mac", "id", "hostfwd", "romfile", "bootindex"]

    /// Parses one `--net` value (see the type's documentation).
    public init(parsing text: String) throws {
        func bad(_ why: String) -> VMMError { .invalidValue(what: "--net", value: text, reason: why) }
        var items = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard let first = items.first, !first.isEmpty else {
            throw bad("expected tap=NAME, fd=N, bridge=BR or user, then mac=, id=")
        }
        items.removeFirst()
        let backend: Backend
        var forwards: [PortForward] = []
        let (kind, value) = Self.split(first)
        switch kind {
        case "tap":
            guard let value, Self.validInterfaceName(value) else { throw bad("tap=NAME needs an interface name of 1 to 15 bytes") }
            backend = .tap(name: value)
        case "bridge":
            guard let value, Self.validInterfaceName(value) else { throw bad("bridge=BR needs a bridge name of 1 to 15 bytes") }
            backend = .bridge(name: value)
        case "fd":
            guard let value, let fd = Int32(value), fd >= 3 else { throw bad("fd=N needs a descriptor number of 3 or more") }
            backend = .fd(fd)
        case "user":
            guard value == nil else { throw bad("user takes no value (user,hostfwd=tcp::HOSTPORT-:GUESTPORT)") }
            backend = .user(forwards: [])
        default:
            throw bad("'\(first)' is not a backend: expected tap=NAME, fd=N, bridge=BR or user")
        }
        var spec = NetSpec(backend: backend)
        for (key, v) in try OptionItems.pairs(items, keys: Self.keys, repeatable: ["hostfwd"], bad: bad) {
            switch key {
            case "mac":
                guard let mac = Self.parseMAC(v) else { throw bad("mac=\(v): expected six hex bytes such as 52:54:00:12:34:56") }
                guard mac[0] & 1 == 0 else { throw bad("mac=\(v): a multicast address cannot be a NIC's address") }
                guard mac != [0, 0, 0, 0, 0, 0] else { throw bad("mac=\(v): the zero address cannot be a NIC's address") }
                spec.mac = mac
            case "id":
                guard !v.isEmpty, v.utf8.count <= 64,
                      v.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_" || $0 == "-" || $0 == ".") }) else {
                    throw bad("id=\(v): expected 1 to 64 letters, digits, '_', '-' or '.'")
                }
                spec.id = v
            case "romfile":
                spec.romFile = v
            case "bootindex":
                guard let n = BootDevice.parseIndex(v) else { throw bad("bootindex=\(v): expected 0 to 9999") }
                spec.bootIndex = n
            case "hostfwd":
                guard case .user = backend else { throw bad("hostfwd applies to user-mode NICs only") }
                guard let f = Self.parseForward(v) else {
                    throw bad("hostfwd=\(v): expected tcp::HOSTPORT-:GUESTPORT or udp:ADDR:HOSTPORT-:GUESTPORT")
                }
                forwards.append(f)
            default:
                throw bad("unknown key '\(key)' (keys: \(Self.keys.joined(separator: ", ")))")
            }
        }
        if case .user = backend { spec.backend = .user(forwards: forwards) }
        self = spec
    }

    private static func split(_ item: String) -> (String, String?) {
        guard let eq = item.firstIndex(of: "=") else { return (item, nil) }
        return (String(item[..<eq]), String(item[item.index(after: eq)...]))
    }

    /// Whether `name` can name a host network interface (IFNAMSIZ, no slash, colon or whitespace).
    public static func validInterfaceName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count < 16 && !name.contains("/") && name != "." && name != ".."
            && !name.contains(where: { $0.isWhitespace || $0 == ":" })
    }

    /// Parses `aa:bb:cc:dd:ee:ff` (or with '-').
    public static func parseMAC(_ text: String) -> [UInt8]? {
        let parts = text.split(separator: text.contains("-") ? "-" : ":", omittingEmptySubsequences: false)
        guard parts.count == 6 else { return nil }
        var out: [UInt8] = []
        for p in parts {
            guard p.count == 2, let b = UInt8(p, radix: 16) else { return nil }
            out.append(b)
        }
        return out
    }

    /// `aa:bb:cc:dd:ee:ff`.
    public static func formatMAC(_ mac: [UInt8]) -> String {
        mac.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: ":")
    }

    /// QEMU's `hostfwd` syntax: `tcp|udp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT`.
    static func parseForward(_ text: String) -> PortForward? {
        let halves = text.split(separator: "-", omittingEmptySubsequences: false)
        guard halves.count == 2 else { return nil }
        let host = halves[0].split(separator: ":", omittingEmptySubsequences: false)
        let guest = halves[1].split(separator: ":", omittingEmptySubsequences: false)
        guard host.count == 3, ["tcp", "udp"].contains(host[0]), guest.count == 2, guest[0].isEmpty,
              let hp = UInt16(host[2]), hp > 0, let gp = UInt16(guest[1]), gp > 0 else { return nil }
        return PortForward(proto: String(host[0]), hostAddress: String(host[1]), hostPort: hp, guestPort: gp)
    }

    /// A stable, locally administered unicast MAC for NIC `id` of VM `vmName` (FNV-1a of both):
    /// the same VM and NIC get the same address on every start.
    public static func derivedMAC(vmName: String, id: String) -> [UInt8] {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in (vmName + "\u{0}" + id).utf8 {
            h ^= UInt64(b)
            h = h &* 0x0000_0100_0000_01b3
        }
        var mac = (0..<6).map { UInt8(truncatingIfNeeded: h >> (8 * UInt64($0))) }
        mac[0] = (mac[0] & 0xfc) | 0x02 // locally administered, unicast
        return mac
    }
}
