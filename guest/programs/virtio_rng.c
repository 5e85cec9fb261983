/* virtio_rng: drives a modern virtio-rng PCI device (virtio.h). Finds it on bus 0, negotiates
 * VERSION_1, sets up the request queue with an MSI-X vector, and asks for random bytes several
 * times, each completion signalled by MSI-X. The driver runs in ring 3 (native speed on PVM
 * hosts); only the interrupt handler runs in ring 0.
 * Command line: reads=N (default 4), size=BYTES (default 64, at most 4096); mmio [source=acpi|cmdline]: the
 * device is a virtio-mmio window (DSDT or command line), its interrupt routed through the I/O APIC.
 * Prints `RNG <hex of the first 16 bytes>` per read. */
#include "virtio.h"

const char rt_program_name[] = "virtio_rng";

#define VEC 0x40

static uint8_t apic_id;

static long run(void *arg) {
    (void)arg;
    static struct vdev d;
    static struct vq q;
    if (vmmio_setup_from_cmdline()) return 0;
    int found = vdev_find(VIRTIO_ID_RNG, 0, &d);
    if (!rt_check("rng-found", found == 0, "virtio-rng at 00:%02x.%u device %04x",
                  d.slot, d.fn, d.device_id))
        return 0;
    const char *e = vdev_map(&d);
    if (!rt_check("rng-capabilities", !e, "%s common %lx notify %lx (x%u) isr %lx msix %u entries",
                  e ? e : "mapped", d.common, d.notify, d.notify_mult, d.isr, d.msix_count))
        return 0;
    int msix = d.msix_cap && vdev_msix_set(&d, 0, apic_id, VEC, 0) == 0 && vdev_msix_enable(&d) == 0;
    if (d.mmio) { vmmio_route_irq(&d, apic_id, VEC); msix = 1; }    /* the window's interrupt, through the I/O APIC */
    e = vdev_negotiate(&d, 0);
    if (!rt_check("rng-features", !e, "%s device %lx driver %lx", e ? e : "VERSION_1 negotiated",
                  d.device_features, d.features))
        return 0;
    e = vq_setup(&d, &q, 0, 64, msix ? 0 : VIRTIO_MSI_NO_VECTOR);
    if (!rt_check("rng-queue", !e, "%s size %u msix %x", e ? e : "queue 0 enabled", q.size, q.msix)) return 0;
    vdev_driver_ok(&d);
    rt_check("rng-driver-ok", vdev_status(&d) == 0x0f, "status %x", vdev_status(&d));

    uint32_t reads = (uint32_t)rt_cmdline_uint("reads", 4), size = (uint32_t)rt_cmdline_uint("size", 64);
    if (size == 0 || size > 4096) size = 64;
    uint8_t *buf = rt_alloc_pages(2);
    uint8_t *prev = buf + 4096;
    uint32_t got_total = 0, irq_ok = 0, differs = 0, nonzero = 0;
    for (uint32_t r = 0; r < reads; r++) {
        memset(buf, 0, size);
        struct vbuf b = { buf, size };
        uint32_t seen = vmsi_count[VEC - VMSI_BASE];
        int head = vq_add(&q, &b, 0, 1);
        vq_kick(&q);
        int irq = msix && q.msix == 0 ? vmsi_wait(VEC, seen, 10000) == 0 : 0;
        if (vq_wait_used(&q, 10000)) { rt_fail("rng-read", "request %u: no completion within 10 s", r); return 0; }
        uint32_t len = 0;
        int id = vq_get_used(&q, &len);
        if (id != head || len == 0 || len > size) {
            rt_fail("rng-read", "request %u: used id %d (expected %d) len %u of %u", r, id, head, len, size);
            return 0;
        }
        got_total += len;
        irq_ok += irq;
        for (uint32_t i = 0; i < len; i++) if (buf[i]) { nonzero++; break; }
        if (r && memcmp(buf, prev, len < 16 ? len : 16)) differs++;
        memcpy(prev, buf, len);
        rt_printf("RNG");
        for (uint32_t i = 0; i < len && i < 16; i++) rt_printf(" %02x", buf[i]);
        rt_printf("\n");
    }
    rt_check("rng-read", got_total > 0, "%u reads, %u bytes", reads, got_total);
    rt_check("rng-nonzero", nonzero == reads, "%u of %u reads have a nonzero byte", nonzero, reads);
    rt_check("rng-varies", reads < 2 || differs == reads - 1, "%u of %u consecutive reads differ", differs, reads - 1);
    if (msix)
        rt_check("rng-msix-interrupt", irq_ok == reads, "%u of %u completions signalled by MSI-X vector 0x%x (count %u)",
                 irq_ok, reads, VEC, vmsi_count[VEC - VMSI_BASE]);
    else
        rt_fail("rng-msix-interrupt", "the device has no MSI-X capability");
    vdev_reset(&d);
    return 0;
}

int main(void) { return vdrv_main(run, VEC, &apic_id); }
