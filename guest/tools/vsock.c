/* vsock: a small AF_VSOCK stream client/server for Linux guests (static, no dependencies), the guest
 * side of the vsock tests. The stream pattern is the freestanding driver's: byte i = (i * 7 + (i >> 8)) & 0xff.
 *
 *   vsock listen PORT          accepts one connection on PORT, echoes it until EOF, checks the pattern:
 *                              prints `VSOCK-LISTENING PORT`, then `VSOCK-ECHOED bytes=N bad=B`
 *   vsock connect CID PORT N   connects, sends N pattern bytes (then shuts down writing) while reading
 *                              what comes back until EOF: `VSOCK-CONNECTED bytes=N bad=B` (or
 *                              `VSOCK-ERROR …`)
 *
 * Build: gcc -static -O2 -o vsock vsock.c */
#include <errno.h>
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static unsigned char pattern(unsigned long i) { return (unsigned char)(i * 7 + (i >> 8)); }
static unsigned char buf[65536];

static int fail(const char *what) {
    printf("VSOCK-ERROR %s: %s\n", what, strerror(errno));
    return 1;
}

static int write_all(int fd, const unsigned char *p, size_t n) {
    while (n) {
        ssize_t k = write(fd, p, n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Reads until EOF, checking the pattern; optionally echoes. */
static void drain(int fd, int echo, unsigned long *total, unsigned long *bad) {
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return;
        for (ssize_t i = 0; i < n; i++) if (buf[i] != pattern(*total + (unsigned long)i)) (*bad)++;
        *total += (unsigned long)n;
        if (echo && write_all(fd, buf, (size_t)n)) return;
    }
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc == 3 && !strcmp(argv[1], "listen")) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (s < 0) return fail("socket");
        struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = (unsigned)atoi(argv[2]) };
        if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 1)) return fail("bind/listen");
        printf("VSOCK-LISTENING %s\n", argv[2]);
        int c = accept(s, NULL, NULL);
        if (c < 0) return fail("accept");
        unsigned long total = 0, bad = 0;
        drain(c, 1, &total, &bad);
        close(c);
        printf("VSOCK-ECHOED bytes=%lu bad=%lu\n", total, bad);
        return 0;
    }
    if (argc == 5 && !strcmp(argv[1], "connect")) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (s < 0) return fail("socket");
        struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = (unsigned)atoi(argv[2]), .svm_port = (unsigned)atoi(argv[3]) };
        if (connect(s, (struct sockaddr *)&a, sizeof a)) return fail("connect");
        unsigned long n = strtoul(argv[4], NULL, 0);
        pid_t writer = fork();
        if (writer == 0) {
            static unsigned char out[65536];
            for (unsigned long off = 0; off < n;) {
                size_t k = n - off < sizeof out ? n - off : sizeof out;
                for (size_t i = 0; i < k; i++) out[i] = pattern(off + i);
                if (write_all(s, out, k)) _exit(1);
                off += k;
            }
            shutdown(s, SHUT_WR);
            _exit(0);
        }
        unsigned long total = 0, bad = 0;
        drain(s, 0, &total, &bad);
        int st = 0;
        waitpid(writer, &st, 0);
        close(s);
        printf("VSOCK-CONNECTED bytes=%lu bad=%lu writer=%d\n", total, bad, WIFEXITED(st) ? WEXITSTATUS(st) : -1);
        return 0;
    }
    fprintf(stderr, "usage: vsock listen PORT | vsock connect CID PORT BYTES\n");
    return 2;
}
