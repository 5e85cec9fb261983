#if canImport(Glibc)
import Glibc
#endif
import KVM

/// Guest time dilation: an explicit option that makes a slow (emulated) guest kernel take fewer timer
/// interrupts per second of real time.
///
/// The guest is told its TSC runs `factor` times faster than it does (`tsc_early_khz`), and kvm-clock is
/// hidden so the TSC is its clocksource. Each tick then comes `factor` times later in real time; on PVM
/// hosts, where one tick costs about 10 ms of emulation, a boot gets markedly faster. The cost: the guest's
/// wall clock runs `factor` times slow. Never on by default.
public enum TimeDilation {
    /// Largest accepted factor.
    public static let maximumFactor: UInt = 100

    /// The kernel command-line parameters that dilate guest time by `factor`, for a host TSC of `hostTSCkHz`.
    public static func cmdlineParameters(factor: UInt, hostTSCkHz: UInt64) -> String {
        "no-kvmclock clocksource=tsc tsc=reliable tsc_early_khz=\(hostTSCkHz * UInt64(factor))"
    }

    /// The host TSC frequency in kHz: sysfs when the kernel exports it, else calibrated against
    /// CLOCK_MONOTONIC over about 50 ms.
    public static func hostTSCkHz() -> UInt64 {
        if let text = try? String(contentsOfFileAtPath: "/sys/devices/system/cpu/cpu0/tsc_freq_khz"),
           let khz = UInt64(text.filter(\.isNumber)), khz > 0 {
            return khz
        }
        var t0 = timespec(), t1 = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t0)
        let c0 = rdtsc()
        var req = timespec(tv_sec: 0, tv_nsec: 50_000_000)
        var rem = timespec()
        while nanosleep(&req, &rem) != 0 { req = rem }
        clock_gettime(CLOCK_MONOTONIC, &t1)
        let c1 = rdtsc()
        let ns = UInt64((t1.tv_sec - t0.tv_sec) * 1_000_000_000 + (t1.tv_nsec - t0.tv_nsec))
        guard ns > 0, c1 > c0 else { return 1_000_000 }
        // Round to the nearest MHz: calibration noise is larger than that.
        return ((c1 - c0) * 1_000_000 / ns + 500) / 1000 * 1000
    }

    private static func rdtsc() -> UInt64 {
        ckvm_rdtsc()
    }
}

private extension String {
    init(contentsOfFileAtPath path: String) throws {
        guard let f = fopen(path, "r") else { throw GuestMemoryErrorShim.unreadable }
        defer { fclose(f) }
        var buf = [CChar](repeating: 0, count: 64)
        guard fgets(&buf, 64, f) != nil else { throw GuestMemoryErrorShim.unreadable }
        self = String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

private enum GuestMemoryErrorShim: Error { case unreadable }
