/// QEMU's command-line options as people type them (`kvm -m 384 -cdrom x.iso -hda disk.img -boot d`), mapped onto
/// `swiftkvm run` arguments (`runArguments`). Every option and sub-option is either mapped or refused with an error
/// naming it; what maps only approximately (IDE disks become virtio devices, a machine type names SwiftKVM's own PC)
/// is reported in `notes`.
public struct QEMUOptions: Sendable, Equatable {
    public var memory: String?
    public var smp: String?
    public var cdrom: String?
    /// `-hda` … `-hdd` (IDE index 0-3).
    public var hd: [Int: String] = [:]
    public var drives: [String] = []
    public var boot: String?
    public var noACPI = false
    public var kernel: String?
    public var initrd: String?
    public var append: String?
    public var bios: String?
    public var serial: [String] = []
    public var cpu: String?
    public var name: String?
    public var netdevs: [String] = []
    public var devices: [String] = []
    public var machine: String?
    public var accel: [String] = []
    public var display: String?
    public var vga: String?
    public var monitor: String?
    public var noReboot = false
    /// A disk image given without an option (QEMU's `qemu-system-x86_64 disk.img`): `-hda`.
    public var image: String?

    public init() {}

    /// The translation: `swiftkvm run` arguments and notes for the user.
    public struct Translation: Sendable, Equatable {
        public var arguments: [String]
        public var notes: [String]
    }

    private func bad(_ option: String, _ value: String, _ why: String) -> VMMError {
        .invalidValue(what: option, value: value, reason: why)
    }

    /// Splits `a=b,c=d` into pairs (QEMU escapes a comma as `,,`, which a value may contain).
    static func keyValues(_ text: String) -> [(key: String, value: String?)] {
        var items: [String] = [], current = ""
        var chars = Array(text)[...]
        while let c = chars.popFirst() {
            if c == "," {
                if chars.first == "," { current.append(","); chars.removeFirst() } else { items.append(current); current = "" }
            } else {
                current.append(c)
            }
        }
        items.append(current)
        return items.map { item in
            guard let eq = item.firstIndex(of: "=") else { return (item, nil) }
            return (String(item[..<eq]), String(item[item.index(after: eq)...]))
        }
    }

    /// One disk as `--disk` items, or an error naming the `-drive` key.
    struct Drive {
        var file: String?
        var interface = "ide"
        var format: String?
        var cdrom = false
        var readOnly = false
        var cache: String?
        var id: String?
        var bootIndex: Int?
        var index: Int?
        var option: String

        func diskArgument() -> String {
            var items = ["path=\(file!)"]
            if let format { items.append("format=\(format)") }
            if cdrom { items.append("media=cdrom") } else if interface == "scsi" { items.append("if=scsi") }
            if readOnly && !cdrom { items.append("readonly=on") }
            if let cache { items.append("cache=\(cache)") }
            if let id { items.append("id=\(id)") }
            if let bootIndex { items.append("bootindex=\(bootIndex)") }
            return items.joined(separator: ",")
        }
    }

