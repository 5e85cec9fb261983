// Runtime control of a running Machine: pause/resume (vCPUs parked outside KVM_RUN),
// Ctrl+Alt+Del through the i8042, and live metrics.
import Devices
import Virtio
import KVM
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Parks vCPU threads outside `KVM_RUN` while the machine is paused.
///
/// Pausing sets the flag, sets `immediate_exit` on every vCPU and kicks its thread: a vCPU in
/// `KVM_RUN` returns with EINTR, and one about to enter returns at once. Before each `KVM_RUN` a
/// vCPU thread calls `parkIfPaused`, which holds it until the machine is resumed or stopped.
/// `pause` returns once every vCPU thread is parked (or has ended).
final class PauseGate: @unchecked Sendable {
    private struct State {
        var runners: [VCPURunner] = []
        var parked = 0
        var ended = 0
        var cpuTimeNs: [UInt32: UInt64] = [:]
    }
    private let state = Mutex(State())
    private let paused = Atomic<Bool>(false)
    /// Poll interval of a parked vCPU thread (resume latency is at most this).
    static let parkPollNs = 1_000_000

    var isPaused: Bool { paused.load(ordering: .acquiring) }

    /// Called by `Machine.run` once the vCPU threads exist.
    func attach(_ runners: [VCPURunner]) {
        state.withLock { $0.runners = runners; $0.parked = 0; $0.ended = 0 }
    }

    /// Called by `Machine.run` after every vCPU thread was joined.
    func detach() {
        state.withLock { $0.runners = [] }
        paused.store(false, ordering: .releasing)
    }

    /// A vCPU thread ended (it never parks again).
    func threadEnded() { state.withLock { $0.ended += 1 } }

    /// Records the CPU time a vCPU thread has used so far.
    func recordCPUTime(vcpu: UInt32) {
        var ts = timespec()
        guard clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0 else { return }
        let ns = UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
        state.withLock { $0.cpuTimeNs[vcpu] = ns }
    }

    /// CPU time used by each vCPU thread, in nanoseconds, as last recorded.
    var cpuTimeNs: [UInt32: UInt64] { state.withLock { $0.cpuTimeNs } }

    /// vCPU side: blocks while the machine is paused and not stopping. Merges `counts` into the
    /// machine's statistics before parking (so metrics read while paused are complete).
    func parkIfPaused(_ runner: VCPURunner, counts: ExitCounts) {
        guard paused.load(ordering: .acquiring) else { return }
        let machine = runner.machine
        machine.statistics.merge(counts.take())
        recordCPUTime(vcpu: runner.vcpu.id)
        state.withLock { $0.parked += 1 }
        var ts = timespec(tv_sec: 0, tv_nsec: Self.parkPollNs)
        while paused.load(ordering: .acquiring) && !machine.controller.stopRequested {
            nanosleep(&ts, nil)
        }
        state.withLock { $0.parked -= 1 }
        // Leave the paused state: clear immediate_exit unless a stop raced with the resume. A stop
        // sets stopRequested before kicking, so either this check sees it or the kick comes later.
        runner.vcpu.immediateExit = false
        atomicThreadFenceSeqCst()
        if machine.controller.stopRequested { runner.vcpu.immediateExit = true }
    }

    /// Requests the pause and waits (at most `timeoutMs`) until every vCPU thread is parked.
    /// Returns false on timeout or when the machine is not running.
    func pause(timeoutMs: Int) -> Bool {
        let runners = state.withLock { $0.runners }
        guard !runners.isEmpty else { return false }
        paused.store(true, ordering: .releasing)
        for r in runners { r.kickToPause() }
        let deadline = Self.nowNs() + UInt64(timeoutMs) * 1_000_000
        var ts = timespec(tv_sec: 0, tv_nsec: 200_000)
        while true {
            let done = state.withLock { $0.parked + $0.ended >= $0.runners.count }
            if done { return true }
            if Self.nowNs() >= deadline { return false }
            // A vCPU may have been between the flag check and KVM_RUN when kicked: kick again.
            for r in runners { r.kickToPause() }
            nanosleep(&ts, nil)
        }
    }

