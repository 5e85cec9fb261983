/* virtio_mmio: a virtio-mmio (version 2) driver for a virtio-blk and a virtio-rng device that checks the
 * transport itself: how the devices are announced, the register file, the interrupt, and bad driver input.
 * The driver runs in ring 3 (virtio.h, virtio_mmio.c); only the interrupt handler runs in ring 0.
 *
 * Checks:
 *   discovery       the windows from `source=acpi` (default: the DSDT's LNRO0005 devices) or `source=cmdline`
 *                   (virtio_mmio.device=SIZE@BASE:IRQ items; needs the multiboot entry), `devices=N` of them
 *   sources-agree   when both the DSDT and the command line announce devices, the same windows and IRQs
 *   identity        every window: MagicValue "virt", Version 2, VendorID, a DeviceID; prints
 *                   `MMIO <i> base=… size=… irq=… device=…`
 *   read-only       writes to MagicValue, Version, DeviceID, QueueNumMax and InterruptStatus change nothing
 *   widths          8- and 16-bit reads of MagicValue read 0; an 8-bit Status write is ignored
 *   blk-read        sector 0 read (word k of sector s = (s << 8) | k), completed with an interrupt on the
 *                   window's IRQ (routed through the I/O APIC), InterruptStatus bit 0 set, cleared by InterruptACK
 *   blk-write       sector 100 written with W(s,k) = 0x5700000000000000 | (s << 8) | k and read back
 *   rng-read        64 random bytes, not all zero, with an interrupt
 *   bad-queue-size  QueueNum above QueueNumMax: DRIVER_OK gives DEVICE_NEEDS_RESET, InterruptStatus bit 1 and
 *                   an interrupt; after a reset the disk works again
 *   bad-ring        a descriptor table outside RAM (1 TiB): DEVICE_NEEDS_RESET; reset recovers
 *   live-queue      QueueReady 0 and QueueNum writes after DRIVER_OK are ignored (the queue keeps working)
 *   bad-notify      QueueNotify of a queue that does not exist: nothing happens, the disk still works
 * Command line: source=acpi|cmdline, devices=N (default 2). */
#include "virtio.h"

const char rt_program_name[] = "virtio_mmio";

#define VEC 0x41
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1

static uint8_t apic_id;
static struct vdev blk, rng;
static struct vq bq, rq;

struct blk_req { uint32_t type, reserved; uint64_t sector; };

/* One request on the disk: 0 on success with *status, -1 on no completion within 10 s. */
static int blk_io(uint32_t type, uint64_t sector, void *data, uint8_t *status, int *irq) {
    static struct blk_req hdr;
    hdr.type = type; hdr.reserved = 0; hdr.sector = sector;
    *status = 0xff;
    struct vbuf b[3] = { { &hdr, sizeof hdr }, { data, 512 }, { status, 1 } };
    uint32_t seen = vmsi_count[VEC - VMSI_BASE];
    if (type == VIRTIO_BLK_T_IN) { if (vq_add(&bq, b, 1, 2) < 0) return -1; }
    else if (vq_add(&bq, b, 2, 1) < 0) return -1;
    vq_notify(&bq);
    if (vq_wait_used(&bq, 10000)) return -1;
    uint32_t len;
    vq_get_used(&bq, &len);
    *irq = vmsi_wait(VEC, seen, 2000) == 0;
    return 0;
}

static const char *open_blk(void) {
    const char *e = vdev_negotiate(&blk, 0);
    if (e) return e;
    e = vq_setup(&blk, &bq, 0, 16, 0);
    if (e) return e;
    vdev_driver_ok(&blk);
    return vdev_status(&blk) == 0x0f ? 0 : "status is not 0x0f after DRIVER_OK";
}

static int read_sector0_ok(void) {
    static uint64_t buf[64];
    uint8_t st;
    int irq;
    memset(buf, 0, sizeof buf);
    if (blk_io(VIRTIO_BLK_T_IN, 0, buf, &st, &irq) || st) return 0;
    for (int k = 0; k < 64; k++) if (buf[k] != (uint64_t)k) return 0;
    return 1;
}

