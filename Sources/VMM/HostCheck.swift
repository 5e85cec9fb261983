import CLZ4
import CLZMA
import CZlib
import CZstd
import KVM
#if canImport(Glibc)
import Glibc
#endif

/// The result of one host check.
public enum CheckStatus: String, Sendable, Codable, Equatable {
    case pass = "PASS", warn = "WARN", fail = "FAIL"
}

/// One line of the `swiftkvm check` report.
public struct CheckItem: Sendable, Codable, Equatable {
    /// What was checked ("/dev/kvm exists").
    public var what: String
    public var status: CheckStatus
    /// What was found.
    public var detail: String
    public init(_ what: String, _ status: CheckStatus, _ detail: String) {
        self.what = what; self.status = status; self.detail = detail
    }

    /// `SwiftKVM: Checking <what> ... : PASS (detail)`, with `what` padded to `width`.
    public func line(width: Int = 0) -> String {
        let label = "Checking " + what
        let pad = String(repeating: " ", count: max(0, width - label.count))
        return "SwiftKVM: \(label) \(pad)... : \(status.rawValue)" + (detail.isEmpty ? "" : " (\(detail))")
    }
}

/// How guest user mode works on this host, from the two probe runs.
public enum UserModeSupport: String, Sendable, Codable, Equatable {
    /// `syscall` from ring 3 enters the kernel at CPL 0 without help.
    case native
    /// Only the PVM SYSCALL fix-up makes it enter at CPL 0.
    case pvmFixup = "pvm-fixup"
    /// Neither run reached the SYSCALL entry at CPL 0.
    case broken = "not-working"

    /// Classifies the two probe runs.
    public static func classify(withoutFixup: UserModeProbeOutcome, withFixup: UserModeProbeOutcome?) -> UserModeSupport {
        if withoutFixup.syscallCPL == 0 { return .native }
        if withFixup?.syscallCPL == 0 { return .pvmFixup }
        return .broken
    }
}

/// Whether /dev/kvm is there and usable.
public enum KVMDeviceState: Sendable, Equatable {
    case missing
    /// Exists but cannot be opened read-write (the reason says why).
    case notAccessible(String)
    case accessible
}

/// Everything `HostCheck` asks the host. `LiveHostFacts` asks the real one; tests inject fakes.
public protocol HostFacts {
    /// The KVM device path ("/dev/kvm").
    var devicePath: String { get }
    /// Whether the device exists and opens read-write.
    func deviceState() -> KVMDeviceState
    /// `KVM_GET_API_VERSION`.
    func apiVersion() throws -> Int32
    /// `KVM_CHECK_EXTENSION` for `cap`.
    func capability(_ cap: Capability) throws -> Int32
    /// The CPU flags from /proc/cpuinfo, or nil when unreadable.
    func cpuFlags() -> Set<String>?
    /// Whether the `kvm_pvm` module is loaded.
    func pvmModuleLoaded() -> Bool
    /// Decompression libraries linked into SwiftKVM: name and version (nil when unusable).
    func decompressionLibraries() -> [(name: String, version: String?)]
    /// Runs the user-mode probe guest with or without the PVM SYSCALL fix-up.
    func runUserModeProbe(syscallFixup: Bool) -> UserModeProbeOutcome
}

/// The facts of the machine this process runs on.
public final class LiveHostFacts: HostFacts {
    public let devicePath: String
    private var system: KVMSystem?

    public init(devicePath: String = "/dev/kvm") { self.devicePath = devicePath }

    public func deviceState() -> KVMDeviceState {
        guard access(devicePath, F_OK) == 0 else { return .missing }
        let fd = open(devicePath, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return .notAccessible("open read-write: \(String(cString: strerror(errno)))") }
        close(fd)
        return .accessible
    }

    private func kvm() throws -> KVMSystem {
        if let system { return system }
        let s = try KVMSystem(path: devicePath)
        system = s
        return s
    }

    public func apiVersion() throws -> Int32 {
        // Not through KVMSystem.init, which rejects versions other than 12.
        let fd = open(devicePath, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw KVMError(operation: "open \(devicePath)", errno: errno) }
        defer { close(fd) }
        let v = ckvm_ioctl_value(fd, CKVM_GET_API_VERSION, 0)
        guard v >= 0 else { throw KVMError(operation: "KVM_GET_API_VERSION", errno: -v) }
        return v
    }

    public func capability(_ cap: Capability) throws -> Int32 { try kvm().checkExtension(cap) }

    public func cpuFlags() -> Set<String>? {
        guard let text = readSmallFile("/proc/cpuinfo"),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("flags") }),
              let colon = line.firstIndex(of: ":") else { return nil }
        return Set(line[line.index(after: colon)...].split(separator: " ").map(String.init))
    }

    public func pvmModuleLoaded() -> Bool { access("/sys/module/kvm_pvm", F_OK) == 0 }

    public func decompressionLibraries() -> [(name: String, version: String?)] {
        [
            ("zlib (gzip)", zlibVersion().map { String(cString: $0) }),
            ("liblzma (xz, lzma)", lzma_version_string().map { String(cString: $0) }),
            ("liblz4 (lz4)", LZ4_versionString().map { String(cString: $0) }),
            ("libzstd (zstd)", ZSTD_versionString().map { String(cString: $0) }),
        ]
    }

    public func runUserModeProbe(syscallFixup: Bool) -> UserModeProbeOutcome {
        UserModeProbe.run(syscallFixup: syscallFixup)
    }
}

