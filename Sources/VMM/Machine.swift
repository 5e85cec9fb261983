import Boot
import Devices
import GuestMemory
import KVM
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// An interrupt line wired to a GSI of the in-kernel interrupt controllers.
struct KVMInterruptLine: InterruptLine {
    let vm: VirtualMachine
    let gsi: UInt32
    func set(level: Bool) { try? vm.setIRQLine(gsi, level: level) }
}

/// Collects the first request to stop the machine and wakes the control thread.
final class MachineController: MachineControl, @unchecked Sendable {
    private let state = Mutex<MachineExit?>(nil)
    private let controlThread = Atomic<UInt>(0)
    private let suspendRequested = Atomic<Bool>(false)
    /// Parks the vCPUs at once when the guest enters S3 (set by `Machine`; runs on the requesting vCPU's thread).
    var parkForSuspend: (@Sendable () -> Void)?

    /// Takes a pending S3 request (the control thread then suspends the machine).
    func takeSuspend() -> Bool { suspendRequested.exchange(false, ordering: .acquiringAndReleasing) }

    func setControlThread(_ tid: UInt) { controlThread.store(tid, ordering: .sequentiallyConsistent) }

    /// The stop reason, once one was requested.
    var exit: MachineExit? { state.withLock { $0 } }
    var stopRequested: Bool { exit != nil }

    /// Records `exit` unless another reason came first, and wakes the control thread.
    func stop(_ exit: MachineExit) {
        let first = state.withLock { s -> Bool in
            guard s == nil else { return false }
            s = exit
            return true
        }
        if first {
            let tid = controlThread.load(ordering: .sequentiallyConsistent)
            if tid != 0 { _ = pthread_kill(pthread_t(tid), Machine.wakeSignal) }
        }
    }

    func request(_ request: MachineRequest) {
        switch request {
        case .reset: stop(.reset)
        case .powerOff: stop(.powerOff)
        case .exit(let status): stop(.debugExit(status: status))
        case .suspend:
            parkForSuspend?()
            suspendRequested.store(true, ordering: .releasing)
            let tid = controlThread.load(ordering: .sequentiallyConsistent)
            if tid != 0 { _ = pthread_kill(pthread_t(tid), Machine.wakeSignal) }
        }
    }
}

/// A built virtual machine: KVM VM, guest memory, devices and vCPUs, ready to `run()`.
///
/// Built from a `VMConfiguration`: allocates guest RAM and registers it as KVM memory slots;
/// sets the TSS (0xfeffd000) and identity-map (0xfeffc000) addresses (QEMU's, below any firmware window); creates the in-kernel
/// IRQ chip and PIT; loads the guest through `Boot`; puts the UART (0x3f8, IRQ 4), i8042, CMOS
/// RTC, debug-exit port and ignored legacy ports on the port-I/O bus; creates the vCPUs with
/// filtered CPUID, MSRs, LAPIC LVT0/LVT1 and the loader's entry state.
///
/// `run()` starts one thread per vCPU (named "vcpu N") and returns a `MachineExit`; see
/// `MachineExit` for the exit codes.
public final class Machine: @unchecked Sendable {
    /// TSS address given to KVM (three pages below the identity map page).
    public static let tssAddress: UInt64 = 0xfeff_d000
    /// Identity-map page address given to KVM.
    public static let identityMapAddress: UInt64 = 0xfeff_c000
    /// Signal that wakes the control thread out of its wait (blocked while `run()` waits).
    static var wakeSignal: Int32 { ckvm_kick_signal() + 1 }

    public let config: VMConfiguration

