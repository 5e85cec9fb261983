import Synchronization

/// Decides when a machine without an ACPI power-off has stopped for good, across all vCPUs.
///
/// A guest without ACPI powers off by halting with interrupts disabled. With several vCPUs one
/// halted CPU says nothing (an AP parked with `cli; hlt` while the BSP works), and an AP that never
/// received INIT/SIPI can still be started by a running CPU. So the control thread runs rounds:
/// it starts a round and asks every vCPU thread to classify its vCPU; the machine is off when, in
/// two consecutive complete rounds, every vCPU was halted for good or never started, and at least
/// one was halted for good. (Two rounds, because the vCPUs are sampled one after the other.)
final class HaltTracker: Sendable {
    /// What one vCPU was doing when sampled.
    enum VCPUState: Sendable, Equatable {
        /// Running, or halted but able to wake (IF=1, something pending).
        case running
        /// Halted with IF=0 and nothing pending: only INIT or NMI from another CPU could wake it.
        case haltedForGood
        /// Never started (KVM_MP_STATE_UNINITIALIZED or INIT_RECEIVED): waits for a SIPI.
        case notStarted
    }

    /// Complete all-stopped rounds in a row needed to decide a power-off.
    static let roundsNeeded = 2

    private struct State {
        var round: UInt64 = 0
        /// One slot per vCPU id (nil: not reported this round); reused, so a round allocates nothing.
        var reports: [VCPUState?] = []
        var reported = 0
        var completed = false
        var consecutive = 0
    }
    private let state = Mutex(State())

    init() {}

    /// Starts a new sampling round over `vcpuCount` vCPUs and returns its number (never 0).
    func beginRound(vcpuCount: Int) -> UInt64 {
        state.withLock { s in
            if !s.completed { s.consecutive = 0 }   // the previous round was not answered by everyone
            s.round &+= 1
            if s.round == 0 { s.round = 1 }
            if s.reports.count != vcpuCount { s.reports = Array(repeating: nil, count: vcpuCount) }
            for i in s.reports.indices { s.reports[i] = nil }
            s.reported = 0
            s.completed = false
            return s.round
        }
    }

    /// Records vCPU `vcpu`'s state for `round`; true when the machine is now known to be off.
    func report(vcpu: UInt32, round: UInt64, state vcpuState: VCPUState) -> Bool {
        state.withLock { s in
            guard round == s.round, !s.completed, Int(vcpu) < s.reports.count else { return false }
            if s.reports[Int(vcpu)] == nil { s.reported += 1 }
            s.reports[Int(vcpu)] = vcpuState
            guard s.reported >= s.reports.count else { return false }
            s.completed = true
            var anyRunning = false, anyHalted = false
            for i in s.reports.indices {
                if s.reports[i] == .running { anyRunning = true }
                if s.reports[i] == .haltedForGood { anyHalted = true }
            }
            if !anyRunning && anyHalted {
                s.consecutive += 1
            } else {
                s.consecutive = 0
            }
            return s.consecutive >= Self.roundsNeeded
        }
    }
}