/// The whole `swiftkvm check` report.
public struct HostCheckReport: Sendable, Codable, Equatable {
    /// One entry per check, in order.
    public var items: [CheckItem]
    /// "hardware (vmx)", "hardware (svm)", "pvm" or "unknown".
    public var virtualization: String
    /// Whether SwiftKVM's PVM fix-ups will be switched on (`run` detects the same way).
    public var pvmFixupsActive: Bool
    /// The fix-ups that will be active (empty on hardware hosts).
    public var fixups: [String]
    /// How guest user mode works, when the probe ran.
    public var userMode: UserModeSupport?
    /// The probe runs: without and with the SYSCALL fix-up.
    public var probeWithoutFixup: UserModeProbeOutcome?
    public var probeWithFixup: UserModeProbeOutcome?

    /// Whether the host can run guests: no check failed.
    public var canRunGuests: Bool { !items.contains { $0.status == .fail } }

    /// The virt-host-validate style text, one line per check, then the fix-up list.
    public var text: String {
        let width = (items.map { $0.what.count }.max() ?? 0) + "Checking ".count
        var lines = items.map { $0.line(width: width) }
        if pvmFixupsActive {
            lines.append("SwiftKVM: PVM fix-ups active for guests on this host:")
            lines += fixups.map { "SwiftKVM:   - \($0)" }
        } else {
            lines.append("SwiftKVM: PVM fix-ups: none (hardware KVM)")
        }
        return lines.joined(separator: "\n")
    }
}

/// The checks of `swiftkvm check`, run against a `HostFacts`.
public enum HostCheck {
    /// Capabilities `Machine` cannot work without.
    public static let required: [Capability] = [.userMemory, .irqchip, .pit2, .immediateExit, .setTSSAddress]
    /// Capabilities that are used when present or needed by later features.
    public static let recommended: [Capability] = [.irqfd, .ioeventfd, .splitIRQChip, .syncRegs, .vcpuEvents,
                                                   .internalErrorData, .x86UserSpaceMSR, .x86MSRFilter]
    /// Capabilities the PVM SYSCALL fix-up needs.
    public static let neededForSyscallFixup: [Capability] = [.x86UserSpaceMSR, .x86MSRFilter]

    /// The fix-ups `PVMQuirks` applies (mirrors its documentation).
    public static let pvmFixupList: [String] = [
        "CPUID.1:ECX CX16 hidden (lock cmpxchg16b fails to emulate)",
        "fwait emulation failure: skipped (RIP+1)",
        "int3 emulation failure: RIP+1 and #BP injected",
        "ud2 emulation failure: #UD injected",
        "user-mode SYSCALL: LSTAR read/write filter + trampoline at 0xffffff8000000000 (PML4 511, PUD 0) → kernel entry at CPL0",
    ]

