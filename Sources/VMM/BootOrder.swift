/// `--boot`, QEMU's `-boot` for firmware boots: the order of device kinds (`c` disks, `d` CD-ROMs,
/// `n` network), a boot menu, and strict mode. Written to the firmware as fw_cfg `bootorder` (`BootOrder`).
public struct BootOrderSpec: Codable, Sendable, Equatable {
    /// Device kinds in boot order.
    public var order: [BootDevice.Kind]
    /// Only the listed devices are tried (SeaBIOS's `HALT` entry).
    public var strict: Bool = false
    /// Let the firmware offer its boot menu.
    public var menu: Bool = false

    public init(order: [BootDevice.Kind], strict: Bool = false, menu: Bool = false) {
        self.order = order; self.strict = strict; self.menu = menu
    }

    /// Parses `LETTERS` or `[order=LETTERS][,menu=on|off][,strict=on|off]` (letters from `c`, `d`, `n`).
    public init(parsing text: String) throws {
        func bad(_ why: String) -> VMMError { .invalidValue(what: "--boot", value: text, reason: why) }
        func letters(_ s: Substring) throws -> [BootDevice.Kind] {
            guard !s.isEmpty else { throw bad("no boot devices given (letters c, d, n)") }
            var kinds: [BootDevice.Kind] = []
            for ch in s {
                switch ch {
                case "a", "b": throw bad("'\(ch)' is a floppy drive, and swiftkvm machines have none")
                case "c": kinds.append(.disk)
                case "d": kinds.append(.cdrom)
                case "n": kinds.append(.network)
                default: throw bad("unknown boot device '\(ch)' (c: disk, d: CD-ROM, n: network)")
                }
                guard kinds.dropLast().contains(kinds.last!) == false else { throw bad("'\(ch)' is given twice") }
            }
            return kinds
        }
        order = []
        guard text.contains("=") else { order = try letters(Substring(text)); return }
        for (i, item) in text.split(separator: ",", omittingEmptySubsequences: false).enumerated() {
            let kv = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            // QEMU's implied key: `-boot dc,menu=on` is `order=dc,menu=on`.
            if i == 0, kv.count == 1 { order = try letters(item); continue }
            guard kv.count == 2 else { throw bad("'\(item)' is not KEY=VALUE") }
            func flag() throws -> Bool {
                switch kv[1] {
                case "on": return true
                case "off": return false
                default: throw bad("\(kv[0])=\(kv[1]): expected on or off")
                }
            }
            switch kv[0] {
            case "order": order = try letters(kv[1])
            case "strict": strict = try flag()
            case "menu": menu = try flag()
            default: throw bad("unknown key '\(kv[0])' (keys: order, menu, strict)")
            }
        }
    }
}

/// A device the firmware can boot from, named by the Open Firmware path QEMU gives it in fw_cfg `bootorder`
/// (SeaBIOS and OVMF match these).
public struct BootDevice: Sendable, Equatable {
    /// The kind, as `--boot` letters name it.
    public enum Kind: String, Codable, Sendable {
        case disk = "c", cdrom = "d", network = "n"
    }
    public var kind: Kind
    /// The Open Firmware device path, e.g. `/pci@i0cf8/scsi@1/disk@0,0`.
    public var path: String
    /// Explicit priority (lower first), or nil.
    public var bootIndex: Int?
    /// What the user called it, for messages (the image path or NIC id).
    public var label: String

    /// Parses a `bootindex=` value (0 to 9999, as `--disk` and `--net` take it); nil when it is not one.
    public static func parseIndex(_ text: String) -> Int? {
        guard let n = Int(text), (0...9999).contains(n) else { return nil }
        return n
    }

    public init(kind: Kind, path: String, bootIndex: Int?, label: String) {
        self.kind = kind; self.path = path; self.bootIndex = bootIndex; self.label = label
    }

    /// A virtio-blk disk in PCI slot `slot`.
    public static func virtioBlock(slot: Int, bootIndex: Int?, label: String) -> BootDevice {
        BootDevice(kind: .disk, path: "/pci@i0cf8/scsi@\(String(slot, radix: 16))/disk@0,0", bootIndex: bootIndex, label: label)
    }
    /// A virtio-net NIC with a boot ROM in PCI slot `slot` (SeaBIOS matches its ROM by slot).
    public static func network(slot: Int, bootIndex: Int?, label: String) -> BootDevice {
        BootDevice(kind: .network, path: "/pci@i0cf8/ethernet@\(String(slot, radix: 16))", bootIndex: bootIndex, label: label)
    }
    /// Target `target` (LUN 0) of the virtio-scsi adapter in PCI slot `slot`.
    public static func scsi(slot: Int, target: Int, cdrom: Bool, bootIndex: Int?, label: String) -> BootDevice {
        BootDevice(kind: cdrom ? .cdrom : .disk,
                   path: "/pci@i0cf8/scsi@\(String(slot, radix: 16))/channel@0/disk@\(String(target, radix: 16)),0",
                   bootIndex: bootIndex, label: label)
    }
}

/// The firmware's boot order: fw_cfg `bootorder` lines from the devices and `--boot`.
public enum BootOrder {
    /// QEMU's default order for PCs (`cad`, no floppies here): disks, then CD-ROMs.
    public static let defaultOrder: [BootDevice.Kind] = [.disk, .cdrom]

    /// The `bootorder` lines: devices with a `bootIndex` first (by index), then per kind of `spec`'s order
    /// (QEMU's default without one) the other devices of that kind in configuration order, then `HALT` when
    /// strict. Throws when `--boot` names a kind the machine has no device of (for `n`, no NIC with a
    /// boot ROM), or when two devices share a boot index.
    public static func lines(devices: [BootDevice], spec: BootOrderSpec?) throws -> [String] {
        var seen: [Int: String] = [:]
        for d in devices {
            guard let i = d.bootIndex else { continue }
            if let other = seen[i] {
                throw VMMError.invalidValue(what: "bootindex", value: "\(i)", reason: "given to both \(other) and \(d.label)")
            }
            seen[i] = d.label
        }
        var out = devices.filter { $0.bootIndex != nil }.sorted { $0.bootIndex! < $1.bootIndex! }.map(\.path)
        let kinds = spec.map { $0.order.isEmpty ? defaultOrder : $0.order } ?? defaultOrder
        for kind in kinds {
            let matching = devices.filter { $0.kind == kind }
            if let spec, !spec.order.isEmpty {
                let text = spec.order.map(\.rawValue).joined()
                if matching.isEmpty {
                    let what = switch kind {
                    case .disk: "disk"
                    case .cdrom: "CD-ROM (--disk …,media=cdrom)"
                    case .network: "NIC with a PXE boot ROM (--net …; iPXE's is in the Debian package ipxe-qemu)"
                    }
                    throw VMMError.invalidValue(what: "--boot", value: text,
                                                reason: "'\(kind.rawValue)' names no device: the VM has no \(what)")
                }
            }
            out += matching.filter { $0.bootIndex == nil }.map(\.path)
        }
        if spec?.strict == true, !out.isEmpty { out.append("HALT") }
        return out
    }
}
