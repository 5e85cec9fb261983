/* pci: a PCI driver's view of bus 0 through configuration mechanism #1 (0xCF8/0xCFC).
 * Enumerates every function and prints it, sizes every BAR (restoring it afterwards), walks the
 * capability lists, then uses the virtio-rng device (virtio.h) to prove interrupts: MSI-X
 * enabled and a vector programmed to this CPU's LAPIC (a request completion arrives as that
 * vector), a masked vector sets its pending bit and is delivered on unmask, and, with MSI-X
 * off, legacy INTx through the IOAPIC pin named by the Interrupt Line register (level-triggered;
 * the handler reads the virtio ISR to deassert it). The driver runs in ring 3.
 * Output lines: `PCI bb:dd.f vvvv:dddd class cc/ss/pp hdr hh irq L pin P`,
 *   `BAR bb:dd.f N mem32|mem64|io ADDRESS size SIZE`, `CAP bb:dd.f OFFSET id ID`.
 * Command line: swiftkvm (also check the SwiftKVM contract: host bridge 8086:0d57 at 00:00.0,
 *   memory BARs naturally aligned in 0xC0000000-0xDFFFFFFF, INTA# of slot N on GSI 16 + (N-1) % 8),
 *   devices=N (expected number of functions including the host bridge), nointx. */
#include "virtio.h"

const char rt_program_name[] = "pci";

#define VEC_MSIX 0x40
#define VEC_INTX 0x41

static uint8_t apic_id;
static volatile uint64_t intx_isr_addr;
static volatile uint32_t intx_isr_value;

static const char *cap_name(uint8_t id) {
    switch (id) {
    case 0x01: return "power management";
    case 0x05: return "MSI";
    case 0x09: return "vendor-specific";
    case 0x10: return "PCI Express";
    case 0x11: return "MSI-X";
    default: return "other";
    }
}

struct bar_rec { uint8_t slot, fn, bar; uint64_t addr, size; };
static struct bar_rec bars[64];
static int nbars;

