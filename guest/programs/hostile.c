/* hostile: a malicious virtio-blk driver. For each case it resets the device, sets up queue 0
 * (16 entries, INDIRECT_DESC negotiated when offered, no interrupts), publishes one malformed
 * request, and classifies what the device did within wait=MS (default 1000):
 *   clean:  IOERR/UNSUPP in the status byte, a used entry of length 0 without a status, or
 *           NEEDS_RESET in the device status: each of them tells the driver;
 *   broken: the request completed with status OK, the device wrote into a device-readable
 *           (read-only) buffer, or nothing happened within the wait (a dropped request hangs a
 *           real driver, and nothing shows that the device saw it).
 * After every case the device is reset and a valid read must succeed (`recovered`), so the VMM
 * kept running and the device works again. Runs as multiboot (`.elf`) or as a flat long-mode
 * binary (`.bin`, no command line then: RAM assumed 128 MiB for the straddling case).
 * Output: `ok hostile-<case>: <outcome>; recovered` or `FAIL hostile-<case>: …`, and
 * `HOSTILE <case> <outcome>` lines. Command line: wait=MS, only=CASE. Disk: any content, at least
 * 16 sectors. */
#include "virtio.h"

const char rt_program_name[] = "hostile";

#define QSIZE 16
#define T_IN 0
#define T_OUT 1

struct blk_hdr { uint32_t type, reserved; uint64_t sector; };

static struct vdev d;
static struct vq q;
static uint8_t *page;          /* header at 0, status at 0x100, data at 0x200, indirect tables at 0x800 and 0x1000 */
static uint64_t ram_top;
static uint32_t wait_ms;

#define HDR (page)
#define STATUS (page + 0x100)
#define DATA (page + 0x200)
#define ITABLE ((volatile struct vring_desc *)(page + 0x1000))
#define ITABLE2 ((volatile struct vring_desc *)(page + 0x2000))
#define A(p) ((uint64_t)(uintptr_t)(p))

static const char *fresh(void) {
    if (vdev_reset(&d)) return "device does not reset";
    const char *e = vdev_negotiate(&d, VIRTIO_BIT(VIRTIO_F_INDIRECT_DESC));
    if (!e) e = vq_setup(&d, &q, 0, QSIZE, VIRTIO_MSI_NO_VECTOR);
    if (e) return e;
    vq_disable_interrupts(&q);
    vdev_driver_ok(&d);
    struct blk_hdr *h = (struct blk_hdr *)HDR;
    *h = (struct blk_hdr){ T_IN, 0, 1 };
    *STATUS = 0xff;
    memset(DATA, 0x5a, 512);
    return 0;
}

static void D(volatile struct vring_desc *t, int i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next) {
    t[i].addr = addr;
    t[i].len = len;
    t[i].flags = flags;
    t[i].next = next;
}

/* Publishes `count` ring entries (all `head`) and moves avail idx by `advance`. */
static void publish(uint16_t head, uint16_t count, uint16_t advance) {
    for (uint16_t i = 0; i < count; i++) q.avail->ring[(q.avail_idx + i) % q.size] = head;
    q.avail_idx = (uint16_t)(q.avail_idx + advance);
    vq_notify(&q);
}

/* A valid read of sector 1 through descriptors 0-2. */
static void valid_chain(void) {
    D(q.desc, 0, A(HDR), 16, VRING_DESC_F_NEXT, 1);
    D(q.desc, 1, A(DATA), 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2);
    D(q.desc, 2, A(STATUS), 1, VRING_DESC_F_WRITE, 0);
}

enum outcome { O_ACCEPTED, O_IOERR, O_UNSUPP, O_OTHER_STATUS, O_DROPPED, O_NEEDS_RESET, O_USED_NO_STATUS };
static const char *outcome_name[] = { "accepted (status OK)", "IOERR", "UNSUPP", "unknown status", "no used entry",
                                      "NEEDS_RESET", "used entry without a status" };

