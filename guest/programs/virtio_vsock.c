/* virtio_vsock: a freestanding virtio-vsock driver (virtio 1.x, modern PCI, device type 19;
 * virtio.h) that tests a vsock device end to end against host programs on the VMM's Unix sockets
 * (Firecracker's muxer: the host connects to uds_path and writes `CONNECT <port>\n`; the guest's
 * connections to CID 2 port P reach `<uds_path>_P`), or benchmarks it. The driver runs in ring 3
 * and polls the used rings.
 *
 * Device: the first virtio-vsock function (1af4:1053). Queue 0 rx (buffers of `rxbuf=` bytes,
 * default 64 KiB + 44), queue 1 tx (header and payload in one buffer, up to 64 KiB of payload),
 * queue 2 event (a few buffers posted, never expected back). Features: VERSION_1 | EVENT_IDX (not
 * with `noevent`). guest_cid is read from the configuration (offset 0) and must equal `cid=` when
 * given (check vsock-config).
 *
 * One stream connection at a time. The driver advertises buf_alloc = 256 KiB (its echo ring) and
 * counts as forwarded what left the ring; it never sends more than the host's
 * buf_alloc - (tx_cnt - fwd_cnt), asks with CREDIT_REQUEST when that is 0, answers CREDIT_REQUEST,
 * and sends CREDIT_UPDATE when the host's view of its free space is stale.
 *
 * Data pattern (both directions): byte i of a stream = (i * 7 + (i >> 8)) & 0xff.
 *
 * mode=all (default): `listen` then `connect`.
 * mode=listen port=P (default 1024) n=BYTES (default 1 MiB): prints `VSOCK-READY listen P`, waits
 *   (timeout=MS, default 60000) for the host's REQUEST on port P, answers RESPONSE, checks the n
 *   pattern bytes that arrive and echoes them, until the host shuts down (SHUTDOWN, answered with
 *   RST) or resets: `ok listen-echo: bytes=N …`.
 * mode=connect hostport=P (default 1025) n=BYTES: connects to CID 2 port P, sends n pattern bytes
 *   and checks that the same n bytes come back (a host echo server at <uds_path>_P), then SHUTDOWN:
 *   `ok connect-echo: …`. `refused=P` first connects to a port where nothing listens: RST expected.
 * bench=tx hostport=P n=BYTES (default 64 MiB): 64 KiB writes to the host (which discards them);
 *   time from the REQUEST until the host has consumed every byte (fwd_cnt):
 *   `BENCH tx done bytes=… tsc=… [tsc_khz=…]`.
 * bench=rx port=P: prints VSOCK-READY, accepts one host connection and counts bytes until the host
 *   shuts down: `BENCH rx done bytes=… tsc=…` (first byte to SHUTDOWN); the bytes are checked only
 *   with `verify`.
 * bench=connect hostport=P n=N (default 100): N connections (REQUEST → RESPONSE, then SHUTDOWN →
 *   RST): `BENCH connect done n=… tsc=… [tsc_khz=…]` with the mean set-up time.
 * TSC rate: tsc_khz=N on the command line, else CPUID 0x40000010 (hypervisor) or 0x15. */
#include "virtio.h"

const char rt_program_name[] = "virtio_vsock";

#define VEC 0x40
#define VIRTIO_ID_VSOCK 19
#define HDR 44
#define HOST_CID 2
#define MAX_PAYLOAD 65536
#define RING (256u * 1024)
#define TX_QSIZE 32
#define TX_SLOT (((HDR + MAX_PAYLOAD) + 4095) & ~4095u)

enum { OP_REQUEST = 1, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST };
#define SHUT_RCV 1
#define SHUT_SEND 2

