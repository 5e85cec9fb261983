#define _GNU_SOURCE
#include "CKVM.h"
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <ucontext.h>

int ckvm_ioctl_value(int fd, unsigned long request, unsigned long arg) {
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

int ckvm_ioctl_ptr(int fd, unsigned long request, void *arg) {
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

struct kvm_cpuid2 *ckvm_cpuid2_alloc(uint32_t count) {
    struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + (size_t)count * sizeof(struct kvm_cpuid_entry2));
    if (c) c->nent = count;
    return c;
}

struct kvm_msrs *ckvm_msrs_alloc(uint32_t count) {
    struct kvm_msrs *m = calloc(1, sizeof(*m) + (size_t)count * sizeof(struct kvm_msr_entry));
    if (m) m->nmsrs = count;
    return m;
}

struct kvm_msr_list *ckvm_msr_list_alloc(uint32_t count) {
    struct kvm_msr_list *l = calloc(1, sizeof(*l) + (size_t)count * sizeof(uint32_t));
    if (l) l->nmsrs = count;
    return l;
}

int ckvm_kick_signal(void) { return SIGRTMIN; }

static void ckvm_kick_handler(int sig) { (void)sig; }

int ckvm_install_kick_handler(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = ckvm_kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; // no SA_RESTART: KVM_RUN must return EINTR
    return sigaction(SIGRTMIN, &sa, NULL) < 0 ? -errno : 0;
}

int ckvm_pthread_kick(unsigned long thread) {
    return -pthread_kill((pthread_t)thread, SIGRTMIN);
}

unsigned long ckvm_pthread_self(void) { return (unsigned long)pthread_self(); }

int ckvm_set_thread_name(const char *name) {
    char buf[16];
    strncpy(buf, name, 15);
    buf[15] = 0;
    return -pthread_setname_np(pthread_self(), buf);
}

int ckvm_get_thread_name(char *buf, unsigned long len) {
    return -pthread_getname_np(pthread_self(), buf, len);
}

int ckvm_is_main_thread(void) { return getpid() == (pid_t)syscall(SYS_gettid); }

void ckvm_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

uint64_t ckvm_rdtsc(void) { return __builtin_ia32_rdtsc(); }

int ckvm_eventfd(unsigned int initval, int flags) {
    int fd = eventfd(initval, flags);
    return fd < 0 ? -errno : fd;
}

int ckvm_epoll_create(void) {
    int fd = epoll_create1(EPOLL_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int ckvm_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data) {
    struct epoll_event ev = { .events = events, .data.u64 = data };
    return epoll_ctl(epfd, op, fd, &ev) < 0 ? -errno : 0;
}

int ckvm_epoll_wait(int epfd, uint64_t *datas, uint32_t *events, int max, int timeout_ms) {
    struct epoll_event evs[64];
    if (max > 64) max = 64;
    if (max < 1) return -EINVAL;
    int n = epoll_wait(epfd, evs, max, timeout_ms);
    if (n < 0) return -errno;
    for (int i = 0; i < n; i++) { datas[i] = evs[i].data.u64; events[i] = evs[i].events; }
    return n;
}

void *ckvm_run_io_data(struct kvm_run *run) {
    return (char *)run + run->io.data_offset;
}

void *ckvm_run_mmio_data(struct kvm_run *run) {
    return run->mmio.data;
}

uint64_t *ckvm_run_internal_data(struct kvm_run *run) {
    return run->internal.data;
}

uint64_t *ckvm_run_system_event_data(struct kvm_run *run) {
    return run->system_event.data;
}

// MARK: seccomp violation report

#define CKVM_SYSCALL_NAMES 1024
static char ckvm_syscall_names[CKVM_SYSCALL_NAMES][32];
static __thread char ckvm_thread_kind[16];
static __thread long ckvm_thread_tid;
static long ckvm_process_id;

void ckvm_sigsys_set_syscall_name(int nr, const char *name) {
    if (nr < 0 || nr >= CKVM_SYSCALL_NAMES || name == NULL) return;
    strncpy(ckvm_syscall_names[nr], name, sizeof ckvm_syscall_names[nr] - 1);
}

void ckvm_sigsys_set_thread_kind(const char *kind) {
    strncpy(ckvm_thread_kind, kind, sizeof ckvm_thread_kind - 1);
    ckvm_thread_tid = syscall(SYS_gettid);
}

/* Async-signal-safe string building: append `s` or the decimal `v` to buf at *len. */
static void ckvm_append(char *buf, size_t cap, size_t *len, const char *s) {
    while (*s && *len + 1 < cap) buf[(*len)++] = *s++;
}
static void ckvm_append_long(char *buf, size_t cap, size_t *len, long v) {
    char digits[24];
    int n = 0;
    unsigned long u = v < 0 ? (unsigned long)(-v) : (unsigned long)v;
    do { digits[n++] = (char)('0' + u % 10); u /= 10; } while (u && n < 23);
    if (v < 0 && *len + 1 < cap) buf[(*len)++] = '-';
    while (n > 0 && *len + 1 < cap) buf[(*len)++] = digits[--n];
}

static void ckvm_sigsys_handler(int sig, siginfo_t *info, void *context) {
    int nr = info->si_syscall;
    char line[256];
    size_t len = 0;
    ckvm_append(line, sizeof line, &len, "swiftkvm: seccomp: forbidden syscall ");
    ckvm_append_long(line, sizeof line, &len, nr);
    if (nr >= 0 && nr < CKVM_SYSCALL_NAMES && ckvm_syscall_names[nr][0]) {
        ckvm_append(line, sizeof line, &len, " (");
        ckvm_append(line, sizeof line, &len, ckvm_syscall_names[nr]);
        ckvm_append(line, sizeof line, &len, ")");
    }
    ucontext_t *uc = (ucontext_t *)context;
    greg_t *r = uc->uc_mcontext.gregs;
    ckvm_append(line, sizeof line, &len, " [args ");
    ckvm_append_long(line, sizeof line, &len, (long)r[REG_RDI]);
    ckvm_append(line, sizeof line, &len, ", ");
    ckvm_append_long(line, sizeof line, &len, (long)r[REG_RSI]);
    ckvm_append(line, sizeof line, &len, ", ...]");
    ckvm_append(line, sizeof line, &len, " on a '");
    ckvm_append(line, sizeof line, &len, ckvm_thread_kind[0] ? ckvm_thread_kind : "unknown");
    ckvm_append(line, sizeof line, &len, "' thread (tid ");
    ckvm_append_long(line, sizeof line, &len, ckvm_thread_tid);
    ckvm_append(line, sizeof line, &len, "): killing the process with SIGSYS\n");
    ssize_t ignored = write(STDERR_FILENO, line, len);
    (void)ignored;
    /* SA_RESETHAND restored the default disposition and SA_NODEFER left SIGSYS unblocked: a SIGSYS now kills the
       process (with a core dump, as the default action). tgkill is allowed by every built-in filter; if a custom
       filter forbids it, issuing the forbidden call again traps again, and a forced SIGSYS with the default
       disposition kills as well. exit_group is the last resort. */
    syscall(SYS_tgkill, ckvm_process_id, ckvm_thread_tid ? ckvm_thread_tid : syscall(SYS_gettid), sig);
    syscall(nr, r[REG_RDI], r[REG_RSI], r[REG_RDX], r[REG_R10], r[REG_R8], r[REG_R9]);
    _exit(128 + SIGSYS);
}

int ckvm_install_sigsys_reporter(void) {
    ckvm_process_id = getpid();
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = ckvm_sigsys_handler;
    sa.sa_flags = SA_SIGINFO | SA_RESETHAND | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSYS, &sa, NULL) != 0) return -errno;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGSYS);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    return 0;
}

#include <cpuid.h>
int ckvm_host_cpuid_has_hw_virt(void) {
    unsigned a, b, c, d;
    if (__get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 5))) return 1;
    if (__get_cpuid(0x80000001, &a, &b, &c, &d) && (c & (1u << 2))) return 1;
    return 0;
}

static int ckvm_saved_argc;
static char **ckvm_saved_argv;
/* glibc calls the executable's constructors with (argc, argv, envp). */
__attribute__((constructor)) static void ckvm_save_arguments(int argc, char **argv, char **envp) {
    (void)envp;
    ckvm_saved_argc = argc;
    ckvm_saved_argv = argv;
}
int ckvm_argc(void) { return ckvm_saved_argc; }
char **ckvm_argv(void) { return ckvm_saved_argv; }
