/* bench/net/inject: the host side of the network benchmark (bench/net/run), in C so that the host is
 * never the bottleneck. Run it as root inside the network namespace that holds the TAP.
 *
 *   inject tsc
 *       The host TSC frequency in kHz (sysfs tsc_freq_khz, else rdtsc against CLOCK_MONOTONIC over 0.5 s).
 *   inject send IFACE N SIZE [--dst MAC] [--stop-delay MS] [--batch B] [--no-retry]
 *       Sends N test frames of SIZE bytes (Ethernet length 60-1514, no FCS) to --dst (default broadcast)
 *       through an AF_PACKET socket with sendmmsg (PACKET_QDISC_BYPASS), then 3 STOP frames after
 *       --stop-delay ms (default 300). The frame format is guest/tools/netinject.py's: ethertype 0x88B5,
 *       payload = 4-byte LE sequence number s, then byte i = (s + i) & 0xff for i >= 4 (i counted from the
 *       payload start); STOP frames carry "STOP". A frame the TAP refuses because its queue is full
 *       (ENOBUFS: the VMM is not reading fast enough) is sent again after a short sleep (counted as a
 *       retry), so the guest sees every frame once and in order and the sender yields the CPU while the
 *       VMM catches up; --no-retry drops it instead (counted as dropped).
 *       Prints `SENT frames=N bytes=B seconds=T retries=R dropped=D` (seconds: first to last frame).
 *   inject count IFACE SECONDS [--idle S] [--expect N]
 *       Counts test frames arriving on IFACE (from the guest) with recvmmsg on an AF_PACKET socket until
 *       SECONDS, --idle S seconds without a frame after the first, or N frames (test frames and others). Prints
 *       `COUNT frames=N bytes=B lost=L back=K other=O socket_drops=D seconds=T` (seconds: first to last frame).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define ETH_TEST 0x88b5
#define MAXB 256
#define FRAME_MAX 1514

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void usage(void) {
    fprintf(stderr, "usage: inject tsc | send IFACE N SIZE [--dst MAC] [--stop-delay MS] [--batch B] [--no-retry] |"
                    " count IFACE SECONDS [--idle S] [--expect N]\n");
    exit(2);
}

static int parse_mac(const char *s, uint8_t m[6]) {
    unsigned v[6];
    if (sscanf(s, "%x:%x:%x:%x:%x:%x", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5]) != 6) return -1;
    for (int i = 0; i < 6; i++) {
        if (v[i] > 255) return -1;
        m[i] = (uint8_t)v[i];
    }
    return 0;
}

static int open_packet(const char *iface, int *ifindex) {
    int s = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (s < 0) die("socket(AF_PACKET)");
    int idx = (int)if_nametoindex(iface);
    if (!idx) die(iface);
    struct sockaddr_ll sll = { .sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL), .sll_ifindex = idx };
    if (bind(s, (struct sockaddr *)&sll, sizeof sll) < 0) die("bind");
    *ifindex = idx;
    return s;
}

static void if_mac(int s, const char *iface, uint8_t mac[6]) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", iface);
    if (ioctl(s, SIOCGIFHWADDR, &ifr) < 0) die("SIOCGIFHWADDR");
    memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);
}

/* ---------------------------------------------------------------- tsc */
static int cmd_tsc(void) {
    FILE *f = fopen("/sys/devices/system/cpu/cpu0/tsc_freq_khz", "r");
    unsigned long long khz = 0;
    if (f) {
        if (fscanf(f, "%llu", &khz) != 1) khz = 0;
        fclose(f);
    }
    if (khz) {
        printf("%llu sysfs\n", khz);
        return 0;
    }
    /* Best of 5 short calibrations against CLOCK_MONOTONIC_RAW (the smallest interval error). */
    double best_err = 1e9, best = 0;
    for (int i = 0; i < 5; i++) {
        struct timespec a0, a1, b0, b1;
        clock_gettime(CLOCK_MONOTONIC_RAW, &a0);
        uint64_t c0 = __builtin_ia32_rdtsc();
        clock_gettime(CLOCK_MONOTONIC_RAW, &a1);
        struct timespec d = { 0, 100000000 };
        while (nanosleep(&d, &d)) {}
        clock_gettime(CLOCK_MONOTONIC_RAW, &b0);
        uint64_t c1 = __builtin_ia32_rdtsc();
        clock_gettime(CLOCK_MONOTONIC_RAW, &b1);
        double t0 = a0.tv_sec + a0.tv_nsec / 1e9, t0b = a1.tv_sec + a1.tv_nsec / 1e9;
        double t1 = b0.tv_sec + b0.tv_nsec / 1e9, t1b = b1.tv_sec + b1.tv_nsec / 1e9;
        double err = (t0b - t0) + (t1b - t1);
        double k = (double)(c1 - c0) / (((t1 + t1b) - (t0 + t0b)) / 2) / 1000;
        if (err < best_err) { best_err = err; best = k; }
    }
    printf("%llu calibrated\n", (unsigned long long)(best + 0.5));
    return 0;
}

