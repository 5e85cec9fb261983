// CKVM: the C side of SwiftKVM's KVM bindings.
//
// Swift cannot import the _IO/_IOW/_IOR/_IOWR macros nor call the variadic ioctl(2),
// so this header re-exports every ioctl number SwiftKVM uses as a constant and offers
// non-variadic wrappers. Functions are prefixed `ckvm_` and return a value or -errno.
#ifndef CKVM_H
#define CKVM_H

#include <linux/kvm.h>
#include <asm/bootparam.h>
#include <asm/e820.h>
#include <stdint.h>
#include <stddef.h>

// MARK: ioctl numbers (one place)
// /dev/kvm
static const unsigned long CKVM_GET_API_VERSION = KVM_GET_API_VERSION;
static const unsigned long CKVM_CREATE_VM = KVM_CREATE_VM;
static const unsigned long CKVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
static const unsigned long CKVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
static const unsigned long CKVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;
static const unsigned long CKVM_GET_MSR_INDEX_LIST = KVM_GET_MSR_INDEX_LIST;
// VM
static const unsigned long CKVM_CREATE_VCPU = KVM_CREATE_VCPU;
static const unsigned long CKVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
static const unsigned long CKVM_GET_DIRTY_LOG = KVM_GET_DIRTY_LOG;
static const unsigned int CKVM_MEM_LOG_DIRTY_PAGES = KVM_MEM_LOG_DIRTY_PAGES;
static const unsigned long CKVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;
static const unsigned long CKVM_SET_IDENTITY_MAP_ADDR = KVM_SET_IDENTITY_MAP_ADDR;
static const unsigned long CKVM_CREATE_IRQCHIP = KVM_CREATE_IRQCHIP;
static const unsigned long CKVM_CREATE_PIT2 = KVM_CREATE_PIT2;
static const unsigned long CKVM_IRQ_LINE = KVM_IRQ_LINE;
static const unsigned long CKVM_IRQ_LINE_STATUS = KVM_IRQ_LINE_STATUS;
static const unsigned long CKVM_SET_GSI_ROUTING = KVM_SET_GSI_ROUTING;
static const unsigned long CKVM_IRQFD = KVM_IRQFD;
static const unsigned long CKVM_IOEVENTFD = KVM_IOEVENTFD;
static const unsigned long CKVM_SIGNAL_MSI = KVM_SIGNAL_MSI;
static const unsigned long CKVM_ENABLE_CAP = KVM_ENABLE_CAP;
static const unsigned long CKVM_X86_SET_MSR_FILTER = KVM_X86_SET_MSR_FILTER;
static const unsigned long CKVM_GET_CLOCK = KVM_GET_CLOCK;
static const unsigned long CKVM_SET_CLOCK = KVM_SET_CLOCK;
static const unsigned long CKVM_GET_IRQCHIP = KVM_GET_IRQCHIP;
static const unsigned long CKVM_SET_IRQCHIP = KVM_SET_IRQCHIP;
// vCPU
static const unsigned long CKVM_RUN = KVM_RUN;
static const unsigned long CKVM_GET_REGS = KVM_GET_REGS;
static const unsigned long CKVM_SET_REGS = KVM_SET_REGS;
static const unsigned long CKVM_GET_SREGS = KVM_GET_SREGS;
static const unsigned long CKVM_SET_SREGS = KVM_SET_SREGS;
static const unsigned long CKVM_GET_FPU = KVM_GET_FPU;
static const unsigned long CKVM_SET_FPU = KVM_SET_FPU;
static const unsigned long CKVM_SET_CPUID2 = KVM_SET_CPUID2;
static const unsigned long CKVM_GET_CPUID2 = KVM_GET_CPUID2;
static const unsigned long CKVM_GET_MSRS = KVM_GET_MSRS;
static const unsigned long CKVM_SET_MSRS = KVM_SET_MSRS;
static const unsigned long CKVM_GET_LAPIC = KVM_GET_LAPIC;
static const unsigned long CKVM_SET_LAPIC = KVM_SET_LAPIC;
static const unsigned long CKVM_GET_MP_STATE = KVM_GET_MP_STATE;
static const unsigned long CKVM_SET_MP_STATE = KVM_SET_MP_STATE;
static const unsigned long CKVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS;
static const unsigned long CKVM_SET_VCPU_EVENTS = KVM_SET_VCPU_EVENTS;
static const unsigned long CKVM_SET_SIGNAL_MASK = KVM_SET_SIGNAL_MASK;
static const unsigned long CKVM_INTERRUPT = KVM_INTERRUPT;
static const unsigned long CKVM_NMI = KVM_NMI;
static const unsigned long CKVM_SET_GUEST_DEBUG = KVM_SET_GUEST_DEBUG;
static const unsigned long CKVM_GET_TSC_KHZ = KVM_GET_TSC_KHZ;
static const unsigned long CKVM_GET_XSAVE = KVM_GET_XSAVE;
static const unsigned long CKVM_SET_XSAVE = KVM_SET_XSAVE;
static const unsigned long CKVM_GET_XCRS = KVM_GET_XCRS;
static const unsigned long CKVM_SET_XCRS = KVM_SET_XCRS;
static const unsigned long CKVM_GET_DEBUGREGS = KVM_GET_DEBUGREGS;
static const unsigned long CKVM_SET_DEBUGREGS = KVM_SET_DEBUGREGS;
static const unsigned long CKVM_GET_PIT2 = KVM_GET_PIT2;
static const unsigned long CKVM_SET_PIT2 = KVM_SET_PIT2;
static const unsigned long CKVM_SET_TSC_KHZ = KVM_SET_TSC_KHZ;

