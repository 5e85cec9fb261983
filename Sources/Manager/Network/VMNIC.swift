import FoundationEssentials
import VMM

/// A NIC of a VM definition (key `nics`): `{"network": "NAME"}` or `{"bridge": "BR"}`, plus an
/// optional `mac` and `iface_id`. When the VM starts, the daemon creates a TAP for it on the
/// network's (or the named) bridge and gives it to the vmm as a `network-interfaces` entry
/// (`host_dev_name` = the TAP); the TAP is removed when the VM stops.
public struct VMNIC: Sendable, Equatable {
    /// What the NIC plugs into.
    public enum Attachment: Sendable, Equatable {
        /// A network defined with `swiftkvm net define` (it must be running when the VM starts).
        case network(String)
        /// An existing host bridge.
        case bridge(String)
    }

    public var attachment: Attachment
    /// The guest's MAC (`aa:bb:cc:dd:ee:ff`); nil: derived from the VM's name and the iface id.
    public var mac: String?
    /// Firecracker's `iface_id` (default `netN`, N = the NIC's index).
    public var ifaceId: String

    public static let keys = ["network", "bridge", "mac", "iface_id"]
    /// At most this many NICs per VM (TAP names carry a one- or two-digit index).
    public static let maxCount = 16

    public init(attachment: Attachment, mac: String? = nil, ifaceId: String) {
        self.attachment = attachment
        self.mac = mac
        self.ifaceId = ifaceId
    }

    /// The TAP of NIC `index` of VM `vmName`: `swk` + 8 hex digits of a hash of the name + `n` +
    /// the index (at most 14 bytes, within IFNAMSIZ).
    public static func tapName(vmName: String, index: Int) -> String {
        "swk" + NetworkDefinition.hex(NetworkDefinition.shortHash(vmName), digits: 8) + "n\(index)"
    }

    /// The MAC the guest gets: the given one (lower case) or the vmm's derived one.
    public func guestMAC(vmName: String) -> String {
        if let mac { return mac.lowercased() }
        return NetSpec.derivedMAC(vmName: vmName, id: ifaceId).map { NetworkDefinition.hex(UInt32($0), digits: 2) }.joined(separator: ":")
    }

    static func isMAC(_ s: String) -> Bool {
        let parts = s.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6, parts.allSatisfy({ $0.count == 2 && UInt8($0, radix: 16) != nil }) else { return false }
        return UInt8(parts[0], radix: 16)! & 1 == 0 // unicast
    }

    static func isIfaceID(_ s: String) -> Bool {
        (1...64).contains(s.utf8.count) && s.utf8.allSatisfy { b in
            (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5a) || (b >= 0x61 && b <= 0x7a) || b == UInt8(ascii: "_")
        }
    }

    /// Parses the `nics` array; `taken` are the iface ids of the definition's `network-interfaces`.
    static func parseList(_ value: JSONValue, taken: Set<String>, bad: (String) -> ManagerError) throws(ManagerError) -> [VMNIC] {
        guard let list = value.arrayValue else { throw bad("key `nics` must be an array of objects like {\"network\": \"NAME\"}") }
        guard list.count <= maxCount else { throw bad("key `nics`: at most \(maxCount) NICs, not \(list.count)") }
        var nics: [VMNIC] = []
        var ids = taken
        for (i, v) in list.enumerated() {
            let key = "nics[\(i)]"
            guard let o = v.objectValue else { throw bad("key `\(key)` must be an object like {\"network\": \"NAME\"} or {\"bridge\": \"BR\"}") }
            for k in o.keys.sorted() where !keys.contains(k) {
                throw bad("unknown key `\(key).\(k)`, expected one of \(keys.map { "`\($0)`" }.joined(separator: ", "))")
            }
            func string(_ k: String) throws(ManagerError) -> String? {
                guard let v = o[k], !v.isNull else { return nil }
                guard let s = v.stringValue else { throw bad("key `\(key).\(k)` must be a string") }
                return s
            }
            let attachment: Attachment
            switch (try string("network"), try string("bridge")) {
            case (let n?, nil):
                guard VMDefinition.isValidName(n) else { throw bad("key `\(key).network`: '\(n)' is not a valid network name") }
                attachment = .network(n)
            case (nil, let b?):
                guard NetworkDefinition.isValidInterfaceName(b) else {
                    throw bad("key `\(key).bridge`: '\(b)' is not a valid interface name (1 to 15 of A-Z a-z 0-9 . _ -)")
                }
                attachment = .bridge(b)
            case (.some, .some): throw bad("key `\(key)`: give either `network` or `bridge`, not both")
            case (nil, nil): throw bad("key `\(key)` needs `network` (a swiftkvm network) or `bridge` (a host bridge)")
            }
            let mac = try string("mac")
            if let mac, !isMAC(mac) {
                throw bad("key `\(key).mac`: '\(mac)' is not a unicast MAC address (six hex octets separated by ':', e.g. 52:54:00:12:34:56)")
            }
            let id = try string("iface_id") ?? "net\(i)"
            guard isIfaceID(id) else { throw bad("key `\(key).iface_id`: '\(id)' must be 1 to 64 letters, digits or underscores") }
            guard ids.insert(id).inserted else { throw bad("key `\(key).iface_id`: the interface id '\(id)' is used twice") }
            nics.append(VMNIC(attachment: attachment, mac: mac, ifaceId: id))
        }
        return nics
    }

    /// The NIC as stored in a definition.
    var json: JSONValue {
        var o: [String: JSONValue] = ["iface_id": .string(ifaceId)]
        switch attachment {
        case .network(let n): o["network"] = .string(n)
        case .bridge(let b): o["bridge"] = .string(b)
        }
        if let mac { o["mac"] = .string(mac) }
        return .object(o)
    }
}
