/* virtio_net: a freestanding virtio-net driver (virtio 1.x, modern PCI, device type 1; virtio.h)
 * that tests a virtio-net device end to end against a TAP on the host, or benchmarks it. The
 * driver runs in ring 3 (native speed on PVM hosts) and polls the used rings; only the MSI-X
 * handler runs in ring 0, for one interrupt check.
 *
 * Device: the first virtio-net function (1af4:1041, or transitional with subsystem ID 1). Queue 0
 * is the receive queue, queue 1 the transmit queue (no MQ, no control queue), each up to 256
 * entries. Features: VERSION_1 | MAC | STATUS | MRG_RXBUF (not with `nomrg`) | EVENT_IDX (not
 * with `noevent`), plus CSUM | HOST_TSO4 for `bench=tx tso=1` only. Every buffer starts with the
 * 12-byte virtio_net_hdr of virtio 1.x (num_buffers always present). The MAC is read from the
 * device configuration (offset 0), the link status (offset 6) when STATUS was negotiated.
 *
 * Receive buffers: `rxbuf=N` bytes each (default 2048, 64-16384), separated by 64-byte gaps so a
 * device that writes past a descriptor's length corrupts what the driver reads. With MRG_RXBUF
 * every buffer is one descriptor and a frame may span num_buffers of them (rxbuf=256: a 1514-byte
 * frame needs 6); without it every receive entry is a chain of ceil(1526 / rxbuf) descriptors.
 * Transmit: header and frame in two descriptors (ping/serve/rx), header + frame in one
 * (bench=tx; `txdesc=1|2` overrides), TSO frames as [header + Ethernet/IPv4/TCP headers] + [payload].
 *
 * Checks (all modes): net-setup, net-config (`# mac=…`; MAC not zero, link up), net-msix (the
 * first received frame raises MSI-X vector 0 of the receive queue; not in bench modes, skipped
 * with `nomsix` or without MSI-X), net-rx-headers (no receive header with flags or GSO set,
 * num_buffers consistent).
 *
 * mode=ping (default): ip=A.B.C.D (default 10.0.2.15) peer=A.B.C.D (default 10.0.2.1). ARP for the
 *   peer (`arp`), then count=N (default 4) ICMP echo requests with size=N payload bytes (default
 *   56, at most 1472) whose replies must carry our id/seq, the payload and valid IPv4/ICMP
 *   checksums (`icmp`); `rx-merge` when a frame needed more than one receive buffer. Answers ARP
 *   and ICMP echo requests for its own address all along.
 * mode=serve: prints NET-READY, answers ARP and echo requests until an Ethernet frame of type
 *   0x88B5 whose payload starts with "STOP" arrives: `ok serve: echoes=N …`; timeout=MS (default
 *   120000) fails.
 * mode=rx n=N: prints NET-READY, receives N test frames (type 0x88B5, payload = 4-byte LE sequence
 *   number s, then payload byte i = (s + i) & 0xff for i >= 4, i counted from the payload start;
 *   Ethernet length 60-1514) and checks the bytes and the order (a gap counts as lost, a sequence
 *   number going back fails): `ok rx: frames=N lost=L bytes=B`. A STOP frame ends early (the rest
 *   counts as lost); timeout=MS (default 60000) between frames fails.
 * bench=tx size=S n=N [dst=MAC]: N frames of S bytes (Ethernet length 60-1514, no FCS) of type
 *   0x88B5 to dst (default broadcast), payload = LE sequence number then i & 0xff; keeps the ring
 *   full, reclaims completed buffers by polling, kicks under EVENT_IDX rules.
 *   `BENCH tx start …`, `BENCH tx done frames=N bytes=B tsc=T kicks=K errors=E [tsc_khz=K]`.
 * bench=tx tso=1 size=S (default 65536, at most 65549) [mss=1448]: IPv4/TCP frames from ip to
 *   peer (port 40000 → 5001, MAC from ARP unless dst=) with NEEDS_CSUM (csum_start 34, csum_offset
 *   16), GSO TCPV4, hdr_len 54, gso_size mss, the TCP checksum field holding the pseudo-header sum
 *   (Linux's CHECKSUM_PARTIAL), the IPv4 ID and TCP sequence advancing. Needs CSUM and HOST_TSO4.
 * bench=rx n=N: prints NET-READY, counts 0x88B5 frames until N arrived or a STOP frame:
 *   `BENCH rx done frames=N bytes=B tsc=T lost=L [tsc_khz=K]` (tsc from the first frame to the last).
 * TSC rate: tsc_khz=N on the command line, else CPUID 0x40000010 (hypervisor) or 0x15. */
#include "virtio.h"

const char rt_program_name[] = "virtio_net";

#define VEC 0x40

#define VIRTIO_NET_F_CSUM      0
#define VIRTIO_NET_F_MAC       5
#define VIRTIO_NET_F_HOST_TSO4 11
#define VIRTIO_NET_F_MRG_RXBUF 15
#define VIRTIO_NET_F_STATUS    16
#define VIRTIO_NET_S_LINK_UP   1

#define HDR_F_NEEDS_CSUM 1
#define GSO_NONE  0
#define GSO_TCPV4 1

struct vnet_hdr {
    uint8_t flags, gso_type;
    uint16_t hdr_len, gso_size, csum_start, csum_offset, num_buffers;
} __attribute__((packed));
#define HDR_LEN 12

#define ETH_TEST 0x88b5
#define ETH_ARP  0x0806
#define ETH_IP   0x0800
#define MAX_FRAME 1514
#define RX_MAX 16384              /* reassembly buffer: larger frames are errors (no GUEST_TSO) */
#define RX_GAP 64                 /* bytes between receive buffers */
#define RX_MAX_CHAIN 32
#define TX_SLOT 2048              /* per transmit head: [4 pad][12 header][frame] */
#define ICMP_ID 0x5357