    func parseDrive(_ text: String) throws -> Drive {
        var d = Drive(option: text)
        func flag(_ key: String, _ v: String?) throws -> Bool {
            switch v {
            case "on", "yes", "true", nil: return true
            case "off", "no", "false": return false
            default: throw bad("-drive", text, "\(key)=\(v!): expected on or off")
            }
        }
        for (key, value) in Self.keyValues(text) {
            switch key {
            case "file":
                guard let value, !value.isEmpty else { throw bad("-drive", text, "file= is empty") }
                d.file = value
            case "if":
                guard let value, ["ide", "virtio", "scsi", "none", "pflash"].contains(value) else {
                    throw bad("-drive", text, "if=\(value ?? ""): swiftkvm has ide (as virtio), virtio, scsi, pflash and none")
                }
                d.interface = value
            case "format":
                guard let value, value == "raw" || value == "qcow2" else { throw bad("-drive", text, "format=\(value ?? ""): expected raw or qcow2") }
                d.format = value
            case "media":
                guard let value, value == "disk" || value == "cdrom" else { throw bad("-drive", text, "media=\(value ?? ""): expected disk or cdrom") }
                d.cdrom = value == "cdrom"
            case "readonly": d.readOnly = try flag(key, value)
            case "cache":
                guard let value, value == "none" || value == "writeback" else {
                    throw bad("-drive", text, "cache=\(value ?? ""): swiftkvm has writeback (the default) and none")
                }
                d.cache = value
            case "index", "unit":
                guard let value, let n = Int(value), n >= 0, n < 64 else { throw bad("-drive", text, "\(key)=\(value ?? ""): expected 0 to 63") }
                d.index = n
            case "id":
                guard let value, !value.isEmpty, value.utf8.count <= 20 else { throw bad("-drive", text, "id= takes 1 to 20 bytes") }
                d.id = value
            default:
                throw bad("-drive", text, "unknown key '\(key)' (keys: file, if, format, media, readonly, cache, index, unit, id)")
            }
        }
        if d.interface == "virtio", d.cdrom { throw bad("-drive", text, "media=cdrom with if=virtio: a virtio-blk disk has no removable medium (use if=scsi or if=ide)") }
        if d.file == nil { throw bad("-drive", text, "file= is required (empty CD-ROM drives are not supported)") }
        if d.file!.contains(",") { throw bad("-drive", text, "a file name with a comma is not supported") }
        return d
    }