static enum outcome observe(uint8_t status_before) {
    uint64_t end = rt_deadline(wait_ms);
    while (!rt_expired(end)) {
        if (vq_pending_used(&q)) break;
        if (vdev_status(&d) & VIRTIO_STATUS_NEEDS_RESET) return O_NEEDS_RESET;
        cpu_pause();
    }
    if (!vq_pending_used(&q)) return (vdev_status(&d) & VIRTIO_STATUS_NEEDS_RESET) ? O_NEEDS_RESET : O_DROPPED;
    uint8_t s = *STATUS;
    if (s == status_before) return O_USED_NO_STATUS;
    return s == 0 ? O_ACCEPTED : s == 1 ? O_IOERR : s == 2 ? O_UNSUPP : O_OTHER_STATUS;
}

static int recovered(char *why) {
    const char *e = fresh();
    if (e) { memcpy(why, e, strlen(e) + 1); return 0; }
    valid_chain();
    publish(0, 1, 1);
    if (vq_wait_used(&q, 5000)) { memcpy(why, "valid read: no completion", 26); return 0; }
    if (*STATUS != 0) { memcpy(why, "valid read: status not OK", 26); return 0; }
    return 1;
}

/* Runs one case: build() sets up the queue contents and publishes. ro_check: a device-readable
 * buffer that must stay unchanged (NULL for none). */
static void run_case(const char *name, void (*build)(void), volatile uint8_t *ro_check) {
    char only[32];
    if (rt_cmdline_str("only", only, sizeof only) > 0 && strncmp(only, name, sizeof only)) return;
    const char *e = fresh();
    if (e) { rt_fail(name, "setup: %s", e); return; }
    uint8_t ro_before = ro_check ? *ro_check : 0;
    build();
    enum outcome o = observe(0xff);
    int wrote_ro = ro_check && *ro_check != ro_before;
    int clean = (o == O_IOERR || o == O_UNSUPP || o == O_NEEDS_RESET || o == O_USED_NO_STATUS) && !wrote_ro;
    char why[40];
    int rec = recovered(why);
    rt_printf("HOSTILE %s %s%s\n", name, outcome_name[o], wrote_ro ? " wrote-read-only-buffer" : "");
    char check[48];
    size_t n = strlen(name);
    memcpy(check, "hostile-", 8);
    memcpy(check + 8, name, n + 1);
    if (clean && rec) rt_okf(check, "%s; recovered after reset", outcome_name[o]);
    else rt_fail(check, "%s%s; %s", outcome_name[o], wrote_ro ? ", the device wrote into a read-only buffer" : "",
                 rec ? "recovered after reset" : why);
}

