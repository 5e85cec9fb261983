/* virtio_blk: a freestanding virtio-blk driver (virtio.h) that checks a modern virtio-blk PCI
 * device end to end, or benchmarks it. The driver runs in ring 3 (native speed on PVM hosts);
 * only the MSI-X handler runs in ring 0.
 *
 * Disk contents the host prepares (at least 1024 sectors): every 64-bit little-endian word k
 * (0-63) of sector s holds P(s,k) = (s << 8) | k. What this program writes: W(s,k) =
 * 0x5700000000000000 | (s << 8) | k.
 *
 * Check mode (default), on every virtio-blk device found (checks are named blkN-…):
 *   writable disk: reads of sectors 0-63 (pattern P), a read through an indirect table (8-15),
 *   a read past the end (IOERR), writes of W to 64-71 (direct) and 80-87 (indirect) read back,
 *   FLUSH, GET_ID (compared with id=ID on the command line, for disk 0), DISCARD of 128-135 and
 *   WRITE_ZEROES of 192-199 (read back as zeroes) when negotiated, 32 requests in flight (4 KiB
 *   writes of W to 512-767, then reads of them, one kick each batch), EVENT_IDX interrupt
 *   suppression, and every request completed with an MSI-X interrupt.
 *   read-only disk (VIRTIO_BLK_F_RO): reads work, a write fails with IOERR, the data is unchanged.
 *   The host then checks the file: W at 64-71, 80-87, 512-767; zeroes at 192-199 (and 128-135
 *   where discard punches holes); P elsewhere.
 * Command line: id=STRING (GET_ID of disk 0), disks=N (expected count), readonly=I (disk I must
 *   be read-only), noindirect, noevent (do not negotiate those features); mmio [source=acpi|cmdline]:
 *   the disks are virtio-mmio windows found in the DSDT (default) or on the command line, their
 *   interrupt routed through the I/O APIC instead of MSI-X (every mode but movebar and hostile).
 *
 * Bench mode: bench=seqread|seqwrite|randread|randwrite size=BYTES (default 1 MiB for seq*,
 *   4 KiB for rand*) n=REQUESTS qd=DEPTH (default 8) span=SECTORS (default the capacity), on
 *   disk 0, polling the used ring in ring 3 with interrupts suppressed and one kick per batch.
 *   Prints `BENCH <kind> start …` and `BENCH <kind> done ops=… bytes=… tsc=… kicks=…`. bench=notify n=N writes the
 *   queue's notify register N times with nothing new in the ring (the exit cost of a notification).
 *
 * Fill mode: fill (on disk 0, whose host file sits on a file system smaller than the disk): writes the
 *   W pattern in 64 KiB requests from sector 0 until a write fails. Checks: `fill-ioerr` (a write ended
 *   with IOERR before the end of the disk, as a full host disk must report), `fill-read-after` (the
 *   first 128 sectors, written before the failure, read back intact), `fill-rewrite` (overwriting
 *   sector 0 in place still works: the device recovered) and `fill-flush-reported` (FLUSH completes
 *   with OK or IOERR, never hangs). Prints `FILL wrote N sectors, then STATUS at sector S`.
 *
 * BAR-move mode: movebar (disk 0, P pattern): reads through the device, moves the BAR holding its
 *   notification structure to 0xD8000000 as an OS may, and checks `moved-read` (requests kicked at
 *   the new address complete), `old-address-dead` (a kick written to the old address starts
 *   nothing: the VMM dropped its ioeventfd there) and `moved-back-read` (after moving it back).
 *
 * Stream mode: stream [rounds=N] (disk 0; N = 0, the default, runs until the VM stops): round r writes
 *   32 x 4 KiB requests of S(r,s,k) = (r << 32) | (s << 8) | k to sectors 512-767 in flight at once (one
 *   kick), waits for every completion and for an MSI-X interrupt, then reads the sectors back in 32
 *   requests in flight and compares. Prints `STREAM round R ok` per round, or a FAIL naming the round,
 *   the request and the status or word, and stops. Waits are bounded by iterations, not by the TSC, so
 *   a VM snapshotted mid-round and loaded elsewhere (where ring-3 TSC reads may jump) continues the
 *   round where it stopped: the snapshot tests use it for requests in flight across a snapshot.
 *
 * Big-memory mode: bigmem (disk 0, P pattern; a guest with more than 3 GiB of RAM): checks
 *   `two-regions` (the memory map has usable RAM up to the 3 GiB PCI hole and again from 4 GiB),
 *   `cpu-access` (the last bytes below the hole and the first and last above it hold what the CPU
 *   wrote), `dma-high` (a read into a buffer above 4 GiB), `dma-top` (a read into the last page of
 *   RAM) and `dma-straddle-refused` (a read whose buffer runs from low RAM into the hole is not
 *   completed with OK, and the RAM part of the buffer is untouched). */
#include "virtio.h"

const char rt_program_name[] = "virtio_blk";

#define VEC 0x40
#define SECTOR 512u
#define MIN_SECTORS 1024u

#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_DISCARD 13
#define VIRTIO_BLK_F_WRITE_ZEROES 14

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_DISCARD 11
#define T_WRITE_ZEROES 13
#define S_OK 0
#define S_IOERR 1
#define S_UNSUPP 2