    /// Runs every check. `runProbe` false skips the user-mode probe (reported as WARN).
    public static func evaluate(_ facts: some HostFacts, runProbe: Bool = true) -> HostCheckReport {
        var items: [CheckItem] = []
        let dev = facts.devicePath
        // Virtualization kind first: it does not need /dev/kvm.
        let flags = facts.cpuFlags()
        let module = facts.pvmModuleLoaded()
        let hw = flags.map { f in ["vmx", "svm"].filter { f.contains($0) } } ?? []
        let virtualization: String
        let pvm: Bool
        if module {
            virtualization = "pvm"; pvm = true
        } else if let h = hw.first {
            virtualization = "hardware (\(h))"; pvm = false
        } else if flags != nil {
            virtualization = "pvm"; pvm = true
        } else {
            virtualization = "unknown"; pvm = false
        }

        let state = facts.deviceState()
        switch state {
        case .missing:
            items.append(CheckItem("\(dev) exists", .fail, "not found: load kvm_intel, kvm_amd or kvm_pvm"))
        case .notAccessible(let why):
            items.append(CheckItem("\(dev) exists", .pass, ""))
            items.append(CheckItem("\(dev) is accessible", .fail, why))
        case .accessible:
            items.append(CheckItem("\(dev) exists", .pass, ""))
            items.append(CheckItem("\(dev) is accessible", .pass, "read-write"))
        }
        items.append(virtualizationItem(virtualization: virtualization, module: module, hw: hw, flagsKnown: flags != nil))

        var report = HostCheckReport(items: items, virtualization: virtualization, pvmFixupsActive: pvm,
                                     fixups: pvm ? pvmFixupList : [])
        guard state == .accessible else {
            report.items.append(CheckItem("guest user mode (probe)", .warn, "not run: \(dev) is unusable"))
            report.items.append(decompressionItem(facts))
            return report
        }

        var apiOK = false
        do {
            let v = try facts.apiVersion()
            apiOK = v == KVMSystem.expectedAPIVersion
            report.items.append(CheckItem("KVM API version", apiOK ? .pass : .fail,
                                          apiOK ? "\(v)" : "\(v), SwiftKVM needs \(KVMSystem.expectedAPIVersion)"))
        } catch {
            report.items.append(CheckItem("KVM API version", .fail, "\(error)"))
        }
        guard apiOK else { report.items.append(decompressionItem(facts)); return report }

        func value(_ cap: Capability) -> (Int32?, String?) {
            do { return (try facts.capability(cap), nil) } catch { return (nil, "\(error)") }
        }
        for cap in required + recommended {
            let (v, err) = value(cap)
            let name = String(cap.description.dropFirst("KVM_CAP_".count))
            let needed = required.contains(cap) || (pvm && neededForSyscallFixup.contains(cap))
            if let err {
                report.items.append(CheckItem("capability \(name)", needed ? .fail : .warn, err))
            } else if let v, v > 0 {
                report.items.append(CheckItem("capability \(name)", .pass, v == 1 ? "" : "\(v)"))
            } else {
                let why = required.contains(cap) ? "missing: SwiftKVM needs it"
                    : needed ? "missing: the PVM SYSCALL fix-up needs it" : "missing"
                report.items.append(CheckItem("capability \(name)", needed && required.contains(cap) ? .fail : .warn, why))
            }
        }
        let (nr, _) = value(.nrVCPUs)
        let (mx, _) = value(.maxVCPUs)
        let recommendedCPUs = Int(nr ?? 0) > 0 ? Int(nr!) : 4   // KVM's documented default when NR_VCPUS is 0
        let maxCPUs = Int(mx ?? 0) > 0 ? Int(mx!) : recommendedCPUs
        report.items.append(CheckItem("vCPUs", maxCPUs >= 1 ? .pass : .fail,
                                      "max \(maxCPUs), recommended \(recommendedCPUs)"))
        let (slots, slotErr) = value(.nrMemslots)
        if let slots, slots > 0 {
            report.items.append(CheckItem("memory slots", slots >= 8 ? .pass : .warn, "max \(slots)"))
        } else {
            report.items.append(CheckItem("memory slots", .warn, slotErr ?? "not reported"))
        }
        report.items.append(decompressionItem(facts))

        if !runProbe {
            report.items.append(CheckItem("guest user mode (probe)", .warn, "skipped"))
            return report
        }
        let off = facts.runUserModeProbe(syscallFixup: false)
        report.probeWithoutFixup = off
        report.items.append(CheckItem("guest ring 0 → ring 3 (probe)", off.reachedUserMode ? .pass : .fail,
                                      off.reachedUserMode ? "cs=0x\(String(off.userCS!, radix: 16))" : off.summary))
        report.items.append(CheckItem("guest syscall without fix-up (probe)", off.syscallCPL == 0 ? .pass : (pvm ? .warn : .fail),
                                      off.summary + (off.syscallCPL == 3 ? ": stays at CPL3 (PVM)" : "")))
        // Always run with the fix-up too: on hardware hosts it shows the fix-up is harmless.
        let on = facts.runUserModeProbe(syscallFixup: true)
        report.probeWithFixup = on
        report.items.append(CheckItem("guest syscall with PVM fix-up (probe)",
                                      on.syscallCPL == 0 ? .pass : (off.syscallCPL == 0 ? .warn : .fail), on.summary))
        let support = UserModeSupport.classify(withoutFixup: off, withFixup: on)
        report.userMode = support
        switch support {
        case .native:
            report.items.append(CheckItem("guest user mode", .pass, "works natively"))
        case .pvmFixup:
            report.items.append(CheckItem("guest user mode", pvm ? .pass : .warn,
                                          "works only through the PVM SYSCALL fix-up" + (pvm ? " (on for this host)" : " (but this host is not detected as PVM, so run leaves it off)")))
        case .broken:
            report.items.append(CheckItem("guest user mode", .warn, "does not work: Linux userspace cannot run"))
        }
        return report
    }

    static func virtualizationItem(virtualization: String, module: Bool, hw: [String], flagsKnown: Bool) -> CheckItem {
        if virtualization.hasPrefix("hardware") {
            return CheckItem("for hardware virtualization", .pass, "\(hw.joined(separator: ", ")) in /proc/cpuinfo")
        }
        if virtualization == "pvm" {
            let why = module ? "kvm_pvm module loaded" : "no vmx/svm in /proc/cpuinfo"
            return CheckItem("for hardware virtualization", .warn,
                             "none: \(why); KVM is PVM, guest ring-0 code is emulated and slow, SwiftKVM enables its PVM fix-ups")
        }
        return CheckItem("for hardware virtualization", .warn, "unknown: /proc/cpuinfo unreadable")
    }

    static func decompressionItem(_ facts: some HostFacts) -> CheckItem {
        let libs = facts.decompressionLibraries()
        let missing = libs.filter { $0.version == nil }.map(\.name)
        let text = libs.map { "\($0.name) \($0.version ?? "missing")" }.joined(separator: ", ")
        return CheckItem("host-side kernel decompression libraries", missing.isEmpty ? .pass : .warn, text)
    }
}