static uint8_t apic_id;
static struct vdev dev;
static struct vq rxq, txq;
static uint8_t my_mac[6], peer_mac[6], my_ip[4], peer_ip[4];
static const uint8_t bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
static volatile int peer_mac_known;
static int mrg, tx_descs = 2, use_msix;
static uint32_t rxbuf, rx_k, rx_entries, rx_stride;
static uint8_t *rxmem, *frame, *txmem;
static int16_t rx_entry_of[VQ_MAX_SIZE];
static const char *dev_error;     /* first device protocol error */

enum { MODE_PING, MODE_SERVE, MODE_RX };
static int mode;

static struct {
    uint64_t frames, bytes, tx_frames, other, arp_answered, echoes, bad_hdr, nb_not_one, bad_frames;
    uint32_t max_nbuf, max_nbuf_len, max_len, nb_value;
    volatile int stop;
} st;

/* rx mode */
static struct {
    uint64_t want, frames, bytes, lost, bad_payload, back;
    uint32_t next;
    int done;
} rxt;

/* ping mode: the reply we wait for */
static struct {
    uint16_t seq, size;
    volatile int seen;
    int ok;
    char why[64];
} echo;

/* ---------------------------------------------------------------- helpers */
static inline uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)(v >> 16)); put16(p + 2, (uint16_t)v); }
static inline uint32_t get32le(const uint8_t *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }
static inline void put32le(uint8_t *p, uint32_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24); }

static uint64_t csum_add(uint64_t sum, const uint8_t *p, uint32_t len) {
    for (; len > 1; p += 2, len -= 2) sum += get16(p);
    if (len) sum += (uint32_t)p[0] << 8;
    return sum;
}
static uint16_t csum_fold(uint64_t sum) {
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}
/* The value to store in a checksum field (the field zero while summing). */
static uint16_t csum(const uint8_t *p, uint32_t len) { return (uint16_t)~csum_fold(csum_add(0, p, len)); }

static int parse_ip(const char *key, uint8_t out[4], uint32_t def) {
    char s[32];
    for (int i = 0; i < 4; i++) out[i] = (uint8_t)(def >> (24 - 8 * i));
    if (rt_cmdline_str(key, s, sizeof s) < 0) return 0;
    const char *p = s;
    for (int i = 0; i < 4; i++) {
        uint32_t v = 0;
        int digits = 0;
        while (*p >= '0' && *p <= '9' && digits < 4) { v = v * 10 + (uint32_t)(*p++ - '0'); digits++; }
        if (!digits || v > 255 || (i < 3 && *p++ != '.')) return -1;
        out[i] = (uint8_t)v;
    }
    return *p ? -1 : 0;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}
static int parse_mac(const char *s, uint8_t out[6]) {
    for (int i = 0; i < 6; i++) {
        int h = hexval(s[0]), l = hexval(s[1]);
        if (h < 0 || l < 0) return -1;
        out[i] = (uint8_t)(h << 4 | l);
        s += 2;
        if (i < 5 && *s++ != ':') return -1;
    }
    return *s ? -1 : 0;
}

static void device_error(const char *what) { if (!dev_error) dev_error = what; }

/* ---------------------------------------------------------------- receive */
static inline uint8_t *rx_addr(uint32_t entry, uint32_t j) { return rxmem + (uint64_t)(entry * rx_k + j) * rx_stride; }

static void rx_post(uint32_t entry) {
    struct vbuf b[RX_MAX_CHAIN];
    for (uint32_t j = 0; j < rx_k; j++) b[j] = (struct vbuf){ rx_addr(entry, j), rxbuf };
    int h = vq_add(&rxq, b, 0, (int)rx_k);
    if (h < 0) { device_error("receive queue full when reposting a buffer"); return; }
    rx_entry_of[h] = (int16_t)entry;
}

/* The next used receive entry: its index and used length, or -1 (none, or a device error). */
static int rx_take(uint32_t *len) {
    int h = vq_get_used(&rxq, len);
    if (h == -1) return -1;
    if (h < 0 || rx_entry_of[h] < 0) { device_error("receive used id is not an outstanding buffer"); return -1; }
    int e = rx_entry_of[h];
    rx_entry_of[h] = -1;
    return e;
}

/* Receives one frame into `frame` (without the virtio header) and reposts its buffers. Returns
 * the frame length, 0 when nothing is pending, -1 after a device error. */
static long rx_one(void) {
    if (dev_error || !vq_pending_used(&rxq)) return 0;
    uint32_t len;
    int e = rx_take(&len);
    if (e < 0) return -1;
    const uint8_t *b0 = rx_addr((uint32_t)e, 0);
    struct vnet_hdr hdr;
    memcpy(&hdr, b0, HDR_LEN);
    if (hdr.gso_type != GSO_NONE || hdr.flags) st.bad_hdr++;           /* no GUEST_CSUM or GUEST_TSO: both must be 0 */
    long flen = 0;
    if (!mrg) {
        if (len < HDR_LEN || len > rx_k * rxbuf) { device_error("receive used length outside the chain"); rx_post((uint32_t)e); return -1; }
        if (hdr.num_buffers != 1 && !st.nb_not_one++) st.nb_value = hdr.num_buffers;
        uint32_t left = len, off = HDR_LEN;
        for (uint32_t j = 0; left; j++) {
            uint32_t n = left < rxbuf ? left : rxbuf;
            if (n > off) { memcpy(frame + flen, rx_addr((uint32_t)e, j) + off, n - off); flen += n - off; }
            off = off > n ? off - n : 0;
            left -= n;
        }
        rx_post((uint32_t)e);
    } else {
        uint32_t nb = hdr.num_buffers;
        if (len < HDR_LEN || len > rxbuf || nb < 1 || nb > rx_entries) {
            device_error("receive header: bad used length or num_buffers");
            rx_post((uint32_t)e);
            return -1;
        }
        memcpy(frame, b0 + HDR_LEN, len - HDR_LEN);
        flen = len - HDR_LEN;
        rx_post((uint32_t)e);
        for (uint32_t i = 1; i < nb; i++) {
            if (vq_wait_used(&rxq, 1000)) { device_error("num_buffers larger than the used entries that followed"); return -1; }
            int e2 = rx_take(&len);
            if (e2 < 0) return -1;
            if (len > rxbuf || flen + len > RX_MAX) { device_error("merged frame too long"); rx_post((uint32_t)e2); return -1; }
            memcpy(frame + flen, rx_addr((uint32_t)e2, 0), len);
            flen += len;
            rx_post((uint32_t)e2);
        }
        if (nb > st.max_nbuf) { st.max_nbuf = nb; st.max_nbuf_len = (uint32_t)flen; }
    }
    if ((uint64_t)flen > st.max_len) st.max_len = (uint32_t)flen;
    st.frames++;
    st.bytes += (uint64_t)flen;
    return flen;
}

