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