struct vhdr {
    uint64_t src_cid, dst_cid;
    uint32_t src_port, dst_port, len;
    uint16_t type, op;
    uint32_t flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

static uint8_t apic_id;
static struct vdev dev;
static struct vq rxq, txq, evq;
static uint64_t my_cid;
static uint32_t rxbuf, rx_entries;
static uint8_t *rxmem, *txmem, *evmem, *pattern_buf;
static int16_t rx_entry_of[VQ_MAX_SIZE];
static const char *dev_error;

enum { C_NONE, C_LISTEN, C_CONNECTING, C_OPEN, C_CLOSED };
static struct conn {
    int state;
    uint32_t lport, pport;                /* our port, the host's port */
    uint32_t peer_buf, peer_fwd, tx_cnt;  /* the host's credit */
    uint32_t rx_cnt, fwd_cnt, fwd_sent;   /* ours */
    uint32_t peer_shut;
    int rst, echo, verify, credit_asked;
    uint8_t *ring;
    uint32_t rhead, rcount;
    uint64_t received, sent, bad_bytes, first_bad;
    uint64_t t_first, t_last;
} c;

static struct { uint64_t rx_packets, tx_packets, rsts_in, bad_packets, refused_requests, credit_requests, credit_updates; } st;

static inline uint8_t pattern(uint64_t i) { return (uint8_t)(i * 7 + (i >> 8)); }   /* period 64 KiB */
static void device_error(const char *what) { if (!dev_error) dev_error = what; }

/* ---------------------------------------------------------------- transmit */
static inline uint8_t *tx_slot(int head) { return txmem + (uint64_t)head * TX_SLOT; }

static void tx_reclaim(void) {
    int id;
    while ((id = vq_get_used(&txq, 0)) >= 0) {}
    if (id == -2) device_error("transmit used id out of range");
}

/* Sends one packet of `len` payload bytes (copied from `data`, or the stream pattern from
 * `pattern_from` when data is NULL). Waits (polling the receive side) for a free slot. */
static int send_pkt(uint16_t op, uint32_t flags, uint32_t lport, uint32_t pport, const uint8_t *data, uint32_t len,
                    uint64_t pattern_from) {
    uint64_t end = 0;
    while (txq.num_free < 1) {
        tx_reclaim();
        if (txq.num_free >= 1) break;
        if (!end) end = rt_deadline(5000);
        else if (rt_expired(end)) { device_error("transmit buffers not completed within 5 s"); return -1; }
        cpu_pause();
    }
    uint8_t *s = tx_slot(txq.free_head);
    struct vhdr *h = (struct vhdr *)s;
    h->src_cid = my_cid;
    h->dst_cid = HOST_CID;
    h->src_port = lport;
    h->dst_port = pport;
    h->len = len;
    h->type = 1;
    h->op = op;
    h->flags = flags;
    h->buf_alloc = RING;
    h->fwd_cnt = c.fwd_cnt;
    if (lport == c.lport && pport == c.pport) c.fwd_sent = c.fwd_cnt;
    if (len) {
        if (data) memcpy(s + HDR, data, len);
        else memcpy(s + HDR, pattern_buf + pattern_from % 65536, len);   /* two periods of the pattern */
    }
    struct vbuf b = { s, HDR + len };
    if (vq_add(&txq, &b, 1, 0) < 0) { device_error("transmit queue full"); return -1; }
    vq_kick(&txq);
    st.tx_packets++;
    return 0;
}

static inline uint32_t peer_credit(void) {
    uint32_t inflight = c.tx_cnt - c.peer_fwd;
    return inflight > c.peer_buf ? 0 : c.peer_buf - inflight;
}

/* ---------------------------------------------------------------- receive */
static inline uint8_t *rx_addr(uint32_t e) { return rxmem + (uint64_t)e * rxbuf; }

static void rx_post(uint32_t e) {
    struct vbuf b = { rx_addr(e), rxbuf };
    int h = vq_add(&rxq, &b, 0, 1);
    if (h < 0) { device_error("receive queue full when reposting"); return; }
    rx_entry_of[h] = (int16_t)e;
}

static void ring_put(const uint8_t *p, uint32_t n) {
    for (uint32_t k = 0; k < n;) {
        uint32_t tail = (c.rhead + c.rcount) % RING;
        uint32_t chunk = RING - tail < n - k ? RING - tail : n - k;
        memcpy(c.ring + tail, p + k, chunk);
        c.rcount += chunk;
        k += chunk;
    }
}

static void handle(const struct vhdr *h, const uint8_t *payload, uint32_t used_len) {
    st.rx_packets++;
    if (used_len < HDR || h->len != used_len - HDR || h->dst_cid != my_cid || h->src_cid != HOST_CID || h->type != 1) {
        st.bad_packets++;
        return;
    }
    int ours = c.state != C_NONE && h->dst_port == c.lport && (c.state == C_LISTEN || h->src_port == c.pport);
    if (h->op == OP_REQUEST) {
        if (ours && c.state == C_LISTEN) {
            c.pport = h->src_port;
            c.peer_buf = h->buf_alloc;
            c.peer_fwd = h->fwd_cnt;
            c.state = C_OPEN;
            send_pkt(OP_RESPONSE, 0, c.lport, c.pport, 0, 0, 0);
        } else {
            st.refused_requests++;
            send_pkt(OP_RST, 0, h->dst_port, h->src_port, 0, 0, 0);
        }
        return;
    }
    if (!ours || c.state == C_LISTEN) {
        if (h->op != OP_RST) send_pkt(OP_RST, 0, h->dst_port, h->src_port, 0, 0, 0);
        return;
    }
    c.peer_buf = h->buf_alloc;
    c.peer_fwd = h->fwd_cnt;
    if (peer_credit()) c.credit_asked = 0;
    switch (h->op) {
    case OP_RESPONSE:
        if (c.state == C_CONNECTING) c.state = C_OPEN;
        break;
    case OP_RST:
        st.rsts_in++;
        c.rst = 1;
        c.state = C_CLOSED;
        break;
    case OP_SHUTDOWN:
        c.peer_shut |= h->flags;
        break;
    case OP_RW: {
        uint32_t n = h->len;
        if (!c.t_first) c.t_first = rdtsc();
        c.t_last = rdtsc();
        for (uint32_t i = 0; c.verify && i < n; i++)
            if (payload[i] != pattern(c.received + i)) {
                if (!c.bad_bytes) c.first_bad = c.received + i;
                c.bad_bytes++;
            }
        c.received += n;
        c.rx_cnt += n;
        if (c.echo) {
            if (c.rcount + n > RING) { device_error("the device sent more than the advertised credit"); break; }
            ring_put(payload, n);
        } else {
            c.fwd_cnt += n;
        }
        break;
    }
    case OP_CREDIT_UPDATE:
        st.credit_updates++;
        break;
    case OP_CREDIT_REQUEST:
        st.credit_requests++;
        send_pkt(OP_CREDIT_UPDATE, 0, c.lport, c.pport, 0, 0, 0);
        break;
    default:
        st.bad_packets++;
    }
}

static void rx_poll(void) {
    int any = 0;
    while (!dev_error && vq_pending_used(&rxq)) {
        uint32_t len;
        int h = vq_get_used(&rxq, &len);
        if (h < 0 || rx_entry_of[h] < 0) { device_error("receive used id is not an outstanding buffer"); return; }
        uint32_t e = (uint32_t)rx_entry_of[h];
        rx_entry_of[h] = -1;
        if (len > rxbuf) { device_error("receive used length larger than the buffer"); rx_post(e); return; }
        handle((const struct vhdr *)rx_addr(e), rx_addr(e) + HDR, len);
        rx_post(e);
        any = 1;
    }
    if (any) vq_kick(&rxq);
    /* The host's view of our free space is stale: tell it. */
    if (c.state == C_OPEN && c.fwd_cnt - c.fwd_sent >= RING / 4) send_pkt(OP_CREDIT_UPDATE, 0, c.lport, c.pport, 0, 0, 0);
}

/* Echo: sends what the ring holds, within the host's credit. */
static void echo_out(void) {
    while (c.rcount && c.state == C_OPEN && !dev_error) {
        uint32_t credit = peer_credit();
        if (!credit) {
            if (!c.credit_asked) { c.credit_asked = 1; send_pkt(OP_CREDIT_REQUEST, 0, c.lport, c.pport, 0, 0, 0); }
            return;
        }
        tx_reclaim();
        if (txq.num_free < 1) return;
        uint32_t n = c.rcount;
        if (n > RING - c.rhead) n = RING - c.rhead;
        if (n > credit) n = credit;
        if (n > MAX_PAYLOAD) n = MAX_PAYLOAD;
        c.fwd_cnt += n;                     /* leaves the ring with this packet */
        send_pkt(OP_RW, 0, c.lport, c.pport, c.ring + c.rhead, n, 0);
        c.rhead = (c.rhead + n) % RING;
        c.rcount -= n;
        c.tx_cnt += n;
        c.sent += n;
    }
}

static void poll_step(void) {
    rx_poll();
    if (c.echo) echo_out();
    tx_reclaim();
}

/* Polls until cond() holds, the connection is reset, a device error, or ms without progress. */
static int wait_for(int (*cond)(void), uint32_t ms) {
    uint64_t end = rt_deadline(ms), seen = st.rx_packets;
    uint32_t spins = 0;
    while (!cond() && !dev_error) {
        poll_step();
        if (st.rx_packets != seen) { seen = st.rx_packets; end = rt_deadline(ms); continue; }
        if ((++spins & 255) == 0 && rt_expired(end)) return 0;
        cpu_pause();
    }
    return cond();
}

static int is_open(void) { return c.state == C_OPEN || c.state == C_CLOSED; }
static int is_closed(void) { return c.state == C_CLOSED; }
static int peer_done(void) { return c.state == C_CLOSED || (c.peer_shut & SHUT_SEND && !c.rcount); }

static void conn_reset(int state, uint32_t lport, uint32_t pport, int echo) {
    memset(&c, 0, (size_t)((uint8_t *)&c.ring - (uint8_t *)&c));
    c.rhead = c.rcount = 0;
    c.received = c.sent = c.bad_bytes = c.first_bad = c.t_first = c.t_last = 0;
    c.state = state;
    c.lport = lport;
    c.pport = pport;
    c.echo = echo;
    c.verify = 1;
}

/* Connects to the host's port; 1 when the host answered RESPONSE. */
static int vs_connect(uint32_t lport, uint32_t hostport, int echo, uint32_t ms) {
    conn_reset(C_CONNECTING, lport, hostport, echo);
    send_pkt(OP_REQUEST, 0, lport, hostport, 0, 0, 0);
    return wait_for(is_open, ms) && c.state == C_OPEN;
}

/* Ends the connection: SHUTDOWN (both), then the host's RST. */
static int vs_close(uint32_t ms) {
    if (c.state == C_OPEN) send_pkt(OP_SHUTDOWN, SHUT_RCV | SHUT_SEND, c.lport, c.pport, 0, 0, 0);
    return wait_for(is_closed, ms);
}

/* Sends n pattern bytes within the host's credit (64 KiB packets), polling meanwhile. */
static int send_stream(uint64_t n, uint32_t ms) {
    uint64_t end = rt_deadline(ms);
    uint32_t spins = 0;
    while (c.sent < n && c.state == C_OPEN && !dev_error) {
        uint32_t credit = peer_credit();
        tx_reclaim();
        if (credit && txq.num_free) {
            uint64_t n2 = n - c.sent;
            uint32_t k = (uint32_t)(n2 < MAX_PAYLOAD ? n2 : MAX_PAYLOAD);
            if (k > credit) k = credit;
            send_pkt(OP_RW, 0, c.lport, c.pport, 0, k, c.sent);
            c.sent += k;
            c.tx_cnt += k;
            end = rt_deadline(ms);
            continue;
        }
        if (!credit && !c.credit_asked) { c.credit_asked = 1; send_pkt(OP_CREDIT_REQUEST, 0, c.lport, c.pport, 0, 0, 0); }
        uint64_t before = st.rx_packets;
        poll_step();
        if (st.rx_packets != before) end = rt_deadline(ms);
        else if ((++spins & 255) == 0 && rt_expired(end)) return 0;
        cpu_pause();
    }
    return c.sent == n;
}

/* ---------------------------------------------------------------- setup */
static const char *open_vsock(void) {
    if (vdev_find(VIRTIO_ID_VSOCK, 0, &dev)) return "no virtio-vsock device on bus 0";
    const char *e = vdev_map(&dev);
    if (e) return e;
    if (!dev.devcfg) return "no device configuration capability";
    uint64_t wanted = rt_cmdline_has("noevent") ? 0 : VIRTIO_BIT(VIRTIO_F_EVENT_IDX);
    e = vdev_negotiate(&dev, wanted);
    if (e) return e;
    if (dev.msix_cap) vdev_set_config_vector(&dev, VIRTIO_MSI_NO_VECTOR);
    if ((e = vq_setup(&dev, &rxq, 0, 128, VIRTIO_MSI_NO_VECTOR))) return e;
    if ((e = vq_setup(&dev, &txq, 1, TX_QSIZE, VIRTIO_MSI_NO_VECTOR))) return e;
    if ((e = vq_setup(&dev, &evq, 2, 8, VIRTIO_MSI_NO_VECTOR))) return e;
    vq_disable_interrupts(&rxq);
    vq_disable_interrupts(&txq);
    vq_disable_interrupts(&evq);
    rxbuf = (uint32_t)rt_cmdline_uint("rxbuf", HDR + MAX_PAYLOAD);
    if (rxbuf < HDR + 1 || rxbuf > HDR + MAX_PAYLOAD) return "rxbuf must be 45 to 65580";
    rx_entries = rxq.size;
    rxmem = rt_alloc_pages_nozero(((uint64_t)rx_entries * rxbuf + 4095) / 4096);
    txmem = rt_alloc_pages_nozero((uint64_t)txq.size * TX_SLOT / 4096);
    evmem = rt_alloc_pages(1);
    c.ring = rt_alloc_pages_nozero(RING / 4096);
    pattern_buf = rt_alloc_pages_nozero(2 * 65536 / 4096);
    if (!rxmem || !txmem || !evmem || !c.ring || !pattern_buf) return "out of guest memory for buffers";
    for (uint32_t i = 0; i < 2 * 65536; i++) pattern_buf[i] = pattern(i);
    for (uint32_t i = 0; i < VQ_MAX_SIZE; i++) rx_entry_of[i] = -1;
    for (uint32_t i = 0; i < rx_entries; i++) rx_post(i);
    for (uint32_t i = 0; i < evq.size; i++) {
        struct vbuf b = { evmem + 8 * i, 8 };
        vq_add(&evq, &b, 0, 1);
    }
    if (dev_error) return dev_error;
    vdev_driver_ok(&dev);
    if (vdev_status(&dev) & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED)) return "device status reports an error";
    vq_kick(&rxq);
    vq_kick(&evq);
    return 0;
}