    deinit {
        if let store = variableStore { close(store.fd) }
    }
    public let memory: GuestMemory
    /// Port-I/O devices.
    public let ioBus = Bus()
    /// MMIO devices.
    public let mmioBus = Bus()
    /// The COM1 UART (feed host input with `serial.enqueue`).
    public let serial: Serial16550
    /// What the loader did.
    public let loaded: LoadedKernel
    /// Exit counts by reason, filled as vCPU threads end.
    public let statistics = ExitStatistics()
    /// The host fix-ups in use.
    public let quirks: any HostQuirks
    /// The CMOS RTC (IRQ 8); its timer thread runs while the machine runs.
    let rtc: CMOSRTC
    /// Whether the guest is in ACPI S3 (the control thread holds its vCPUs until the wake).
    let suspended = Atomic<Bool>(false)
    /// The ACPI PM registers (S3 wake status) and the FACS of direct boots (its waking vector), set by `setUpACPI`.
    var acpiPower: ACPIPower?
    var facsAddress: UInt64?
    /// The UEFI variable store's flash and its open, locked file (closed when the machine is released).
    var variableStore: (flash: PFlashCFI01, fd: Int32)?
    /// The firmware image mapped below 4 GiB (firmware boots only; Machine+Firmware.swift).
    var firmwareROM: GuestRegion?
    /// QEMU's fw_cfg device (Machine+FWCfg.swift).
    var firmwareConfig: FWCfg?

    let kvm: KVMSystem
    let vm: VirtualMachine
    /// The vCPUs, their threads, pause and halt checks (VCPUManager.swift).
    let vcpuManager: VCPUManager
    let controller = MachineController()
    /// PCI bus 0, its windows and MSI routing (Machine+PCI.swift).
    let pci: MachinePCI
    /// Virtio devices, their event loops and disks (Machine+Virtio.swift).
    let virtio = MachineVirtio()
    /// The stateful devices by id, for snapshots (Snapshot.swift).
    let devices = DeviceManager()
    /// Whether a Diff snapshot has a base: a Full snapshot was taken, or the machine was restored,
    /// since dirty logging started (Snapshot.swift).
    let dirtyBaseline = Atomic<Bool>(false)
    /// A snapshot parked the device threads; `resume()` lets them go.
    let devicesHeldBySnapshot = Atomic<Bool>(false)
    /// Whether the RAM slots log dirty pages now (tracking, or a migration in progress).
    let dirtyLogging = Atomic<Bool>(false)
    let logger: Logger
    let serialOutput: any SerialOutput