/* ---------------------------------------------------------------- send */
static uint8_t pattern[256 + FRAME_MAX];

static void fill(uint8_t *f, uint32_t seq, uint32_t len) {
    f[14] = (uint8_t)seq; f[15] = (uint8_t)(seq >> 8); f[16] = (uint8_t)(seq >> 16); f[17] = (uint8_t)(seq >> 24);
    memcpy(f + 18, pattern + ((seq + 4) & 0xff), len - 18);
}

static int cmd_send(int argc, char **argv) {
    if (argc < 3) usage();
    const char *iface = argv[0];
    unsigned long long n = strtoull(argv[1], 0, 0);
    unsigned size = (unsigned)strtoul(argv[2], 0, 0);
    uint8_t dst[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
    int stop_delay = 300, batch = 64, retry = 1;
    for (int i = 3; i < argc; i++) {
        if (!strcmp(argv[i], "--dst") && i + 1 < argc) { if (parse_mac(argv[++i], dst)) usage(); }
        else if (!strcmp(argv[i], "--stop-delay") && i + 1 < argc) stop_delay = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--batch") && i + 1 < argc) batch = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--no-retry")) retry = 0;
        else usage();
    }
    if (size < 60 || size > FRAME_MAX || batch < 1 || batch > MAXB) usage();
    for (unsigned i = 0; i < sizeof pattern; i++) pattern[i] = (uint8_t)i;
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);

    int ifindex;
    int s = open_packet(iface, &ifindex);
    int one = 1, sndbuf = 8 << 20;
    if (setsockopt(s, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one) < 0) perror("PACKET_QDISC_BYPASS (ignored)");
    if (setsockopt(s, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof sndbuf) < 0) perror("SO_SNDBUFFORCE (ignored)");
    uint8_t src[6];
    if_mac(s, iface, src);

    static uint8_t frames[MAXB][FRAME_MAX];
    static struct iovec iov[MAXB];
    static struct mmsghdr msg[MAXB];
    for (int i = 0; i < MAXB; i++) {
        memcpy(frames[i], dst, 6);
        memcpy(frames[i] + 6, src, 6);
        frames[i][12] = ETH_TEST >> 8;
        frames[i][13] = ETH_TEST & 0xff;
        iov[i] = (struct iovec){ frames[i], size };
        memset(&msg[i], 0, sizeof msg[i]);
        msg[i].msg_hdr.msg_iov = &iov[i];
        msg[i].msg_hdr.msg_iovlen = 1;
    }
    unsigned long long seq = 0, retries = 0, dropped = 0, calls = 0;
    struct timespec nap = { 0, 20000 };
    double t0 = now(), progress = t0;
    while (seq < n) {
        int k = (int)(n - seq < (unsigned long long)batch ? n - seq : (unsigned long long)batch);
        for (int i = 0; i < k; i++) fill(frames[i], (uint32_t)(seq + i), size);
        int off = 0;
        while (off < k) {
            int r = sendmmsg(s, msg + off, (unsigned)(k - off), 0);
            calls++;
            if (r < 0) {
                if (errno != ENOBUFS && errno != EAGAIN && errno != EINTR) die("sendmmsg");
                r = 0;
            }
            off += r;
            if (r > 0) progress = 0;
            if (off < k) {
                /* The frame at `off` was refused (the TAP's queue is full): yield, then send it again. */
                if (retry) {
                    retries++;
                    if (progress == 0) progress = now();
                    else if ((retries & 63) == 0 && now() - progress > 5) {
                        printf("SENT frames=%llu bytes=%llu seconds=%.6f retries=%llu dropped=%llu calls=%llu stalled=1\n",
                               seq + (unsigned long long)off, (seq + (unsigned long long)off) * size, now() - t0, retries, dropped, calls);
                        fprintf(stderr, "inject: the TAP took no frame for 5 s (is the VMM reading it?)\n");
                        return 3;
                    }
                    nanosleep(&nap, 0);
                } else {
                    dropped++;
                    off++;
                }
            }
        }
        seq += (unsigned long long)k;
    }
    double t1 = now();
    printf("SENT frames=%llu bytes=%llu seconds=%.6f retries=%llu dropped=%llu calls=%llu\n", n, n * size, t1 - t0, retries,
           dropped, calls);
    fflush(stdout);
    if (stop_delay >= 0) {
        uint8_t stop[60];
        memset(stop, 0, sizeof stop);
        memcpy(stop, dst, 6);
        memcpy(stop + 6, src, 6);
        stop[12] = ETH_TEST >> 8;
        stop[13] = ETH_TEST & 0xff;
        memcpy(stop + 14, "STOP", 4);
        for (int i = 0; i < 3; i++) {
            struct timespec d = { stop_delay / 1000, (stop_delay % 1000) * 1000000L };
            nanosleep(&d, 0);
            (void)!send(s, stop, sizeof stop, 0);    /* the VMM may be gone already */
            stop_delay = 50;
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- count */
static int cmd_count(int argc, char **argv) {
    if (argc < 2) usage();
    const char *iface = argv[0];
    double seconds = atof(argv[1]), idle = 0;
    unsigned long long expect = 0;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--idle") && i + 1 < argc) idle = atof(argv[++i]);
        else if (!strcmp(argv[i], "--expect") && i + 1 < argc) expect = strtoull(argv[++i], 0, 0);
        else usage();
    }
    int ifindex;
    int s = open_packet(iface, &ifindex);
    int rcvbuf = 256 << 20;
    if (setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) < 0) perror("SO_RCVBUFFORCE (ignored)");
    struct tpacket_stats ps;
    socklen_t psl = sizeof ps;
    getsockopt(s, SOL_PACKET, PACKET_STATISTICS, &ps, &psl);   /* reset */
    struct timeval tv = { 0, 100000 };
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);

    enum { B = 64, L = 65600 };
    static uint8_t bufs[B][L];
    static struct iovec iov[B];
    static struct mmsghdr msg[B];
    static struct sockaddr_ll from[B];
    for (int i = 0; i < B; i++) {
        iov[i] = (struct iovec){ bufs[i], L };
        msg[i].msg_hdr = (struct msghdr){ .msg_name = &from[i], .msg_namelen = sizeof from[i], .msg_iov = &iov[i], .msg_iovlen = 1 };
    }
    unsigned long long frames = 0, bytes = 0, lost = 0, back = 0, other = 0;
    uint32_t next = 0;
    double t_start = now(), t_first = 0, t_last = 0;
    printf("COUNT-READY\n");
    fflush(stdout);
    for (;;) {
        double t = now();
        if (t - t_start >= seconds) break;
        if (idle > 0 && t_first > 0 && t - t_last > idle) break;
        if (expect && frames + other >= expect) break;
        for (int i = 0; i < B; i++) msg[i].msg_hdr.msg_namelen = sizeof from[i];
        int r = recvmmsg(s, msg, B, MSG_WAITFORONE, 0);
        if (r < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            die("recvmmsg");
        }
        t = now();
        for (int i = 0; i < r; i++) {
            if (from[i].sll_pkttype == PACKET_OUTGOING) continue;
            unsigned len = msg[i].msg_len;
            const uint8_t *f = bufs[i];
            if (len >= 18 && f[12] == (ETH_TEST >> 8) && f[13] == (ETH_TEST & 0xff)) {
                if (!memcmp(f + 14, "STOP", 4)) continue;
                uint32_t seq = f[14] | f[15] << 8 | f[16] << 16 | (uint32_t)f[17] << 24;
                if (seq < next) back++;
                else { lost += seq - next; next = seq + 1; }
                frames++;
                bytes += len;
            } else {
                other++;
                bytes += len;
            }
            if (t_first == 0) t_first = t;
            t_last = t;
        }
    }
    psl = sizeof ps;
    getsockopt(s, SOL_PACKET, PACKET_STATISTICS, &ps, &psl);
    printf("COUNT frames=%llu bytes=%llu lost=%llu back=%llu other=%llu socket_drops=%u seconds=%.6f\n", frames, bytes, lost, back,
           other, ps.tp_drops, t_first > 0 ? t_last - t_first : 0.0);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    if (!strcmp(argv[1], "tsc")) return cmd_tsc();
    if (!strcmp(argv[1], "send")) return cmd_send(argc - 2, argv + 2);
    if (!strcmp(argv[1], "count")) return cmd_count(argc - 2, argv + 2);
    usage();
    return 2;
}
