import Virtio
#if canImport(Glibc)
import Glibc
#endif

/// The `--vsock cid=N,uds=PATH[,id=ID]` device (Firecracker's `PUT /vsock`: `guest_cid`, `uds_path`,
/// `vsock_id`): a virtio-vsock device whose host side is the Unix socket `udsPath` (host-initiated
/// connections send `CONNECT <port>\n` there) and `<udsPath>_<port>` (guest-initiated ones).
public struct VsockSpec: Codable, Sendable, Equatable {
    /// The guest's context ID (3 or more).
    public var guestCID: UInt64
    /// Path of the listening Unix socket.
    public var udsPath: String
    /// Firecracker's vsock_id (informational).
    public var id: String?

    public init(guestCID: UInt64, udsPath: String, id: String? = nil) {
        self.guestCID = guestCID; self.udsPath = udsPath; self.id = id
    }

    /// Keys accepted by `init(parsing:)`.
    public static let keys = ["cid", "uds", "id"]

    /// Parses `cid=N,uds=PATH[,id=ID]`.
    public init(parsing text: String) throws {
        func bad(_ why: String) -> VMMError { .invalidValue(what: "--vsock", value: text, reason: why) }
        var cid: UInt64?, path: String?, id: String?
        for (key, value) in try OptionItems.pairs(text.split(separator: ",", omittingEmptySubsequences: false),
                                                  keys: Self.keys, bad: bad) {
            switch key {
            case "cid":
                guard let v = UInt64(value) else { throw bad("cid=\(value): expected a number from 3 to 4294967294") }
                cid = v
            case "uds": path = value
            case "id": id = value
            default: throw bad("unknown key '\(key)' (keys: \(Self.keys.joined(separator: ", ")))")
            }
        }
        guard let cid else { throw bad("cid=N is required") }
        guard let path else { throw bad("uds=PATH is required") }
        self.init(guestCID: cid, udsPath: path, id: id)
        try validate()
    }

    /// Checks the CID range and the socket path (length, and that nothing but a socket is there).
    /// Errors name `--vsock` and the field.
    public func validate() throws {
        guard guestCID >= 3, guestCID < 0xffff_ffff else {
            throw VMMError.invalidValue(what: "--vsock", value: "cid=\(guestCID)",
                                        reason: "the guest CID must be 3 to 4294967294 (0, 1 and 2 are reserved: 2 is the host)")
        }
        guard !udsPath.isEmpty else { throw VMMError.invalidValue(what: "--vsock", value: "uds=", reason: "the socket path is empty") }
        guard udsPath.utf8.count <= VirtioVsock.maxPathLength else {
            throw VMMError.invalidValue(what: "--vsock", value: "uds=\(udsPath)",
                                        reason: "\(udsPath.utf8.count) bytes: a Unix socket path holds at most \(VirtioVsock.maxPathLength)")
        }
        var st = stat()
        if lstat(udsPath, &st) == 0, st.st_mode & S_IFMT != S_IFSOCK {
            throw VMMError.invalidValue(what: "--vsock", value: "uds=\(udsPath)", reason: "the path exists and is not a socket")
        }
    }
}
