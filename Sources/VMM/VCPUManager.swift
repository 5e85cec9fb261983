import Boot
import Devices
import GuestMemory
import KVM
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// What a vCPU thread needs to handle its exits: the buses, guest memory, the host fix-ups, the
/// stop controller, the statistics and the logger — not the whole `Machine`.
final class ExitContext: @unchecked Sendable {
    let ioBus: Bus
    let mmioBus: Bus
    let memory: GuestMemory
    let quirks: any HostQuirks
    let controller: MachineController
    let statistics: ExitStatistics
    let haltTracker: HaltTracker
    let logger: Logger
    /// How many vCPUs the machine has (one halted vCPU alone can mean power-off).
    let vcpuCount: Int

    init(ioBus: Bus, mmioBus: Bus, memory: GuestMemory, quirks: any HostQuirks, controller: MachineController,
         statistics: ExitStatistics, haltTracker: HaltTracker, logger: Logger, vcpuCount: Int) {
        self.ioBus = ioBus; self.mmioBus = mmioBus; self.memory = memory; self.quirks = quirks
        self.controller = controller; self.statistics = statistics; self.haltTracker = haltTracker
        self.logger = logger; self.vcpuCount = vcpuCount
    }
}

/// The vCPUs of a machine: their creation and reset state, one thread each while the machine runs,
/// pause and resume (threads parked on a condition variable outside `KVM_RUN`), halt checks and
/// register dumps.
final class VCPUManager: @unchecked Sendable {
    let vcpus: [VCPU]
    /// Parks the vCPU threads while paused.
    let gate = PauseGate()
    /// Decides a power-off by halt across all vCPUs (HaltTracker.swift).
    let haltTracker = HaltTracker()
    private let runners = Mutex<[VCPURunner]>([])

    /// Creates `count` vCPUs with filtered CPUID, reset MSRs, LAPIC LVT0/LVT1 and FPU, and puts the
    /// loader's entry state into vCPU 0.
    init(vm: VirtualMachine, count: Int, supportedCPUID: [kvm_cpuid_entry2], quirks: any HostQuirks,
         cpuidMasks: [CPUIDMask], cpuTemplate: CPUTemplate? = nil, entry: EntryState, logger: Logger) throws {
        var cpus: [VCPU] = []
        for id in 0..<count {
            let vcpu = try vm.createVCPU(id: UInt32(id))
            var cpuid = CPUIDFilter.filter(supportedCPUID, apicID: UInt32(id), cpuCount: count,
                                           hideCX16: quirks.hidesCX16, masks: cpuidMasks)
            cpuid = quirks.filterCPUID(cpuid)
            try cpuTemplate?.apply(to: &cpuid)
            try vcpu.setCPUID(cpuid)
            try Self.setUpMSRs(vcpu, logger: logger)
            try cpuTemplate?.applyMSRs(to: vcpu)
            try Self.setUpLAPIC(vcpu)
            try Self.setUpFPU(vcpu)
            if id == 0 {
                try vcpu.setSregs(EntryConversion.sregs(entry, base: try vcpu.getSregs()))
                try vcpu.setRegs(EntryConversion.regs(entry))
            }
            cpus.append(vcpu)
        }
        vcpus = cpus
    }

    /// Puts paused vCPUs back to their state after a wake from S3: vCPU 0 at `entry` and runnable, the others
    /// waiting for INIT-SIPI.
    /// Each vCPU's thread applies it as it leaves the park (its seccomp filter allows the register ioctls).
    func resetForWake(entry: EntryState) {
        for r in runners.withLock({ $0 }) {
            r.pendingWakeReset.withLock { $0 = .some(r.vcpu.id == 0 ? entry : nil) }
        }
    }

    /// Starts one thread per vCPU; each installs its seccomp filter and waits at `launch` before
    /// its first KVM_RUN. A thread that cannot start stops the machine through the context's
    /// controller (the threads already started then end on their own).
    func start(context: ExitContext, gate launch: StartGate) {
        let list = vcpus.map { VCPURunner(context: context, gate: gate, vcpu: $0) }
        runners.withLock { $0 = list }
        gate.attach(list)
        for r in list where !context.controller.stopRequested {
            do { try r.start(gate: launch) } catch {
                context.controller.stop(.vmmFailure("cannot start vCPU \(r.vcpu.id) thread: \(error)"))
            }
        }
    }