/* ---------------------------------------------------------------- transmit */
static inline uint8_t *tx_slot(int head) { return txmem + (uint64_t)head * TX_SLOT; }

static void tx_reclaim(void) {
    int id;
    while ((id = vq_get_used(&txq, 0)) >= 0) {}
    if (id == -2) device_error("transmit used id out of range");
}

/* Buffer for the next frame, or NULL when the ring stays full for 2 s. tx_end sends it. */
static uint8_t *tx_begin(void) {
    uint64_t end = 0;
    while (txq.num_free < tx_descs) {
        tx_reclaim();
        if (txq.num_free >= tx_descs) break;
        if (!end) end = rt_deadline(2000);
        else if (rt_expired(end)) { device_error("transmit buffers not completed within 2 s"); return 0; }
        cpu_pause();
    }
    return tx_slot(txq.free_head) + 16;
}

static void tx_end(uint32_t len) {
    uint8_t *s = tx_slot(txq.free_head);
    if (len < 60) { memset(s + 16 + len, 0, 60 - len); len = 60; }
    memset(s + 4, 0, HDR_LEN);
    struct vbuf b[2];
    if (tx_descs == 2) {
        b[0] = (struct vbuf){ s + 4, HDR_LEN };
        b[1] = (struct vbuf){ s + 16, len };
    } else {
        b[0] = (struct vbuf){ s + 4, HDR_LEN + len };
    }
    if (vq_add(&txq, b, tx_descs, 0) < 0) { device_error("transmit queue full"); return; }
    vq_kick(&txq);
    st.tx_frames++;
}

static uint8_t *eth_hdr(uint8_t *f, const uint8_t *dst, uint16_t type) {
    memcpy(f, dst, 6);
    memcpy(f + 6, my_mac, 6);
    put16(f + 12, type);
    return f + 14;
}

static void send_arp(uint16_t op, const uint8_t *eth_dst, const uint8_t *tha, const uint8_t *tpa) {
    uint8_t *f = tx_begin();
    if (!f) return;
    uint8_t *a = eth_hdr(f, eth_dst, ETH_ARP);
    put16(a, 1); put16(a + 2, ETH_IP); a[4] = 6; a[5] = 4; put16(a + 6, op);
    memcpy(a + 8, my_mac, 6); memcpy(a + 14, my_ip, 4);
    memcpy(a + 18, tha, 6); memcpy(a + 24, tpa, 4);
    tx_end(42);
}

static uint8_t ping_byte(uint16_t seq, uint32_t i) { return (uint8_t)(i * 7 + seq); }

static void send_echo(uint16_t seq, uint16_t size) {
    uint8_t *f = tx_begin();
    if (!f) return;
    uint8_t *ip = eth_hdr(f, peer_mac, ETH_IP);
    uint16_t total = (uint16_t)(20 + 8 + size);
    ip[0] = 0x45; ip[1] = 0; put16(ip + 2, total); put16(ip + 4, seq); put16(ip + 6, 0x4000);
    ip[8] = 64; ip[9] = 1; put16(ip + 10, 0);
    memcpy(ip + 12, my_ip, 4); memcpy(ip + 16, peer_ip, 4);
    put16(ip + 10, csum(ip, 20));
    uint8_t *ic = ip + 20;
    ic[0] = 8; ic[1] = 0; put16(ic + 2, 0); put16(ic + 4, ICMP_ID); put16(ic + 6, seq);
    for (uint32_t i = 0; i < size; i++) ic[8 + i] = ping_byte(seq, i);
    put16(ic + 2, csum(ic, 8u + size));
    tx_end(14u + total);
}

/* ---------------------------------------------------------------- frame handling */
static void handle_arp(const uint8_t *f, uint32_t len) {
    const uint8_t *a = f + 14;
    if (len < 42 || get16(a) != 1 || get16(a + 2) != ETH_IP || a[4] != 6 || a[5] != 4) { st.other++; return; }
    uint16_t op = get16(a + 6);
    if (op == 1 && !memcmp(a + 24, my_ip, 4)) {
        send_arp(2, a + 8, a + 8, a + 14);
        st.arp_answered++;
    } else if (op == 2 && !memcmp(a + 14, peer_ip, 4) && !memcmp(a + 24, my_ip, 4)) {
        memcpy(peer_mac, a + 8, 6);
        peer_mac_known = 1;
    } else {
        st.other++;
    }
}