    /// The `swiftkvm run` arguments for these options.
    public func runArguments() throws -> Translation {
        var args: [String] = [], notes: [String] = []
        // Memory: MiB without a suffix, as QEMU reads it.
        var mem = memory ?? "128"
        if mem.hasPrefix("size=") { mem = String(mem.dropFirst(5)) }
        if mem.contains(",") { throw bad("-m", memory ?? "", "only a size is supported (no slots or maxmem)") }
        if !mem.isEmpty, mem.allSatisfy(\.isNumber) { mem += "M" }
        args += ["--memory", mem]
        if let smp { args += ["--cpus", try cpus(smp)] }

        // Disks: -hda…-hdd (IDE 0-3), the positional image as -hda, then -drive in order; -cdrom is IDE 2.
        var drives: [Drive] = []
        var hds = hd
        if let image {
            guard hds[0] == nil else { throw bad("disk image", image, "given as well as -hda") }
            hds[0] = image
        }
        if cdrom != nil, hds[2] != nil { throw bad("-cdrom", cdrom!, "IDE index 2 is taken by -hdc") }
        for f in Array(hds.values) + (cdrom.map { [$0] } ?? []) where f.contains(",") {
            throw bad("disk image", f, "a file name with a comma is not supported")
        }
        for index in 0..<4 {
            if let file = hds[index] { drives.append(Drive(file: file, index: index, option: "-hd\(["a", "b", "c", "d"][index])")) }
            if index == 2, let cdrom { drives.append(Drive(file: cdrom, cdrom: true, readOnly: true, index: 2, option: "-cdrom")) }
        }
        for text in self.drives { drives.append(try parseDrive(text)) }
        // pflash: unit/index 0 (or the first) is the firmware's code, 1 its variable store (QEMU's UEFI invocation).
        let pflash = drives.enumerated().filter { $0.element.interface == "pflash" }
            .sorted { ($0.element.index ?? $0.offset, $0.offset) < ($1.element.index ?? $1.offset, $1.offset) }.map(\.element)
        drives.removeAll { $0.interface == "pflash" }
        if pflash.count > 2 { throw bad("-drive", pflash[2].option, "at most two if=pflash drives (firmware code, variable store)") }
        if !pflash.isEmpty, bios != nil { throw bad("-bios", bios!, "given as well as if=pflash firmware") }
        for p in pflash where p.format != nil && p.format != "raw" { throw bad("-drive", p.option, "pflash images are raw") }
        if pflash.count == 2, pflash[1].readOnly { throw bad("-drive", pflash[1].option, "the variable store must be writable") }

        // Devices: NICs (-netdev + -device virtio-net-pci), drives attached by id, rng, balloon, debug-exit.
        var netdevs: [String: (kind: String, items: [(key: String, value: String?)])] = [:]
        for text in self.netdevs {
            let kv = Self.keyValues(text)
            guard let kind = kv.first?.key, kv.first?.value == nil else { throw bad("-netdev", text, "expected TYPE,id=ID,…") }
            guard let id = kv.first(where: { $0.key == "id" })?.value, !id.isEmpty else { throw bad("-netdev", text, "id= is required") }
            guard netdevs[id] == nil else { throw bad("-netdev", text, "id=\(id) is given twice") }
            netdevs[id] = (kind, Array(kv.dropFirst()))
        }
        var usedNetdevs = Set<String>(), nets: [String] = []
        var debugExit: String?
        for text in devices {
            let kv = Self.keyValues(text)
            guard let driver = kv.first?.key, kv.first?.value == nil else { throw bad("-device", text, "expected DRIVER,…") }
            let props = Dictionary(kv.dropFirst().map { ($0.key, $0.value ?? "on") }, uniquingKeysWith: { a, _ in a })
            func allow(_ keys: Set<String>) throws {
                if let k = props.keys.sorted().first(where: { !keys.contains($0) }) {
                    throw bad("-device", text, "\(driver) has no property '\(k)' here (properties: \(keys.sorted().joined(separator: ", ")))")
                }
            }
            func bootIndex() throws -> Int? {
                guard let b = props["bootindex"] else { return nil }
                guard let n = Int(b), n >= 0 else { throw bad("-device", text, "bootindex=\(b): expected a number") }
                return n
            }
            switch driver {
            case "virtio-net-pci", "virtio-net":
                try allow(["netdev", "mac", "id", "bootindex", "romfile"])
                guard let id = props["netdev"], let nd = netdevs[id] else { throw bad("-device", text, "netdev= must name a -netdev id") }
                guard usedNetdevs.insert(id).inserted else { throw bad("-device", text, "netdev \(id) is used twice") }
                var net = try net(id: id, kind: nd.kind, items: nd.items, mac: props["mac"])
                if let n = try bootIndex() { net += ",bootindex=\(n)" }
                if let rom = props["romfile"] {
                    guard !rom.contains(",") else { throw bad("-device", text, "a romfile name with a comma is not supported") }
                    net += ",romfile=\(rom)"
                }
                nets.append(net)
            case "virtio-blk-pci", "virtio-blk", "scsi-hd", "scsi-cd":
                try allow(["drive", "bootindex", "id"])
                guard let id = props["drive"], let i = drives.firstIndex(where: { $0.id == id }) else {
                    throw bad("-device", text, "drive= must name a -drive id")
                }
                guard drives[i].interface == "none" else { throw bad("-device", text, "drive \(id) is already on if=\(drives[i].interface)") }
                drives[i].interface = driver.hasPrefix("virtio") ? "virtio" : "scsi"
                if driver == "scsi-cd" { drives[i].cdrom = true; drives[i].readOnly = true }
                if let n = try bootIndex() { drives[i].bootIndex = n }
            case "virtio-scsi-pci", "virtio-scsi":
                try allow(["id"])   // the adapter exists whenever a SCSI unit does
            case "virtio-rng-pci", "virtio-rng":
                try allow(["id"])
                args.append("--rng")
            case "virtio-balloon-pci", "virtio-balloon":
                try allow(["id", "deflate-on-oom", "free-page-reporting"])
                var b = "0"
                if props["deflate-on-oom"] == "on" { b += ",deflate-on-oom" }
                if props["free-page-reporting"] == "on" { b += ",free-page-reporting" }
                args += ["--balloon", b]
            case "isa-debug-exit":
                try allow(["iobase", "iosize"])
                debugExit = props["iobase"] ?? "0x501"
            default:
                throw bad("-device", text, "unknown or unsupported device '\(driver)' (swiftkvm has virtio-net-pci, virtio-blk-pci, virtio-scsi-pci, scsi-hd, scsi-cd, virtio-rng-pci, virtio-balloon-pci, isa-debug-exit)")
            }
        }
        if let id = netdevs.keys.sorted().first(where: { !usedNetdevs.contains($0) }) {
            throw bad("-netdev", "id=\(id)", "no -device virtio-net-pci,netdev=\(id) uses it")
        }
        if let d = drives.first(where: { $0.interface == "none" }) {
            throw bad("-drive", d.option, "if=none, and no -device attaches it")
        }
        // IDE has no controller here: disks go on virtio-blk, CD-ROMs on virtio-scsi.
        let ide = drives.filter { $0.interface == "ide" }
        if !ide.isEmpty {
            notes.append("no IDE controller: \(ide.map { "\($0.file!) is a \($0.cdrom ? "virtio-scsi CD-ROM" : "virtio-blk disk")" }.joined(separator: ", ")) (the guest needs virtio drivers)")
        }
        let ordered = drives.enumerated().sorted { ($0.element.index ?? 64 + $0.offset, $0.offset) < ($1.element.index ?? 64 + $1.offset, $1.offset) }
        for (_, d) in ordered { args += ["--disk", d.diskArgument()] }
        for n in nets { args += ["--net", n] }
        args += ["--debug-exit-port", debugExit ?? "none"]

        // The guest: -kernel (direct boot, as QEMU's -kernel does through its option ROM), else firmware.
        if let kernel {
            if !pflash.isEmpty { throw bad("-kernel", kernel, "with if=pflash firmware (boot the kernel from the firmware, or drop the pflash drives)") }
            if let bios { args += ["--firmware", bios] }
            args += ["--kernel", kernel]
            if let initrd { args += ["--initrd", initrd] }
            args += ["--cmdline", append ?? ""]
        } else {
            if initrd != nil { throw bad("-initrd", initrd!, "needs -kernel") }
            if append != nil { throw bad("-append", append!, "needs -kernel") }
            if let code = pflash.first {
                args += ["--firmware", code.file!]
                if pflash.count == 2 { args += ["--uefi-vars", pflash[1].file!] }
            } else if let bios { args += ["--firmware", bios] } else { args.append("--bios") }
        }
        if let boot {
            guard kernel == nil || bios != nil else { throw bad("-boot", boot, "with -kernel the kernel is booted directly; -boot is for firmware boots") }
            args += ["--boot", boot]
        }
        if noACPI { args.append("--no-acpi") }

        // Console, CPU, name, machine.
        if serial.count > 1 { throw bad("-serial", serial[1], "one serial port (COM1) only") }
        switch serial.first ?? "stdio" {
        case "stdio": args += ["--serial", "stdio"]
        case "mon:stdio":
            args += ["--serial", "stdio"]
            notes.append("-serial mon:stdio: no QEMU monitor; the serial port is on stdio")
        case "none", "null": args += ["--serial", "none"]
        case let s where s.hasPrefix("file:"): args += ["--serial", s]
        case let s: throw bad("-serial", s, "expected stdio, mon:stdio, file:PATH or none")
        }
        if let cpu, cpu != "host", cpu != "max" { throw bad("-cpu", cpu, "only host (the host's CPU, as KVM allows) is supported") }
        if let name {
            var n = name
            for (k, v) in Self.keyValues(name) where k == "guest" { n = v ?? "" }
            if n.contains("=") { throw bad("-name", name, "expected NAME or guest=NAME") }
            args += ["--name", n]
        }
        if let machine {
            for (k, v) in Self.keyValues(machine) {
                switch (k, v) {
                case ("accel", "kvm"), ("type", "pc"), ("type", "q35"), ("pc", nil), ("q35", nil): break
                case (let t, nil) where t.hasPrefix("pc-"): break
                default: throw bad("-machine", machine, "'\(k)\(v.map { "=" + $0 } ?? "")' is not supported (pc or q35, accel=kvm)")
                }
            }
            notes.append("-machine \(machine): swiftkvm's PC (its own host bridge, virtio devices) stands in for QEMU's machine types")
        }
        for a in accel where a != "kvm" { throw bad("-accel", a, "swiftkvm runs on KVM only") }
        if let display, display != "none" { throw bad("-display", display, "swiftkvm has no display (firmware and bootloader screens go to the serial port)") }
        if let vga, vga != "none" { throw bad("-vga", vga, "swiftkvm has no graphics card (firmware and bootloader screens go to the serial port)") }
        if let monitor, monitor != "none" { throw bad("-monitor", monitor, "swiftkvm has no QEMU monitor") }
        args += ["--on-reboot", noReboot ? "exit" : "restart"]
        return Translation(arguments: args, notes: notes)
    }

