#define _GNU_SOURCE
#include "CJail.h"
#include <errno.h>
#include <linux/capability.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#ifndef SYS_close_range
#define SYS_close_range 436
#endif

static int result(long r) { return r < 0 ? -errno : (int)r; }

int cjail_pivot_root(const char *new_root, const char *put_old) {
    return result(syscall(SYS_pivot_root, new_root, put_old));
}

int cjail_set_no_new_privs(void) { return result(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)); }

int cjail_drop_bounding_set(void) {
    int dropped = 0;
    for (int cap = 0; cap <= 63; cap++) {
        if (prctl(PR_CAPBSET_READ, cap, 0, 0, 0) < 0) {
            if (errno == EINVAL) break; /* past the kernel's last capability */
            return -errno;
        }
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0) return -errno;
        dropped++;
    }
    return dropped;
}

int cjail_clear_capabilities(void) {
    struct __user_cap_header_struct header = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
    struct __user_cap_data_struct data[2] = { { 0, 0, 0 }, { 0, 0, 0 } };
    if (syscall(SYS_capset, &header, data) < 0) return -errno;
    /* The ambient set is already empty once the permitted set is; clear it explicitly anyway. */
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL) return -errno;
    return 0;
}

int cjail_close_from(int first) {
    if (syscall(SYS_close_range, (unsigned)first, ~0U, 0) == 0) return 0;
    if (errno != ENOSYS) return -errno;
    struct rlimit lim;
    long max = getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur != RLIM_INFINITY ? (long)lim.rlim_cur : 65536;
    for (long fd = first; fd < max; fd++) close((int)fd);
    return 0;
}

uint64_t cjail_makedev(uint32_t major, uint32_t minor) { return makedev(major, minor); }
uint32_t cjail_major(uint64_t dev) { return major(dev); }
uint32_t cjail_minor(uint64_t dev) { return minor(dev); }

int cjail_unshare(int flags) { return result(unshare(flags)); }
int cjail_setns(int fd, int nstype) { return result(setns(fd, nstype)); }
int cjail_setresuid(uid_t uid) { return result(setresuid(uid, uid, uid)); }
int cjail_setresgid(gid_t gid) { return result(setresgid(gid, gid, gid)); }
long cjail_copy_file_range(int in, int out, unsigned long len) {
    ssize_t n = copy_file_range(in, NULL, out, NULL, len, 0);
    return n < 0 ? -errno : (long)n;
}

int cjail_fork(void) { return result(fork()); }

int cjail_clone_newns(void) { return CLONE_NEWNS; }
int cjail_clone_newnet(void) { return CLONE_NEWNET; }
int cjail_clone_newpid(void) { return CLONE_NEWPID; }
unsigned long cjail_ms_private_rec(void) { return MS_PRIVATE | MS_REC; }
unsigned long cjail_ms_bind_rec(void) { return MS_BIND | MS_REC; }
int cjail_mnt_detach(void) { return MNT_DETACH; }