/* ---------------------------------------------------------------- cases */
static void c_loop(void) {                   /* hdr -> data -> status -> hdr ... */
    valid_chain();
    q.desc[2].flags |= VRING_DESC_F_NEXT;
    q.desc[2].next = 0;
    publish(0, 1, 1);
}
static void c_self_loop(void) {
    D(q.desc, 0, A(HDR), 16, VRING_DESC_F_NEXT, 0);
    publish(0, 1, 1);
}
static void c_full_ring_loop(void) {         /* every descriptor chained, the last back to the first */
    D(q.desc, 0, A(HDR), 16, VRING_DESC_F_NEXT, 1);
    for (int i = 1; i < QSIZE; i++) D(q.desc, i, A(DATA), 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, (uint16_t)((i + 1) % QSIZE));
    publish(0, 1, 1);
}
static void c_longer_than_queue(void) {      /* an indirect chain of 2 x QSIZE + 2 valid entries */
    int n = 2 * QSIZE + 2;
    D(ITABLE, 0, A(HDR), 16, VRING_DESC_F_NEXT, 1);
    for (int i = 1; i < n - 1; i++) D(ITABLE, i, A(DATA), 16, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, (uint16_t)(i + 1));
    D(ITABLE, n - 1, A(STATUS), 1, VRING_DESC_F_WRITE, 0);
    D(q.desc, 0, A(ITABLE), (uint32_t)(16 * n), VRING_DESC_F_INDIRECT, 0);
    publish(0, 1, 1);
}
static void c_indirect_bad_length(void) {
    D(ITABLE, 0, A(HDR), 16, VRING_DESC_F_NEXT, 1);
    D(ITABLE, 1, A(DATA), 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2);
    D(ITABLE, 2, A(STATUS), 1, VRING_DESC_F_WRITE, 0);
    D(q.desc, 0, A(ITABLE), 40, VRING_DESC_F_INDIRECT, 0);           /* 2.5 descriptors */
    publish(0, 1, 1);
}
static void c_indirect_zero_length(void) {
    D(q.desc, 0, A(ITABLE), 0, VRING_DESC_F_INDIRECT, 0);
    publish(0, 1, 1);
}
static void c_indirect_loop(void) {
    D(ITABLE, 0, A(HDR), 16, VRING_DESC_F_NEXT, 1);
    D(ITABLE, 1, A(DATA), 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2);
    D(ITABLE, 2, A(STATUS), 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0);
    D(q.desc, 0, A(ITABLE), 48, VRING_DESC_F_INDIRECT, 0);
    publish(0, 1, 1);
}
static void c_indirect_next_out_of_table(void) {
    D(ITABLE, 0, A(HDR), 16, VRING_DESC_F_NEXT, 7);                   /* the table has 3 entries */
    D(ITABLE, 1, A(DATA), 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2);
    D(ITABLE, 2, A(STATUS), 1, VRING_DESC_F_WRITE, 0);
    D(q.desc, 0, A(ITABLE), 48, VRING_DESC_F_INDIRECT, 0);
    publish(0, 1, 1);
}
static void c_nested_indirect(void) {
    D(ITABLE2, 0, A(HDR), 16, VRING_DESC_F_NEXT, 1);
    D(ITABLE2, 1, A(DATA), 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2);
    D(ITABLE2, 2, A(STATUS), 1, VRING_DESC_F_WRITE, 0);
    D(ITABLE, 0, A(ITABLE2), 48, VRING_DESC_F_INDIRECT, 0);
    D(q.desc, 0, A(ITABLE), 16, VRING_DESC_F_INDIRECT, 0);
    publish(0, 1, 1);
}
static void c_indirect_outside_ram(void) {
    D(q.desc, 0, 0x1000000000ull, 48, VRING_DESC_F_INDIRECT, 0);     /* 64 GiB */
    publish(0, 1, 1);
}
static void c_buffer_outside_ram(void) {
    valid_chain();
    q.desc[1].addr = 0x1000000000ull;                                  /* 64 GiB */
    publish(0, 1, 1);
}
static void c_buffer_straddles_ram_end(void) {
    valid_chain();
    q.desc[1].addr = ram_top - 256;                                    /* 256 bytes in RAM, 256 beyond */
    publish(0, 1, 1);
}
static void c_buffer_in_mmio_hole(void) {
    valid_chain();
    q.desc[1].addr = 0xfec00000ull;                                    /* the IOAPIC, not RAM */
    publish(0, 1, 1);
}
static void c_length_4g(void) {
    valid_chain();
    q.desc[1].len = 0xffffffffu;
    publish(0, 1, 1);
}
static void c_address_wraps(void) {
    valid_chain();
    q.desc[1].addr = 0xffffffffffffff00ull;                            /* addr + len overflows 64 bits */
    publish(0, 1, 1);
}
static void c_header_writable(void) {
    valid_chain();
    q.desc[0].flags |= VRING_DESC_F_WRITE;
    publish(0, 1, 1);
}
static void c_header_short(void) {
    valid_chain();
    q.desc[0].len = 8;
    publish(0, 1, 1);
}
static void c_status_read_only(void) {
    valid_chain();
    q.desc[2].flags = 0;
    publish(0, 1, 1);
}
static void c_status_zero_length(void) {
    valid_chain();
    q.desc[2].len = 0;
    publish(0, 1, 1);
}
static void c_read_into_read_only(void) {    /* a read (IN) whose data buffer is device-readable */
    valid_chain();
    q.desc[1].flags = VRING_DESC_F_NEXT;
    publish(0, 1, 1);
}
static void c_avail_ahead(void) {            /* avail idx QSIZE + 5 ahead of the device */
    valid_chain();
    publish(0, QSIZE, QSIZE + 5);
}
static void c_head_out_of_range(void) {
    valid_chain();
    publish(QSIZE + 3, 1, 1);
}
static void c_next_out_of_range(void) {
    valid_chain();
    q.desc[1].next = 0xffff;
    publish(0, 1, 1);
}

