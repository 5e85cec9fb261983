/* An LD_PRELOAD library that makes one file fail like a disk with bad sectors, for the failing-backend tests
 * (Tests/IntegrationTests/VirtioGuestTests.swift): writes (pwrite, pwritev) to FAILIO_TARGET that reach at or
 * beyond byte FAILIO_FROM fail with errno FAILIO_ERRNO (default EIO); everything else passes through.
 * The file is matched by device and inode. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

static int failing(int fd, off_t off, size_t len) {
    const char *t = getenv("FAILIO_TARGET"), *from = getenv("FAILIO_FROM");
    if (!t || !from) return 0;
    struct stat a, b;
    if (fstat(fd, &a) != 0 || stat(t, &b) != 0 || a.st_dev != b.st_dev || a.st_ino != b.st_ino) return 0;
    return (unsigned long long)off + len > strtoull(from, NULL, 0);
}

static int fail_errno(void) {
    const char *e = getenv("FAILIO_ERRNO");
    return e ? atoi(e) : EIO;
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pwrite");
    if (failing(fd, off, n)) { errno = fail_errno(); return -1; }
    return real(fd, buf, n, off);
}
ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) { return pwrite(fd, buf, n, off); }

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off) {
    static ssize_t (*real)(int, const struct iovec *, int, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pwritev");
    size_t len = 0;
    for (int i = 0; i < cnt; i++) len += iov[i].iov_len;
    if (failing(fd, off, len)) { errno = fail_errno(); return -1; }
    return real(fd, iov, cnt, off);
}
ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off_t off) { return pwritev(fd, iov, cnt, off); }