/* ---------------------------------------------------------------- modes */
static void mode_listen(void) {
    uint32_t port = (uint32_t)rt_cmdline_uint("port", 1024);
    uint64_t n = rt_cmdline_uint("n", 1 << 20);
    uint32_t timeout = (uint32_t)rt_cmdline_uint("timeout", 60000);
    conn_reset(C_LISTEN, port, 0, 1);
    rt_printf("VSOCK-READY listen %u\n", port);
    if (!wait_for(is_open, timeout)) { rt_fail("listen-echo", "%s", dev_error ? dev_error : "no host connection within the timeout"); return; }
    rt_printf("# host port %u connected to guest port %u\n", c.pport, port);
    wait_for(peer_done, timeout);
    int shut = c.state == C_OPEN;
    if (shut) {
        /* The host is done sending and we echoed everything: answer its SHUTDOWN with RST. */
        send_pkt(OP_RST, 0, c.lport, c.pport, 0, 0, 0);
        c.state = C_CLOSED;
    }
    rt_check("listen-echo", c.received == n && c.sent == n && !c.bad_bytes && !dev_error,
             "bytes=%lu echoed=%lu of n=%lu, %lu bad bytes (first at %lu), ended by %s%s%s", c.received, c.sent, n, c.bad_bytes,
             c.first_bad, shut ? "SHUTDOWN" : c.rst ? "RST" : "timeout", dev_error ? ", " : "", dev_error ? dev_error : "");
}

