import GuestMemory
import Boot
import Virtio

/// What to do when the guest resets (triple fault, i8042 reset pulse, KVM system event reset).
public enum RebootPolicy: String, Codable, Sendable, CaseIterable {
    /// Exit with `ExitCode.reset` (3).
    case exit
    /// Reload the guest and boot it again.
    case restart
}

/// One `--cpuid-mask leaf[.subleaf].reg=mask` item: clears the bits of `mask` in one CPUID register.
public struct CPUIDMask: Codable, Sendable, Equatable {
    /// CPUID register.
    public enum Register: String, Codable, Sendable, CaseIterable { case eax, ebx, ecx, edx }
    public var leaf: UInt32
    /// Subleaf (index); nil applies to every subleaf of `leaf`.
    public var subleaf: UInt32?
    public var register: Register
    /// Bits to clear.
    public var mask: UInt32

    public init(leaf: UInt32, subleaf: UInt32? = nil, register: Register, mask: UInt32) {
        self.leaf = leaf; self.subleaf = subleaf; self.register = register; self.mask = mask
    }

    /// Parses `leaf[.subleaf].reg=mask`, numbers in hex (0x…) or decimal, e.g. `0x1.ecx=0x2000`
    /// or `7.0.ebx=0x200`.
    public init(parsing text: String) throws {
        let bad = { (why: String) in VMMError.invalidValue(what: "--cpuid-mask", value: text, reason: why) }
        let halves = text.split(separator: "=", omittingEmptySubsequences: false)
        guard halves.count == 2 else { throw bad("expected leaf[.subleaf].reg=mask, e.g. 0x1.ecx=0x2000") }
        let parts = halves[0].split(separator: ".", omittingEmptySubsequences: false).map(String.init)
        guard parts.count == 2 || parts.count == 3, let reg = Register(rawValue: parts.last!.lowercased()) else {
            throw bad("expected leaf[.subleaf].reg=mask with reg one of eax, ebx, ecx, edx")
        }
        leaf = UInt32(try SizeParser.parseInteger(parts[0], what: "--cpuid-mask leaf", max: UInt64(UInt32.max)))
        subleaf = parts.count == 3
            ? UInt32(try SizeParser.parseInteger(parts[1], what: "--cpuid-mask subleaf", max: UInt64(UInt32.max))) : nil
        register = reg
        mask = UInt32(try SizeParser.parseInteger(String(halves[1]), what: "--cpuid-mask mask", max: UInt64(UInt32.max)))
    }
}

/// The balloon device: the size to take from the guest, and its options (Firecracker's `/balloon`).
public struct BalloonSpec: Codable, Sendable, Equatable {
    /// MiB the host wants back at start.
    public var amountMiB: UInt32
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM (the guest may take pages back under memory pressure).
    public var deflateOnOOM: Bool
    /// Seconds between statistics polls (0: no polling).
    public var statsIntervalS: UInt32
    /// Offer free page reporting.
    public var freePageReporting: Bool
    public init(amountMiB: UInt32, deflateOnOOM: Bool, statsIntervalS: UInt32, freePageReporting: Bool) {
        self.amountMiB = amountMiB; self.deflateOnOOM = deflateOnOOM
        self.statsIntervalS = statsIntervalS; self.freePageReporting = freePageReporting
    }

    /// `--balloon MIB[,deflate-on-oom][,free-page-reporting][,stats=SECONDS]`.
    public init(parsing text: String) throws {
        func bad(_ reason: String) -> VMMError { .invalidValue(what: "--balloon", value: text, reason: reason) }
        let parts = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard let mib = UInt32(parts[0]) else { throw bad("expected the MiB to take back first, e.g. 64 or 0") }
        self.init(amountMiB: mib, deflateOnOOM: false, statsIntervalS: 0, freePageReporting: false)
        for p in parts.dropFirst() {
            switch p {
            case "deflate-on-oom": deflateOnOOM = true
            case "free-page-reporting": freePageReporting = true
            case _ where p.hasPrefix("stats="):
                guard let s = UInt32(p.dropFirst(6)), s <= 86_400 else { throw bad("stats= takes seconds from 0 to 86400") }
                statsIntervalS = s
            default: throw bad("unknown option '\(p)': expected deflate-on-oom, free-page-reporting or stats=SECONDS")
            }
        }
    }
}

/// A flat binary to run (`--flat FILE --load-address A --entry E --mode M`).
public struct FlatImage: Codable, Sendable, Equatable {
    public var path: String
    public var loadAddress: UInt64
    public var entry: UInt64
    public var mode: FlatLoader.Mode
    public init(path: String, loadAddress: UInt64, entry: UInt64, mode: FlatLoader.Mode) {
        self.path = path; self.loadAddress = loadAddress; self.entry = entry; self.mode = mode
    }
}

