// Runtime control of a running Machine: pause/resume (vCPUs parked outside KVM_RUN),
// Ctrl+Alt+Del through the i8042, and live metrics.
import Devices
import Virtio
import KVM
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

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
    public var isPaused: Bool { vcpuManager.isPaused }

    /// Stops every vCPU (kicks it out of `KVM_RUN` and parks its thread) and returns once all
    /// are parked, then holds the RTC's timer thread (no IRQ 8 edge while paused). Guest time the
    /// VMM emulates (the in-kernel PIT and LAPIC timers) keeps running.
    /// Throws when the machine is not running or a vCPU does not stop within `timeoutMs`.
    public func pause(timeoutMs: Int = 5000) throws {
        guard !controller.stopRequested else { throw VMMError.invalidConfiguration("the machine is stopping") }
        guard !suspended.load(ordering: .acquiring) else {
            throw VMMError.invalidConfiguration("the guest is suspended to RAM (ACPI S3); it can be paused once it wakes")
        }
        guard vcpuManager.pause(timeoutMs: timeoutMs) else {
            vcpuManager.resume()
            throw VMMError.setup("the vCPUs did not stop within \(timeoutMs) ms (is the machine running?)")
        }
        rtc.holdTimer()
    }

    /// Lets paused vCPUs run again (no effect when not paused).
    public func resume() {
        // A guest in S3 stays asleep until its wake event (the control thread resumes it).
        guard !suspended.load(ordering: .acquiring) else { return }
        if devicesHeldBySnapshot.exchange(false, ordering: .acquiringAndReleasing) { virtio.resumeAfterSnapshot() }
        rtc.releaseTimer()
        vcpuManager.resume()
    }

    /// Keeps the vCPUs parked from the start: `run()` starts their threads paused, and `resume()`
    /// lets them go (a snapshot loaded without `resume_vm`).
    public func startPaused() {
        rtc.holdTimer()
        vcpuManager.gate.presetPaused()
    }

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
                       vcpuTimeUs: vcpuManager.cpuTimeNs.mapValues { $0 / 1000 },
                       serialTransmittedBytes: serial.transmittedBytes,
                       serialDroppedInputBytes: serial.droppedInputBytes,
                       unhandledIO: ioBus.unhandledCount, unhandledMMIO: mmioBus.unhandledCount,
                       nics: Dictionary(virtio.nics.map { ($0.id, $0.device.counters) }, uniquingKeysWith: { a, _ in a }))
    }
}