    /// Builds the machine. Errors in user input (files, sizes) are `BootError`/`VMMError`; KVM
    /// failures are `KVMError`.
    ///
    /// With `restoring`, the machine is built from the snapshot's configuration and takes its
    /// guest memory, vCPU, in-kernel and device state from it instead of loading a guest.
    public init(config: VMConfiguration, serialOutput: any SerialOutput, logger: Logger,
                quirks: (any HostQuirks)? = nil, restoring: MachineRestore? = nil) throws {
        self.config = config
        self.logger = logger
        self.serialOutput = serialOutput
        try config.validate(hostMemory: nil)
        let usePVM = config.pvmFixups ?? PVMQuirks.detect()
        self.quirks = quirks ?? (usePVM ? PVMQuirks() : NoHostQuirks())

        // Guest RAM and the guest image first: bad input is reported before KVM is touched.
        memory = try config.memoryBackend.map { try GuestMemory.allocate(size: config.memorySize, backend: $0) }
            ?? GuestMemory.allocate(size: config.memorySize)
        if let restoring {
            guard memory.totalSize == restoring.snapshot.memorySize else {
                throw VMMError.invalidConfiguration("snapshot: guest RAM of \(restoring.snapshot.memorySize) bytes, this machine has \(memory.totalSize)")
            }
            guard restoring.snapshot.vcpus.count == config.cpus else {
                throw VMMError.invalidConfiguration("snapshot: \(restoring.snapshot.vcpus.count) vCPUs, this machine has \(config.cpus)")
            }
            loaded = .restoredFromSnapshot()
        } else {
            // On PVM hosts a Linux guest's command line gets the items it needs there (HOST-KVM.md), whatever its source.
            var hostSafe: (@Sendable (String) -> String)? = nil
            if self.quirks is PVMQuirks {
                let log = logger
                hostSafe = { (line: String) -> String in
                    let (out, added) = DefaultGuest.addingHostSafeItems(to: line)
                    if !added.isEmpty { log.info("PVM host: added to the kernel command line: \(added.joined(separator: " "))") }
                    return out
                }
            }
            loaded = try Self.load(config: config, memory: memory, linuxCmdline: hostSafe)
        }
        for line in loaded.summary { logger.debug("boot: \(line)") }

        kvm = try KVMSystem()
        try Self.checkCPUCount(config.cpus, kvm: kvm)
        try config.cpuTemplate?.checkCapabilities(kvm)
        vm = try kvm.createVM()
        // The host quirks first (the PVM fix-up's MSR filter): KVM_X86_SET_MSR_FILTER waits for an SRCU grace
        // period, which is expedited (tens of µs) on an idle VM but takes a scheduler tick or more (12-15 ms
        // measured) right after a memory-slot change. Their memory slots also come before the irqchip: once KVM
        // has an in-kernel irqchip, each new slot costs 4-9 ms here (measured with strace -T), 0.1 ms before.
        try self.quirks.configure(vm: vm, logger: logger)
        let logDirty = config.trackDirtyPages == true
        for (slot, region) in memory.regions.enumerated() {
            try vm.setUserMemoryRegion(slot: UInt32(slot), guestPhys: region.start, size: region.size, host: region.host,
                                       flags: logDirty ? VirtualMachine.logDirtyPages : 0)
        }
        if logDirty { memory.dirtyLog.enable() }
        dirtyLogging.store(logDirty, ordering: .relaxed)
        // A restored machine's base for Diff snapshots is the memory file it was loaded from.
        dirtyBaseline.store(restoring != nil, ordering: .relaxed)
        // A restored firmware machine maps its image again (guest RAM, with the shadow, comes from the snapshot).
        var romImage = loaded.firmwareImage
        if restoring != nil, case .firmware(let spec) = config.payload {
            romImage = try Self.readFile(spec.path, limit: FirmwareLoader.maximumSize, what: "firmware image", limitName: "the firmware window")
        }
        firmwareROM = try Self.mapFirmware(romImage, vm: vm, kvm: kvm, logger: logger)
        do { try vm.setTSSAddress(Self.tssAddress) } catch { logger.debug("\(error)") }
        do { try vm.setIdentityMapAddress(Self.identityMapAddress) } catch { logger.debug("\(error)") }
        try vm.createIRQChip()
        try vm.createPIT2()

        // Devices.
        serial = Serial16550(interrupt: KVMInterruptLine(vm: vm, gsi: Serial16550.defaultIRQ), output: serialOutput)
        try ioBus.insert(serial, base: Serial16550.defaultBase, length: Serial16550.portCount)
        devices.register(serial, id: "serial0")
        let i8042 = I8042(keyboardInterrupt: KVMInterruptLine(vm: vm, gsi: I8042.keyboardIRQ),
                          auxInterrupt: KVMInterruptLine(vm: vm, gsi: I8042.auxIRQ), control: controller)
        try ioBus.insert(i8042, base: I8042.defaultBase, length: I8042.portCount)
        devices.register(i8042, id: "i8042")
        rtc = CMOSRTC(interrupt: KVMInterruptLine(vm: vm, gsi: CMOSRTC.defaultIRQ))
        let below = memory.regions.filter { $0.start < GuestMemory.pciHoleEnd }.reduce(0) { $0 + $1.size }
        rtc.setMemorySize(belowFourGiB: below, aboveFourGiB: memory.totalSize - below)
        try ioBus.insert(rtc, base: CMOSRTC.defaultBase, length: CMOSRTC.portCount)
        devices.register(rtc, id: "rtc")
        pci = try MachinePCI(vm: vm, ioBus: ioBus, mmioBus: mmioBus, logger: logger)
        devices.register(pci.mechanism1, id: "pci-config-address")
        devices.register(pci.root.hostBridge, id: "pci-host-bridge")
        if let port = config.debugExitPort {
            do {
                try ioBus.insert(DebugExit(control: controller), base: UInt64(port), length: 1)
            } catch {
                throw VMMError.invalidValue(what: "--debug-exit-port", value: "0x" + String(port, radix: 16),
                                            reason: "it collides with another device (\(error))")
            }
        }
        if config.debugExitPort.map(UInt64.init) != SystemControlPortA.defaultPort {
            try ioBus.insert(SystemControlPortA(control: controller), base: SystemControlPortA.defaultPort, length: 1)
        }
        for r in LegacyPorts.defaultIgnored {
            // Skip an ignored range the debug-exit port was put in.
            if let port = config.debugExitPort, UInt64(port) >= r.base, UInt64(port) < r.base + r.length { continue }
            try ioBus.insert(SinkDevice(name: r.name, readValue: r.readValue), base: r.base, length: r.length)
        }

        vcpuManager = try VCPUManager(vm: vm, count: config.cpus, supportedCPUID: try kvm.supportedCPUID(),
                                      quirks: self.quirks, cpuidMasks: config.cpuidMasks, cpuTemplate: config.cpuTemplate, entry: loaded.entry,
                                      logger: logger)
        controller.parkForSuspend = { [gate = vcpuManager.gate] in gate.requestPause() }
        if case .firmware(let spec) = config.payload, let rom = firmwareROM { try setUpVariableStore(spec, romSize: rom.size) }
        try setUpVirtio()
        try setUpACPI(writeTables: restoring == nil)
        try setUpFirmwareDebugConsole()
        if let restoring { try restore(restoring) }
    }