    /// Lets parked vCPU threads run again.
    func resume() { paused.store(false, ordering: .releasing) }

    static func nowNs() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}

@inline(__always) func atomicThreadFenceSeqCst() {
    atomicMemoryFence(ordering: .sequentiallyConsistent)
}

/// Live counters of a machine, for metrics (`swiftkvm vmm`'s metrics file).
public struct MachineMetrics: Sendable, Equatable {
    /// vCPU exits by reason (merged from the vCPU threads at least every ~100 ms while running).
    public var exits: [String: UInt64]
    /// CPU time of each vCPU thread in microseconds, by vCPU index.
    public var vcpuTimeUs: [UInt32: UInt64]
    /// Bytes the guest wrote to the serial port.
    public var serialTransmittedBytes: UInt64
    /// Host input bytes the serial port dropped (its input buffer was full).
    public var serialDroppedInputBytes: UInt64
    /// Port-I/O and MMIO accesses that reached no device.
    public var unhandledIO: UInt64
    public var unhandledMMIO: UInt64
    /// virtio-net counters by NIC id.
    public var nics: [String: NetCounters]

    public init(exits: [String: UInt64], vcpuTimeUs: [UInt32: UInt64], serialTransmittedBytes: UInt64,
                serialDroppedInputBytes: UInt64, unhandledIO: UInt64, unhandledMMIO: UInt64, nics: [String: NetCounters] = [:]) {
        self.exits = exits; self.vcpuTimeUs = vcpuTimeUs; self.serialTransmittedBytes = serialTransmittedBytes
        self.serialDroppedInputBytes = serialDroppedInputBytes; self.unhandledIO = unhandledIO; self.unhandledMMIO = unhandledMMIO
        self.nics = nics
    }
}

extension Machine {
    /// Whether the vCPUs are paused.
    public var isPaused: Bool { pauseGate.isPaused }

    /// Stops every vCPU (kicks it out of `KVM_RUN` and parks its thread) and returns once all
    /// are parked. Guest time the VMM emulates (the in-kernel PIT and LAPIC timers) keeps running.
    /// Throws when the machine is not running or a vCPU does not stop within `timeoutMs`.
    public func pause(timeoutMs: Int = 5000) throws {
        guard !controller.stopRequested else { throw VMMError.invalidConfiguration("the machine is stopping") }
        guard pauseGate.pause(timeoutMs: timeoutMs) else {
            pauseGate.resume()
            throw VMMError.setup("the vCPUs did not stop within \(timeoutMs) ms (is the machine running?)")
        }
    }

    /// Lets paused vCPUs run again (no effect when not paused).
    public func resume() { pauseGate.resume() }

    /// Presses Ctrl+Alt+Del on the PS/2 keyboard (as Firecracker's SendCtrlAltDel): a Linux guest
    /// with the i8042 driver reboots (which ends the VMM as a reset). Throws when there is no i8042.
    public func sendCtrlAltDel() throws {
        guard let entry = ioBus.find(I8042.defaultBase), let i8042 = entry.device as? I8042 else {
            throw VMMError.setup("no i8042 keyboard controller at port 0x60 to send Ctrl+Alt+Del to")
        }
        i8042.pressCtrlAltDel()
    }

    /// Current counters (exits by reason, vCPU time, serial bytes, unhandled accesses).
    public var metrics: MachineMetrics {
        MachineMetrics(exits: statistics.snapshot,
                       vcpuTimeUs: pauseGate.cpuTimeNs.mapValues { $0 / 1000 },
                       serialTransmittedBytes: serial.transmittedBytes,
                       serialDroppedInputBytes: serial.droppedInputBytes,
                       unhandledIO: ioBus.unhandledCount, unhandledMMIO: mmioBus.unhandledCount,
                       nics: Dictionary(virtio.nics.map { ($0.id, $0.device.counters) }, uniquingKeysWith: { a, _ in a }))
    }
}
