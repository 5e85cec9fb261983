import CKVM
#if canImport(Glibc)
import Glibc
#endif

/// The built-in seccomp filters, one per thread kind (docs/SECCOMP.md gives the reason for every entry).
/// Each filter allows its syscalls (with argument checks where they matter) and traps everything else.
public enum SeccompPolicy {
    typealias R = SeccompRule
    private static func arg(_ i: UInt32, _ v: UInt64) -> SeccompCondition { .arg(i, v) }
    private static func ioctls(_ requests: [UInt]) -> [R] { requests.map { R("ioctl", [arg(1, UInt64($0))]) } }
    private static func fcntls(_ commands: [Int32]) -> [R] { commands.map { R("fcntl", [arg(1, UInt64($0))]) } }

    /// What every thread needs: the Swift runtime and allocator (memory, futexes), thread exit, signal
    /// returns (the vCPU kick handler), the SIGSYS report (`tgkill`), time, randomness, logging to a
    /// descriptor (`write`).
    static var common: [R] {
        ["brk", "mmap", "munmap", "mremap", "madvise", "mprotect", "futex", "sched_yield", "getpid", "gettid",
         "tgkill", "rt_sigprocmask", "rt_sigreturn", "exit", "exit_group", "clock_gettime", "clock_nanosleep",
         "nanosleep", "getrandom", "write", "writev"].map { R($0) }
            + [R("prctl", [arg(0, 15) /* PR_SET_NAME */]), R("prctl", [arg(0, 16) /* PR_GET_NAME */])]
    }

    /// TUNSETOFFLOAD (`_IOW('T', 208, unsigned int)`): virtio-net applies the offloads the guest's driver
    /// negotiated to the TAP when the driver writes its features (on a vCPU) or resets the device.
    static let tunSetOffload: UInt = 0x4004_54d0

    /// vCPU threads: KVM_RUN and the exits handled on them (and their own reset for a wake from ACPI S3).
    static var vcpu: [R] {
        common
            + ioctls([CKVM_RUN, CKVM_GET_REGS, CKVM_SET_REGS, CKVM_GET_SREGS, CKVM_SET_SREGS, CKVM_GET_MP_STATE,
                      CKVM_SET_MP_STATE, CKVM_GET_VCPU_EVENTS, CKVM_SET_VCPU_EVENTS, CKVM_IRQ_LINE, CKVM_IRQ_LINE_STATUS,
                      CKVM_SIGNAL_MSI, CKVM_GET_MSRS, CKVM_SET_MSRS, CKVM_IOEVENTFD, CKVM_IRQFD,
                      CKVM_SET_GSI_ROUTING, tunSetOffload])
            + ["read", "pread64", "pwrite64", "fsync", "fdatasync", "sendto", "sendmsg", "recvfrom", "epoll_ctl",
               "eventfd2", "close"].map { R($0) }
    }

    /// Device threads: a virtio event loop (epoll over ioeventfds, backends) or a disk I/O worker.
    static var device: [R] {
        common
            + ioctls([CKVM_IRQ_LINE, CKVM_SIGNAL_MSI])
            + fcntls([F_GETFL, F_SETFL, F_GETFD, F_SETFD])
            + ["epoll_wait", "epoll_pwait", "epoll_ctl", "read", "readv", "pread64", "preadv", "pwrite64", "pwritev",
               "fsync", "fdatasync", "fallocate", "lseek", "close", "fstat", "newfstatat", "recvfrom", "recvmsg",
               "sendto", "sendmsg", "accept", "accept4", "connect", "poll", "ppoll", "timerfd_settime", "timerfd_gettime", "shutdown", "getsockopt", "setsockopt"].map { R($0) }
            + [R("socket", [arg(0, UInt64(AF_UNIX))])]
    }

    /// The API server's event loop (SwiftNIO on a Unix socket).
    static var api: [R] {
        common
            + fcntls([F_GETFL, F_SETFL, F_GETFD, F_SETFD])
            + ["epoll_wait", "epoll_pwait", "epoll_ctl", "read", "readv", "accept", "accept4", "close", "unlink", "recvfrom", "recvmsg",
               "sendto", "sendmsg", "shutdown", "getsockopt", "setsockopt", "getsockname", "getpeername", "bind",
               "listen", "fstat", "newfstatat", "eventfd2", "timerfd_settime"].map { R($0) }
    }

    /// Console threads: stdin → serial input, and the console socket server.
    static var console: [R] {
        common
            + fcntls([F_GETFL, F_SETFL, F_GETFD, F_SETFD])
            + ["read", "poll", "ppoll", "accept", "accept4", "close", "recvfrom", "sendto", "sendmsg", "shutdown", "ioctl"]
                .map { R($0) }
    }

    /// What `PUT /snapshot/create` reads on the controller thread of a paused VM: the vCPUs' extended state and
    /// MSRs, the in-kernel irqchip, PIT and clock, and the MSR list of /dev/kvm.
    /// A Diff snapshot and a migration also read the dirty-page log, and a migration turns it on and off.
    static let snapshotIoctls: [UInt] = [CKVM_GET_XSAVE, CKVM_GET_XCRS, CKVM_GET_DEBUGREGS, CKVM_GET_LAPIC,
                                         CKVM_GET_VCPU_EVENTS, CKVM_GET_MSRS, CKVM_GET_MSR_INDEX_LIST,
                                         CKVM_GET_IRQCHIP, CKVM_GET_PIT2, CKVM_GET_CLOCK,
                                         CKVM_GET_DIRTY_LOG, CKVM_SET_USER_MEMORY_REGION]

    /// The main and control threads: the control loop (signals, vCPU kicks), stopping devices, flushing
    /// disks and metrics, runtime API actions.
    static var vmm: [R] {
        common
            + ioctls([CKVM_IRQ_LINE, CKVM_SIGNAL_MSI, CKVM_GET_REGS, CKVM_GET_SREGS, CKVM_GET_MP_STATE, tunSetOffload])
            + ioctls(snapshotIoctls)
            + fcntls([F_GETFL, F_SETFL, F_GETFD, F_SETFD])
            // Opening a disk image on a running VM (PATCH /drives path_on_host; a migration's source taking its
            // images back after a failed hand-off): QEMU-style image locks (F_OFD_GETLK, F_OFD_SETLK).
            + fcntls([36, 37]) + ["access", "readlink"].map { R($0) }
            + ["rt_sigtimedwait", "rt_sigaction", "read", "close", "fsync", "fdatasync", "flock", "unlink", "openat",
               "fstat", "newfstatat", "lseek", "pread64", "pwrite64", "epoll_ctl", "shutdown", "sendto", "recvfrom",
               "ftruncate", "getrusage", "munlock", "wait4", "rename", "renameat", "renameat2", "mincore"].map { R($0) }
            + [R("kill", [arg(1, UInt64(SIGTERM))])]
            // PUT /migrate: the stream to the target (Unix or TCP socket; getaddrinfo of a host name).
            + ["connect", "setsockopt", "getsockopt", "getsockname", "getpeername", "poll", "ppoll", "recvmsg", "sendmsg", "bind"].map { R($0) }
            + [AF_UNIX, AF_INET, AF_INET6].map { R("socket", [arg(0, UInt64($0))]) }
    }

    /// The built-in filters.
    public static var builtIn: [ThreadKind: SeccompFilter] {
        [.vcpu: SeccompFilter(rules: vcpu), .device: SeccompFilter(rules: device), .api: SeccompFilter(rules: api),
         .console: SeccompFilter(rules: console), .vmm: SeccompFilter(rules: vmm)]
    }
}