static void enumerate(int contract) {
    int functions = 0, empty = 0, empty_bad = 0, bar_errors = 0, restore_errors = 0, cap_errors = 0, contract_errors = 0;
    for (int slot = 0; slot < 32; slot++) {
        int fns = 1;
        for (int fn = 0; fn < fns; fn++) {
            uint8_t s = (uint8_t)slot, f = (uint8_t)fn;
            uint32_t id = rt_pci_read32(0, s, f, 0);
            if ((id & 0xffff) == 0xffff) {
                empty++;
                if (id != 0xffffffff) empty_bad++;
                if (fn == 0) break;
                continue;
            }
            uint8_t hdr = rt_pci_read8(0, s, f, 0x0e);
            if (fn == 0 && (hdr & 0x80)) fns = 8;
            uint32_t cls = rt_pci_read32(0, s, f, 0x08);
            uint8_t line = rt_pci_read8(0, s, f, 0x3c), pin = rt_pci_read8(0, s, f, 0x3d);
            functions++;
            rt_printf("PCI 00:%02x.%u %04x:%04x class %02x/%02x/%02x hdr %02x irq %u pin %u\n", slot, fn, id & 0xffff,
                      id >> 16, cls >> 24, (cls >> 16) & 0xff, (cls >> 8) & 0xff, hdr, line, pin);
            if (contract && slot == 0 && fn == 0 && (id != 0x0d578086 || (cls >> 8) != 0x060000)) {
                contract_errors++;
                rt_fail("host-bridge", "00:00.0 is %04x:%04x class %06x, expected 8086:0d57 class 060000", id & 0xffff,
                        id >> 16, cls >> 8);
            }
            if (contract && slot > 0 && pin != 0) {
                unsigned want = 16 + (unsigned)((slot - 1) % 8);
                if (pin != 1 || line != want) {
                    contract_errors++;
                    rt_fail("intx-map", "00:%02x.%u interrupt line %u pin %u, expected line %u pin 1", slot, fn, line, pin, want);
                }
            }
            if ((hdr & 0x7f) != 0) continue;                /* bridges: no BAR sizing here */
            for (int b = 0; b < 6; b++) {
                uint8_t off = (uint8_t)(0x10 + 4 * b);
                uint32_t before = rt_pci_read32(0, s, f, off), before_hi = b < 5 ? rt_pci_read32(0, s, f, off + 4) : 0;
                int is_io = 0, is_64 = 0;
                uint64_t size = rt_pci_bar_size(0, s, f, b, &is_io, &is_64);
                uint32_t after = rt_pci_read32(0, s, f, off), after_hi = b < 5 ? rt_pci_read32(0, s, f, off + 4) : 0;
                if (after != before || (is_64 && after_hi != before_hi)) {
                    restore_errors++;
                    rt_fail("bar-restore", "00:%02x.%u BAR%d %x (hi %x) after sizing, was %x (hi %x)", slot, fn, b, after,
                            after_hi, before, before_hi);
                }
                if (size) {
                    uint64_t addr = is_io ? (before & ~3u) : ((before & ~0xfull) | (is_64 ? (uint64_t)before_hi << 32 : 0));
                    rt_printf("BAR 00:%02x.%u %d %s 0x%lx size 0x%lx%s\n", slot, fn, b, is_io ? "io" : is_64 ? "mem64" : "mem32",
                              addr, size, !is_io && (before & 8) ? " prefetchable" : "");
                    if (size & (size - 1)) { bar_errors++; rt_fail("bar-size", "00:%02x.%u BAR%d size 0x%lx is not a power of two", slot, fn, b, size); }
                    if (addr & (size - 1)) { bar_errors++; rt_fail("bar-alignment", "00:%02x.%u BAR%d 0x%lx not aligned to its size 0x%lx", slot, fn, b, addr, size); }
                    if (contract && !is_io && (addr < 0xc0000000ull || addr + size > 0xe0000000ull)) {
                        contract_errors++;
                        rt_fail("bar-window", "00:%02x.%u BAR%d 0x%lx+0x%lx outside 0xC0000000-0xDFFFFFFF", slot, fn, b, addr, size);
                    }
                    if (!is_io && nbars < 64) bars[nbars++] = (struct bar_rec){ s, f, (uint8_t)b, addr, size };
                }
                if (is_64) b++;
            }
            /* Capabilities: every pointer dword-aligned and in the device-specific area, no loop. */
            if (rt_pci_read16(0, s, f, 0x06) & 0x10) {
                uint8_t p = rt_pci_read8(0, s, f, 0x34);
                int n = 0;
                while (p) {
                    if (p < 0x40 || (p & 3) || n >= 48) {
                        cap_errors++;
                        rt_fail("capabilities", "00:%02x.%u bad capability pointer 0x%x after %d entries", slot, fn, p, n);
                        break;
                    }
                    uint8_t cid = rt_pci_read8(0, s, f, p);
                    rt_printf("CAP 00:%02x.%u 0x%02x id 0x%02x %s\n", slot, fn, p, cid, cap_name(cid));
                    p = rt_pci_read8(0, s, f, p + 1);
                    n++;
                }
            }
        }
    }
    /* Memory BARs of different functions must not overlap (address 0 = unassigned). */
    int overlaps = 0;
    for (int i = 0; i < nbars; i++)
        for (int j = i + 1; j < nbars; j++)
            if (bars[i].addr && bars[j].addr && bars[i].addr < bars[j].addr + bars[j].size &&
                bars[j].addr < bars[i].addr + bars[i].size) {
                overlaps++;
                rt_fail("bar-overlap", "00:%02x.%u BAR%u and 00:%02x.%u BAR%u overlap", bars[i].slot, bars[i].fn, bars[i].bar,
                        bars[j].slot, bars[j].fn, bars[j].bar);
            }
    uint64_t want = rt_cmdline_uint("devices", 0);
    rt_check("enumerate", functions > 0 && (!want || want == (uint64_t)functions), "%d functions on bus 0 (expected %lu)",
             functions, want);
    rt_check("host-bridge-class", (rt_pci_read32(0, 0, 0, 0x08) >> 16) == 0x0600, "00:00.0 class %06x",
             rt_pci_read32(0, 0, 0, 0x08) >> 8);
    rt_check("bar-sizing", !bar_errors && !restore_errors && !overlaps, "%d memory BARs sized and restored, no overlap", nbars);
    rt_check("capability-walk", !cap_errors, "every capability list well-formed");
    if (contract) rt_check("contract", !contract_errors, "host bridge, BAR window and INTx map as in the SwiftKVM contract");
    rt_check("absent-device", empty > 0 && !empty_bad, "%d empty slots, %d of them not reading all ones", empty, empty_bad);
}