/// ioctl(2) with an integer argument. Returns the result or -errno.
int ckvm_ioctl_value(int fd, unsigned long request, unsigned long arg);
/// ioctl(2) with a pointer argument. Returns the result or -errno.
int ckvm_ioctl_ptr(int fd, unsigned long request, void *arg);

/// Allocates a zeroed `struct kvm_cpuid2` with room for `count` entries (free with free()).
struct kvm_cpuid2 *ckvm_cpuid2_alloc(uint32_t count);
/// Allocates a zeroed `struct kvm_msrs` with room for `count` entries (free with free()).
struct kvm_msrs *ckvm_msrs_alloc(uint32_t count);
/// Allocates a zeroed `struct kvm_msr_list` with room for `count` indices (free with free()).
struct kvm_msr_list *ckvm_msr_list_alloc(uint32_t count);

/// The real-time signal used to kick vCPU threads out of KVM_RUN.
int ckvm_kick_signal(void);
/// Installs an empty handler (no SA_RESTART) for the kick signal, so it interrupts KVM_RUN.
int ckvm_install_kick_handler(void);
/// Sends the kick signal to a thread. Returns 0 or -errno.
int ckvm_pthread_kick(unsigned long thread);
/// The calling thread's pthread id.
unsigned long ckvm_pthread_self(void);
/// Sets the calling thread's name (at most 15 characters). Returns 0 or -errno.
int ckvm_set_thread_name(const char *name);
/// Copies the calling thread's name into buf (len >= 16). Returns 0 or -errno.
int ckvm_get_thread_name(char *buf, unsigned long len);
/// 1 on the process's main thread (its thread id is the process id), else 0.
int ckvm_is_main_thread(void);
/// Full memory barrier.
void ckvm_fence(void);
/* Atomic byte access to memory shared with the kernel or another thread (kvm_run.immediate_exit). */
static inline uint8_t ckvm_load_u8(const volatile uint8_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void ckvm_store_u8(volatile uint8_t *p, uint8_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
/// The host's time-stamp counter (rdtsc).
uint64_t ckvm_rdtsc(void);
/// eventfd(2). Returns the fd or -errno.
int ckvm_eventfd(unsigned int initval, int flags);

// MARK: epoll (struct epoll_event is packed on x86-64 and does not import cleanly)
/// epoll_create1(EPOLL_CLOEXEC). Returns the fd or -errno.
int ckvm_epoll_create(void);
/// epoll_ctl(ADD/MOD/DEL) of `fd` with `events` (EPOLLIN = 1, EPOLLOUT = 4, EPOLLET = 1u << 31) and `data`.
/// `op` is 1 = add, 2 = delete, 3 = modify. Returns 0 or -errno.
int ckvm_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data);
/// epoll_wait into parallel arrays of at most `max` entries. Returns the count (0 on timeout) or -errno.
int ckvm_epoll_wait(int epfd, uint64_t *datas, uint32_t *events, int max, int timeout_ms);

// MARK: kvm_run field access (unions do not import ergonomically into Swift)
/// Pointer to the data of a KVM_EXIT_IO exit inside the mapped kvm_run.
void *ckvm_run_io_data(struct kvm_run *run);
/// Pointer to the 8 data bytes of a KVM_EXIT_MMIO exit inside the mapped kvm_run.
void *ckvm_run_mmio_data(struct kvm_run *run);
/// Pointer to the `internal.data[16]` words of a KVM_EXIT_INTERNAL_ERROR exit.
uint64_t *ckvm_run_internal_data(struct kvm_run *run);
/// Pointer to the `system_event.data[16]` words of a KVM_EXIT_SYSTEM_EVENT exit.
uint64_t *ckvm_run_system_event_data(struct kvm_run *run);

#endif

// MARK: seccomp violation report (SIGSYS)
/// Installs the SIGSYS handler that reports a seccomp violation (SCMP_ACT_TRAP) and kills the process: it writes
/// one line to stderr naming the syscall (number and name), the thread kind and the thread id, using only
/// async-signal-safe calls, then re-raises SIGSYS with the default disposition (the process dies of SIGSYS).
/// Returns 0 or -errno.
int ckvm_install_sigsys_reporter(void);
/// Records syscall `nr`'s name for the report (copied, at most 31 bytes; `nr` < 1024). Call before any filter.
void ckvm_sigsys_set_syscall_name(int nr, const char *name);
/// Records the calling thread's kind (copied, at most 15 bytes) and thread id for the report.
void ckvm_sigsys_set_thread_kind(const char *kind);

// MARK: host CPU
/// Whether the host CPU reports hardware virtualization in CPUID (VMX: leaf 1 ECX bit 5; SVM: leaf
/// 0x80000001 ECX bit 2). For hosts where /proc/cpuinfo cannot be read (a jailed vmm). 1 or 0.
int ckvm_host_cpuid_has_hw_virt(void);

// MARK: process arguments
/// argc and argv as glibc passed them to the program's constructors. Swift's `CommandLine.arguments` reads
/// /proc/self/cmdline on Linux, which a process in a jail without /proc does not have (it sees no arguments).
int ckvm_argc(void);
char **ckvm_argv(void);
