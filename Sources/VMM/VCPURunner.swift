import Devices
import Boot
import KVM
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Runs one vCPU on its own pthread ("vcpu N") and handles its exits synchronously.
final class VCPURunner: @unchecked Sendable {
    /// A reset for the wake from ACPI S3 (`VCPUManager.resetForWake`), applied by this vCPU's own thread (only it may
    /// set its registers under its seccomp filter) when it leaves the park: the waking entry for vCPU 0, nil for
    /// the others (back to wait-for-SIPI).
    let pendingWakeReset = Mutex<EntryState??>(nil)

    private func applyWakeReset(_ reset: EntryState?) throws {
        if let entry = reset {
            try vcpu.setSregs(EntryConversion.sregs(entry, base: try vcpu.getSregs()))
            try vcpu.setRegs(EntryConversion.regs(entry))
            try vcpu.setMPState(UInt32(KVM_MP_STATE_RUNNABLE))
        } else {
            try vcpu.setMPState(UInt32(KVM_MP_STATE_UNINITIALIZED))
        }
    }

    let context: ExitContext
    let gate: PauseGate
    let vcpu: VCPU
    private var thread: HostThread.Handle?
    private let threadID = Atomic<UInt>(0)
    /// The halt-check round requested by the control thread (0: none).
    private let haltCheck = Atomic<UInt64>(0)
    /// Stack size of vCPU threads.
    static let stackSize = 1 << 20

    init(context: ExitContext, gate: PauseGate, vcpu: VCPU) {
        self.context = context
        self.gate = gate
        self.vcpu = vcpu
    }

    /// Starts the thread, which installs the vCPU seccomp filter and then waits at `gate` before its
    /// first KVM_RUN.
    func start(gate launch: StartGate) throws {
        do {
            thread = try HostThread.start(name: "vcpu \(vcpu.id)", kind: .vcpu, gate: launch, blockStopSignals: false,
                                          stackSize: Self.stackSize) { [self] in body() }
        } catch {
            throw VMMError.setup("pthread_create for vCPU \(vcpu.id) failed: \(String(cString: strerror(error.code)))")
        }
    }

    /// Waits for the thread to end.
    func join() {
        thread?.join()
        thread = nil
    }

    /// Interrupts KVM_RUN so the thread checks whether the vCPU is halted for good.
    func requestHaltCheck(round: UInt64) {
        haltCheck.store(round, ordering: .sequentiallyConsistent)
        kick()
    }

    /// Makes every later KVM_RUN return at once and interrupts the current one.
    func kickToStop() {
        vcpu.immediateExit = true
        kick()
    }

    /// Makes the vCPU leave KVM_RUN so that it parks (the pause flag is already set).
    func kickToPause() {
        vcpu.immediateExit = true
        kick()
    }

    private func kick() {
        let tid = threadID.load(ordering: .sequentiallyConsistent)
        if tid != 0 { _ = ckvm_pthread_kick(UInt(tid)) }
    }

    private func body() {
        _ = ckvm_set_thread_name("vcpu \(vcpu.id)")
        // The kick signal must reach this thread even if the parent process started us with it
        // blocked (signal masks are inherited across exec).
        var kickSet = sigset_t()
        sigemptyset(&kickSet)
        sigaddset(&kickSet, ckvm_kick_signal())
        pthread_sigmask(SIG_UNBLOCK, &kickSet, nil)
        threadID.store(UInt(ckvm_pthread_self()), ordering: .sequentiallyConsistent)
        let counts = ExitCounts()
        defer {
            threadID.store(0, ordering: .sequentiallyConsistent)
            counts.flush(into: context.statistics)
            context.statistics.mergeDispatch(exits: counts.dispatched, ns: counts.dispatchNs)
            gate.recordCPUTime(vcpu: vcpu.id)
            gate.threadEnded()
        }
        let controller = context.controller
        let statistics = context.statistics
        while !controller.stopRequested {
            gate.parkIfPaused(vcpu: vcpu, stopRequested: { controller.stopRequested },
                              beforePark: { [vcpu] in
                                  counts.flush(into: statistics)
                                  // Let KVM finish an I/O or MMIO exit just handled (it completes the
                                  // instruction on the next KVM_RUN): with immediate_exit set, that
                                  // KVM_RUN completes it and returns at once, so the state a snapshot
                                  // reads while parked has no half-done instruction. (Set here too: a
                                  // VM started paused was never kicked, and must not run a guest
                                  // instruction.)
                                  vcpu.immediateExit = true
                                  _ = try? vcpu.run()
                              })
            if controller.stopRequested { break }
            if let reset = pendingWakeReset.withLock({ r in defer { r = nil }; return r }) {
                do { try applyWakeReset(reset) } catch {
                    controller.stop(.vmmFailure("ACPI S3: cannot reset vCPU \(vcpu.id): \(error)"))
                    break
                }
            }
            let exit: VCPUExit
            do {
                exit = try vcpu.run()
            } catch {
                controller.stop(.vmmFailure("\(error)"))
                break
            }
            // The VMM's own share of the exit: from KVM_RUN's return to the end of its handling (vDSO clock
            // reads, no system call).
            let returned = PauseGate.nowNs()
            counts.record(exit)
            handle(exit, counts: counts)
            counts.dispatchNs &+= PauseGate.nowNs() &- returned
            counts.dispatched &+= 1
        }
    }

