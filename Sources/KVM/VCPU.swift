import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// Direction of a port I/O exit.
public enum IODirection: Sendable, Equatable {
    /// Guest reads (`in`): fill the data buffer before the next `run()`.
    case `in`
    /// Guest writes (`out`).
    case out
}

/// Why `VCPU.run()` returned.
///
/// Pointers point into the vCPU's mapped `kvm_run` and are valid until the next `run()`.
/// For `.io` reads and `.mmio` reads, the handler fills the buffer; KVM completes the
/// instruction on the next `run()`.
public enum VCPUExit {
    /// Port I/O of `count` × `size` bytes at `port` (count > 1 for `rep ins/outs`).
    case io(port: UInt16, size: Int, direction: IODirection, count: Int, data: UnsafeMutableRawPointer)
    /// An access to guest-physical `address` that no memory slot backs.
    case mmio(address: UInt64, data: UnsafeMutableRawPointer, length: Int, isWrite: Bool)
    /// The guest executed HLT (only without an in-kernel irqchip, or with the HLT exit enabled).
    case halt
    /// Triple fault or similar: the guest reset itself.
    case shutdown
    /// KVM could not handle the guest (suberror 1 = emulation failure), with the exit data words.
    case internalError(suberror: UInt32, data: [UInt64])
    /// VM entry failed with a hardware reason code.
    case failEntry(reason: UInt64)
    /// `KVM_EXIT_SYSTEM_EVENT` (1 shutdown, 2 reset, 3 crash…).
    case systemEvent(type: UInt32)
    /// A filtered RDMSR: answer with `VCPU.completeMSR(value:error:)`.
    case x86RDMSR(index: UInt32, reason: UInt32)
    /// A filtered WRMSR: acknowledge with `VCPU.completeMSR(value:error:)`.
    case x86WRMSR(index: UInt32, value: UInt64, reason: UInt32)
    /// KVM_RUN returned EINTR or `immediate_exit` was set: the vCPU was kicked.
    case interrupted
    /// Any other `KVM_EXIT_*` reason.
    case unknown(reason: UInt32)

    /// A short, stable name for statistics and logs (`unknown-N` for an unknown reason N).
    public var name: String {
        if case .unknown(let r) = self { return "unknown-\(r)" }
        return Self.kindNames[kindIndex]
    }

    /// The names of the exit kinds, indexed by `kindIndex` (`unknown` stands for every unknown reason).
    public static let kindNames = ["io", "mmio", "hlt", "shutdown", "internal-error", "fail-entry", "system-event",
                                   "rdmsr", "wrmsr", "interrupted", "unknown"]

    /// A small index per exit kind, for counters that must not allocate (`kindNames[kindIndex]` names it).
    public var kindIndex: Int {
        switch self {
        case .io: return 0
        case .mmio: return 1
        case .halt: return 2
        case .shutdown: return 3
        case .internalError: return 4
        case .failEntry: return 5
        case .systemEvent: return 6
        case .x86RDMSR: return 7
        case .x86WRMSR: return 8
        case .interrupted: return 9
        case .unknown: return 10
        }
    }
}

/// One virtual CPU: owns its fd and its mapped `kvm_run` (unmapped in deinit).
///
/// `run()` and the register accessors must be called from one thread at a time (the vCPU's
/// thread). `immediateExit` may be set from any thread to kick the vCPU.
public final class VCPU: @unchecked Sendable {
    /// The vCPU file descriptor, owned by this object.
    public let fd: Int32
    /// The vCPU id (APIC id) it was created with.
    public let id: UInt32
    private let runState: UnsafeMutablePointer<kvm_run>
    private let mmapSize: Int