static void echo_reply_check(const uint8_t *ip, const uint8_t *ic, uint32_t icmp_len) {
    uint16_t seq = get16(ic + 6);
    if (echo.seen || seq != echo.seq || get16(ic + 4) != ICMP_ID) return;   /* late or foreign */
    echo.seen = 1;
    echo.ok = 0;
    if (memcmp(ip + 12, peer_ip, 4)) { memcpy(echo.why, "source address", 15); return; }
    if (icmp_len != 8u + echo.size) { memcpy(echo.why, "payload length", 15); return; }
    for (uint32_t i = 0; i < echo.size; i++)
        if (ic[8 + i] != ping_byte(seq, i)) { memcpy(echo.why, "payload bytes", 14); return; }
    echo.ok = 1;
}

static void handle_ipv4(const uint8_t *f, uint32_t len) {
    const uint8_t *ip = f + 14;
    if (len < 34 || (ip[0] >> 4) != 4) { st.other++; return; }
    uint32_t ihl = (ip[0] & 15) * 4u, total = get16(ip + 2);
    if (ihl < 20 || total < ihl || 14 + total > len) { st.bad_frames++; return; }
    if (csum_fold(csum_add(0, ip, ihl)) != 0xffff) { st.bad_frames++; return; }
    if (memcmp(ip + 16, my_ip, 4) || ip[9] != 1 || (get16(ip + 6) & 0x3fff)) { st.other++; return; }
    const uint8_t *ic = ip + ihl;
    uint32_t icmp_len = total - ihl;
    if (icmp_len < 8 || csum_fold(csum_add(0, ic, icmp_len)) != 0xffff) { st.bad_frames++; return; }
    if (ic[0] == 0 && ic[1] == 0) { echo_reply_check(ip, ic, icmp_len); return; }
    if (ic[0] != 8 || ic[1] != 0) { st.other++; return; }
    /* An echo request for us: answer with the same id, sequence and data. */
    uint8_t *o = tx_begin();
    if (!o) return;
    memcpy(o, f, 14 + total);
    memcpy(o, f + 6, 6);
    memcpy(o + 6, my_mac, 6);
    uint8_t *oip = o + 14;
    memcpy(oip + 12, my_ip, 4);
    memcpy(oip + 16, ip + 12, 4);
    oip[8] = 64;
    put16(oip + 10, 0);
    put16(oip + 10, csum(oip, ihl));
    uint8_t *oic = oip + ihl;
    oic[0] = 0;
    put16(oic + 2, 0);
    put16(oic + 2, csum(oic, icmp_len));
    tx_end(14 + total);
    st.echoes++;
}

static void handle_test(const uint8_t *f, uint32_t len) {
    const uint8_t *p = f + 14;
    uint32_t n = len - 14;
    if (n >= 4 && !memcmp(p, "STOP", 4)) { st.stop = 1; return; }
    if (mode != MODE_RX || rxt.done) { st.other++; return; }
    if (n < 4) { st.bad_frames++; return; }
    uint32_t seq = get32le(p);
    for (uint32_t i = 4; i < n; i++)
        if (p[i] != (uint8_t)(seq + i)) {
            if (!rxt.bad_payload)
                rt_printf("# rx: frame seq %u len %u: payload byte %u is %02x, expected %02x\n", seq, len, i, p[i],
                          (uint8_t)(seq + i));
            rxt.bad_payload++;
            break;
        }
    if (seq < rxt.next) {
        if (!rxt.back) rt_printf("# rx: seq %u after %u\n", seq, rxt.next - 1);
        rxt.back++;
    } else {
        rxt.lost += seq - rxt.next;
        rxt.next = seq + 1;
    }
    rxt.frames++;
    rxt.bytes += len;
    if (rxt.next >= rxt.want) rxt.done = 1;
}

static void handle_frame(const uint8_t *f, uint32_t len) {
    if (len < 14) { st.bad_frames++; return; }
    switch (get16(f + 12)) {
    case ETH_ARP: handle_arp(f, len); break;
    case ETH_IP: handle_ipv4(f, len); break;
    case ETH_TEST: handle_test(f, len); break;
    default: st.other++; break;
    }
}

/* ---------------------------------------------------------------- polling, MSI-X check */
static int msix_pending_check;
static uint32_t msix_seen;

static void msix_check(void) {
    msix_pending_check = 0;
    int got = vmsi_wait(VEC, msix_seen, 500) == 0;
    rt_check("net-msix", got, "first received frame %s MSI-X vector 0x%x (receive queue vector %u, %u interrupts)",
             got ? "raised" : "did not raise", VEC, rxq.msix, vmsi_count[VEC - VMSI_BASE] - msix_seen);
    vq_disable_interrupts(&rxq);                    /* polling from now on */
}

static int rx_poll(void) {
    int n = 0;
    long l;
    while ((l = rx_one()) != 0) {
        if (l < 0) break;
        handle_frame(frame, (uint32_t)l);
        n++;
        if (msix_pending_check) msix_check();
    }
    if (rxq.avail_idx != rxq.kicked_idx) vq_kick(&rxq);
    tx_reclaim();
    return n;
}

/* Polls until *flag is set, a device error, or ms pass (since the last received frame when
 * idle_reset). Returns *flag. */
static int poll_until(volatile int *flag, uint32_t ms, int idle_reset) {
    uint64_t end = rt_deadline(ms);
    uint32_t spins = 0;
    while (!*flag && !dev_error) {
        if (rx_poll()) { if (idle_reset) end = rt_deadline(ms); continue; }
        if ((++spins & 255) == 0 && rt_expired(end)) break;
        cpu_pause();
    }
    return *flag;
}