struct blk_hdr { uint32_t type, reserved; uint64_t sector; };
struct blk_seg { uint64_t sector; uint32_t num_sectors, flags; };

static uint8_t apic_id;
static struct vdev dev;
static struct vq q;
static char prefix[8];
static uint32_t sync_requests, irq_completions;

static const char *nm(const char *check) {
    static char buf[64];
    size_t p = strlen(prefix), c = strlen(check);
    if (p + c + 1 > sizeof buf) c = sizeof buf - p - 1;
    memcpy(buf, prefix, p);
    memcpy(buf + p, check, c);
    buf[p + c] = 0;
    return buf;
}

static inline uint64_t pat_p(uint64_t s, uint64_t k) { return (s << 8) | k; }
static inline uint64_t pat_w(uint64_t s, uint64_t k) { return 0x5700000000000000ull | (s << 8) | k; }

static void fill(void *buf, uint64_t sector, uint32_t count, int written) {
    uint64_t *w = buf;
    for (uint32_t i = 0; i < count; i++)
        for (uint32_t k = 0; k < 64; k++) w[i * 64 + k] = written ? pat_w(sector + i, k) : pat_p(sector + i, k);
}
/* Index of the first mismatching word, or -1. kind: 0 = P, 1 = W, 2 = zero. */
static long verify(const void *buf, uint64_t sector, uint32_t count, int kind) {
    const uint64_t *w = buf;
    for (uint32_t i = 0; i < count; i++)
        for (uint32_t k = 0; k < 64; k++) {
            uint64_t want = kind == 2 ? 0 : kind == 1 ? pat_w(sector + i, k) : pat_p(sector + i, k);
            if (w[i * 64 + k] != want) return (long)(i * 64 + k);
        }
    return -1;
}

/* Request memory: header + status (+ discard segment) per slot, in one page each. */
struct slot { struct blk_hdr hdr; struct blk_seg seg; volatile uint8_t status; uint8_t pad[3]; };

/* One synchronous request, completed through the MSI-X interrupt (or polling when the queue has
 * no vector). Returns the status byte, or -1 (no completion), -2 (wrong used id). */
static int blk_sync(uint32_t type, uint64_t sector, void *data, uint32_t len, int indirect, uint32_t *used_len) {
    static struct slot *s;
    static volatile struct vring_desc *table;
    if (!s) { s = rt_alloc_pages(1); table = (volatile struct vring_desc *)((uint8_t *)s + 2048); }
    s->hdr.type = type;
    s->hdr.reserved = 0;
    s->hdr.sector = sector;
    s->status = 0xff;
    struct vbuf b[3];
    int n = 0, out = 1;
    b[n++] = (struct vbuf){ &s->hdr, sizeof s->hdr };
    if (len) {
        b[n++] = (struct vbuf){ data, len };
        if (type == T_OUT || type == T_DISCARD || type == T_WRITE_ZEROES) out = 2;
    }
    b[n++] = (struct vbuf){ &s->status, 1 };
    uint32_t seen = vmsi_count[VEC - VMSI_BASE];
    int head = indirect ? vq_add_indirect(&q, b, out, n - out, table) : vq_add(&q, b, out, n - out);
    if (head < 0) return -3;
    vq_kick(&q);
    sync_requests++;
    if (q.msix != VIRTIO_MSI_NO_VECTOR && vmsi_wait(VEC, seen, 10000) == 0) irq_completions++;
    if (vq_wait_used(&q, 10000)) return -1;
    uint32_t l = 0;
    int id = vq_get_used(&q, &l);
    if (used_len) *used_len = l;
    if (id != head) return -2;
    return s->status;
}

static const char *status_name(int st) {
    switch (st) {
    case S_OK: return "OK";
    case S_IOERR: return "IOERR";
    case S_UNSUPP: return "UNSUPP";
    case -1: return "no completion within 10 s";
    case -2: return "wrong used id";
    case -3: return "no free descriptors";
    default: return "unknown status";
    }
}

static int expect_status(const char *check, int st, int want, const char *what) {
    return rt_check(nm(check), st == want, "%s: status %d (%s), expected %s", what, st, status_name(st), status_name(want));
}

/* Reads count sectors and checks them against kind (0 = P, 1 = W, 2 = zero). */
static void read_check(const char *check, uint8_t *buf, uint64_t sector, uint32_t count, int kind, int indirect) {
    memset(buf, 0xee, count * SECTOR);
    uint32_t used_len = 0;
    int st = blk_sync(T_IN, sector, buf, count * SECTOR, indirect, &used_len);
    if (st != S_OK) { expect_status(check, st, S_OK, "read"); return; }
    long bad = verify(buf, sector, count, kind);
    const uint64_t *w = (const uint64_t *)buf;
    if (bad < 0)
        rt_okf(nm(check), "sectors %lu-%lu%s as expected (used len %u)", sector, sector + count - 1,
               indirect ? " (indirect)" : "", used_len);
    else
        rt_fail(nm(check), "sector %lu word %lu reads %lx", sector + (uint64_t)bad / 64, (uint64_t)bad % 64, w[bad]);
}