    /// Loads the configured guest into memory.
    static func load(config: VMConfiguration, memory: GuestMemory,
                     linuxCmdline: (@Sendable (String) -> String)? = nil) throws -> LoadedKernel {
        switch config.payload {
        case .flat(let flat):
            let image = try readFile(flat.path, limit: memory.totalSize, what: "flat image")
            return try FlatLoader.load(image: image, at: flat.loadAddress, entry: flat.entry, mode: flat.mode, memory: memory)
        case .firmware(let spec):
            // FirmwareLoader names the window when the image is larger than it.
            let image = try readFile(spec.path, limit: 64 << 20, what: "firmware image", limitName: "any firmware image")
            return try FirmwareLoader.load(image: image, path: spec.path, memory: memory)
        case .kernel(let path, let initrd, let cmdline, let modules):
            var options = BootOptions()
            options.linuxEntry = BzImageLoader.Entry(rawValue: config.kernelEntry) ?? .decompressed
            options.modules = modules.map { MultibootModule(source: .path($0.path), cmdline: $0.cmdline) }
            options.linuxCmdline = linuxCmdline
            // Devices on virtio-mmio are announced on the command line too (VirtioMMIOLayout).
            var result = try KernelLoader.load(kernel: .path(path), initrd: initrd.map { .path($0) },
                                               cmdline: try config.cmdlineWithVirtioMMIODevices(cmdline),
                                               memory: memory, options: options)
            if result.format != .multiboot {
                result.ranges.append(try MPTable.write(cpus: config.cpus, into: memory))
            }
            return result
        }
    }