/* ---------------------------------------------------------------- setup */
static const char *open_net(uint64_t wanted, int irq) {
    if (vdev_find(VIRTIO_ID_NET, 0, &dev)) return "no virtio-net device on bus 0";
    const char *e = vdev_map(&dev);
    if (e) return e;
    if (!dev.devcfg) return "no device configuration capability";
    use_msix = irq && (dev.msix_cap || dev.mmio) && !rt_cmdline_has("nomsix");
    if (dev.mmio && use_msix) vmmio_route_irq(&dev, apic_id, VEC);   /* virtio-mmio: the window's one interrupt */
    if (dev.msix_cap && (vdev_msix_set(&dev, 0, apic_id, VEC, 0) || vdev_msix_enable(&dev))) return "MSI-X setup failed";
    e = vdev_negotiate(&dev, wanted);
    if (e) return e;
    if (dev.msix_cap) vdev_set_config_vector(&dev, VIRTIO_MSI_NO_VECTOR);
    e = vq_setup(&dev, &rxq, 0, 256, use_msix ? 0 : VIRTIO_MSI_NO_VECTOR);
    if (e) return e;
    e = vq_setup(&dev, &txq, 1, 256, VIRTIO_MSI_NO_VECTOR);
    if (e) return e;
    if (use_msix && rxq.msix != 0) return "the receive queue did not take MSI-X vector 0";
    vq_disable_interrupts(&txq);
    if (!use_msix) vq_disable_interrupts(&rxq);
    mrg = vdev_has(&dev, VIRTIO_NET_F_MRG_RXBUF);

    rxbuf = (uint32_t)rt_cmdline_uint("rxbuf", 2048);
    if (rxbuf < 64 || rxbuf > 16384) return "rxbuf must be 64-16384";
    rx_k = mrg ? 1 : (HDR_LEN + MAX_FRAME + rxbuf - 1) / rxbuf;
    if (rx_k > RX_MAX_CHAIN || rx_k > rxq.size) return "rxbuf too small for a receive chain";
    rx_entries = rxq.size / rx_k;
    rx_stride = (rxbuf + RX_GAP + 63) & ~63u;
    rxmem = rt_alloc_pages_nozero(((uint64_t)rx_entries * rx_k * rx_stride + 4095) / 4096);
    frame = rt_alloc_pages_nozero(RX_MAX / 4096 + 1);
    txmem = rt_alloc_pages((uint64_t)txq.size * TX_SLOT / 4096);
    if (!rxmem || !frame || !txmem) return "out of guest memory for buffers";
    for (uint32_t i = 0; i < VQ_MAX_SIZE; i++) rx_entry_of[i] = -1;
    for (uint32_t i = 0; i < rx_entries; i++) rx_post(i);
    if (dev_error) return dev_error;
    msix_seen = vmsi_count[VEC - VMSI_BASE];
    msix_pending_check = use_msix;
    vdev_driver_ok(&dev);
    if (vdev_status(&dev) & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED)) return "device status reports an error";
    vq_kick(&rxq);
    return 0;
}

static int check_config(void) {
    for (int i = 0; i < 6; i++) my_mac[i] = vdev_cfg8(&dev, (uint32_t)i);
    rt_printf("# mac=%02x:%02x:%02x:%02x:%02x:%02x\n", my_mac[0], my_mac[1], my_mac[2], my_mac[3], my_mac[4], my_mac[5]);
    int has_mac = vdev_has(&dev, VIRTIO_NET_F_MAC);
    int zero = !(my_mac[0] | my_mac[1] | my_mac[2] | my_mac[3] | my_mac[4] | my_mac[5]);
    int has_status = vdev_has(&dev, VIRTIO_NET_F_STATUS);
    uint16_t status = has_status ? vdev_cfg16(&dev, 6) : VIRTIO_NET_S_LINK_UP;
    return rt_check("net-config", has_mac && !zero && (status & VIRTIO_NET_S_LINK_UP) && !(my_mac[0] & 1),
                    "mac %02x:%02x:%02x:%02x:%02x:%02x (MAC feature %s), status %s%x: link %s", my_mac[0], my_mac[1],
                    my_mac[2], my_mac[3], my_mac[4], my_mac[5], has_mac ? "negotiated" : "missing",
                    has_status ? "" : "not negotiated, assumed ", status, status & VIRTIO_NET_S_LINK_UP ? "up" : "down");
}

static void final_checks(void) {
    if (dev_error) rt_fail("net-device", "%s", dev_error);
    rt_check("net-rx-headers", !st.bad_hdr, "%lu frames received (%lu bytes, largest %u), %lu with flags/GSO set%s, %lu other, %lu malformed",
             st.frames, st.bytes, st.max_len, st.bad_hdr, mrg ? "" : " (no MRG_RXBUF)", st.other, st.bad_frames);
    if (!mrg && st.nb_not_one)
        rt_printf("# note: %lu frames had num_buffers != 1 (first: %u) without MRG_RXBUF (virtio 1.x requires 1)\n",
                  st.nb_not_one, st.nb_value);
    if (use_msix && msix_pending_check) rt_printf("# net-msix not checked: no frame received\n");
}

/* ---------------------------------------------------------------- modes */
static int resolve_peer(void) {
    static const uint8_t zero[6];
    for (int attempt = 0; attempt < 3 && !peer_mac_known && !dev_error; attempt++) {
        send_arp(1, bcast, zero, peer_ip);
        poll_until(&peer_mac_known, 1000, 0);
    }
    return rt_check("arp", peer_mac_known, "%u.%u.%u.%u is at %02x:%02x:%02x:%02x:%02x:%02x", peer_ip[0], peer_ip[1],
                    peer_ip[2], peer_ip[3], peer_mac[0], peer_mac[1], peer_mac[2], peer_mac[3], peer_mac[4], peer_mac[5]);
}