    func cpus(_ text: String) throws -> String {
        var count: String?, max: String?
        for (k, v) in Self.keyValues(text) {
            switch (k, v) {
            case (let n, nil) where Int(n) != nil: count = n
            case ("cpus", let n?): count = n
            case ("maxcpus", let n?): max = n
            case ("sockets", "1"), ("cores", _), ("threads", "1"), ("dies", "1"): break
            default: throw bad("-smp", text, "'\(k)\(v.map { "=" + $0 } ?? "")': only N, cpus=N and maxcpus=N (no hotplug, one socket) are supported")
            }
        }
        guard let count, Int(count) != nil else { throw bad("-smp", text, "expected a CPU count") }
        if let max, max != count { throw bad("-smp", text, "maxcpus must equal the CPU count (no CPU hotplug)") }
        for (k, v) in Self.keyValues(text) where k == "cores" && v != count {
            throw bad("-smp", text, "cores=\(v ?? "") must equal the CPU count (one socket, one thread per core)")
        }
        return count
    }

    /// A `--net` value for netdev `id`.
    func net(id: String, kind: String, items: [(key: String, value: String?)], mac: String?) throws -> String {
        var parts: [String] = [], forwards: [String] = []
        for (k, v) in items where k != "id" {
            switch (kind, k) {
            case ("tap", "ifname"): parts.append("tap=\(v ?? "")")
            case ("tap", "script"), ("tap", "downscript"):
                guard v == "no" else { throw bad("-netdev", "\(kind),id=\(id)", "\(k)=\(v ?? ""): swiftkvm runs no scripts (script=no, downscript=no)") }
            case ("bridge", "br"): parts.append("bridge=\(v ?? "")")
            case ("user", "hostfwd"): forwards.append("hostfwd=\(v ?? "")")
            default: throw bad("-netdev", "\(kind),id=\(id)", "'\(k)' is not supported for \(kind)")
            }
        }
        switch kind {
        case "tap":
            guard parts.count == 1 else { throw bad("-netdev", "tap,id=\(id)", "ifname= is required") }
            let keys = Set(items.map(\.key))
            guard keys.contains("script"), keys.contains("downscript") else {
                throw bad("-netdev", "tap,id=\(id)", "QEMU would run /etc/qemu-ifup and qemu-ifdown here; swiftkvm runs no scripts: add script=no,downscript=no")
            }
        case "bridge": guard parts.count == 1 else { throw bad("-netdev", "bridge,id=\(id)", "br= is required") }
        case "user": parts = ["user"] + forwards
        default: throw bad("-netdev", "\(kind),id=\(id)", "type \(kind) is not supported (tap, bridge, user)")
        }
        parts.append("id=\(id)")
        if let mac { parts.append("mac=\(mac)") }
        return parts.joined(separator: ",")
    }
}