static uint64_t echo_want;
static int got_all(void) { return c.received >= echo_want || c.state == C_CLOSED; }

static void mode_connect(void) {
    uint32_t port = (uint32_t)rt_cmdline_uint("hostport", 1025);
    uint64_t n = rt_cmdline_uint("n", 1 << 20);
    uint32_t refused = (uint32_t)rt_cmdline_uint("refused", 0);
    if (refused) {
        int open = vs_connect(40000, refused, 0, 5000);
        rt_check("connect-refused", !open && c.rst, "port %u with nothing listening: %s", refused,
                 open ? "connected" : c.rst ? "RST" : "no answer");
    }
    if (!vs_connect(40001, port, 0, 10000)) {
        rt_fail("connect-echo", "host port %u: %s", port, dev_error ? dev_error : c.rst ? "RST" : "no RESPONSE");
        return;
    }
    int sent = send_stream(n, 10000);
    /* The echo comes back while we send; wait for the rest. */
    echo_want = n;
    wait_for(got_all, 10000);
    int closed = vs_close(5000);
    rt_check("connect-echo", sent && c.received == n && !c.bad_bytes && closed && !dev_error,
             "sent=%lu received=%lu of n=%lu, %lu bad bytes (first at %lu), %s%s%s", c.sent, c.received, n, c.bad_bytes,
             c.first_bad, closed ? "closed (SHUTDOWN, RST)" : "no RST after SHUTDOWN", dev_error ? ", " : "",
             dev_error ? dev_error : "");
}