static void mode_ping(void) {
    if (!resolve_peer()) return;
    uint32_t count = (uint32_t)rt_cmdline_uint("count", 4);
    uint32_t size = (uint32_t)rt_cmdline_uint("size", 56);
    if (size > 1472) { rt_fail("icmp", "size=%u: at most 1472 payload bytes", size); return; }
    uint32_t good = 0;
    for (uint32_t i = 1; i <= count && !dev_error; i++) {
        echo.seq = (uint16_t)i;
        echo.size = (uint16_t)size;
        echo.seen = 0;
        echo.why[0] = 0;
        uint64_t t0 = rdtsc();
        send_echo((uint16_t)i, (uint16_t)size);
        poll_until(&echo.seen, 2000, 0);
        uint64_t t1 = rdtsc();
        if (echo.seen && echo.ok) good++;
        else rt_printf("# icmp seq %u: %s\n", i, echo.seen ? echo.why : "no reply within 2 s");
        if (i == 1 || !echo.ok) rt_printf("# icmp seq %u: %lu tsc\n", i, t1 - t0);
    }
    rt_check("icmp", good == count && count > 0, "%u of %u echo replies from %u.%u.%u.%u with %u payload bytes correct", good,
             count, peer_ip[0], peer_ip[1], peer_ip[2], peer_ip[3], size);
    if (mrg && st.max_len + HDR_LEN > rxbuf)
        rt_check("rx-merge", st.max_nbuf > 1, "largest frame %u bytes arrived in %u buffers of %u bytes (num_buffers %u)",
                 st.max_len, st.max_nbuf, rxbuf, st.max_nbuf);
    else if (!mrg && rx_k > 1)
        rt_okf("rx-chain", "frames up to %u bytes received in chains of %u descriptors of %u bytes", st.max_len, rx_k, rxbuf);
}

static void mode_serve(void) {
    rt_printf("NET-READY\n");
    uint32_t timeout = (uint32_t)rt_cmdline_uint("timeout", 120000);
    if (poll_until(&st.stop, timeout, 0))
        rt_okf("serve", "echoes=%lu arp=%lu frames=%lu", st.echoes, st.arp_answered, st.frames);
    else
        rt_fail("serve", "%s after echoes=%lu arp=%lu frames=%lu", dev_error ? dev_error : "no STOP frame within the timeout",
                st.echoes, st.arp_answered, st.frames);
}

static void mode_rx(void) {
    rxt.want = rt_cmdline_uint("n", 1000);
    rt_printf("NET-READY\n");
    uint32_t timeout = (uint32_t)rt_cmdline_uint("timeout", 60000);
    static volatile int finished;
    uint64_t end = rt_deadline(timeout);
    uint32_t spins = 0;
    while (!finished && !dev_error) {
        if (rx_poll()) { end = rt_deadline(timeout); finished = rxt.done || st.stop; continue; }
        if ((++spins & 255) == 0 && rt_expired(end)) break;
        cpu_pause();
    }
    if (st.stop && !rxt.done && rxt.next < rxt.want) rxt.lost += rxt.want - rxt.next;
    int ok = finished && rxt.frames > 0 && !rxt.bad_payload && !rxt.back;
    rt_check("rx", ok, "frames=%lu lost=%lu bytes=%lu%s (%lu bad payloads, %lu out of order, of n=%lu)", rxt.frames, rxt.lost,
             rxt.bytes, finished ? (rxt.done ? "" : ", ended by STOP") : ", timed out", rxt.bad_payload, rxt.back, rxt.want);
}

/* ---------------------------------------------------------------- benchmarks */
static void print_rate(const char *kind, uint64_t frames, uint64_t bytes, uint64_t tsc) {
    uint64_t khz = rt_tsc_khz();
    if (!khz || !tsc) return;
    uint64_t us = tsc * 1000 / khz;
    if (!us) return;
    rt_printf("# %s: %lu frames/s, %lu Mbit/s (%lu us at tsc_khz=%lu)\n", kind, frames * 1000000 / us, bytes * 8 / us, us, khz);
}

