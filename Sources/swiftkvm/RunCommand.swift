import ArgumentParser
import Boot
import Devices
import KVM
import Logging
import Synchronization
import VMM
#if canImport(Glibc)
import Glibc
#endif

/// `swiftkvm run`: boots a kernel, a flat test program, or the default guest.
///
/// Exit codes (`MachineExit`): 0 power-off (or a flat program's HLT), 2 bad usage or input, 4 unhandled
/// internal error, 6 VMM failure, 8 guest reset/triple fault (`--on-reboot exit`), (v<<1)|1 (odd) from the
/// debug-exit port, 130/143 after SIGINT/SIGTERM.
struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run a virtual machine.",
        discussion: """
        Exit codes: 0 guest power-off (a flat program's HLT), 2 bad usage or input, 4 unhandled KVM internal \
        error, 6 VMM failure, 8 guest reset or triple fault (--on-reboot exit), (v<<1)|1 (always odd) when the \
        guest writes v to the debug-exit port, 130/143 after SIGINT/SIGTERM.
        """)

    @Option(help: "Kernel to boot: bzImage, ELF64 vmlinux or multiboot v1.")
    var kernel: String?
    @Option(help: "Initial ramdisk (Linux kernels).")
    var initrd: String?
    @Option(help: "Kernel command line (default for the default guest: the PVM-safe line).")
    var cmdline: String?
    @Option(help: "Default guest's kernel, without --kernel: stock (Debian's, scripts/guest-assets) or lean (scripts/guest-kernel).")
    var guest: String = "stock"
    @Option(help: "Guest RAM with K/M/G suffix (default 512M, 128M with --flat), then [,ksm=on][,hugepages=off|thp|hugetlbfs].")
    var memory: String?
    @Option(name: .customLong("memory-backend"), help: "Guest RAM backing: anon (default), memfd, or file=PATH (created, or reused when empty or of the guest's size; mapped shared).")
    var memoryBackend: String?
    @Option(help: "Number of vCPUs.")
    var cpus: String = "1"
    @Option(help: "Firmware image to start at the reset vector (SeaBIOS's bios.bin, OVMF's OVMF.fd; at most 16 MiB), instead of a kernel.")
    var firmware: String?
    @Option(name: .customLong("uefi-vars"), help: "UEFI variable store for --firmware/--uefi (a per-VM copy of OVMF_VARS): a CFI flash below the firmware; created from \(RunCommand.ovmfVarsTemplate) when missing; changes are written to it.")
    var uefiVars: String?
    @Flag(name: .customLong("uefi"), help: "Boot OVMF (\(RunCommand.ovmfCodePath), Debian package ovmf): --firmware with that file; give --uefi-vars for its variable store.")
    var uefi = false
    @Flag(name: .customLong("bios"), help: "Boot SeaBIOS (\(RunCommand.seabiosPath), Debian package seabios): --firmware with that file. With --kernel (a bzImage), --initrd and --cmdline, SeaBIOS loads the kernel through fw_cfg (QEMU's linuxboot_dma.bin option ROM).")
    var bios = false
    @Option(help: "Flat binary to run (needs --load-address; runs until HLT).")
    var flat: String?
    @Option(name: .customLong("load-address"), help: "Guest-physical load address of the flat binary.")
    var loadAddress: String?
    @Option(help: "Entry address of the flat binary (default: the load address).")
    var entry: String?
    @Option(help: "CPU mode at the flat binary's entry: real, protected or long (default long).")
    var mode: String = "long"
    @Option(name: .customLong("module"), help: "Multiboot module FILE[,cmdline] (repeatable).")
    var modules: [String] = []
    @Flag(name: .customLong("show-regs"), help: "Print the registers when the VM stops.")
    var showRegs = false
    @Option(help: "Serial console: stdio, file:PATH or none.")
    var serial: String = "stdio"
    @Option(name: .customLong("debug-exit-port"), help: "isa-debug-exit port (hex or decimal), or 'none'.")
    var debugExitPort: String = "0xf4"
    @Flag(name: .customLong("no-seccomp"), help: "Run without the seccomp filters (docs/SECCOMP.md).")
    var noSeccomp = false
    @Option(name: .customLong("seccomp-filter"), help: "Load the seccomp filters from this JSON file (Firecracker's seccompiler format, one filter per thread kind: vmm, api, vcpu, device, console) instead of the built-in ones.")
    var seccompFilter: String?
    @Option(name: .customLong("on-reboot"), help: "On guest reset: exit (code 3) or restart.")
    var onReboot: String = "exit"
    @Option(name: .customLong("cpuid-mask"), help: "Hide CPUID bits: leaf[.subleaf].reg=mask (repeatable).")
    var cpuidMasks: [String] = []
    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: String = "warning"
    @Option(name: .customLong("kernel-entry"), help: "bzImage entry: decompressed (host-side, default) or bzimage.")
    var kernelEntry: String = "decompressed"

    @Option(name: .customLong("disk"),
            help: "Disk: path=FILE[,format=raw|qcow2][,readonly=on][,id=ID][,backing_files=on][,cache=none|writeback][,if=virtio|scsi][,media=disk|cdrom][,bootindex=N] (repeatable). if=virtio (default): a virtio-blk device each; if=scsi: a unit of one virtio-scsi adapter; media=cdrom: a read-only CD/DVD-ROM drive on virtio-scsi.")
    var disks: [String] = []
    @Option(name: .customLong("cdrom"), help: "CD/DVD-ROM image (an ISO) on virtio-scsi: --disk path=FILE,media=cdrom.")
    var cdrom: String?
    @Flag(name: .customLong("no-host-fixups"), help: "Run without the PVM host fix-ups (hidden CX16 and paravirt features, the syscall trampoline, recovered emulation failures), for experiments; they are on only on PVM hosts anyway.")
    var noHostFixups = false
    @Flag(name: .customLong("no-acpi"), help: "No ACPI tables: the MP table alone describes the CPUs and interrupts (firmware gets no tables either).")
    var noACPI = false
    @Option(name: .customLong("boot"),
            help: "Firmware boot order: c (disk), d (CD-ROM), or [order=LETTERS][,menu=on|off][,strict=on|off]; devices with bootindex= come first. Passed to the firmware as fw_cfg bootorder (default: disks, then CD-ROMs).")
    var boot: String?

    @Option(name: .customLong("net"),
            help: "virtio-net NIC: tap=NAME | fd=N | bridge=BR | user[,hostfwd=tcp::HOSTPORT-:GUESTPORT], then [,mac=MAC][,id=ID] (repeatable).")
    var nets: [String] = []

    @Option(name: .customLong("vsock"),
            help: "virtio-vsock device: cid=N (3 or more),uds=PATH (host connects to PATH and sends 'CONNECT <port>'; the guest's connections to port P go to PATH_P).")
    var vsock: String?

    @Option(help: "VM name (seeds the NICs' MAC addresses when mac= is not given).")
    var name: String = "swiftkvm"
    @Flag(name: .customLong("rng"), help: "Add a virtio-rng device (entropy from the host's getrandom).")
    var rng = false
    @Option(name: .customLong("balloon"),
            help: "Add a virtio-balloon device: MIB[,deflate-on-oom][,free-page-reporting][,stats=SECONDS] (MIB: memory the guest gives back at boot; free-page-reporting returns what the guest frees).")
    var balloon: String?
    @Flag(name: .customLong("virtio-console"), help: "Add a virtio-console device (hvc0); host input goes to it and to the serial port.")
    var virtioConsole = false
    @Option(help: "Virtio transport: pci (default) or mmio (virtio-mmio windows from 0xF0000000, announced in the DSDT as LNRO0005 devices and on the kernel command line as virtio_mmio.device=).")
    var transport: String = "pci"

    @Option(help: "Restore a snapshot instead of booting: DIR holds the files 'snapshot' and 'memory' (as `swiftkvm vm save` writes them). The machine (kernel, RAM, vCPUs, devices) comes from the snapshot; only --serial, --log-level, --show-regs and the seccomp options apply.")
    var restore: String?

    @Option(name: .customLong("time-dilation"),
            help: "Linux guests: make guest time run N times slow (N ticks fewer per real second; hides kvm-clock). Speeds up boots where guest kernel code is emulated; the guest clock runs slow.")
    var timeDilation: UInt?

    func run() throws {
        let code = RunMain.execute(self)
        throw ExitCode(code)
    }

    /// Creates the per-VM variable store `path` from OVMF's template when it does not exist (as libvirt makes
    /// `nvram` files); an existing file is used as it is.
    static func createVariableStore(_ path: String) throws {
        guard access(path, F_OK) != 0 else { return }
        let template = try Machine.readFile(ovmfVarsTemplate, limit: 4 << 20, what: "UEFI variable store template (Debian package ovmf)",
                                           limitName: "a variable store's largest size")
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw VMMError.invalidValue(what: "--uefi-vars", value: path, reason: "cannot create it: \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        let n = template.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        guard n == template.count, fsync(fd) == 0 else {
            unlink(path)
            throw VMMError.invalidValue(what: "--uefi-vars", value: path, reason: "cannot write it: \(String(cString: strerror(errno)))")
        }
    }

    /// The options that describe the machine, which a snapshot fixes: those given with --restore.
    var machineOptionsGiven: [String] {
        var given: [String] = []
        func check(_ set: Bool, _ name: String) { if set { given.append(name) } }
        check(kernel != nil, "--kernel"); check(initrd != nil, "--initrd"); check(cmdline != nil, "--cmdline")
        check(guest != "stock", "--guest"); check(memory != nil, "--memory"); check(memoryBackend != nil, "--memory-backend")
        check(cpus != "1", "--cpus"); check(flat != nil, "--flat"); check(loadAddress != nil, "--load-address")
        check(entry != nil, "--entry"); check(mode != "long", "--mode"); check(!modules.isEmpty, "--module")
        check(debugExitPort != "0xf4", "--debug-exit-port"); check(onReboot != "exit", "--on-reboot")
        check(!cpuidMasks.isEmpty, "--cpuid-mask"); check(kernelEntry != "decompressed", "--kernel-entry")
        check(!disks.isEmpty, "--disk"); check(!nets.isEmpty, "--net"); check(vsock != nil, "--vsock")
        check(cdrom != nil, "--cdrom"); check(boot != nil, "--boot"); check(noACPI, "--no-acpi"); check(noHostFixups, "--no-host-fixups")
        check(name != "swiftkvm", "--name"); check(rng, "--rng"); check(balloon != nil, "--balloon"); check(virtioConsole, "--virtio-console")
        check(timeDilation != nil, "--time-dilation"); check(firmware != nil, "--firmware"); check(bios, "--bios")
        check(uefi, "--uefi"); check(uefiVars != nil, "--uefi-vars")
        return given
    }

    /// With --restore: the snapshot's machine, with this run's serial console and --show-regs.
    func restoreConfiguration(_ dir: String) throws -> (VMConfiguration, MachineRestore) {
        let given = machineOptionsGiven
        guard given.isEmpty else {
            throw VMMError.invalidConfiguration("--restore takes the machine from the snapshot; \(given.joined(separator: ", ")) cannot be combined with it")
        }
        let restoring = try SnapshotDirectory(dir).load()
        var config = restoring.snapshot.config
        config.serial = serial
        config.showRegs = showRegs
        try config.validate(hostMemory: RunMain.hostMemory())
        return (config, restoring)
    }

    /// SeaBIOS as Debian installs it.
    static let seabiosPath = "/usr/share/seabios/bios.bin"
    /// OVMF's code and the template of its variable store (Debian package ovmf, 4 MiB layout).
    static let ovmfCodePath = "/usr/share/OVMF/OVMF_CODE_4M.fd"
    static let ovmfVarsTemplate = "/usr/share/OVMF/OVMF_VARS_4M.fd"

    /// Turns the options into a configuration; every error is a usage error.
    func makeConfiguration() throws -> VMConfiguration {
        let payload: GuestPayload
        if [bios, uefi, firmware != nil].filter({ $0 }).count > 1 {
            throw VMMError.invalidConfiguration("--bios, --uefi and --firmware cannot be combined (--bios is --firmware \(Self.seabiosPath), --uefi is --firmware \(Self.ovmfCodePath))")
        }
        if uefiVars != nil, !uefi, firmware == nil {
            throw VMMError.invalidConfiguration("--uefi-vars needs --uefi or --firmware")
        }
        if let firmwarePath = bios ? Self.seabiosPath : uefi ? Self.ovmfCodePath : firmware {
            guard flat == nil, modules.isEmpty else {
                throw VMMError.invalidConfiguration("--firmware/--bios cannot be used with --flat or --module (multiboot kernels through firmware are not supported yet)")
            }
            guard kernel != nil || (initrd == nil && cmdline == nil) else {
                throw VMMError.invalidConfiguration("--initrd and --cmdline with --firmware/--bios need --kernel")
            }
            if let vars = uefiVars { try Self.createVariableStore(vars) }
            payload = .firmware(FirmwareSpec(path: firmwarePath, kernel: kernel, initrd: initrd, cmdline: cmdline ?? "", vars: uefiVars))
        } else if let flat {
            guard kernel == nil else {
                throw VMMError.invalidConfiguration("--flat and --kernel cannot be used together")
            }
            guard initrd == nil, modules.isEmpty else {
                throw VMMError.invalidConfiguration("--initrd and --module cannot be used with --flat")
            }
            guard let loadAddress else {
                throw VMMError.invalidConfiguration("--flat needs --load-address")
            }
            guard let m = FlatLoader.Mode(rawValue: mode) else {
                throw VMMError.invalidValue(what: "--mode", value: mode, reason: "expected real, protected or long")
            }
            let load = try SizeParser.parseInteger(loadAddress, what: "--load-address")
            let entryAddress = try entry.map { try SizeParser.parseInteger($0, what: "--entry") } ?? load
            payload = .flat(FlatImage(path: flat, loadAddress: load, entry: entryAddress, mode: m))
        } else {
            guard loadAddress == nil, entry == nil else {
                throw VMMError.invalidConfiguration("--load-address and --entry need --flat")
            }
            guard let guestKernel = DefaultGuest.Kernel(rawValue: guest) else {
                throw VMMError.invalidValue(what: "--guest", value: guest, reason: "expected stock or lean")
            }
            if let kernel {
                guard guestKernel == .stock else {
                    throw VMMError.invalidConfiguration("--guest and --kernel cannot be used together")
                }
                payload = .kernel(path: kernel, initrd: initrd, cmdline: cmdline ?? "",
                                  modules: try modules.map(ModuleSpec.init(parsing:)))
            } else {
                guard let dir = DefaultGuest.assetsDirectory(environment: currentEnvironment(),
                                                             executablePath: DefaultGuest.executablePath(),
                                                             kernel: guestKernel) else {
                    throw VMMError.invalidConfiguration("no --kernel or --flat given and the default guest's \(guestKernel.rawValue) kernel is not built (run \(guestKernel.builder), or set SWIFTKVM_ASSETS)")
                }
                payload = .kernel(path: dir + "/" + guestKernel.fileName,
                                  initrd: initrd ?? dir + "/" + DefaultGuest.initrdName,
                                  cmdline: cmdline ?? DefaultGuest.cmdline(
                                      for: guestKernel, withVirtioDevices: !disks.isEmpty || !nets.isEmpty || vsock != nil || rng || virtioConsole),
                                  modules: try modules.map(ModuleSpec.init(parsing:)))
            }
        }
        var config = VMConfiguration(payload: payload)
        if let memory {
            let (size, options) = try MemoryBackendSpec.parse(memory: memory, backend: memoryBackend)
            config.memorySize = size
            config.memoryBackend = options
        } else if let memoryBackend {
            config.memoryBackend = try MemoryBackendSpec.parse(memory: nil, backend: memoryBackend).backend
            if flat != nil { config.memorySize = 128 << 20 }
        } else if flat != nil {
            config.memorySize = 128 << 20
        }
        guard let n = Int(cpus.trimmingCharacters()), n >= 1, n <= VMConfiguration.maximumCPUs else {
            throw VMMError.invalidValue(what: "--cpus", value: cpus, reason: "expected a number from 1 to \(VMConfiguration.maximumCPUs)")
        }
        config.cpus = n
        config.serial = serial
        if debugExitPort.lowercased() == "none" {
            config.debugExitPort = nil
        } else {
            config.debugExitPort = UInt16(try SizeParser.parseInteger(debugExitPort, what: "--debug-exit-port", max: 0xffff))
        }
        guard let policy = RebootPolicy(rawValue: onReboot) else {
            throw VMMError.invalidValue(what: "--on-reboot", value: onReboot, reason: "expected exit or restart")
        }
        config.onReboot = policy
        config.cpuidMasks = try cpuidMasks.map(CPUIDMask.init(parsing:))
        config.showRegs = showRegs
        config.kernelEntry = kernelEntry
        config.disks = try disks.map(DiskSpec.init(parsing:))
        if let cdrom {
            guard !cdrom.isEmpty, !cdrom.contains(",") else {
                throw VMMError.invalidValue(what: "--cdrom", value: cdrom, reason: "expected a file name without commas (use --disk path=…,media=cdrom)")
            }
            config.disks.append(try DiskSpec(parsing: "path=\(cdrom),media=cdrom"))
        }
        config.boot = try boot.map(BootOrderSpec.init(parsing:))
        if noACPI { config.acpi = false }
        if noHostFixups { config.pvmFixups = false }
        config.nets = try nets.map(NetSpec.init(parsing:))
        config.vsock = try vsock.map(VsockSpec.init(parsing:))
        config.name = name
        config.rng = rng
        config.balloon = try balloon.map(BalloonSpec.init(parsing:))
        if let b = config.balloon, UInt64(b.amountMiB) << 20 > config.memorySize {
            throw VMMError.invalidValue(what: "--balloon", value: balloon ?? "", reason: "more than the guest's \(config.memorySize >> 20) MiB")
        }
        config.virtioConsole = virtioConsole
        guard let kind = VirtioTransportKind(rawValue: transport) else {
            throw VMMError.invalidValue(what: "--transport", value: transport, reason: "expected pci or mmio")
        }
        config.transport = kind
        if let factor = timeDilation {
            guard factor >= 1, factor <= TimeDilation.maximumFactor else {
                throw VMMError.invalidValue(what: "--time-dilation", value: "\(factor)", reason: "expected a factor from 1 to \(TimeDilation.maximumFactor)")
            }
            guard case .kernel(let path, let initrd, let cmdline, let modules) = config.payload else {
                throw VMMError.invalidConfiguration("--time-dilation applies to Linux kernels, not to --flat images")
            }
            if factor > 1 {
                let extra = TimeDilation.cmdlineParameters(factor: factor, hostTSCkHz: TimeDilation.hostTSCkHz())
                config.payload = .kernel(path: path, initrd: initrd, cmdline: cmdline.isEmpty ? extra : cmdline + " " + extra, modules: modules)
            }
        }
        try config.validate(hostMemory: RunMain.hostMemory())
        return config
    }
}

extension String {
    func trimmingCharacters() -> String {
        var s = Substring(self)
        while let f = s.first, f.isWhitespace { s.removeFirst() }
        while let l = s.last, l.isWhitespace { s.removeLast() }
        return String(s)
    }
}

/// The process environment as a dictionary.
func currentEnvironment() -> [String: String] {
    var env: [String: String] = [:]
    var p = environ
    while let entry = p.pointee {
        let s = String(cString: entry)
        if let eq = s.firstIndex(of: "=") { env[String(s[..<eq])] = String(s[s.index(after: eq)...]) }
        p += 1
    }
    return env
}