    /// Asks every vCPU thread whether its vCPU is halted for good (HaltTracker).
    func requestHaltChecks() {
        let list = runners.withLock { $0 }
        let round = haltTracker.beginRound(vcpuCount: list.count)
        for i in list.indices { list[i].requestHaltCheck(round: round) } // (an index loop: no iterator allocation in debug builds)
    }

    /// Ends every vCPU thread (the controller already holds the stop reason) and waits for them.
    func stopAndJoin() {
        let list = runners.withLock { $0 }
        gate.wakeForStop()
        for r in list { r.kickToStop() }
        for r in list { r.join() }
        gate.detach()
        runners.withLock { $0 = [] }
    }

    /// Parks every vCPU thread; false when they did not all park within `timeoutMs` or none runs.
    func pause(timeoutMs: Int) -> Bool { gate.pause(timeoutMs: timeoutMs) }

    /// Lets parked vCPU threads run again.
    func resume() { gate.resume() }

    var isPaused: Bool { gate.isPaused }

    /// CPU time used by each vCPU thread, in nanoseconds, as last recorded.
    var cpuTimeNs: [UInt32: UInt64] { gate.cpuTimeNs }

    /// Register dumps of every vCPU (for `--show-regs`), read after the threads ended.
    func registerDump() -> String {
        vcpus.map { RegisterDump.format(vcpu: $0) }.joined(separator: "\n")
    }

    /// MSRs at reset: fast strings on, SYSENTER/SYSCALL MSRs and the TSC zero.
    static func setUpMSRs(_ vcpu: VCPU, logger: Logger) throws {
        let msrs: [(index: UInt32, value: UInt64)] = [
            (0x1a0, 1),          // IA32_MISC_ENABLE: fast strings
            (0x174, 0), (0x175, 0), (0x176, 0), // IA32_SYSENTER_CS/ESP/EIP
            (0xc000_0081, 0), (0xc000_0082, 0), (0xc000_0083, 0), (0xc000_0084, 0), // STAR, LSTAR, CSTAR, SFMASK
            (0xc000_0102, 0),    // KERNEL_GS_BASE
            (0x10, 0),           // IA32_TSC
        ]
        for m in msrs {
            do { try vcpu.setMSRs([m]) } catch { logger.debug("MSR 0x\(String(m.index, radix: 16)) not set: \(error)") }
        }
    }

    /// LAPIC LVT0 = ExtINT, LVT1 = NMI (so the PIC reaches the BSP, as on a PC).
    static func setUpLAPIC(_ vcpu: VCPU) throws {
        var lapic = try vcpu.getLAPIC()
        withUnsafeMutableBytes(of: &lapic.regs) { raw in
            func update(_ offset: Int, mode: UInt32) {
                var v = raw.loadUnaligned(fromByteOffset: offset, as: UInt32.self)
                v = (v & ~0x700) | (mode << 8)
                v &= ~(1 << 16) // unmasked
                raw.storeBytes(of: v, toByteOffset: offset, as: UInt32.self)
            }
            update(0x350, mode: 7) // LVT0: ExtINT
            update(0x360, mode: 4) // LVT1: NMI
        }
        try vcpu.setLAPIC(lapic)
    }

    /// x87 control word 0x37f and MXCSR 0x1f80, as after a reset.
    static func setUpFPU(_ vcpu: VCPU) throws {
        var fpu = kvm_fpu()
        fpu.fcw = 0x37f
        fpu.mxcsr = 0x1f80
        try vcpu.setFPU(fpu)
    }
}

/// Parks vCPU threads outside `KVM_RUN` while the machine is paused.
///
/// Pausing sets the flag, sets `immediate_exit` on every vCPU and kicks its thread: a vCPU in
/// `KVM_RUN` returns with EINTR, and one about to enter returns at once. Before each `KVM_RUN` a
/// vCPU thread calls `parkIfPaused`, which waits on a condition variable until the machine is
/// resumed or stopped. `pause` returns once every vCPU thread is parked (or has ended).
final class PauseGate: @unchecked Sendable {
    private let cond = ConditionLock()
    // Guarded by `cond`.
    private var runners: [VCPURunner] = []
    private var parked = 0
    private var ended = 0
    private var pausedFlag = false
    private var cpuTime: [UInt32: UInt64] = [:]
    private var stopping = false
    /// Lock-free copy of `pausedFlag` for the check before every KVM_RUN.
    private let paused = Atomic<Bool>(false)