/* Queues 32 x 4 KiB requests at sectors 512-767 (writes from `data`, or reads into it), one slot each, not
 * yet kicked; returns -1, or the request that found the queue full. */
static int queue_batch(uint8_t *data, struct slot *slots, int write, int heads[32]) {
    enum { N = 32, SECS = 8 };
    const uint64_t base = 512;
    for (int i = 0; i < N; i++) {
        struct slot *s = &slots[i];
        s->hdr = (struct blk_hdr){ write ? T_OUT : T_IN, 0, base + (uint64_t)i * SECS };
        s->status = 0xff;
        struct vbuf b[3] = { { &s->hdr, sizeof s->hdr }, { data + i * SECS * SECTOR, SECS * SECTOR }, { &s->status, 1 } };
        heads[i] = vq_add(&q, b, write ? 2 : 1, write ? 1 : 2);
        if (heads[i] < 0) return i;
    }
    return -1;
}

/* 32 x 4 KiB requests in flight with one kick, completed by interrupts. */
static void in_flight(uint8_t *data, int write) {
    enum { N = 32, SECS = 8 };
    const uint64_t base = 512;
    static struct slot *slots;
    if (!slots) slots = rt_alloc_pages(2);
    int heads[N];
    if (write) fill(data, base, N * SECS, 1); else memset(data, 0xee, N * SECS * SECTOR);
    uint32_t seen = vmsi_count[VEC - VMSI_BASE];
    int full = queue_batch(data, slots, write, heads);
    if (full >= 0) { rt_fail(nm(write ? "inflight-write" : "inflight-read"), "queue full at request %d", full); return; }
    vq_kick(&q);
    int done = 0, bad = 0, order_differs = 0;
    uint64_t end = rt_deadline(20000);
    while (done < N && !rt_expired(end)) {
        if (!vq_pending_used(&q)) { vmsi_wait(VEC, vmsi_count[VEC - VMSI_BASE], 50); continue; }
        uint32_t len;
        int id = vq_get_used(&q, &len);
        int i = 0;
        while (i < N && heads[i] != id) i++;
        if (i == N) { bad++; continue; }
        if (i != done) order_differs = 1;
        if (slots[i].status != S_OK) bad++;
        done++;
    }
    /* The interrupt follows the used-ring update, so polling can see every completion first: give it time. */
    if (q.msix != VIRTIO_MSI_NO_VECTOR && vmsi_count[VEC - VMSI_BASE] == seen) vmsi_wait(VEC, seen, 2000);
    uint32_t irqs = vmsi_count[VEC - VMSI_BASE] - seen;
    const char *check = nm(write ? "inflight-write" : "inflight-read");
    if (done != N || bad) { rt_fail(check, "%d of %d completed, %d bad", done, N, bad); return; }
    long mis = write ? -1 : verify(data, base, N * SECS, 1);
    rt_check(check, mis < 0, "%d x 4 KiB %s in flight at once, 1 kick, %u interrupts%s%s", N,
             write ? "writes" : "reads", irqs, order_differs ? ", completed out of order" : "",
             mis < 0 ? "" : ", data mismatch");
    if (!irqs && q.msix != VIRTIO_MSI_NO_VECTOR) rt_fail(nm("inflight-interrupt"), "no MSI-X interrupt for %d completions", N);
}

/* EVENT_IDX: with used_event behind the whole batch the device must not interrupt; with it at
 * the last request of a batch it must interrupt (about) once. */
static void event_idx_check(uint8_t *buf) {
    if (!q.event_idx) { rt_okf(nm("event-idx"), "not negotiated (device %s it)", (dev.device_features >> VIRTIO_F_EVENT_IDX) & 1 ? "offers" : "does not offer"); return; }
    enum { N = 8 };
    static struct slot *slots;
    if (!slots) slots = rt_alloc_pages(1);
    for (int round = 0; round < 2; round++) {
        uint32_t seen = vmsi_count[VEC - VMSI_BASE];
        if (round == 0) vq_disable_interrupts(&q);      /* used_event = last_used - 1: far away */
        else { q.want_irq = 0; *q.used_event = (uint16_t)(q.last_used + N - 1); }
        rt_mb();
        for (int i = 0; i < N; i++) {
            slots[i].hdr = (struct blk_hdr){ T_IN, 0, (uint64_t)i };
            slots[i].status = 0xff;
            struct vbuf b[3] = { { &slots[i].hdr, 16 }, { buf + i * SECTOR, SECTOR }, { &slots[i].status, 1 } };
            vq_add(&q, b, 1, 2);
        }
        vq_kick(&q);
        int done = 0;
        uint64_t end = rt_deadline(10000);
        while (done < N && !rt_expired(end)) { if (vq_get_used(&q, 0) >= 0) done++; else cpu_pause(); }
        /* Give a late interrupt time to arrive (the count is only read, never a timing assertion). */
        vmsi_wait(VEC, seen + (round ? 1 : 0), 200);
        uint32_t irqs = vmsi_count[VEC - VMSI_BASE] - seen;
        if (round == 0)
            rt_check(nm("event-idx-suppressed"), done == N && irqs == 0,
                     "%d of %d completed with used_event behind them: %u interrupts (expected 0)", done, N, irqs);
        else
            rt_check(nm("event-idx-interrupt"), done == N && irqs >= 1 && irqs <= 2,
                     "%d of %d completed with used_event at the last: %u interrupts (expected 1)", done, N, irqs);
    }
    vq_enable_interrupts(&q);
}