static void print_rate(const char *kind, uint64_t bytes, uint64_t tsc) {
    uint64_t khz = rt_tsc_khz();
    if (!khz || !tsc) return;
    uint64_t us = tsc * 1000 / khz;
    if (us) rt_printf("# %s: %lu MB/s (%lu bytes in %lu us)\n", kind, bytes / us, bytes, us);
}

static int all_acked(void) { return c.state != C_OPEN || c.peer_fwd == c.tx_cnt; }

static void bench_tx(void) {
    uint32_t port = (uint32_t)rt_cmdline_uint("hostport", 1025);
    uint64_t n = rt_cmdline_uint("n", 64ull << 20);
    rt_printf("BENCH tx start n=%lu write=65536\n", n);
    uint64_t t0 = rdtsc();
    if (!vs_connect(40002, port, 0, 10000)) { rt_fail("bench", "tx: host port %u: no RESPONSE", port); return; }
    int ok = send_stream(n, 20000);
    /* Until the host consumed everything: ask for its fwd_cnt every 10 ms. */
    uint64_t end = rt_deadline(20000);
    while (ok && !all_acked() && !dev_error && !rt_expired(end)) {
        send_pkt(OP_CREDIT_REQUEST, 0, c.lport, c.pport, 0, 0, 0);
        uint64_t next = rt_deadline(10);
        while (!all_acked() && !rt_expired(next)) { poll_step(); cpu_pause(); }
    }
    uint64_t t1 = rdtsc();
    vs_close(5000);
    uint64_t khz = rt_tsc_khz();
    rt_printf("BENCH tx done bytes=%lu tsc=%lu", c.sent, t1 - t0);
    if (khz) rt_printf(" tsc_khz=%lu", khz);
    rt_printf("\n");
    print_rate("tx", c.sent, t1 - t0);
    rt_check("bench", ok && all_acked() && !dev_error, "tx: %lu of %lu bytes sent and consumed by the host%s%s", c.sent, n,
             dev_error ? ", " : "", dev_error ? dev_error : "");
}