/// A multiboot module (`--module FILE[,cmdline]`).
public struct ModuleSpec: Codable, Sendable, Equatable {
    public var path: String
    public var cmdline: String
    public init(path: String, cmdline: String = "") { self.path = path; self.cmdline = cmdline }

    /// Parses `FILE[,cmdline]` (everything after the first comma is the module's command line).
    public init(parsing text: String) throws {
        guard !text.isEmpty else { throw VMMError.invalidValue(what: "--module", value: text, reason: "empty") }
        if let comma = text.firstIndex(of: ",") {
            path = String(text[..<comma])
            cmdline = String(text[text.index(after: comma)...])
        } else {
            path = text
            cmdline = ""
        }
        guard !path.isEmpty else { throw VMMError.invalidValue(what: "--module", value: text, reason: "no file name before the comma") }
    }
}

/// What the guest is: a kernel (bzImage, ELF or multiboot), a flat binary, or firmware (a BIOS image
/// started at the reset vector, e.g. SeaBIOS's bios.bin).
public enum GuestPayload: Codable, Sendable, Equatable {
    case kernel(path: String, initrd: String?, cmdline: String, modules: [ModuleSpec])
    case flat(FlatImage)
    case firmware(FirmwareSpec)
}

/// A firmware boot: the image, and optionally a Linux bzImage (with initrd and command line) that the
/// firmware loads through fw_cfg, as QEMU's `-kernel` with SeaBIOS.
public struct FirmwareSpec: Codable, Sendable, Equatable {
    public var path: String
    public var kernel: String?
    public var initrd: String?
    public var cmdline: String
    /// UEFI variable store (a per-VM copy of OVMF_VARS): a CFI flash directly below the firmware image, whose
    /// writes go to this file; nil: none.
    public var vars: String?
    public init(path: String, kernel: String? = nil, initrd: String? = nil, cmdline: String = "", vars: String? = nil) {
        self.path = path; self.kernel = kernel; self.initrd = initrd; self.cmdline = cmdline; self.vars = vars
    }
}

/// Everything needed to build and run one VM. A plain value (Codable); `Machine` turns it into live objects.
public struct VMConfiguration: Codable, Sendable, Equatable {
    /// Guest RAM in bytes.
    public var memorySize: UInt64 = 512 << 20
    /// How guest RAM is backed (nil: private anonymous memory).
    public var memoryBackend: MemoryBackend?
    /// Number of vCPUs.
    public var cpus: Int = 1
    /// The guest to boot.
    public var payload: GuestPayload
    /// `--serial` as text: `stdio`, `file:PATH` or `none`.
    public var serial: String = "stdio"
    /// Port of the isa-debug-exit device, or nil for none.
    public var debugExitPort: UInt16? = 0xf4
    /// What a guest reset does.
    public var onReboot: RebootPolicy = .exit
    /// Extra CPUID bits to hide.
    public var cpuidMasks: [CPUIDMask] = []
    /// A custom CPU template (`PUT /cpu-config`), applied after `cpuidMasks` and the VMM's MSR set-up.
    public var cpuTemplate: CPUTemplate? = nil
    /// Print the registers of every vCPU when the VM stops.
    public var showRegs: Bool = false
    /// How a bzImage is entered (host-side decompression by default).
    public var kernelEntry: String = "decompressed"
    /// Apply the PVM host fix-ups: nil detects the host.
    public var pvmFixups: Bool? = nil
    /// virtio-blk disks (`--disk`), attached in this order (from PCI slot 1, or the first virtio-mmio window).
    public var disks: [DiskSpec] = []
    /// virtio-net NICs (`--net`), attached after the disks in this order.
    public var nets: [NetSpec] = []
    /// The VM's name: the seed of the NICs' derived MAC addresses.
    public var name: String = "swiftkvm"
    /// A virtio-vsock device (`--vsock`), after the NICs.
    public var vsock: VsockSpec? = nil
    /// A virtio-console (hvc0) device (`--virtio-console`), after the vsock device.
    public var virtioConsole: Bool = false
    /// A virtio-rng device (`--rng`), after the console.
    public var rng: Bool = false
    /// Rate limit of the virtio-rng device (bandwidth in bytes, ops); nil: none.
    public var rngRateLimit: RateLimitConfig? = nil
    /// A virtio-balloon device (Firecracker's `/balloon`); nil: none.
    public var balloon: BalloonSpec? = nil
    /// Log the pages the guest and the devices write, for Diff snapshots (Firecracker's
    /// `track_dirty_pages`); nil or false: off.
    public var trackDirtyPages: Bool? = nil
    /// The virtio transport (`--transport`); nil: PCI (`virtioTransport`). Optional so that configurations
    /// saved before it existed still decode.
    public var transport: VirtioTransportKind? = nil
    /// ACPI tables for the guest (`--no-acpi` sets false: the MP table alone describes the CPUs and
    /// interrupts); nil: on.
    public var acpi: Bool? = nil
    /// Whether the guest gets ACPI tables.
    public var hasACPI: Bool { acpi ?? true }
    /// The firmware's boot order (`--boot`); nil: QEMU's default (disks, then CD-ROMs). Firmware boots only.
    public var boot: BootOrderSpec? = nil