static void check_disk(int index, int expect_ro) {
    uint64_t cap = vdev_cfg64(&dev, 0);
    int ro = vdev_has(&dev, VIRTIO_BLK_F_RO);
    rt_check(nm("config"), cap >= MIN_SECTORS, "capacity %lu sectors (need >= %u), blk_size %u, seg_max %u, %s",
             cap, MIN_SECTORS, vdev_has(&dev, VIRTIO_BLK_F_BLK_SIZE) ? vdev_cfg32(&dev, 20) : 512,
             vdev_has(&dev, VIRTIO_BLK_F_SEG_MAX) ? vdev_cfg32(&dev, 12) : 0, ro ? "read-only" : "writable");
    if (expect_ro >= 0) rt_check(nm("read-only-flag"), ro == expect_ro, "VIRTIO_BLK_F_RO %s (expected %s)", ro ? "set" : "clear", expect_ro ? "set" : "clear");
    if (cap < MIN_SECTORS) return;
    uint8_t *buf = rt_alloc_pages_nozero(64 * SECTOR / 4096 + 1);
    uint8_t *big = rt_alloc_pages_nozero(32 * 8 * SECTOR / 4096);
    if (!buf || !big) { rt_fail(nm("memory"), "out of guest memory"); return; }

    /* GET_ID */
    memset(buf, 0, 64);
    uint32_t ulen = 0;
    int st = blk_sync(T_GET_ID, 0, buf, 20, 0, &ulen);
    char id[21];
    memcpy(id, buf, 20);
    id[20] = 0;
    if (st == S_OK) {
        rt_printf("BLKID %d %s\n", index, id);
        char want[32];
        if (index == 0 && rt_cmdline_str("id", want, sizeof want) >= 0)
            rt_check(nm("get-id"), !strncmp(id, want, 20), "device id \"%s\", expected \"%s\"", id, want);
        else
            rt_okf(nm("get-id"), "device id \"%s\"", id);
    } else {
        expect_status("get-id", st, S_OK, "GET_ID");
    }

    read_check("read", buf, 0, 64, 0, 0);
    if (vdev_has(&dev, VIRTIO_F_INDIRECT_DESC)) read_check("read-indirect", buf, 8, 8, 0, 1);
    st = blk_sync(T_IN, cap, buf, SECTOR, 0, 0);
    expect_status("read-past-end", st, S_IOERR, "read of sector = capacity");
    st = blk_sync(T_IN, cap - 1, buf, 2 * SECTOR, 0, 0);
    expect_status("read-across-end", st, S_IOERR, "2-sector read of the last sector");

    if (ro) {
        fill(buf, 64, 8, 1);
        st = blk_sync(T_OUT, 64, buf, 8 * SECTOR, 0, 0);
        expect_status("write-refused", st, S_IOERR, "write to a read-only disk");
        read_check("read-only-unchanged", buf, 64, 8, 0, 0);
    } else {
        fill(buf, 64, 8, 1);
        st = blk_sync(T_OUT, 64, buf, 8 * SECTOR, 0, 0);
        if (expect_status("write", st, S_OK, "write of sectors 64-71")) read_check("write-readback", buf, 64, 8, 1, 0);
        if (vdev_has(&dev, VIRTIO_F_INDIRECT_DESC)) {
            fill(buf, 80, 8, 1);
            st = blk_sync(T_OUT, 80, buf, 8 * SECTOR, 1, 0);
            if (expect_status("write-indirect", st, S_OK, "indirect write of sectors 80-87"))
                read_check("write-indirect-readback", buf, 80, 8, 1, 1);
        }
        fill(buf, 0, 1, 1);
        st = blk_sync(T_OUT, cap, buf, SECTOR, 0, 0);
        expect_status("write-past-end", st, S_IOERR, "write of sector = capacity");
        if (vdev_has(&dev, VIRTIO_BLK_F_FLUSH)) expect_status("flush", blk_sync(T_FLUSH, 0, 0, 0, 0, 0), S_OK, "FLUSH");
        else rt_fail(nm("flush"), "VIRTIO_BLK_F_FLUSH not offered");
        struct blk_seg *seg = (struct blk_seg *)buf;
        if (vdev_has(&dev, VIRTIO_BLK_F_DISCARD)) {
            *seg = (struct blk_seg){ 128, 8, 0 };
            expect_status("discard", blk_sync(T_DISCARD, 0, seg, sizeof *seg, 0, 0), S_OK, "DISCARD of 128-135");
        } else {
            rt_fail(nm("discard"), "VIRTIO_BLK_F_DISCARD not offered by a writable disk");
        }
        if (vdev_has(&dev, VIRTIO_BLK_F_WRITE_ZEROES)) {
            *seg = (struct blk_seg){ 192, 8, 0 };
            st = blk_sync(T_WRITE_ZEROES, 0, seg, sizeof *seg, 0, 0);
            if (expect_status("write-zeroes", st, S_OK, "WRITE_ZEROES of 192-199"))
                read_check("write-zeroes-readback", buf, 192, 8, 2, 0);
        } else {
            rt_fail(nm("write-zeroes"), "VIRTIO_BLK_F_WRITE_ZEROES not offered by a writable disk");
        }
        in_flight(big, 1);
        in_flight(big, 0);
        if (vdev_has(&dev, VIRTIO_BLK_F_FLUSH)) expect_status("flush-final", blk_sync(T_FLUSH, 0, 0, 0, 0, 0), S_OK, "FLUSH");
    }
    event_idx_check(buf);
    if (q.msix != VIRTIO_MSI_NO_VECTOR)
        rt_check(nm("msix-completions"), irq_completions == sync_requests,
                 "%u of %u requests completed with an MSI-X interrupt", irq_completions, sync_requests);
    else
        rt_fail(nm("msix-completions"), "queue has no MSI-X vector");
}