    private func handle(_ exit: VCPUExit, counts: ExitCounts) {
        let logger = context.logger
        let controller = context.controller
        switch exit {
        case .io(let port, let size, let direction, let count, let data):
            guard size == 1 || size == 2 || size == 4, count >= 1 else {
                logger.debug("vCPU \(vcpu.id): ignoring I/O of size \(size) × \(count) at port 0x\(String(port, radix: 16))")
                return
            }
            for i in 0..<count {
                let p = data + i * size
                let handled: Bool
                if direction == .out {
                    handled = context.ioBus.write(address: UInt64(port), data: UnsafeRawBufferPointer(start: p, count: size))
                } else {
                    handled = context.ioBus.read(address: UInt64(port), data: UnsafeMutableRawBufferPointer(start: p, count: size))
                }
                if !handled {
                    logger.debug("unhandled port \(direction == .out ? "write" : "read") at 0x\(String(port, radix: 16)) size \(size)")
                }
            }
        case .mmio(let address, let data, let length, let isWrite):
            guard length > 0 else { return }
            if context.mmioBus.find(address) == nil,
               context.quirks.handleMMIO(vcpu: vcpu, memory: context.memory, address: address, isWrite: isWrite, logger: logger) {
                return
            }
            let handled: Bool
            if isWrite {
                handled = context.mmioBus.write(address: address, data: UnsafeRawBufferPointer(start: data, count: length))
            } else {
                handled = context.mmioBus.read(address: address, data: UnsafeMutableRawBufferPointer(start: data, count: length))
            }
            if !handled {
                logger.debug("unhandled MMIO \(isWrite ? "write" : "read") at 0x\(String(address, radix: 16)) size \(length)")
            }
        case .halt:
            // Only without an in-kernel LAPIC; with several vCPUs the halt tracker decides.
            if context.vcpuCount == 1, isHaltedForGood(mpStateKnown: true) { controller.stop(.powerOff) }
        case .interrupted:
            // Publish live counts for metrics (kicks come at least every ~100 ms).
            counts.flush(into: context.statistics)
            gate.recordCPUTime(vcpu: vcpu.id)
            let round = haltCheck.exchange(0, ordering: .sequentiallyConsistent)
            if round != 0, context.haltTracker.report(vcpu: vcpu.id, round: round, state: haltState()) {
                logger.debug("every vCPU halted with interrupts disabled or never started: power-off")
                controller.stop(.powerOff)
            }
        case .shutdown:
            logger.info("vCPU \(vcpu.id): shutdown (triple fault or reset)")
            controller.stop(.reset)
        case .systemEvent(let type):
            switch Int32(type) {
            case KVM_SYSTEM_EVENT_SHUTDOWN: controller.stop(.powerOff)
            case KVM_SYSTEM_EVENT_RESET: controller.stop(.reset)
            case KVM_SYSTEM_EVENT_CRASH: controller.stop(.internalError("guest crash system event on vCPU \(vcpu.id)"))
            default: logger.debug("vCPU \(vcpu.id): ignoring system event \(type)")
            }
        case .internalError(let suberror, let data):
            if context.quirks.handleInternalError(vcpu: vcpu, memory: context.memory, suberror: suberror, data: data, logger: logger) {
                return
            }
            let message = describeFailure("KVM internal error (suberror \(suberror))", suberror: suberror, data: data)
            logger.debug("\(message)")
            controller.stop(.internalError(message))
        case .failEntry(let reason):
            let message = describeFailure("VM entry failed (hardware reason 0x\(String(reason, radix: 16)))", suberror: nil, data: [])
            logger.debug("\(message)")
            controller.stop(.internalError(message))
        case .x86RDMSR(let index, _):
            if !context.quirks.handleMSR(vcpu: vcpu, memory: context.memory, index: index, write: nil, logger: logger) {
                logger.debug("rdmsr 0x\(String(index, radix: 16)) refused (#GP)")
                vcpu.completeMSR(error: true)
            }
        case .x86WRMSR(let index, let value, _):
            if !context.quirks.handleMSR(vcpu: vcpu, memory: context.memory, index: index, write: value, logger: logger) {
                logger.debug("wrmsr 0x\(String(index, radix: 16)) refused (#GP)")
                vcpu.completeMSR(error: true)
            }
        case .unknown(let reason):
            let message = describeFailure("unexpected KVM exit reason \(reason)", suberror: nil, data: [])
            logger.debug("\(message)")
            controller.stop(.internalError(message))
        }
    }