static void bench_rx(void) {
    uint32_t port = (uint32_t)rt_cmdline_uint("port", 1024);
    uint32_t timeout = (uint32_t)rt_cmdline_uint("timeout", 60000);
    conn_reset(C_LISTEN, port, 0, 0);
    c.verify = rt_cmdline_has("verify");
    rt_printf("VSOCK-READY listen %u\n", port);
    if (!wait_for(is_open, timeout)) { rt_fail("bench", "rx: no host connection"); return; }
    wait_for(peer_done, timeout);
    uint64_t t1 = rdtsc();
    if (c.state == C_OPEN) { send_pkt(OP_RST, 0, c.lport, c.pport, 0, 0, 0); c.state = C_CLOSED; }
    uint64_t khz = rt_tsc_khz(), tsc = c.t_first ? t1 - c.t_first : 0;
    rt_printf("BENCH rx done bytes=%lu tsc=%lu", c.received, tsc);
    if (khz) rt_printf(" tsc_khz=%lu", khz);
    rt_printf("\n");
    print_rate("rx", c.received, tsc);
    rt_check("bench", c.received > 0 && !c.bad_bytes && !dev_error, "rx: %lu bytes, %lu bad", c.received, c.bad_bytes);
}

static void bench_connect(void) {
    uint32_t port = (uint32_t)rt_cmdline_uint("hostport", 1025);
    uint32_t n = (uint32_t)rt_cmdline_uint("n", 100);
    uint64_t total = 0, worst = 0;
    uint32_t done = 0;
    for (uint32_t i = 0; i < n && !dev_error; i++) {
        uint64_t t0 = rdtsc();
        if (!vs_connect(41000 + i, port, 0, 5000)) break;
        uint64_t dt = rdtsc() - t0;
        total += dt;
        if (dt > worst) worst = dt;
        if (!vs_close(5000)) break;
        done++;
    }
    uint64_t khz = rt_tsc_khz();
    rt_printf("BENCH connect done n=%u tsc=%lu worst=%lu", done, total, worst);
    if (khz) rt_printf(" tsc_khz=%lu", khz);
    rt_printf("\n");
    if (khz && done) rt_printf("# connect: mean %lu us, worst %lu us\n", total * 1000 / khz / done, worst * 1000 / khz);
    rt_check("bench", done == n, "connect: %u of %u connections set up and closed%s%s", done, n, dev_error ? ", " : "",
             dev_error ? dev_error : "");
}