static const char *open_disk(int index, uint64_t wanted) {
    if (vdev_find(VIRTIO_ID_BLOCK, index, &dev)) return "absent";
    const char *e = vdev_map(&dev);
    if (e) return e;
    if (dev.msix_cap && (vdev_msix_set(&dev, 0, apic_id, VEC, 0) || vdev_msix_set(&dev, 1, apic_id, VEC, 0) ||
                         vdev_msix_enable(&dev)))
        return "MSI-X setup failed";
    e = vdev_negotiate(&dev, wanted);
    if (e) return e;
    vdev_set_config_vector(&dev, dev.msix_cap ? 1 : VIRTIO_MSI_NO_VECTOR);
    if (dev.mmio) vmmio_route_irq(&dev, apic_id, VEC);
    e = vq_setup(&dev, &q, 0, 256, dev.msix_cap ? 0 : VIRTIO_MSI_NO_VECTOR);
    if (e) return e;
    vdev_driver_ok(&dev);
    if (vdev_status(&dev) & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED)) return "device status reports an error";
    return 0;
}

/* ---------------------------------------------------------------- bench */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static inline uint64_t xorshift(void) {
    uint64_t x = rng_state;
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    return rng_state = x;
}

/* bench=notify n=N: N writes of the queue's notify register with nothing new in the ring, from ring 3: each is one
 * VM exit that the VMM's ioeventfd ends in the host kernel (the device thread wakes and finds no work). */
static void bench_notify(void) {
    uint64_t n = rt_cmdline_uint("n", 100000);
    uint64_t kicks0 = q.notifications;
    rt_printf("BENCH notify start n=%lu\n", n);
    uint64_t t0 = rdtsc();
    for (uint64_t i = 0; i < n; i++) vq_notify(&q);
    uint64_t t1 = rdtsc();
    rt_printf("BENCH notify done ops=%lu bytes=0 tsc=%lu kicks=%lu errors=0\n", n, t1 - t0, q.notifications - kicks0);
    rt_check("bench", q.notifications - kicks0 == n && vdev_status(&dev) == 0x0f, "notify: %lu writes, status %x", n,
             vdev_status(&dev));
}

static void bench(const char *kind) {
    if (!strncmp(kind, "notify", 7)) { bench_notify(); return; }
    int write = !strncmp(kind, "seqwrite", 9) || !strncmp(kind, "randwrite", 10);
    int rnd = !strncmp(kind, "rand", 4);
    if (!write && strncmp(kind, "seqread", 8) && strncmp(kind, "randread", 9)) {
        rt_fail("bench", "unknown bench=%s (seqread, seqwrite, randread, randwrite)", kind);
        return;
    }
    uint64_t size = rt_cmdline_uint("size", rnd ? 4096 : 1 << 20);
    uint64_t qd = rt_cmdline_uint("qd", 8);
    uint64_t n = rt_cmdline_uint("n", rnd ? 20000 : 1024);
    uint64_t cap = vdev_cfg64(&dev, 0);
    uint64_t span = rt_cmdline_uint("span", cap);
    uint64_t secs = size / SECTOR;
    if (!secs || size % SECTOR || size > (4u << 20) || span > cap || span < secs || !qd || qd * 3 > q.size) {
        rt_fail("bench", "bad parameters size=%lu qd=%lu span=%lu (capacity %lu, queue %u)", size, qd, span, cap, q.size);
        return;
    }
    uint64_t blocks = span / secs;
    struct slot *slots = rt_alloc_pages((qd * sizeof(struct slot) + 4095) / 4096);
    uint8_t *data = rt_alloc_pages_nozero((qd * size + 4095) / 4096);
    if (!slots || !data) { rt_fail("bench", "out of guest memory for qd=%lu x %lu bytes", qd, size); return; }
    int16_t slot_of[VQ_MAX_SIZE];
    vq_disable_interrupts(&q);
    uint64_t next_block = 0, submitted = 0, done = 0, errors = 0;
    uint64_t kicks0 = q.notifications;
    rt_printf("BENCH %s start size=%lu qd=%lu n=%lu span=%lu\n", kind, size, qd, n, span);
    uint64_t t0 = rdtsc();
#define SUBMIT(i) do { \
        struct slot *s_ = &slots[i]; \
        uint64_t blk_ = rnd ? xorshift() % blocks : next_block; \
        if (!rnd && ++next_block == blocks) next_block = 0; \
        s_->hdr.type = write ? T_OUT : T_IN; s_->hdr.reserved = 0; s_->hdr.sector = blk_ * secs; s_->status = 0xff; \
        struct vbuf b_[3] = { { &s_->hdr, 16 }, { data + (i) * size, (uint32_t)size }, { &s_->status, 1 } }; \
        int h_ = vq_add(&q, b_, write ? 2 : 1, write ? 1 : 2); \
        slot_of[h_] = (int16_t)(i); submitted++; \
    } while (0)
    for (uint64_t i = 0; i < qd && submitted < n; i++) SUBMIT(i);
    vq_kick(&q);
    uint64_t idle = 0, idle_deadline = rt_deadline(60000);
    while (done < n) {
        int got = 0, id;
        uint32_t len;
        while ((id = vq_get_used(&q, &len)) >= 0) {
            int i = slot_of[id];
            if (slots[i].status != S_OK) errors++;
            done++;
            got++;
            if (submitted < n) SUBMIT(i);
        }
        if (id == -2) { errors++; break; }
        if (got) { vq_kick(&q); idle = 0; }
        else if ((++idle & 1023) == 0 && rt_expired(idle_deadline)) break;   /* no progress for 60 s */
        else cpu_pause();
        if (!idle) idle_deadline = rt_deadline(60000);
    }