static void intx_handler(struct rt_frame *f) {
    (void)f;
    vmsi_count[VEC_INTX - VMSI_BASE]++;
    if (intx_isr_addr) intx_isr_value |= mmio_read8(intx_isr_addr);  /* reading the ISR deasserts INTx */
    rt_lapic_eoi();
}

/* One rng request; waits for completion by polling. Returns 0 or -1. */
static int rng_request(struct vq *q, uint8_t *buf) {
    struct vbuf b = { buf, 16 };
    if (vq_add(q, &b, 0, 1) < 0) return -1;
    vq_kick(q);
    if (vq_wait_used(q, 10000)) return -1;
    return vq_get_used(q, 0) >= 0 ? 0 : -1;
}

static void interrupts(void) {
    static struct vdev d;
    static struct vq q;
    if (vdev_find(VIRTIO_ID_RNG, 0, &d)) { rt_fail("msix", "no virtio-rng device to raise interrupts (add one)"); return; }
    const char *e = vdev_map(&d);
    if (e) { rt_fail("msix", "virtio-rng: %s", e); return; }
    if (!rt_check("msix-capability", d.msix_cap != 0, "00:%02x.%u MSI-X at 0x%x, %u entries, table 0x%lx, PBA 0x%lx", d.slot,
                  d.fn, d.msix_cap, d.msix_count, d.msix_table, d.msix_pba))
        return;
    uint32_t tbl = rt_pci_read32(0, d.slot, d.fn, d.msix_cap + 4), pba = rt_pci_read32(0, d.slot, d.fn, d.msix_cap + 8);
    rt_check("msix-table-in-bar", (tbl & ~7u) + 16ull * d.msix_count <= d.bar_size[tbl & 7] &&
             (pba & ~7u) + 8ull * ((d.msix_count + 63) / 64) <= d.bar_size[pba & 7],
             "table BIR %u offset 0x%x, PBA BIR %u offset 0x%x inside their BARs", tbl & 7, tbl & ~7u, pba & 7, pba & ~7u);
    vdev_msix_set(&d, 0, apic_id, VEC_MSIX, 0);
    vdev_msix_enable(&d);
    uint16_t ctl = rt_pci_read16(0, d.slot, d.fn, d.msix_cap + 2);
    rt_check("msix-enable", (ctl & 0xc000) == 0x8000, "message control 0x%04x (enable set, function mask clear)", ctl);
    uint64_t ent = d.msix_table;
    rt_check("msix-table-readback", mmio_read32(ent) == (0xfee00000u | ((uint32_t)apic_id << 12)) && mmio_read32(ent + 8) == VEC_MSIX,
             "entry 0 address 0x%x data 0x%x control %x", mmio_read32(ent), mmio_read32(ent + 8), mmio_read32(ent + 12));
    e = vdev_negotiate(&d, 0);
    if (!e) e = vq_setup(&d, &q, 0, 16, 0);
    if (e) { rt_fail("msix-interrupt", "virtio-rng setup: %s", e); return; }
    vdev_driver_ok(&d);
    uint8_t *buf = rt_alloc_pages(1);

    uint32_t seen = vmsi_count[VEC_MSIX - VMSI_BASE];
    int ok = rng_request(&q, buf) == 0;
    int irq = vmsi_wait(VEC_MSIX, seen, 5000) == 0;
    rt_check("msix-interrupt", ok && irq && q.msix == 0, "virtio-rng completion %s, vector 0x%x %s (queue vector %x)",
             ok ? "done" : "missing", VEC_MSIX, irq ? "arrived" : "did not arrive", q.msix);

    /* Masked: no delivery, pending bit set; unmask delivers it and clears the bit. */
    vdev_msix_mask(&d, 0, 1);
    seen = vmsi_count[VEC_MSIX - VMSI_BASE];
    ok = rng_request(&q, buf) == 0;
    int early = vmsi_wait(VEC_MSIX, seen, 300) == 0;
    int pending = vdev_msix_pending(&d, 0);
    rt_check("msix-masked-pending", ok && !early && pending, "masked vector: %s, pending bit %d",
             early ? "delivered anyway" : "not delivered", pending);
    vdev_msix_mask(&d, 0, 0);
    irq = vmsi_wait(VEC_MSIX, seen, 5000) == 0;
    rt_check("msix-unmask-delivers", irq && !vdev_msix_pending(&d, 0), "unmasked: %s, pending bit now %d",
             irq ? "delivered" : "not delivered", vdev_msix_pending(&d, 0));

    /* Function mask behaves like masking every vector. */
    ctl = rt_pci_read16(0, d.slot, d.fn, d.msix_cap + 2);
    rt_pci_write16(0, d.slot, d.fn, d.msix_cap + 2, (uint16_t)(ctl | 0x4000));
    seen = vmsi_count[VEC_MSIX - VMSI_BASE];
    ok = rng_request(&q, buf) == 0;
    early = vmsi_wait(VEC_MSIX, seen, 300) == 0;
    rt_pci_write16(0, d.slot, d.fn, d.msix_cap + 2, (uint16_t)(ctl & ~0x4000));
    irq = vmsi_wait(VEC_MSIX, seen, 5000) == 0;
    rt_check("msix-function-mask", ok && !early && irq, "function-masked: %s; after clearing the mask: %s",
             early ? "delivered anyway" : "held", irq ? "delivered" : "not delivered");

    if (rt_cmdline_has("nointx")) { vdev_reset(&d); return; }
    /* INTx: MSI-X off, the device interrupts through its INTA# pin. */
    uint8_t line = rt_pci_read8(0, d.slot, d.fn, 0x3c), pin = rt_pci_read8(0, d.slot, d.fn, 0x3d);
    vdev_reset(&d);
    vdev_msix_disable(&d);
    uint16_t cmd = rt_pci_read16(0, d.slot, d.fn, 0x04);
    rt_pci_write16(0, d.slot, d.fn, 0x04, (uint16_t)(cmd & ~0x400));     /* INTx enabled */
    if (!pin || line >= rt_ioapic_pins()) { rt_fail("intx", "interrupt pin %u line %u: no usable IOAPIC pin", pin, line); return; }
    intx_isr_addr = d.isr;
    rt_ioapic_write(0x11 + 2u * line, (uint32_t)apic_id << 24);
    rt_ioapic_write(0x10 + 2u * line, VEC_INTX | (1u << 15));           /* level, active high, unmasked */
    e = vdev_negotiate(&d, 0);
    if (!e) e = vq_setup(&d, &q, 0, 16, VIRTIO_MSI_NO_VECTOR);
    if (e) { rt_fail("intx", "virtio-rng setup without MSI-X: %s", e); return; }
    vdev_driver_ok(&d);
    seen = vmsi_count[VEC_INTX - VMSI_BASE];
    ok = rng_request(&q, buf) == 0;
    irq = vmsi_wait(VEC_INTX, seen, 5000) == 0;
    uint32_t count = vmsi_count[VEC_INTX - VMSI_BASE] - seen;
    rt_check("intx", ok && irq && (intx_isr_value & 1) && count < 10,
             "completion %s, IOAPIC pin %u vector 0x%x %s (%u times), ISR reads ORed 0x%x", ok ? "done" : "missing", line, VEC_INTX,
             irq ? "arrived" : "did not arrive", count, intx_isr_value);
    rt_ioapic_write(0x10 + 2u * line, 0x10000);                        /* masked again */
    vdev_reset(&d);
}

static long run(void *arg) {
    (void)arg;
    enumerate(rt_cmdline_has("swiftkvm"));
    interrupts();
    return 0;
}

int main(void) {
    rt_lapic_enable();
    apic_id = (uint8_t)rt_lapic_id();
    vmsi_install(VEC_MSIX);
    rt_set_handler(VEC_INTX, intx_handler, 0);
    long r = rt_run_user(run, 0, 3);
    if (r == RT_USER_FAULTED)
        rt_fail("ring3", "driver faulted: %s error %lx at rip %lx", rt_exception_name(rt_user_fault_vector),
                (uint64_t)rt_user_fault_error, (uint64_t)rt_user_fault_rip);
    return 0;
}