    /// Reads a whole file (at most `limit` bytes, which the size error calls `limitName`), with errors naming the path.
    public static func readFile(_ path: String, limit: UInt64, what: String, limitName: String = "guest RAM") throws -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw BootError.fileUnreadable(path: path, reason: String(cString: strerror(errno))) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw BootError.fileUnreadable(path: path, reason: String(cString: strerror(errno))) }
        guard (st.st_mode & S_IFMT) == S_IFREG else { throw BootError.fileUnreadable(path: path, reason: "not a regular file") }
        guard UInt64(st.st_size) <= limit else {
            throw BootError.doesNotFit("\(what) \(path) is \(st.st_size) bytes, larger than \(limitName) (\(SizeParser.format(limit)))")
        }
        var out = [UInt8](repeating: 0, count: Int(st.st_size))
        var done = 0
        while done < out.count {
            let n = out.withUnsafeMutableBytes { read(fd, $0.baseAddress! + done, $0.count - done) }
            if n < 0 && errno == EINTR { continue }
            if n < 0 { throw BootError.fileUnreadable(path: path, reason: String(cString: strerror(errno))) }
            if n == 0 { throw BootError.fileUnreadable(path: path, reason: "file shrank while reading") }
            done += n
        }
        return out
    }

    // MARK: Running

    /// Asks the machine to stop with `exit` (from any thread, e.g. the console's Ctrl-A x).
    public func stop(_ exit: MachineExit) { controller.stop(exit) }

    /// Runs the guest until it stops; returns why. Blocks the calling thread, which becomes the
    /// control thread. With `handleSignals`, SIGINT and SIGTERM stop the VM cleanly (the
    /// caller should block them in every other thread; `Machine.blockStopSignals()` does it for
    /// threads created afterwards).
    public func run(handleSignals: Bool = true) -> MachineExit {
        _ = ckvm_install_kick_handler()
        var waitSet = sigset_t()
        sigemptyset(&waitSet)
        sigaddset(&waitSet, Self.wakeSignal)
        if handleSignals {
            sigaddset(&waitSet, SIGINT)
            sigaddset(&waitSet, SIGTERM)
        }
        var oldMask = sigset_t()
        pthread_sigmask(SIG_BLOCK, &waitSet, &oldMask)
        defer { pthread_sigmask(SIG_SETMASK, &oldMask, nil) }
        controller.setControlThread(UInt(ckvm_pthread_self()))

        do { try virtio.start() } catch {
            controller.stop(.vmmFailure("cannot start the virtio device threads: \(error)"))
        }
        do { try rtc.startTimer() } catch {
            controller.stop(.vmmFailure("cannot start the RTC timer thread: \(error)"))
        }
        let launch = StartGate() // vCPUs wait here, confined, until this thread is confined too
        if !controller.stopRequested {
            vcpuManager.start(context: ExitContext(ioBus: ioBus, mmioBus: mmioBus, memory: memory, quirks: quirks,
                                                   controller: controller, statistics: statistics,
                                                   haltTracker: vcpuManager.haltTracker, logger: logger,
                                                   vcpuCount: vcpuManager.vcpus.count),
                              gate: launch)
        }
        Seccomp.confineCurrentThread(.vmm)
        launch.open()

        // Control loop: wait for a stop request or a signal; between them, ask vCPUs to check
        // whether they are halted for good (power-off without ACPI is a halt with IF=0).
        var interval: Int = 2_000_000 // ns
        while !controller.stopRequested {
            var ts = timespec(tv_sec: 0, tv_nsec: interval)
            let sig = sigtimedwait(&waitSet, nil, &ts)
            if sig == SIGINT || sig == SIGTERM {
                logger.info("received signal \(sig), stopping the VM")
                controller.stop(.signal(sig))
                break
            }
            if sig < 0 && errno == EAGAIN {
                vcpuManager.requestHaltChecks()
                interval = min(interval * 2, 100_000_000)
            }
            if controller.takeSuspend() {
                suspendToRAM(waitSet: waitSet)
                interval = 2_000_000
            }
        }
        controller.setControlThread(0)
        vcpuManager.stopAndJoin()
        virtio.stop(logger: logger)
        rtc.stopTimer()
        // Drain a wake signal that raced with the stop so it is not left pending.
        var zero = timespec(tv_sec: 0, tv_nsec: 0)
        while sigtimedwait(&waitSet, nil, &zero) > 0 {}

        let exit = controller.exit ?? .vmmFailure("stopped without a reason")
        serial.flush()
        serialOutput.flush()
        statistics.merge(quirks.counters.reduce(into: [:]) { $0["fixup " + $1.key] = $1.value })
        statistics.merge(["unhandled io": ioBus.unhandledCount, "unhandled mmio": mmioBus.unhandledCount].filter { $0.value > 0 })
        logger.info("exits: \(statistics.summary)")
        logFirmwareConfigTraffic()
        if let ns = statistics.dispatchNsPerExit {
            logger.info("user-space time per exit: \(Int(ns.rounded())) ns (KVM_RUN return to the next call, mean)")
        }
        logger.debug("stopped: \(exit)")
        return exit
    }

    /// Register dumps of every vCPU (for `--show-regs`), read after `run()` returned.
    public func registerDump() -> String { vcpuManager.registerDump() }
}