#undef SUBMIT
    uint64_t t1 = rdtsc();
    rt_printf("BENCH %s done ops=%lu bytes=%lu tsc=%lu kicks=%lu errors=%lu\n", kind, done, done * size, t1 - t0,
              q.notifications - kicks0, errors);
    rt_check("bench", done == n && !errors, "%s: %lu of %lu requests of %lu bytes at depth %lu, %lu errors", kind, done,
             n, size, qd, errors);
    vq_enable_interrupts(&q);
}

/* ---------------------------------------------------------------- fill */
static void fill_disk(void) {
    enum { SECS = 128 };
    uint8_t *buf = rt_alloc_pages_nozero(SECS * SECTOR / 4096);
    if (!buf) { rt_fail("fill", "out of guest memory"); return; }
    uint64_t cap = vdev_cfg64(&dev, 0);
    uint64_t sector = 0;
    int st = S_OK;
    while (sector < cap) {
        uint32_t n = (uint32_t)(cap - sector < SECS ? cap - sector : SECS);
        fill(buf, sector, n, 1);
        st = blk_sync(T_OUT, sector, buf, n * SECTOR, 0, 0);
        if (st != S_OK) break;
        sector += n;
    }
    rt_printf("FILL wrote %lu sectors, then %s at sector %lu of %lu\n", sector, st == S_OK ? "the end" : status_name(st),
              sector, cap);
    rt_check("fill-ioerr", st == S_IOERR && sector < cap, "a write at sector %lu of %lu ended with %s", sector, cap,
             status_name(st));
    if (sector >= SECS) {
        read_check("fill-read-after", buf, 0, SECS, 1, 0);
        fill(buf, 0, 1, 1);
        expect_status("fill-rewrite", blk_sync(T_OUT, 0, buf, SECTOR, 0, 0), S_OK, "rewrite of sector 0");
    } else {
        rt_fail("fill-read-after", "only %lu sectors were written before the failure", sector);
    }
    int fst = blk_sync(T_FLUSH, 0, 0, 0, 0, 0);
    rt_check("fill-flush-reported", fst == S_OK || fst == S_IOERR, "FLUSH after the failure: %s", status_name(fst));
}

/* ---------------------------------------------------------------- stream */
static inline uint64_t pat_s(uint64_t r, uint64_t s, uint64_t k) { return (r << 32) | (s << 8) | k; }

/* Polls (iterations, not time) until `q` has `n` used entries; 0 on success. */
static int stream_wait_used(uint16_t n) {
    for (uint64_t spins = 0; vq_pending_used(&q) < n; spins++) {
        if (spins > 4000000000ull) return -1;
        cpu_pause();
    }
    return 0;
}

/* One half round: 32 requests in flight (writes of S(r) or reads), all completed OK. */
static int stream_batch(uint64_t r, uint8_t *data, struct slot *slots, int write) {
    enum { N = 32, SECS = 8 };
    int heads[N];
    uint32_t seen = vmsi_count[VEC - VMSI_BASE];
    int full = queue_batch(data, slots, write, heads);
    if (full >= 0) { rt_fail("stream", "round %lu: queue full at request %d", r, full); return -1; }
    vq_enable_interrupts(&q);
    vq_kick(&q);
    if (stream_wait_used(N)) { rt_fail("stream", "round %lu: %u of %d %s completed", r, vq_pending_used(&q), N, write ? "writes" : "reads"); return -1; }
    /* The interrupt is awaited before the completions are taken: taking them moves used_event past
     * the batch, and a device that reads used_event after that rightly sends none (EVENT_IDX). */
    for (uint64_t spins = 0; vmsi_count[VEC - VMSI_BASE] == seen; spins++) {
        if (spins > 4000000000ull) { rt_fail("stream", "round %lu: no MSI-X interrupt for %d completions", r, N); return -1; }
        cpu_pause();
    }
    for (int done = 0; done < N; done++) {
        uint32_t len;
        int id = vq_get_used(&q, &len), i = 0;
        while (i < N && heads[i] != id) i++;
        if (i == N) { rt_fail("stream", "round %lu: used id %d is no request of this round", r, id); return -1; }
        if (slots[i].status != S_OK) { rt_fail("stream", "round %lu: request %d status %d (%s)", r, i, slots[i].status, status_name(slots[i].status)); return -1; }
    }
    return 0;
}