static void bench_tx(void) {
    int tso = (int)rt_cmdline_uint("tso", 0);
    uint64_t n = rt_cmdline_uint("n", tso ? 20000 : 200000);
    uint32_t size = (uint32_t)rt_cmdline_uint("size", tso ? 65536 : 1514);
    uint32_t mss = (uint32_t)rt_cmdline_uint("mss", 1448);
    uint8_t dst[6];
    char s[32];
    memcpy(dst, bcast, 6);
    if (rt_cmdline_str("dst", s, sizeof s) >= 0 && parse_mac(s, dst)) { rt_fail("bench", "bad dst=%s", s); return; }
    if (tso) {
        if (!vdev_has(&dev, VIRTIO_NET_F_CSUM) || !vdev_has(&dev, VIRTIO_NET_F_HOST_TSO4)) {
            rt_fail("bench", "tso=1 needs CSUM and HOST_TSO4 (device features %lx)", dev.device_features);
            return;
        }
        if (size < 54 + 1 || size > 14 + 65535 || mss < 1 || mss > 65535) { rt_fail("bench", "tso: bad size=%u or mss=%u", size, mss); return; }
        if (rt_cmdline_str("dst", s, sizeof s) < 0) {
            if (!resolve_peer()) return;
            memcpy(dst, peer_mac, 6);
        }
        tx_descs = 2;
    } else if (size < 60 || size > MAX_FRAME) {
        rt_fail("bench", "size=%u: Ethernet length 60-%u (tso=1 for larger)", size, MAX_FRAME);
        return;
    }
    uint8_t *payload = 0;
    uint32_t plen = tso ? size - 54 : 0;
    int gso = tso && plen > mss;
    uint16_t pseudo = 0;
    if (tso) {
        payload = rt_alloc_pages_nozero((plen + 4095) / 4096);
        if (!payload) { rt_fail("bench", "out of memory"); return; }
        for (uint32_t i = 0; i < plen; i++) payload[i] = (uint8_t)i;
        uint8_t ph[12];
        memcpy(ph, my_ip, 4); memcpy(ph + 4, peer_ip, 4); ph[8] = 0; ph[9] = 6; put16(ph + 10, (uint16_t)(20 + plen));
        pseudo = csum_fold(csum_add(0, ph, 12));
    }
    /* Every slot (indexed by the head descriptor) is built once; the loop only writes sequence numbers. */
    for (uint32_t h = 0; h < txq.size; h++) {
        uint8_t *sl = tx_slot((int)h);
        struct vnet_hdr *hdr = (struct vnet_hdr *)(sl + 4);
        memset(hdr, 0, HDR_LEN);
        uint8_t *f = sl + 16;
        if (!tso) {
            uint8_t *p = eth_hdr(f, dst, ETH_TEST);
            for (uint32_t i = 0; i < size - 14; i++) p[i] = (uint8_t)i;
            continue;
        }
        hdr->flags = HDR_F_NEEDS_CSUM;
        hdr->gso_type = gso ? GSO_TCPV4 : GSO_NONE;
        hdr->hdr_len = 54;
        hdr->gso_size = gso ? (uint16_t)mss : 0;
        hdr->csum_start = 34;
        hdr->csum_offset = 16;
        uint8_t *ip = eth_hdr(f, dst, ETH_IP);
        ip[0] = 0x45; ip[1] = 0; put16(ip + 2, (uint16_t)(size - 14)); put16(ip + 4, 0); put16(ip + 6, 0x4000);
        ip[8] = 64; ip[9] = 6; put16(ip + 10, 0);
        memcpy(ip + 12, my_ip, 4); memcpy(ip + 16, peer_ip, 4);
        uint8_t *tcp = ip + 20;
        put16(tcp, 40000); put16(tcp + 2, 5001); put32(tcp + 4, 0); put32(tcp + 8, 1);
        tcp[12] = 5 << 4; tcp[13] = 0x18; put16(tcp + 14, 0xffff); put16(tcp + 16, pseudo); put16(tcp + 18, 0);
    }
    vq_disable_interrupts(&txq);
    uint64_t sent = 0, done = 0, errors = 0, kicks0 = txq.notifications;
    uint32_t tcp_seq = 1;
    rt_printf("BENCH tx start size=%u n=%lu txdesc=%d%s\n", size, n, tx_descs, tso ? (gso ? " tso=1" : " tso=1 (no gso)") : "");
    uint64_t t0 = rdtsc();
    uint64_t idle = 0, idle_deadline = rt_deadline(60000);
    while (done < n) {
        int id, got = 0, added = 0;
        while ((id = vq_get_used(&txq, 0)) >= 0) { done++; got++; }
        if (id == -2) { errors++; break; }
        while (sent < n && txq.num_free >= tx_descs) {
            int h = txq.free_head;
            uint8_t *sl = tx_slot(h);
            struct vbuf b[2];
            if (tso) {
                uint8_t *ip = sl + 16 + 14;
                put16(ip + 4, (uint16_t)sent);
                put16(ip + 10, 0);
                put16(ip + 10, csum(ip, 20));
                put32(ip + 24, tcp_seq);
                tcp_seq += plen;
                b[0] = (struct vbuf){ sl + 4, HDR_LEN + 54 };
                b[1] = (struct vbuf){ payload, plen };
            } else {
                put32le(sl + 16 + 14, (uint32_t)sent);
                if (tx_descs == 2) { b[0] = (struct vbuf){ sl + 4, HDR_LEN }; b[1] = (struct vbuf){ sl + 16, size }; }
                else b[0] = (struct vbuf){ sl + 4, HDR_LEN + size };
            }
            vq_add(&txq, b, tx_descs, 0);
            sent++;
            added++;
        }
        if (added) vq_kick(&txq);
        if (got || added) { idle = 0; continue; }
        if ((++idle & 1023) == 0) {
            if (idle == 1024) idle_deadline = rt_deadline(60000);
            else if (rt_expired(idle_deadline)) break;             /* no progress for 60 s */
        }
        cpu_pause();
    }
    uint64_t t1 = rdtsc();
    uint64_t khz = rt_tsc_khz();
    uint64_t bytes = done * size;
    if (khz)
        rt_printf("BENCH tx done frames=%lu bytes=%lu tsc=%lu kicks=%lu errors=%lu tsc_khz=%lu\n", done, bytes, t1 - t0,
                  txq.notifications - kicks0, errors, khz);
    else
        rt_printf("BENCH tx done frames=%lu bytes=%lu tsc=%lu kicks=%lu errors=%lu\n", done, bytes, t1 - t0,
                  txq.notifications - kicks0, errors);
    print_rate("tx", done, bytes, t1 - t0);
    rt_check("bench", done == n && !errors && !dev_error, "tx: %lu of %lu frames of %u bytes completed, %lu errors%s%s", done, n,
             size, errors, dev_error ? ", " : "", dev_error ? dev_error : "");
}