static long run(void *arg) {
    (void)arg;
    wait_ms = (uint32_t)rt_cmdline_uint("wait", 1000);
    ram_top = (rt_mbi && (rt_mbi->flags & 1)) ? (uint64_t)rt_mbi->mem_upper * 1024 + 0x100000 : 128ull << 20;
    int found = vdev_find(VIRTIO_ID_BLOCK, 0, &d);
    if (!rt_check("hostile-found", found == 0, "virtio-blk at 00:%02x.%u", d.slot, d.fn)) return 0;
    const char *e = vdev_map(&d);
    if (!rt_check("hostile-setup", !e, "%s", e ? e : "mapped")) return 0;
    page = rt_alloc_pages(3);
    e = fresh();
    if (!rt_check("hostile-baseline", !e && recovered((char[40]){0}), "%s", e ? e : "a valid read works before the attack"))
        return 0;
    int indirect = vdev_has(&d, VIRTIO_F_INDIRECT_DESC);
    run_case("loop", c_loop, 0);
    run_case("self-loop", c_self_loop, 0);
    run_case("full-ring-loop", c_full_ring_loop, 0);
    if (indirect) {
        run_case("longer-than-queue", c_longer_than_queue, 0);
        run_case("indirect-bad-length", c_indirect_bad_length, 0);
        run_case("indirect-zero-length", c_indirect_zero_length, 0);
        run_case("indirect-loop", c_indirect_loop, 0);
        run_case("indirect-next-out-of-table", c_indirect_next_out_of_table, 0);
        run_case("nested-indirect", c_nested_indirect, 0);
        run_case("indirect-outside-ram", c_indirect_outside_ram, 0);
    } else {
        rt_fail("hostile-indirect", "VIRTIO_F_INDIRECT_DESC not offered: indirect cases not run");
    }
    run_case("buffer-outside-ram", c_buffer_outside_ram, 0);
    run_case("buffer-straddles-ram-end", c_buffer_straddles_ram_end, 0);
    run_case("buffer-in-mmio-hole", c_buffer_in_mmio_hole, 0);
    run_case("length-4g", c_length_4g, 0);
    run_case("address-wraps", c_address_wraps, 0);
    run_case("header-writable", c_header_writable, 0);
    run_case("header-short", c_header_short, 0);
    run_case("status-read-only", c_status_read_only, STATUS);
    run_case("status-zero-length", c_status_zero_length, 0);
    run_case("read-into-read-only", c_read_into_read_only, DATA);
    run_case("avail-ahead", c_avail_ahead, 0);
    run_case("head-out-of-range", c_head_out_of_range, 0);
    run_case("next-out-of-range", c_next_out_of_range, 0);
    char why[40] = "";
    rt_check("hostile-valid-after", recovered(why), "%s", why[0] ? why : "a valid read works after every attack");
    vdev_reset(&d);
    return 0;
}

int main(void) {
    long r = rt_run_user(run, 0, 3);
    if (r == RT_USER_FAULTED)
        rt_fail("ring3", "driver faulted: %s error %lx at rip %lx", rt_exception_name(rt_user_fault_vector),
                (uint64_t)rt_user_fault_error, (uint64_t)rt_user_fault_rip);
    return 0;
}