static void stream(void) {
    enum { N = 32, SECS = 8 };
    const uint64_t base = 512;
    uint8_t *data = rt_alloc_pages_nozero(N * SECS * SECTOR / 4096);
    struct slot *slots = rt_alloc_pages(2);
    if (!data || !slots) { rt_fail("stream", "out of guest memory"); return; }
    uint64_t rounds = rt_cmdline_uint("rounds", 0);
    for (uint64_t r = 1; !rounds || r <= rounds; r++) {
        uint64_t *w = (uint64_t *)data;
        for (uint64_t i = 0; i < N * SECS; i++)
            for (uint64_t k = 0; k < 64; k++) w[i * 64 + k] = pat_s(r, base + i, k);
        if (stream_batch(r, data, slots, 1)) return;
        memset(data, 0xee, N * SECS * SECTOR);
        if (stream_batch(r, data, slots, 0)) return;
        for (uint64_t i = 0; i < N * SECS; i++)
            for (uint64_t k = 0; k < 64; k++)
                if (w[i * 64 + k] != pat_s(r, base + i, k)) {
                    rt_fail("stream", "round %lu: sector %lu word %lu reads %lx", r, base + i, k, w[i * 64 + k]);
                    return;
                }
        rt_printf("STREAM round %lu ok\n", r);
    }
    rt_okf("stream", "%lu rounds of 32 writes and 32 reads in flight", rounds);
}

/* ---------------------------------------------------------------- BAR move */
static void move_bar(void) {
    uint8_t *buf = rt_alloc_pages(2);
    if (!buf) { rt_fail("movebar", "out of guest memory"); return; }
    read_check("before-move", buf, 0, 8, 0, 0);
    int bar = -1;
    for (int i = 0; i < 6; i++)
        if (dev.bar[i] && dev.notify >= dev.bar[i] && dev.notify < dev.bar[i] + dev.bar_size[i]) bar = i;
    if (!rt_check("notify-bar", bar >= 0, "notification structure at %lx in BAR %d", dev.notify, bar)) return;
    uint64_t old = dev.bar[bar], to = 0xd8000000ull;
    uint64_t old_notify = q.notify_addr;
    const char *e = vdev_move_bar(&dev, bar, to);
    if (!rt_check("moved", !e, "BAR %d %lx -> %lx: %s", bar, old, to, e ? e : "ok")) return;
    q.notify_addr = q.notify_addr - old + to;
    read_check("moved-read", buf, 8, 8, 0, 0);
    /* A request kicked at the old address must not start. */
    static struct slot *s;
    if (!s) s = rt_alloc_pages(1);
    s->hdr = (struct blk_hdr){ T_IN, 0, 16 };
    s->status = 0xff;
    struct vbuf b[3] = { { &s->hdr, sizeof s->hdr }, { buf, SECTOR }, { &s->status, 1 } };
    int head = vq_add(&q, b, 1, 2);
    rt_wmb();
    q.avail->idx = q.avail_idx;
    q.kicked_idx = q.avail_idx;
    rt_mb();
    mmio_write16(old_notify, q.index);
    int started = !vq_wait_used(&q, 300);
    rt_check("old-address-dead", !started, "a kick at the old notify address %lx %s", old_notify,
             started ? "completed a request" : "did nothing");
    /* The same request, kicked where the device is now. */
    mmio_write16(q.notify_addr, q.index);
    uint32_t len = 0;
    int ok = !vq_wait_used(&q, 5000) && vq_get_used(&q, &len) == head && s->status == S_OK;
    rt_check("kick-at-new-address", ok, "the pending request completed after a kick at %lx (status %u)", q.notify_addr,
             s->status);
    e = vdev_move_bar(&dev, bar, old);
    if (!rt_check("moved-back", !e, "BAR %d back to %lx: %s", bar, old, e ? e : "ok")) return;
    q.notify_addr = q.notify_addr - to + old;
    read_check("moved-back-read", buf, 24, 8, 0, 0);
}