static void bench_rx(void) {
    uint64_t n = rt_cmdline_uint("n", 100000);
    uint32_t timeout = (uint32_t)rt_cmdline_uint("timeout", 60000);
    vq_disable_interrupts(&rxq);
    rt_printf("NET-READY\n");
    uint64_t frames = 0, bytes = 0, lost = 0, back = 0, other = 0, t_first = 0, t_last = 0;
    uint32_t next = 0;
    int stop = 0;
    uint64_t end = rt_deadline(timeout);
    uint32_t spins = 0;
    while (frames < n && !stop && !dev_error) {
        if (!vq_pending_used(&rxq)) {
            if ((++spins & 255) == 0 && rt_expired(end)) break;
            cpu_pause();
            continue;
        }
        uint64_t now = 0;
        int batch = 0;
        while (vq_pending_used(&rxq) && frames < n) {
            uint32_t len;
            int e = rx_take(&len);
            if (e < 0) break;
            const uint8_t *b0 = rx_addr((uint32_t)e, 0);
            uint32_t total = len;
            if (mrg) {
                uint32_t nb = ((const struct vnet_hdr *)b0)->num_buffers;
                if (len < HDR_LEN || nb < 1 || nb > rx_entries) { device_error("receive header: bad used length or num_buffers"); rx_post((uint32_t)e); break; }
                for (uint32_t i = 1; i < nb; i++) {
                    uint32_t l2;
                    if (vq_wait_used(&rxq, 1000)) { device_error("num_buffers larger than the used entries that followed"); break; }
                    int e2 = rx_take(&l2);
                    if (e2 < 0) break;
                    total += l2;
                    rx_post((uint32_t)e2);
                }
            }
            uint32_t flen = total > HDR_LEN ? total - HDR_LEN : 0;
            const uint8_t *f = b0 + HDR_LEN;
            if (flen >= 18 && get16(f + 12) == ETH_TEST) {
                if (!memcmp(f + 14, "STOP", 4)) { stop = 1; rx_post((uint32_t)e); break; }
                if (!now) now = rdtsc();
                if (!frames) t_first = now;
                uint32_t seq = get32le(f + 14);
                if (seq < next) back++;
                else { lost += seq - next; next = seq + 1; }
                frames++;
                bytes += flen;
            } else {
                other++;
            }
            rx_post((uint32_t)e);
            batch++;
        }
        if (now) t_last = now;
        if (batch) vq_kick(&rxq);
        end = rt_deadline(timeout);
    }
    uint64_t tsc = t_last - t_first, khz = rt_tsc_khz();
    if (khz)
        rt_printf("BENCH rx done frames=%lu bytes=%lu tsc=%lu lost=%lu tsc_khz=%lu\n", frames, bytes, tsc, lost, khz);
    else
        rt_printf("BENCH rx done frames=%lu bytes=%lu tsc=%lu lost=%lu\n", frames, bytes, tsc, lost);
    print_rate("rx", frames, bytes, tsc);
    rt_check("bench", frames > 0 && (frames == n || stop) && !back && !dev_error,
             "rx: %lu of %lu frames%s, %lu lost, %lu out of order, %lu other frames%s%s", frames, n, stop ? " (STOP)" : "", lost,
             back, other, dev_error ? ", " : "", dev_error ? dev_error : "");
}

/* ---------------------------------------------------------------- main */
static long run(void *arg) {
    (void)arg;
    char kind[16], m[16];
    int bench = rt_cmdline_str("bench", kind, sizeof kind) >= 0;
    if (vmmio_setup_from_cmdline()) return 0;
    if (bench && strncmp(kind, "tx", 3) && strncmp(kind, "rx", 3)) { rt_fail("bench", "unknown bench=%s (tx, rx)", kind); return 0; }
    int tso = bench && kind[0] == 't' && rt_cmdline_uint("tso", 0);
    mode = MODE_PING;
    if (!bench && rt_cmdline_str("mode", m, sizeof m) >= 0) {
        if (!strncmp(m, "ping", 5)) mode = MODE_PING;
        else if (!strncmp(m, "serve", 6)) mode = MODE_SERVE;
        else if (!strncmp(m, "rx", 3)) mode = MODE_RX;
        else { rt_fail("mode", "unknown mode=%s (ping, serve, rx)", m); return 0; }
    }
    if (parse_ip("ip", my_ip, 0x0a00020f) || parse_ip("peer", peer_ip, 0x0a000201)) { rt_fail("cmdline", "bad ip= or peer="); return 0; }
    tx_descs = bench && kind[0] == 't' ? 1 : 2;
    uint64_t td = rt_cmdline_uint("txdesc", 0);
    if (td == 1 || td == 2) tx_descs = (int)td;

    uint64_t wanted = VIRTIO_BIT(VIRTIO_NET_F_MAC) | VIRTIO_BIT(VIRTIO_NET_F_STATUS);
    if (!rt_cmdline_has("nomrg")) wanted |= VIRTIO_BIT(VIRTIO_NET_F_MRG_RXBUF);
    if (!rt_cmdline_has("noevent")) wanted |= VIRTIO_BIT(VIRTIO_F_EVENT_IDX);
    if (tso) wanted |= VIRTIO_BIT(VIRTIO_NET_F_CSUM) | VIRTIO_BIT(VIRTIO_NET_F_HOST_TSO4);
    const char *e = open_net(wanted, !bench);
    if (!rt_check("net-setup", !e, "%s: 00:%02x.%u device %04x, features %lx of %lx, rx queue %u (%u entries x %u x %u bytes), "
                  "tx queue %u, %s, msix %s", e ? e : "ready", dev.slot, dev.fn, dev.device_id, dev.features,
                  dev.device_features, rxq.size, rx_entries, rx_k, rxbuf, txq.size, mrg ? "MRG_RXBUF" : "no MRG_RXBUF",
                  use_msix ? "rx vector 0" : "unused (polling)"))
        return 0;
    if (check_config()) {
        if (bench) { if (kind[0] == 't') bench_tx(); else bench_rx(); }
        else if (mode == MODE_PING) mode_ping();
        else if (mode == MODE_SERVE) mode_serve();
        else mode_rx();
    }
    if (!bench) final_checks();
    else if (dev_error) rt_fail("net-device", "%s", dev_error);
    vdev_reset(&dev);
    return 0;
}

int main(void) { return vdrv_main(run, VEC, &apic_id); }
