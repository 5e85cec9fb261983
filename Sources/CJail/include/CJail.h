#ifndef CJAIL_H
#define CJAIL_H
/*
 * C shim for the jailer: the system calls glibc has no wrapper for (pivot_root, capset,
 * close_range), the variadic prctl, and the makedev/major/minor macros, none of which import into
 * Swift. Every function returns a value >= 0 or -errno.
 */
#include <stdint.h>
#include <sys/types.h>

/// pivot_root(new_root, put_old).
int cjail_pivot_root(const char *new_root, const char *put_old);
/// prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).
int cjail_set_no_new_privs(void);
/// Drops every capability from the bounding set (PR_CAPBSET_DROP for 0...last cap). Returns the
/// number dropped or -errno of the first failure other than EINVAL (a cap the kernel lacks).
int cjail_drop_bounding_set(void);
/// capset with empty effective, permitted and inheritable sets (version 3), and clears the ambient set.
int cjail_clear_capabilities(void);
/// close_range(first, ~0U, 0), or a close() loop up to the RLIMIT_NOFILE soft limit when the kernel
/// lacks close_range.
int cjail_close_from(int first);
/// The device number of a character device from its major and minor numbers, and back.
uint64_t cjail_makedev(uint32_t major, uint32_t minor);
uint32_t cjail_major(uint64_t dev);
uint32_t cjail_minor(uint64_t dev);
/// The GNU functions glibc declares only under _GNU_SOURCE (so they do not import into Swift).
int cjail_unshare(int flags);
int cjail_setns(int fd, int nstype);
int cjail_setresuid(uid_t uid);
int cjail_setresgid(gid_t gid);
/// copy_file_range(in, NULL, out, NULL, len, 0): bytes copied, 0 at end of file, or -errno.
long cjail_copy_file_range(int in, int out, unsigned long len);
/// fork(); in the child returns 0.
int cjail_fork(void);
/// The flags the Swift side needs (CLONE_* and MS_* constants are macros of several bits).
int cjail_clone_newns(void);
int cjail_clone_newnet(void);
int cjail_clone_newpid(void);
unsigned long cjail_ms_private_rec(void);
unsigned long cjail_ms_bind_rec(void);
int cjail_mnt_detach(void);
#endif