/* ---------------------------------------------------------------- big memory */
static void big_memory(void) {
    const struct mb_info *mb = rt_mbi;
    uint64_t low_end = 0, high_start = 0, high_end = 0;
    if (mb && (mb->flags & (1u << 6))) {
        for (uint32_t off = 0; off + 24 <= mb->mmap_length;) {
            const uint8_t *e = (const uint8_t *)(uintptr_t)(mb->mmap_addr + off);
            uint64_t base = *(const uint64_t *)(e + 4), len = *(const uint64_t *)(e + 12);
            if (*(const uint32_t *)(e + 20) == 1) {
                if (base <= 0x100000 && base + len > 0x100000) low_end = base + len;
                if (base >= (1ull << 32) && !high_start) { high_start = base; high_end = base + len; }
            }
            off += *(const uint32_t *)e + 4;
        }
    }
    if (!rt_check("two-regions", low_end == 0xc0000000ull && high_start == (1ull << 32) && high_end > high_start,
                  "usable RAM to %lx, then %lx-%lx", low_end, high_start, high_end))
        return;
    volatile uint64_t *below = (volatile uint64_t *)(uintptr_t)(low_end - 8);
    volatile uint64_t *first = (volatile uint64_t *)(uintptr_t)high_start;
    volatile uint64_t *last = (volatile uint64_t *)(uintptr_t)(high_end - 8);
    *below = 0x1111222233334444ull;
    *first = 0x5555666677778888ull;
    *last = 0x9999aaaabbbbccccull;
    rt_check("cpu-access", *below == 0x1111222233334444ull && *first == 0x5555666677778888ull &&
                               *last == 0x9999aaaabbbbccccull, "%lx %lx %lx", *below, *first, *last);
    uint8_t *high = (uint8_t *)(uintptr_t)(high_start + (64ull << 20));
    read_check("dma-high", high, 0, 8, 0, 0);
    uint8_t *top = (uint8_t *)(uintptr_t)(high_end - 4096);
    read_check("dma-top", top, 8, 8, 0, 0);
    /* 2 KiB below the hole and 2 KiB into it. */
    uint8_t *straddle = (uint8_t *)(uintptr_t)(low_end - 2048);
    memset(straddle, 0xab, 2048);
    int st = blk_sync(T_IN, 0, straddle, 4096, 0, 0);
    int untouched = 1;
    for (int i = 0; i < 2048; i++) if (straddle[i] != 0xab) untouched = 0;
    rt_check("dma-straddle-refused", st != S_OK && untouched, "a read into %lx+4096 across the hole: status %d (%s), RAM part %s",
             (uint64_t)(uintptr_t)straddle, st, status_name(st), untouched ? "untouched" : "changed");
}

static long run(void *arg) {
    (void)arg;
    uint64_t wanted = VIRTIO_BIT(VIRTIO_BLK_F_SIZE_MAX) | VIRTIO_BIT(VIRTIO_BLK_F_SEG_MAX) | VIRTIO_BIT(VIRTIO_BLK_F_RO) |
                      VIRTIO_BIT(VIRTIO_BLK_F_BLK_SIZE) | VIRTIO_BIT(VIRTIO_BLK_F_FLUSH) |
                      VIRTIO_BIT(VIRTIO_BLK_F_DISCARD) | VIRTIO_BIT(VIRTIO_BLK_F_WRITE_ZEROES);
    if (!rt_cmdline_has("noindirect")) wanted |= VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC);
    if (!rt_cmdline_has("noevent")) wanted |= VIRTIO_BIT(VIRTIO_F_EVENT_IDX);
    if (vmmio_setup_from_cmdline()) return 0;
    char kind[16];
    if (rt_cmdline_str("bench", kind, sizeof kind) >= 0) {
        const char *e = open_disk(0, wanted);
        if (!rt_check("blk0-setup", !e, "%s: 00:%02x.%u features %lx", e ? e : "ready", dev.slot, dev.fn, dev.features))
            return 0;
        bench(kind);
        vdev_reset(&dev);
        return 0;
    }
    /* The single-disk modes: each runs on disk 0 and ends the program. */
    static const struct { const char *word; void (*fn)(void); } modes[] = {
        { "bigmem", big_memory }, { "movebar", move_bar }, { "fill", fill_disk }, { "stream", stream },
    };
    for (unsigned m = 0; m < sizeof modes / sizeof modes[0]; m++) {
        if (!rt_cmdline_has(modes[m].word)) continue;
        prefix[0] = 0;
        const char *e = open_disk(0, wanted);
        if (rt_check("blk0-setup", !e, "%s", e ? e : "ready")) modes[m].fn();
        vdev_reset(&dev);
        return 0;
    }
    int disks = 0;
    uint64_t ro_index = rt_cmdline_uint("readonly", 99);
    for (int i = 0; i < 8; i++) {
        prefix[0] = 'b'; prefix[1] = 'l'; prefix[2] = 'k'; prefix[3] = (char)('0' + i); prefix[4] = '-'; prefix[5] = 0;
        struct vdev probe;
        if (vdev_find(VIRTIO_ID_BLOCK, i, &probe)) break;
        disks++;
        sync_requests = irq_completions = 0;
        const char *e = open_disk(i, wanted);
        if (!rt_check(nm("setup"), !e, "%s: 00:%02x.%u device %04x, features %lx of %lx, queue %u, msix %s", e ? e : "ready",
                      dev.slot, dev.fn, dev.device_id, dev.features, dev.device_features, q.size,
                      q.msix == VIRTIO_MSI_NO_VECTOR ? "none" : "vector 0"))
            continue;
        check_disk(i, ro_index == 99 ? -1 : (uint64_t)i == ro_index);
        vdev_reset(&dev);
    }
    uint64_t want = rt_cmdline_uint("disks", 0);
    rt_check("disks", disks > 0 && (!want || (uint64_t)disks == want), "%d virtio-blk devices (expected %lu)", disks,
             want);
    return 0;
}

int main(void) { return vdrv_main(run, VEC, &apic_id); }