    init(fd: Int32, id: UInt32, mmapSize: Int) throws {
        guard mmapSize >= MemoryLayout<kvm_run>.size else {
            throw KVMError(operation: "KVM_GET_VCPU_MMAP_SIZE", errno: 0, detail: "size \(mmapSize) is smaller than struct kvm_run")
        }
        let p = mmap(nil, mmapSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let p, p != MAP_FAILED else { throw KVMError(operation: "mmap kvm_run of vCPU \(id)", errno: errno) }
        self.fd = fd
        self.id = id
        self.mmapSize = mmapSize
        // SAFETY: the mapping is at least sizeof(kvm_run) bytes, page-aligned, and lives until deinit.
        self.runState = p.bindMemory(to: kvm_run.self, capacity: 1)
    }

    deinit {
        munmap(runState, mmapSize)
        close(fd)
    }

    /// `kvm_run.immediate_exit`: when set, the next `KVM_RUN` returns at once with EINTR.
    /// Set it from another thread, fence, then signal the vCPU thread to kick it.
    public var immediateExit: Bool {
        get {
            // SAFETY: `run` is mapped for the object's lifetime. Atomic: other threads set it to kick the vCPU.
            runState.pointer(to: \.immediate_exit)!.withMemoryRebound(to: UInt8.self, capacity: 1) { ckvm_load_u8($0) != 0 }
        }
        set {
            // SAFETY: as above; the kernel reads the byte at KVM_RUN entry.
            runState.pointer(to: \.immediate_exit)!.withMemoryRebound(to: UInt8.self, capacity: 1) { ckvm_store_u8($0, newValue ? 1 : 0) }
            ckvm_fence()
        }
    }

    /// Whether KVM may inject an interrupt now (`kvm_run.ready_for_interrupt_injection`).
    public var readyForInterruptInjection: Bool { runState.pointee.ready_for_interrupt_injection != 0 }
    /// RFLAGS.IF at the last exit (`kvm_run.if_flag`).
    public var interruptFlag: Bool { runState.pointee.if_flag != 0 }

    /// Enters the guest (`KVM_RUN`) until the next exit. EINTR becomes `.interrupted`.
    public func run() throws -> VCPUExit {
        let r = ckvm_ioctl_value(fd, CKVM_RUN, 0)
        if r == -EINTR || r == -EAGAIN { return .interrupted }
        if r < 0 { throw KVMError(operation: "KVM_RUN on vCPU \(id)", errno: -r) }
        // SAFETY: after KVM_RUN returns, the kernel has filled `kvm_run` for this exit;
        // the union member read matches `exit_reason`.
        let reason = runState.pointee.exit_reason
        switch Int32(bitPattern: reason) {
        case KVM_EXIT_IO:
            let io = runState.pointee.io
            guard let data = ckvm_run_io_data(runState) else { return .unknown(reason: reason) }
            let bytes = Int(io.size) * Int(io.count)
            guard Int(io.data_offset) + bytes <= mmapSize else { return .unknown(reason: reason) }
            return .io(port: io.port, size: Int(io.size), direction: io.direction == UInt8(KVM_EXIT_IO_IN) ? .in : .out,
                       count: Int(io.count), data: data)
        case KVM_EXIT_MMIO:
            let m = runState.pointee.mmio
            guard let data = ckvm_run_mmio_data(runState) else { return .unknown(reason: reason) }
            return .mmio(address: m.phys_addr, data: data, length: Int(min(m.len, 8)), isWrite: m.is_write != 0)
        case KVM_EXIT_HLT:
            return .halt
        case KVM_EXIT_SHUTDOWN:
            return .shutdown
        case KVM_EXIT_INTERNAL_ERROR:
            let suberror = runState.pointee.internal.suberror
            let n = Int(min(runState.pointee.internal.ndata, 16))
            let words = ckvm_run_internal_data(runState).map { Array(UnsafeBufferPointer(start: $0, count: n)) } ?? []
            return .internalError(suberror: suberror, data: words)
        case KVM_EXIT_FAIL_ENTRY:
            return .failEntry(reason: runState.pointee.fail_entry.hardware_entry_failure_reason)
        case KVM_EXIT_SYSTEM_EVENT:
            return .systemEvent(type: runState.pointee.system_event.type)
        case KVM_EXIT_X86_RDMSR:
            return .x86RDMSR(index: runState.pointee.msr.index, reason: runState.pointee.msr.reason)
        case KVM_EXIT_X86_WRMSR:
            return .x86WRMSR(index: runState.pointee.msr.index, value: runState.pointee.msr.data, reason: runState.pointee.msr.reason)
        case KVM_EXIT_INTR:
            return .interrupted
        default:
            return .unknown(reason: reason)
        }
    }

    /// Completes a `.x86RDMSR` (sets the value read) or `.x86WRMSR` exit; `error` injects #GP.
    public func completeMSR(value: UInt64 = 0, error: Bool = false) {
        // SAFETY: called on the vCPU thread between an MSR exit and the next KVM_RUN.
        runState.pointee.msr.data = value
        runState.pointee.msr.error = error ? 1 : 0
    }

    // MARK: State

    /// `KVM_GET_REGS`.
    public func getRegs() throws -> kvm_regs { try ioctlGet(fd, CKVM_GET_REGS, kvm_regs(), "KVM_GET_REGS") }

    /// `KVM_SET_REGS`.
    public func setRegs(_ regs: kvm_regs) throws { try ioctlSet(fd, CKVM_SET_REGS, regs, "KVM_SET_REGS") }

    /// `KVM_GET_SREGS`.
    public func getSregs() throws -> kvm_sregs { try ioctlGet(fd, CKVM_GET_SREGS, kvm_sregs(), "KVM_GET_SREGS") }

    /// `KVM_SET_SREGS`.
    public func setSregs(_ sregs: kvm_sregs) throws { try ioctlSet(fd, CKVM_SET_SREGS, sregs, "KVM_SET_SREGS") }

    /// `KVM_GET_FPU`.
    public func getFPU() throws -> kvm_fpu { try ioctlGet(fd, CKVM_GET_FPU, kvm_fpu(), "KVM_GET_FPU") }

    /// `KVM_SET_FPU`.
    public func setFPU(_ fpu: kvm_fpu) throws { try ioctlSet(fd, CKVM_SET_FPU, fpu, "KVM_SET_FPU") }

    /// `KVM_SET_CPUID2` with `entries`.
    public func setCPUID(_ entries: [kvm_cpuid_entry2]) throws {
        guard let buf = ckvm_cpuid2_alloc(UInt32(entries.count)) else {
            throw KVMError(operation: "KVM_SET_CPUID2", errno: ENOMEM)
        }
        defer { free(buf) }
        // SAFETY: ckvm_cpuid2_alloc sized the flexible array for `entries.count` entries.
        let dst = UnsafeMutableRawPointer(buf).advanced(by: MemoryLayout<kvm_cpuid2>.size)
            .assumingMemoryBound(to: kvm_cpuid_entry2.self)
        entries.withUnsafeBufferPointer { src in
            if let base = src.baseAddress { dst.update(from: base, count: src.count) }
        }
        try ioctlPointer(fd, CKVM_SET_CPUID2, buf, "KVM_SET_CPUID2")
    }

    /// `KVM_GET_CPUID2` (what the vCPU currently exposes).
    public func getCPUID() throws -> [kvm_cpuid_entry2] {
        let capacity: UInt32 = 256
        guard let buf = ckvm_cpuid2_alloc(capacity) else { throw KVMError(operation: "KVM_GET_CPUID2", errno: ENOMEM) }
        defer { free(buf) }
        try ioctlPointer(fd, CKVM_GET_CPUID2, buf, "KVM_GET_CPUID2")
        // SAFETY: the kernel wrote `nent` (≤ capacity) entries.
        let n = Int(min(buf.pointee.nent, capacity))
        let entries = UnsafeMutableRawPointer(buf).advanced(by: MemoryLayout<kvm_cpuid2>.size)
            .assumingMemoryBound(to: kvm_cpuid_entry2.self)
        return Array(UnsafeBufferPointer(start: entries, count: n))
    }

    /// `KVM_GET_MSRS` for `indices`; returns (index, value) for the MSRs KVM read (it stops at the first failure).
    public func getMSRs(_ indices: [UInt32]) throws -> [(index: UInt32, value: UInt64)] {
        guard !indices.isEmpty else { return [] }
        guard let buf = ckvm_msrs_alloc(UInt32(indices.count)) else { throw KVMError(operation: "KVM_GET_MSRS", errno: ENOMEM) }
        defer { free(buf) }
        // SAFETY: ckvm_msrs_alloc sized the entry array for `indices.count` entries.
        let entries = UnsafeMutableRawPointer(buf).advanced(by: MemoryLayout<kvm_msrs>.size)
            .assumingMemoryBound(to: kvm_msr_entry.self)
        for (i, idx) in indices.enumerated() { entries[i] = kvm_msr_entry(index: idx, reserved: 0, data: 0) }
        let n = Int(try ioctlPointer(fd, CKVM_GET_MSRS, buf, "KVM_GET_MSRS"))
        return (0..<min(n, indices.count)).map { (entries[$0].index, entries[$0].data) }
    }

    /// `KVM_SET_MSRS`; throws if KVM accepted fewer than all of them, naming the first rejected MSR.
    public func setMSRs(_ msrs: [(index: UInt32, value: UInt64)]) throws {
        guard !msrs.isEmpty else { return }
        guard let buf = ckvm_msrs_alloc(UInt32(msrs.count)) else { throw KVMError(operation: "KVM_SET_MSRS", errno: ENOMEM) }
        defer { free(buf) }
        // SAFETY: ckvm_msrs_alloc sized the entry array for `msrs.count` entries.
        let entries = UnsafeMutableRawPointer(buf).advanced(by: MemoryLayout<kvm_msrs>.size)
            .assumingMemoryBound(to: kvm_msr_entry.self)
        for (i, m) in msrs.enumerated() { entries[i] = kvm_msr_entry(index: m.index, reserved: 0, data: m.value) }
        let n = Int(try ioctlPointer(fd, CKVM_SET_MSRS, buf, "KVM_SET_MSRS"))
        if n < msrs.count {
            throw KVMError(operation: "KVM_SET_MSRS", errno: 0,
                           detail: "MSR 0x\(String(msrs[n].index, radix: 16)) was rejected (\(n) of \(msrs.count) set)")
        }
    }

    /// `KVM_GET_LAPIC`.
    public func getLAPIC() throws -> kvm_lapic_state { try ioctlGet(fd, CKVM_GET_LAPIC, kvm_lapic_state(), "KVM_GET_LAPIC") }

    /// `KVM_SET_LAPIC`.
    public func setLAPIC(_ state: kvm_lapic_state) throws { try ioctlSet(fd, CKVM_SET_LAPIC, state, "KVM_SET_LAPIC") }

    /// `KVM_GET_MP_STATE` (`KVM_MP_STATE_RUNNABLE` 0, `_HALTED` 3, …).
    public func getMPState() throws -> UInt32 {
        var s = kvm_mp_state()
        try ioctlStruct(fd, CKVM_GET_MP_STATE, &s, "KVM_GET_MP_STATE")
        return s.mp_state
    }

    /// `KVM_SET_MP_STATE`.
    public func setMPState(_ state: UInt32) throws {
        var s = kvm_mp_state(mp_state: state)
        try ioctlStruct(fd, CKVM_SET_MP_STATE, &s, "KVM_SET_MP_STATE")
    }

    /// `KVM_GET_VCPU_EVENTS`.
    public func getVCPUEvents() throws -> kvm_vcpu_events { try ioctlGet(fd, CKVM_GET_VCPU_EVENTS, kvm_vcpu_events(), "KVM_GET_VCPU_EVENTS") }

    /// `KVM_SET_VCPU_EVENTS`.
    public func setVCPUEvents(_ events: kvm_vcpu_events) throws { try ioctlSet(fd, CKVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS") }

    /// Injects exception `vector` (with an optional error code) at the next entry, as an already
    /// injected event (`exception.injected = 1`), which every KVM accepts without
    /// KVM_CAP_EXCEPTION_PAYLOAD. For a trap such as #BP, advance RIP past the instruction first.
    public func injectException(vector: UInt8, errorCode: UInt32? = nil) throws {
        try injectEvent { e in
            e.exception.injected = 1
            e.exception.pending = 0
            e.exception.nr = vector
            e.exception.has_error_code = errorCode == nil ? 0 : 1
            e.exception.error_code = errorCode ?? 0
        }
    }

    /// Injects interrupt `vector` at the next entry (`interrupt.injected = 1`): the CPU delivers it through the
    /// IDT as an external interrupt, pushing the current RIP, whatever RFLAGS.IF says. A software interrupt
    /// (`int n`) is emulated with it after the caller checked the gate and advanced RIP past the instruction.
    public func injectInterrupt(vector: UInt8) throws {
        try injectEvent { e in
            e.interrupt.injected = 1
            e.interrupt.nr = vector
            e.interrupt.soft = 0
        }
    }

    private func injectEvent(_ change: (inout kvm_vcpu_events) -> Void) throws {
        var e = try getVCPUEvents()
        change(&e)
        e.flags = 0
        try setVCPUEvents(e)
    }
}