/* Sets up queue 0 by hand with QueueNum `num` and the descriptor table at `desc`, then DRIVER_OK. */
static uint32_t hostile_setup(uint32_t num, uint64_t desc) {
    uint64_t b = blk.mmio;
    const char *e = vdev_negotiate(&blk, 0);
    if (e) return 0xffffffff;
    static uint8_t ring[3 * 4096] __attribute__((aligned(4096)));
    mmio_write32(b + VMMIO_QUEUE_SEL, 0);
    mmio_write32(b + VMMIO_QUEUE_NUM, num);
    mmio_write32(b + VMMIO_QUEUE_DESC_LOW, (uint32_t)desc);
    mmio_write32(b + VMMIO_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
    uint64_t avail = (uint64_t)(uintptr_t)ring + 4096, used = (uint64_t)(uintptr_t)ring + 8192;
    mmio_write32(b + VMMIO_QUEUE_DRIVER_LOW, (uint32_t)avail);
    mmio_write32(b + VMMIO_QUEUE_DRIVER_HIGH, 0);
    mmio_write32(b + VMMIO_QUEUE_DEVICE_LOW, (uint32_t)used);
    mmio_write32(b + VMMIO_QUEUE_DEVICE_HIGH, 0);
    mmio_write32(b + VMMIO_QUEUE_READY, 1);
    vdev_driver_ok(&blk);
    return mmio_read32(b + VMMIO_STATUS);
}

static long run(void *arg) {
    (void)arg;
    char source[16] = "acpi";
    rt_cmdline_str("source", source, sizeof source);
    int from_cmdline = !strncmp(source, "cmdline", 8);
    struct vmmio_entry acpi[VMMIO_MAX], cmd[VMMIO_MAX];
    const char *why_a = "", *why_c = "";
    int na = vmmio_from_acpi(acpi, VMMIO_MAX, &why_a), nc = vmmio_from_cmdline(cmd, VMMIO_MAX, &why_c);
    int n = from_cmdline ? nc : na;
    uint64_t want = rt_cmdline_uint("devices", 2);
    if (!rt_check("discovery", n >= 0 && (uint64_t)n == want, "%d windows from %s (expected %lu)%s%s", n, source, want,
                  n < 0 ? ": " : "", n < 0 ? (from_cmdline ? why_c : why_a) : ""))
        return 0;
    if (na > 0 && nc > 0) {
        int same = na == nc;
        for (int i = 0; same && i < na; i++)
            same = acpi[i].base == cmd[i].base && acpi[i].size == cmd[i].size && acpi[i].irq == cmd[i].irq;
        rt_check("sources-agree", same, "DSDT %d windows, command line %d", na, nc);
    }
    struct vmmio_entry *list = from_cmdline ? cmd : acpi;
    int ids_ok = 1;
    for (int i = 0; i < n; i++) {
        uint64_t b = list[i].base;
        uint32_t magic = mmio_read32(b + VMMIO_MAGIC), ver = mmio_read32(b + VMMIO_VERSION);
        uint32_t dev = mmio_read32(b + VMMIO_DEVICE_ID), ven = mmio_read32(b + VMMIO_VENDOR_ID);
        rt_printf("MMIO %d base=%lx size=%lx irq=%u device=%u version=%u vendor=%x\n", i, b, list[i].size, list[i].irq,
                  dev, ver, ven);
        if (magic != VMMIO_MAGIC_VALUE || ver != 2 || !dev || list[i].size != 0x1000) ids_ok = 0;
    }
    rt_check("identity", ids_ok, "MagicValue, Version 2, DeviceID and a 4 KiB window on every device");
    vmmio_use(list, n);
    if (!rt_check("blk-found", vdev_find(VIRTIO_ID_BLOCK, 0, &blk) == 0 && !vdev_map(&blk), "virtio-blk window")) return 0;
    if (!rt_check("rng-found", vdev_find(VIRTIO_ID_RNG, 0, &rng) == 0 && !vdev_map(&rng), "virtio-rng window")) return 0;
    uint64_t b = blk.mmio;

    /* Read-only registers and access widths. */
    mmio_write32(b + VMMIO_QUEUE_SEL, 0);
    uint32_t before[5] = { mmio_read32(b + VMMIO_MAGIC), mmio_read32(b + VMMIO_VERSION), mmio_read32(b + VMMIO_DEVICE_ID),
                           mmio_read32(b + VMMIO_QUEUE_NUM_MAX), mmio_read32(b + VMMIO_INTERRUPT_STATUS) };
    static const uint32_t ro[5] = { VMMIO_MAGIC, VMMIO_VERSION, VMMIO_DEVICE_ID, VMMIO_QUEUE_NUM_MAX, VMMIO_INTERRUPT_STATUS };
    int unchanged = 1;
    for (int i = 0; i < 5; i++) { mmio_write32(b + ro[i], 0x12345677); if (mmio_read32(b + ro[i]) != before[i]) unchanged = 0; }
    rt_check("read-only", unchanged, "QueueNumMax %u", before[3]);
    uint8_t m8 = mmio_read8(b + VMMIO_MAGIC);
    uint16_t m16 = mmio_read16(b + VMMIO_MAGIC);
    vdev_reset(&blk);
    mmio_write8(b + VMMIO_STATUS, VIRTIO_STATUS_ACKNOWLEDGE);
    rt_check("widths", m8 == 0 && m16 == 0 && mmio_read32(b + VMMIO_STATUS) == 0, "8-bit %x, 16-bit %x, status after an 8-bit write %x",
             m8, m16, mmio_read32(b + VMMIO_STATUS));

    /* The disk and its interrupt. */
    vmmio_route_irq(&blk, apic_id, VEC);
    const char *e = open_blk();
    if (!rt_check("blk-setup", !e, "%s: irq %u, queue %u", e ? e : "ready", blk.mmio_irq, bq.size)) return 0;
    static uint64_t buf[64];
    uint8_t st;
    int irq = 0;
    int r = blk_io(VIRTIO_BLK_T_IN, 0, buf, &st, &irq);
    int pattern = 1;
    for (int k = 0; k < 64; k++) if (buf[k] != (uint64_t)k) pattern = 0;
    uint32_t isr = mmio_read32(b + VMMIO_INTERRUPT_STATUS);
    mmio_write32(b + VMMIO_INTERRUPT_ACK, isr);
    uint32_t isr_after = mmio_read32(b + VMMIO_INTERRUPT_STATUS);
    rt_check("blk-read", !r && !st && pattern && irq && (isr & 1) && !isr_after,
             "status %u, pattern %s, interrupt %s, InterruptStatus %x then %x after ACK", st, pattern ? "ok" : "wrong",
             irq ? "yes" : "no", isr, isr_after);
    for (int k = 0; k < 64; k++) buf[k] = 0x5700000000000000ull | (100ull << 8) | (uint64_t)k;
    int w = blk_io(VIRTIO_BLK_T_OUT, 100, buf, &st, &irq);
    memset(buf, 0, sizeof buf);
    int rb = w || st ? -1 : blk_io(VIRTIO_BLK_T_IN, 100, buf, &st, &irq);
    int back = 1;
    for (int k = 0; k < 64; k++) if (buf[k] != (0x5700000000000000ull | (100ull << 8) | (uint64_t)k)) back = 0;
    rt_check("blk-write", !w && !rb && !st && back, "write and read back of sector 100");
    mmio_write32(b + VMMIO_INTERRUPT_ACK, 3);

    /* The entropy device shares nothing with the disk but the vector. */
    vmmio_route_irq(&rng, apic_id, VEC);
    e = vdev_negotiate(&rng, 0);
    if (!e) e = vq_setup(&rng, &rq, 0, 8, 0);
    if (!e) vdev_driver_ok(&rng);
    static uint8_t rbuf[64];
    struct vbuf rb1 = { rbuf, sizeof rbuf };
    uint32_t seen = vmsi_count[VEC - VMSI_BASE];
    int rng_ok = 0, rng_irq = 0, nonzero = 0;
    if (!e && vq_add(&rq, &rb1, 0, 1) >= 0) {
        vq_notify(&rq);
        uint32_t len = 0;
        rng_ok = vq_wait_used(&rq, 10000) == 0 && vq_get_used(&rq, &len) >= 0 && len == sizeof rbuf;
        rng_irq = vmsi_wait(VEC, seen, 2000) == 0;
        for (unsigned i = 0; i < sizeof rbuf; i++) if (rbuf[i]) nonzero = 1;
    }
    rt_check("rng-read", !e && rng_ok && rng_irq && nonzero && (mmio_read32(rng.mmio + VMMIO_INTERRUPT_STATUS) & 1),
             "%s, irq %u, interrupt %s", e ? e : "64 bytes", rng.mmio_irq, rng_irq ? "yes" : "no");
    vdev_reset(&rng);

    /* Live queue registers are frozen; notify of a queue that does not exist does nothing. */
    mmio_write32(b + VMMIO_QUEUE_SEL, 0);
    mmio_write32(b + VMMIO_QUEUE_READY, 0);
    mmio_write32(b + VMMIO_QUEUE_NUM, 2);
    rt_check("live-queue", mmio_read32(b + VMMIO_QUEUE_READY) == 1 && read_sector0_ok(), "QueueReady %u after a write of 0",
             mmio_read32(b + VMMIO_QUEUE_READY));
    mmio_write32(b + VMMIO_QUEUE_NOTIFY, 7);
    mmio_write32(b + VMMIO_QUEUE_NOTIFY, 0xffffffff);
    rt_check("bad-notify", vdev_status(&blk) == 0x0f && read_sector0_ok(), "status %x", vdev_status(&blk));

    /* Bad queue size: larger than QueueNumMax. */
    mmio_write32(b + VMMIO_INTERRUPT_ACK, 3);
    mmio_write32(b + VMMIO_QUEUE_SEL, 0);
    uint32_t max = mmio_read32(b + VMMIO_QUEUE_NUM_MAX);
    seen = vmsi_count[VEC - VMSI_BASE];
    static uint8_t table[4096] __attribute__((aligned(4096)));
    uint32_t s1 = hostile_setup(max * 2, (uint64_t)(uintptr_t)table);
    int cfg_irq = vmsi_wait(VEC, seen, 2000) == 0;
    uint32_t isr1 = mmio_read32(b + VMMIO_INTERRUPT_STATUS);
    mmio_write32(b + VMMIO_INTERRUPT_ACK, isr1);
    e = open_blk();
    rt_check("bad-queue-size", (s1 & VIRTIO_STATUS_NEEDS_RESET) && (isr1 & 2) && cfg_irq && !e && read_sector0_ok(),
             "QueueNum %u > QueueNumMax %u: status %x, InterruptStatus %x, interrupt %s; after reset %s", max * 2, max, s1, isr1,
             cfg_irq ? "yes" : "no", e ? e : "works");

    /* Descriptor table outside guest RAM. */
    uint32_t s2 = hostile_setup(8, 1ull << 40);
    mmio_write32(b + VMMIO_INTERRUPT_ACK, 3);
    e = open_blk();
    rt_check("bad-ring", (s2 & VIRTIO_STATUS_NEEDS_RESET) && !e && read_sector0_ok(), "desc at 1 TiB: status %x; after reset %s",
             s2, e ? e : "works");
    vdev_reset(&blk);
    return 0;
}

int main(void) { return vdrv_main(run, VEC, &apic_id); }