/* ---------------------------------------------------------------- main */
static long run(void *arg) {
    (void)arg;
    char kind[16], m[16];
    int bench = rt_cmdline_str("bench", kind, sizeof kind) >= 0;
    if (vmmio_setup_from_cmdline()) return 0;
    const char *e = open_vsock();
    if (!rt_check("vsock-setup", !e, "%s: 00:%02x.%u device %04x, features %lx of %lx, rx %u x %u bytes, tx %u, event %u",
                  e ? e : "ready", dev.slot, dev.fn, dev.device_id, dev.features, dev.device_features, rx_entries, rxbuf,
                  txq.size, evq.size))
        return 0;
    my_cid = vdev_cfg64(&dev, 0);
    uint64_t want = rt_cmdline_uint("cid", 0);
    if (!rt_check("vsock-config", my_cid >= 3 && (!want || want == my_cid), "guest_cid %lu%s", my_cid, want ? " (as given)" : ""))
        return 0;
    if (bench) {
        if (!strncmp(kind, "tx", 3)) bench_tx();
        else if (!strncmp(kind, "rx", 3)) bench_rx();
        else if (!strncmp(kind, "connect", 8)) bench_connect();
        else rt_fail("bench", "unknown bench=%s (tx, rx, connect)", kind);
    } else {
        if (rt_cmdline_str("mode", m, sizeof m) < 0) memcpy(m, "all", 4);
        int all = !strncmp(m, "all", 4);
        if (all || !strncmp(m, "listen", 7)) mode_listen();
        if (all || !strncmp(m, "connect", 8)) mode_connect();
        if (!all && strncmp(m, "listen", 7) && strncmp(m, "connect", 8)) rt_fail("mode", "unknown mode=%s (all, listen, connect)", m);
    }
    rt_printf("# packets rx=%lu tx=%lu bad=%lu refused=%lu credit requests=%lu updates=%lu\n", st.rx_packets, st.tx_packets,
              st.bad_packets, st.refused_requests, st.credit_requests, st.credit_updates);
    if (dev_error) rt_fail("vsock-device", "%s", dev_error);
    vdev_reset(&dev);
    return 0;
}

int main(void) { return vdrv_main(run, VEC, &apic_id); }
