/* An LD_PRELOAD library that logs every change a process makes to one file, for the power-loss tests
 * (Tests/DiskImageTests/PowerLossTests.swift), in the spirit of device-mapper's log-writes target (which this
 * host's kernel lacks): a replay can then rebuild the file as it was at any flush, and as a disk that lost or
 * reordered the writes after that flush could have left it.
 *
 * Environment: WRITELOG_TARGET  the file to watch (matched by device and inode at each call, so it may be
 *                               created after start);
 *              WRITELOG_PATH    the log (appended).
 * Records (little-endian): 'W' offset(8) length(8) data     pwrite/pwritev/write at the file position
 *                          'F' 0(8) 0(8)                    fdatasync/fsync/sync_file_range(WAIT_AFTER)
 *                          'T' size(8) 0(8)                 ftruncate
 *                          'Z' offset(8) length(8)          fallocate punching a hole or zeroing a range
 * Other processes' markers ('M') may be interleaved by the program under test (swiftkvm-test-helper). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

static int log_fd = -2;
static dev_t target_dev;
static ino_t target_ino;
static int target_known;

static int is_target(int fd) {
    const char *t = getenv("WRITELOG_TARGET");
    if (!t) return 0;
    struct stat st, ts;
    if (fstat(fd, &st) != 0) return 0;
    if (!target_known || st.st_ino != target_ino) {
        if (stat(t, &ts) != 0) return 0;
        target_dev = ts.st_dev;
        target_ino = ts.st_ino;
        target_known = 1;
    }
    return st.st_dev == target_dev && st.st_ino == target_ino;
}

static void log_bytes(const void *p, size_t n) {
    const char *c = p;
    while (n > 0) {
        ssize_t w = syscall(SYS_write, log_fd, c, n);
        if (w <= 0) return;
        c += w;
        n -= (size_t)w;
    }
}

static void record(char type, uint64_t a, uint64_t b, const struct iovec *iov, int iovcnt) {
    if (log_fd == -2) {
        const char *p = getenv("WRITELOG_PATH");
        log_fd = p ? (int)syscall(SYS_openat, AT_FDCWD, p, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600) : -1;
    }
    if (log_fd < 0) return;
    unsigned char head[17];
    head[0] = (unsigned char)type;
    memcpy(head + 1, &a, 8);
    memcpy(head + 9, &b, 8);
    log_bytes(head, sizeof head);
    for (int i = 0; i < iovcnt; i++) log_bytes(iov[i].iov_base, iov[i].iov_len);
}

#define REAL(name, ret, ...) \
    static ret (*real_##name)(__VA_ARGS__); \
    if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name);

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    REAL(pwrite, ssize_t, int, const void *, size_t, off_t)
    ssize_t r = real_pwrite(fd, buf, n, off);
    if (r > 0 && is_target(fd)) {
        struct iovec v = { (void *)buf, (size_t)r };
        record('W', (uint64_t)off, (uint64_t)r, &v, 1);
    }
    return r;
}
ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) { return pwrite(fd, buf, n, off); }

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off) {
    REAL(pwritev, ssize_t, int, const struct iovec *, int, off_t)
    ssize_t r = real_pwritev(fd, iov, cnt, off);
    if (r > 0 && is_target(fd)) {
        /* Log exactly the r bytes written. */
        struct iovec part[64];
        int k = 0;
        size_t left = (size_t)r;
        for (int i = 0; i < cnt && left > 0 && k < 64; i++) {
            size_t take = iov[i].iov_len < left ? iov[i].iov_len : left;
            part[k++] = (struct iovec){ iov[i].iov_base, take };
            left -= take;
        }
        record('W', (uint64_t)off, (uint64_t)r, part, k);
    }
    return r;
}
ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off_t off) { return pwritev(fd, iov, cnt, off); }

ssize_t write(int fd, const void *buf, size_t n) {
    REAL(write, ssize_t, int, const void *, size_t)
    off_t pos = -1;
    int t = fd > 2 && is_target(fd);
    if (t) pos = lseek(fd, 0, SEEK_CUR);
    ssize_t r = real_write(fd, buf, n);
    if (t && r > 0 && pos >= 0) {
        struct iovec v = { (void *)buf, (size_t)r };
        record('W', (uint64_t)pos, (uint64_t)r, &v, 1);
    }
    return r;
}

int fdatasync(int fd) {
    REAL(fdatasync, int, int)
    int r = real_fdatasync(fd);
    if (r == 0 && is_target(fd)) record('F', 0, 0, NULL, 0);
    return r;
}

int fsync(int fd) {
    REAL(fsync, int, int)
    int r = real_fsync(fd);
    if (r == 0 && is_target(fd)) record('F', 0, 0, NULL, 0);
    return r;
}

int ftruncate(int fd, off_t size) {
    REAL(ftruncate, int, int, off_t)
    int r = real_ftruncate(fd, size);
    if (r == 0 && is_target(fd)) record('T', (uint64_t)size, 0, NULL, 0);
    return r;
}
int ftruncate64(int fd, off_t size) { return ftruncate(fd, size); }

int fallocate(int fd, int mode, off_t off, off_t len) {
    REAL(fallocate, int, int, int, off_t, off_t)
    int r = real_fallocate(fd, mode, off, len);
    if (r == 0 && (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) && is_target(fd))
        record('Z', (uint64_t)off, (uint64_t)len, NULL, 0);
    return r;
}
int fallocate64(int fd, int mode, off_t off, off_t len) { return fallocate(fd, mode, off, len); }