    /// The vCPU's state for the halt tracker (HaltTracker.swift).
    private func haltState() -> HaltTracker.VCPUState {
        guard let mp = try? vcpu.getMPState() else { return .running }
        if mp == UInt32(KVM_MP_STATE_UNINITIALIZED) || mp == UInt32(KVM_MP_STATE_INIT_RECEIVED) { return .notStarted }
        return mp == UInt32(KVM_MP_STATE_HALTED) && isHaltedForGood(mpStateKnown: true) ? .haltedForGood : .running
    }

    /// Whether the vCPU is halted with IF=0 and nothing pending (it can never run again).
    private func isHaltedForGood(mpStateKnown: Bool) -> Bool {
        if !mpStateKnown {
            guard let mp = try? vcpu.getMPState(), mp == UInt32(KVM_MP_STATE_HALTED) else { return false }
        }
        guard let regs = try? vcpu.getRegs(), regs.rflags & (1 << 9) == 0 else { return false }
        if let events = try? vcpu.getVCPUEvents(),
           events.nmi.pending != 0 || events.nmi.injected != 0 || events.interrupt.injected != 0 {
            return false
        }
        return true
    }

    /// "what on vCPU n at RIP 0x…: instruction bytes …" with the bytes from the exit data or guest memory.
    private func describeFailure(_ what: String, suberror: UInt32?, data: [UInt64]) -> String {
        var s = "\(what) on vCPU \(vcpu.id)"
        let fetched = InstructionBytes.atRIP(vcpu: vcpu, memory: context.memory)
        if let rip = fetched?.rip { s += " at RIP 0x\(String(rip, radix: 16))" }
        let bytes = suberror.flatMap { InstructionBytes.fromExitData(suberror: $0, data: data) } ?? fetched?.bytes ?? []
        s += bytes.isEmpty ? ": instruction bytes unavailable" : ": instruction bytes \(InstructionBytes.hex(bytes))"
        if !data.isEmpty { s += " (exit data \(data.map { "0x" + String($0, radix: 16) }.joined(separator: " ")))" }
        return s
    }
}

/// Formats a vCPU's registers (for `--show-regs` and diagnostics).
public enum RegisterDump {
    static func h(_ v: UInt64, _ width: Int = 16) -> String {
        let s = String(v, radix: 16)
        return String(repeating: "0", count: max(0, width - s.count)) + s
    }

    /// The registers as text, one group per line, e.g. `RAX=0000000000000000 RBX=…`.
    public static func format(regs r: kvm_regs, sregs s: kvm_sregs, id: UInt32) -> String {
        func seg(_ n: String, _ g: kvm_segment) -> String {
            "\(n)=\(h(UInt64(g.selector), 4)) base=\(h(g.base)) limit=\(h(UInt64(g.limit), 8)) type=\(g.type) l=\(g.l) db=\(g.db)"
        }
        return [
            "vCPU \(id):",
            "RAX=\(h(r.rax)) RBX=\(h(r.rbx)) RCX=\(h(r.rcx)) RDX=\(h(r.rdx))",
            "RSI=\(h(r.rsi)) RDI=\(h(r.rdi)) RSP=\(h(r.rsp)) RBP=\(h(r.rbp))",
            "R8=\(h(r.r8)) R9=\(h(r.r9)) R10=\(h(r.r10)) R11=\(h(r.r11))",
            "R12=\(h(r.r12)) R13=\(h(r.r13)) R14=\(h(r.r14)) R15=\(h(r.r15))",
            "RIP=\(h(r.rip)) RFLAGS=\(h(r.rflags))",
            seg("CS", s.cs), seg("DS", s.ds), seg("ES", s.es), seg("SS", s.ss), seg("FS", s.fs), seg("GS", s.gs),
            "GDT=\(h(s.gdt.base)) limit=\(h(UInt64(s.gdt.limit), 4)) IDT=\(h(s.idt.base)) limit=\(h(UInt64(s.idt.limit), 4))",
            "CR0=\(h(s.cr0)) CR2=\(h(s.cr2)) CR3=\(h(s.cr3)) CR4=\(h(s.cr4)) EFER=\(h(s.efer))",
        ].joined(separator: "\n")
    }

    /// The registers of `vcpu`, or a line saying why they cannot be read.
    public static func format(vcpu: VCPU) -> String {
        do {
            return format(regs: try vcpu.getRegs(), sregs: try vcpu.getSregs(), id: vcpu.id)
        } catch {
            return "vCPU \(vcpu.id): registers unavailable: \(error)"
        }
    }
}