    /// A configuration for `payload` with defaults for everything else.
    public init(payload: GuestPayload) { self.payload = payload }

    /// The smallest guest RAM accepted (2 MiB).
    public static let minimumMemory: UInt64 = 2 << 20
    /// The largest vCPU count accepted (the VMM also checks KVM_CAP_MAX_VCPUS).
    public static let maximumCPUs = 32

    /// Checks values that do not depend on files: memory size (against `hostMemory` when known),
    /// vCPU count and addresses.
    public func validate(hostMemory: UInt64?) throws {
        let mem = SizeParser.format(memorySize)
        guard memorySize >= Self.minimumMemory else {
            throw VMMError.invalidValue(what: "--memory", value: mem, reason: "at least \(SizeParser.format(Self.minimumMemory)) is needed")
        }
        guard memorySize % 4096 == 0 else {
            throw VMMError.invalidValue(what: "--memory", value: "\(memorySize)", reason: "must be a multiple of 4 KiB")
        }
        if let hostMemory, memorySize > hostMemory {
            throw VMMError.invalidValue(what: "--memory", value: mem, reason: "more than the host's \(SizeParser.format(hostMemory)) of RAM")
        }
        guard memorySize <= 1 << 46 else {
            throw VMMError.invalidValue(what: "--memory", value: mem, reason: "larger than 64 TiB")
        }
        guard cpus >= 1, cpus <= Self.maximumCPUs else {
            throw VMMError.invalidValue(what: "--cpus", value: "\(cpus)", reason: "must be between 1 and \(Self.maximumCPUs)")
        }
        guard ["decompressed", "bzimage"].contains(kernelEntry) else {
            throw VMMError.invalidValue(what: "--kernel-entry", value: kernelEntry, reason: "expected decompressed or bzimage")
        }
        _ = try serialSpec()
        try vsock?.validate()
        if boot != nil, !isFirmwareBoot {
            throw VMMError.invalidValue(what: "--boot", value: boot!.order.map(\.rawValue).joined(),
                                        reason: "a boot order is for firmware boots (--bios or --firmware)")
        }
        if virtioTransport == .mmio, virtioDeviceCount > VirtioMMIOLayout.maximumDevices {
            throw VMMError.invalidValue(what: "--transport", value: "mmio",
                                        reason: "\(virtioDeviceCount) virtio devices, at most \(VirtioMMIOLayout.maximumDevices) fit on virtio-mmio (one interrupt each)")
        }
        var ids = Set<String>(), macs = Set<[UInt8]>()
        for (i, nic) in nets.enumerated() {
            let id = nicID(i)
            guard ids.insert(id).inserted else {
                throw VMMError.invalidValue(what: "--net", value: "id=\(id)", reason: "two NICs have this id")
            }
            let mac = nicMAC(i)
            guard macs.insert(mac).inserted else {
                throw VMMError.invalidValue(what: "--net", value: "mac=\(NetSpec.formatMAC(mac))", reason: "two NICs have this MAC address")
            }
            if case .user = nic.backend, nets.filter({ if case .user = $0.backend { true } else { false } }).count > 1 {
                throw VMMError.invalidValue(what: "--net", value: "user", reason: "only one user-mode NIC is supported")
            }
        }
    }

    /// Whether the guest starts in firmware.
    public var isFirmwareBoot: Bool { if case .firmware = payload { true } else { false } }

    /// NIC `index`'s id: its own, or `netN`.
    public func nicID(_ index: Int) -> String { nets[index].id ?? "net\(index)" }

    /// NIC `index`'s MAC address: its own, or one derived from the VM name and the NIC id.
    public func nicMAC(_ index: Int) -> [UInt8] {
        nets[index].mac ?? NetSpec.derivedMAC(vmName: name, id: nicID(index))
    }

    /// The parsed `serial` value.
    public func serialSpec() throws -> SerialSpec {
        do { return try SerialSpec(parsing: serial) } catch {
            throw VMMError.invalidValue(what: "--serial", value: serial, reason: "expected stdio, file:PATH or none")
        }
    }
}