    var isPaused: Bool { paused.load(ordering: .acquiring) }

    /// Pauses before any vCPU thread runs: they park before their first KVM_RUN.
    func presetPaused() {
        cond.withLock {
            pausedFlag = true
            paused.store(true, ordering: .releasing)
        }
    }

    /// Called once the vCPU runners exist.
    func attach(_ list: [VCPURunner]) {
        cond.withLock { runners = list; parked = 0; ended = 0; stopping = false }
    }

    /// Called after every vCPU thread was joined.
    func detach() {
        cond.withLock { runners = []; pausedFlag = false }
        paused.store(false, ordering: .releasing)
    }

    /// A vCPU thread ended (it never parks again).
    func threadEnded() {
        cond.withLock { ended += 1; cond.broadcast() }
    }

    /// Wakes parked threads for good: the machine is stopping.
    func wakeForStop() {
        cond.withLock { stopping = true; cond.broadcast() }
    }

    /// Records the CPU time the calling vCPU thread has used so far.
    func recordCPUTime(vcpu: UInt32) {
        var ts = timespec()
        guard clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0 else { return }
        let ns = UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
        cond.withLock { cpuTime[vcpu] = ns }
    }

    /// CPU time used by each vCPU thread, in nanoseconds, as last recorded.
    var cpuTimeNs: [UInt32: UInt64] { cond.withLock { cpuTime } }

    /// vCPU side: blocks while the machine is paused and not stopping. `beforePark` runs first
    /// (the runner publishes its counts, so metrics read while paused are complete).
    func parkIfPaused(vcpu: VCPU, stopRequested: () -> Bool, beforePark: () -> Void) {
        guard paused.load(ordering: .acquiring) else { return }
        beforePark()
        recordCPUTime(vcpu: vcpu.id)
        cond.lock()
        parked += 1
        cond.broadcast()
        while pausedFlag && !stopping && !stopRequested() { cond.wait() }
        parked -= 1
        cond.unlock()
        // Leave the paused state: clear immediate_exit unless a stop raced with the resume. A stop
        // sets stopRequested before kicking, so either this check sees it or the kick comes later.
        vcpu.immediateExit = false
        atomicMemoryFence(ordering: .sequentiallyConsistent)
        if stopRequested() { vcpu.immediateExit = true }
    }

    /// Requests the pause without waiting (safe on a vCPU thread: it parks before its next KVM_RUN), e.g. when the
    /// guest's write that enters ACPI S3 must be its last instruction before the sleep. `pause` then waits.
    func requestPause() {
        let list = cond.withLock { () -> [VCPURunner] in
            pausedFlag = true
            return runners
        }
        paused.store(true, ordering: .releasing)
        for r in list { r.kickToPause() }
    }

    /// Requests the pause and waits (at most `timeoutMs`) until every vCPU thread is parked.
    /// Returns false on timeout or when the machine is not running.
    func pause(timeoutMs: Int) -> Bool {
        let list = cond.withLock { () -> [VCPURunner] in
            pausedFlag = true
            return runners
        }
        guard !list.isEmpty else {
            cond.withLock { pausedFlag = false }
            return false
        }
        paused.store(true, ordering: .releasing)
        for r in list { r.kickToPause() }
        let deadline = Self.nowNs() + UInt64(timeoutMs) * 1_000_000
        cond.lock()
        defer { cond.unlock() }
        while parked + ended < runners.count {
            let now = Self.nowNs()
            if now >= deadline { return false }
            // A vCPU may have been between the flag check and KVM_RUN when kicked: kick again
            // when nothing happened for a while.
            if !cond.wait(seconds: min(0.0002 * 10, Double(deadline - now) / 1e9)) {
                for r in runners { r.kickToPause() }
            }
        }
        return true
    }

    /// Lets parked vCPU threads run again.
    func resume() {
        cond.withLock {
            pausedFlag = false
            paused.store(false, ordering: .releasing)
            cond.broadcast()
        }
    }

    static func nowNs() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}
