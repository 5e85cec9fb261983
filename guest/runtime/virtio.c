/* Modern virtio-pci driver library (see virtio.h). Ring-3 safe: no privileged instructions
 * except in vmsi_install, which runs in ring 0. */
#include "virtio.h"

/* ---------------------------------------------------------------- discovery */
static uint16_t virtio_type_of(uint16_t device_id, uint16_t subsystem_id) {
    if (device_id >= 0x1040 && device_id <= 0x107f) return (uint16_t)(device_id - 0x1040);
    if (device_id >= 0x1000 && device_id <= 0x103f) return subsystem_id;   /* transitional */
    return 0;
}

int vmmio_find(uint16_t type, int nth, struct vdev *d);
int vmmio_active(void);
const char *vmmio_map(struct vdev *d);
const char *vmmio_negotiate(struct vdev *d, uint64_t wanted);
const char *vmmio_vq_setup(struct vdev *d, struct vq *q, uint16_t index, uint16_t max_size);

int vdev_find(uint16_t type, int nth, struct vdev *d) {
    if (vmmio_active()) return vmmio_find(type, nth, d);
    for (int slot = 0; slot < 32; slot++) {
        int fns = 1;
        for (int fn = 0; fn < fns; fn++) {
            uint32_t id = rt_pci_read32(0, (uint8_t)slot, (uint8_t)fn, 0);
            if ((id & 0xffff) == 0xffff) { if (fn == 0) break; continue; }
            if (fn == 0 && (rt_pci_read8(0, (uint8_t)slot, 0, 0x0e) & 0x80)) fns = 8;
            if ((id & 0xffff) != VIRTIO_PCI_VENDOR) continue;
            uint16_t dev = (uint16_t)(id >> 16);
            uint16_t sub = rt_pci_read16(0, (uint8_t)slot, (uint8_t)fn, 0x2e);
            if (virtio_type_of(dev, sub) != type) continue;
            if (nth-- > 0) continue;
            memset(d, 0, sizeof *d);
            d->bus = 0;
            d->slot = (uint8_t)slot;
            d->fn = (uint8_t)fn;
            d->device_id = dev;
            d->type = type;
            return 0;
        }
    }
    return -1;
}

/* BARs the library had to place itself (unassigned, or above the 4 GiB the runtime maps). */
static uint64_t bar_window_next = 0xc0000000ull;

const char *vdev_map(struct vdev *d) {
    if (d->mmio) return vmmio_map(d);
    uint8_t b = d->bus, s = d->slot, f = d->fn;
    /* Decode off while BARs are sized and moved. */
    uint16_t cmd = rt_pci_read16(b, s, f, 0x04);
    rt_pci_write16(b, s, f, 0x04, (uint16_t)(cmd & ~0x7u));
    for (int i = 0; i < 6; i++) {
        int is_io = 0, is_64 = 0;
        uint32_t lo = rt_pci_read32(b, s, f, (uint8_t)(0x10 + 4 * i));
        uint64_t size = rt_pci_bar_size(b, s, f, i, &is_io, &is_64);
        if (is_io || !size) { if (is_64) i++; continue; }
        uint64_t addr = lo & ~0xfull;
        if (is_64) addr |= (uint64_t)rt_pci_read32(b, s, f, (uint8_t)(0x14 + 4 * i)) << 32;
        if (rt_cmdline_has("virtio-debug"))
            rt_printf("# %02x.%u BAR%d %lx size %lx%s\n", s, f, i, addr, size, is_64 ? " 64-bit" : "");
        if (!addr || addr + size > (1ull << 32)) {
            uint64_t a = (bar_window_next + size - 1) & ~(size - 1);
            if (a + size > 0xe0000000ull) return "no room for a BAR in the 0xC0000000 window";
            bar_window_next = a + size;
            addr = a;
            rt_pci_write32(b, s, f, (uint8_t)(0x10 + 4 * i), (uint32_t)addr | (lo & 0xf));
            if (is_64) rt_pci_write32(b, s, f, (uint8_t)(0x14 + 4 * i), 0);
        }
        d->bar[i] = addr;
        d->bar_size[i] = size;
        if (is_64) i++;
    }
    rt_pci_write16(b, s, f, 0x04, (uint16_t)(cmd | 0x6));   /* memory space, bus master */

    int found = 0;
    for (uint8_t p = rt_pci_find_cap(b, s, f, 0x09, 0); p; p = rt_pci_find_cap(b, s, f, 0x09, p)) {
        uint8_t type = rt_pci_read8(b, s, f, p + 3);
        uint8_t bar = rt_pci_read8(b, s, f, p + 4);
        uint32_t off = rt_pci_read32(b, s, f, p + 8);
        uint32_t len = rt_pci_read32(b, s, f, p + 12);
        if (bar > 5 || !d->bar[bar]) continue;
        if ((uint64_t)off + len > d->bar_size[bar]) return "a virtio capability points outside its BAR";
        uint64_t a = d->bar[bar] + off;
        switch (type) {
        case VIRTIO_PCI_CAP_COMMON_CFG: if (!d->common) { d->common = a; found |= 1; } break;
        case VIRTIO_PCI_CAP_NOTIFY_CFG:
            if (!d->notify) { d->notify = a; d->notify_mult = rt_pci_read32(b, s, f, p + 16); found |= 2; }
            break;
        case VIRTIO_PCI_CAP_ISR_CFG: if (!d->isr) { d->isr = a; found |= 4; } break;
        case VIRTIO_PCI_CAP_DEVICE_CFG: if (!d->devcfg) { d->devcfg = a; d->devcfg_len = len; found |= 8; } break;
        default: break;
        }
    }
    if (!(found & 1)) return "no common configuration capability";
    if (!(found & 2)) return "no notification capability";
    if (!(found & 4)) return "no ISR capability";

    uint8_t m = rt_pci_find_cap(b, s, f, 0x11, 0);
    if (m) {
        uint16_t ctl = rt_pci_read16(b, s, f, m + 2);
        uint32_t t = rt_pci_read32(b, s, f, m + 4), pba = rt_pci_read32(b, s, f, m + 8);
        if (d->bar[t & 7] && d->bar[pba & 7]) {
            d->msix_cap = m;
            d->msix_count = (uint16_t)((ctl & 0x7ff) + 1);
            d->msix_table = d->bar[t & 7] + (t & ~7u);
            d->msix_pba = d->bar[pba & 7] + (pba & ~7u);
        }
    }
    return 0;
}

const char *vdev_move_bar(struct vdev *d, int bar, uint64_t addr) {
    if (bar < 0 || bar > 5 || !d->bar[bar]) return "no such memory BAR";
    if (addr & (d->bar_size[bar] - 1)) return "the new address is not aligned to the BAR's size";
    uint8_t b = d->bus, s = d->slot, f = d->fn;
    uint16_t cmd = rt_pci_read16(b, s, f, 0x04);
    rt_pci_write16(b, s, f, 0x04, (uint16_t)(cmd & ~0x2u));        /* memory decode off while it moves */
    uint32_t lo = rt_pci_read32(b, s, f, (uint8_t)(0x10 + 4 * bar));
    rt_pci_write32(b, s, f, (uint8_t)(0x10 + 4 * bar), (uint32_t)addr | (lo & 0xf));
    if ((lo & 0x6) == 0x4) rt_pci_write32(b, s, f, (uint8_t)(0x14 + 4 * bar), (uint32_t)(addr >> 32));
    rt_pci_write16(b, s, f, 0x04, cmd);
    uint64_t old = d->bar[bar], end = old + d->bar_size[bar];
    uint64_t *ptrs[] = { &d->common, &d->notify, &d->isr, &d->devcfg, &d->msix_table, &d->msix_pba };
    for (unsigned i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++)
        if (*ptrs[i] >= old && *ptrs[i] < end) *ptrs[i] = *ptrs[i] - old + addr;
    d->bar[bar] = addr;
    return 0;
}

/* ---------------------------------------------------------------- status, features */
uint8_t vdev_status(struct vdev *d) {
    return d->mmio ? (uint8_t)mmio_read32(d->mmio + VMMIO_STATUS) : mmio_read8(d->common + VCOMMON_STATUS);
}
void vdev_set_status(struct vdev *d, uint8_t s) {
    if (d->mmio) mmio_write32(d->mmio + VMMIO_STATUS, s);
    else mmio_write8(d->common + VCOMMON_STATUS, s);
}

int vdev_reset(struct vdev *d) {
    vdev_set_status(d, 0);
    for (int i = 0; i < 100000; i++) {
        if (vdev_status(d) == 0) return 0;
        cpu_pause();
    }
    return -1;
}

const char *vdev_negotiate(struct vdev *d, uint64_t wanted) {
    if (d->mmio) return vmmio_negotiate(d, wanted);
    if (vdev_reset(d)) return "device status does not read 0 after reset";
    vdev_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
    vdev_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    mmio_write32(d->common + VCOMMON_DFSELECT, 0);
    uint64_t lo = mmio_read32(d->common + VCOMMON_DF);
    mmio_write32(d->common + VCOMMON_DFSELECT, 1);
    uint64_t hi = mmio_read32(d->common + VCOMMON_DF);
    d->device_features = lo | (hi << 32);
    if (!(d->device_features & VIRTIO_BIT(VIRTIO_F_VERSION_1))) return "device does not offer VIRTIO_F_VERSION_1";
    d->features = d->device_features & (wanted | VIRTIO_BIT(VIRTIO_F_VERSION_1));
    mmio_write32(d->common + VCOMMON_GFSELECT, 0);
    mmio_write32(d->common + VCOMMON_GF, (uint32_t)d->features);
    mmio_write32(d->common + VCOMMON_GFSELECT, 1);
    mmio_write32(d->common + VCOMMON_GF, (uint32_t)(d->features >> 32));
    vdev_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    if (!(vdev_status(d) & VIRTIO_STATUS_FEATURES_OK)) return "device cleared FEATURES_OK";
    return 0;
}

void vdev_driver_ok(struct vdev *d) { vdev_set_status(d, (uint8_t)(vdev_status(d) | VIRTIO_STATUS_DRIVER_OK)); }

/* ---------------------------------------------------------------- device configuration */
uint8_t vdev_cfg8(struct vdev *d, uint32_t off) { return mmio_read8(d->devcfg + off); }
uint16_t vdev_cfg16(struct vdev *d, uint32_t off) { return mmio_read16(d->devcfg + off); }
uint32_t vdev_cfg32(struct vdev *d, uint32_t off) { return mmio_read32(d->devcfg + off); }
uint64_t vdev_cfg64(struct vdev *d, uint32_t off) {
    for (int i = 0; i < 100; i++) {
        uint32_t g = d->mmio ? mmio_read32(d->mmio + VMMIO_CONFIG_GENERATION) : mmio_read8(d->common + VCOMMON_CFGGENERATION);
        uint64_t v = mmio_read32(d->devcfg + off) | ((uint64_t)mmio_read32(d->devcfg + off + 4) << 32);
        uint32_t g2 = d->mmio ? mmio_read32(d->mmio + VMMIO_CONFIG_GENERATION) : mmio_read8(d->common + VCOMMON_CFGGENERATION);
        if (g2 == g) return v;
    }
    return ~0ull;
}
void vdev_cfg_write8(struct vdev *d, uint32_t off, uint8_t v) { mmio_write8(d->devcfg + off, v); }

/* ---------------------------------------------------------------- MSI-X */
int vdev_msix_enable(struct vdev *d) {
    if (!d->msix_cap) return -1;
    uint16_t ctl = rt_pci_read16(d->bus, d->slot, d->fn, d->msix_cap + 2);
    rt_pci_write16(d->bus, d->slot, d->fn, d->msix_cap + 2, (uint16_t)((ctl | 0x8000) & ~0x4000));
    return 0;
}
void vdev_msix_disable(struct vdev *d) {
    if (!d->msix_cap) return;
    uint16_t ctl = rt_pci_read16(d->bus, d->slot, d->fn, d->msix_cap + 2);
    rt_pci_write16(d->bus, d->slot, d->fn, d->msix_cap + 2, (uint16_t)(ctl & ~0x8000));
}
int vdev_msix_set(struct vdev *d, uint16_t entry, uint8_t apic_id, uint8_t vector, int masked) {
    if (!d->msix_cap || entry >= d->msix_count) return -1;
    uint64_t e = d->msix_table + 16ull * entry;
    mmio_write32(e + 12, 1);                        /* mask while changing */
    mmio_write32(e + 0, 0xfee00000u | ((uint32_t)apic_id << 12));
    mmio_write32(e + 4, 0);
    mmio_write32(e + 8, vector);                    /* fixed delivery, edge */
    mmio_write32(e + 12, masked ? 1 : 0);
    return 0;
}
void vdev_msix_mask(struct vdev *d, uint16_t entry, int masked) {
    if (!d->msix_cap || entry >= d->msix_count) return;
    mmio_write32(d->msix_table + 16ull * entry + 12, masked ? 1 : 0);
}
int vdev_msix_pending(struct vdev *d, uint16_t entry) {
    if (!d->msix_cap || entry >= d->msix_count) return 0;
    return (mmio_read32(d->msix_pba + 4ull * (entry / 32)) >> (entry % 32)) & 1;
}
uint16_t vdev_set_config_vector(struct vdev *d, uint16_t entry) {
    if (d->mmio) return VIRTIO_MSI_NO_VECTOR;
    mmio_write16(d->common + VCOMMON_MSIX, entry);
    return mmio_read16(d->common + VCOMMON_MSIX);
}

/* ---------------------------------------------------------------- virtqueues */
const char *vq_setup(struct vdev *d, struct vq *q, uint16_t index, uint16_t max_size, uint16_t msix) {
    if (d->mmio) return vmmio_vq_setup(d, q, index, max_size);
    memset(q, 0, sizeof *q);
    q->dev = d;
    q->index = index;
    if (index >= mmio_read16(d->common + VCOMMON_NUMQ)) return "queue index beyond num_queues";
    mmio_write16(d->common + VCOMMON_Q_SELECT, index);
    uint16_t devmax = mmio_read16(d->common + VCOMMON_Q_SIZE);
    if (!devmax) return "queue size 0 (queue not available)";
    uint16_t n = devmax < max_size ? devmax : max_size;
    if (n > VQ_MAX_SIZE) n = VQ_MAX_SIZE;
    while (n & (n - 1)) n &= (uint16_t)(n - 1);      /* round down to a power of two */
    q->size = n;
    /* desc (16 n) | avail (6 + 2 n) | pad to 4 KiB | used (6 + 8 n) */
    size_t avail_off = 16u * n, used_off = (avail_off + 6 + 2u * n + 4095) & ~4095u;
    size_t bytes = used_off + 6 + 8u * n;
    uint8_t *mem = rt_alloc_pages((bytes + 4095) / 4096);
    if (!mem) return "out of memory for the queue";
    q->desc = (volatile struct vring_desc *)mem;
    q->avail = (volatile struct vring_avail *)(mem + avail_off);
    q->used = (volatile struct vring_used *)(mem + used_off);
    q->used_event = &q->avail->ring[n];
    q->avail_event = (volatile uint16_t *)&q->used->ring[n];
    q->event_idx = vdev_has(d, VIRTIO_F_EVENT_IDX);
    q->want_irq = 1;                                /* a zeroed ring asks for interrupts */
    for (uint16_t i = 0; i < n; i++) q->desc[i].next = (uint16_t)(i + 1);
    q->free_head = 0;
    q->num_free = n;

    mmio_write16(d->common + VCOMMON_Q_SIZE, n);
    mmio_write64(d->common + VCOMMON_Q_DESC, (uint64_t)(uintptr_t)q->desc);
    mmio_write64(d->common + VCOMMON_Q_AVAIL, (uint64_t)(uintptr_t)q->avail);
    mmio_write64(d->common + VCOMMON_Q_USED, (uint64_t)(uintptr_t)q->used);
    mmio_write16(d->common + VCOMMON_Q_MSIX, msix);
    q->msix = mmio_read16(d->common + VCOMMON_Q_MSIX);
    uint16_t noff = mmio_read16(d->common + VCOMMON_Q_NOFF);
    q->notify_addr = d->notify + (uint64_t)noff * d->notify_mult;
    mmio_write16(d->common + VCOMMON_Q_ENABLE, 1);
    if (mmio_read16(d->common + VCOMMON_Q_ENABLE) != 1) return "queue_enable does not read back 1";
    return 0;
}

static void put_avail(struct vq *q, uint16_t head) {
    q->avail->ring[q->avail_idx & (q->size - 1)] = head;
    q->avail_idx++;
}

int vq_add(struct vq *q, const struct vbuf *bufs, int out, int in) {
    int n = out + in;
    if (n <= 0 || n > q->num_free) return -1;
    uint16_t head = q->free_head, i = head, last = head;
    for (int k = 0; k < n; k++) {
        volatile struct vring_desc *dsc = &q->desc[i];
        dsc->addr = (uint64_t)(uintptr_t)bufs[k].addr;
        dsc->len = bufs[k].len;
        dsc->flags = (uint16_t)((k >= out ? VRING_DESC_F_WRITE : 0) | (k + 1 < n ? VRING_DESC_F_NEXT : 0));
        last = i;
        i = dsc->next;
    }
    (void)last;
    q->free_head = i;
    q->num_free = (uint16_t)(q->num_free - n);
    q->chain_len[head] = (uint16_t)n;
    put_avail(q, head);
    return head;
}

int vq_add_indirect(struct vq *q, const struct vbuf *bufs, int out, int in, volatile struct vring_desc *table) {
    int n = out + in;
    if (n <= 0 || q->num_free < 1) return -1;
    for (int k = 0; k < n; k++) {
        table[k].addr = (uint64_t)(uintptr_t)bufs[k].addr;
        table[k].len = bufs[k].len;
        table[k].flags = (uint16_t)((k >= out ? VRING_DESC_F_WRITE : 0) | (k + 1 < n ? VRING_DESC_F_NEXT : 0));
        table[k].next = (uint16_t)(k + 1);
    }
    uint16_t head = q->free_head;
    volatile struct vring_desc *dsc = &q->desc[head];
    q->free_head = dsc->next;
    q->num_free--;
    dsc->addr = (uint64_t)(uintptr_t)table;
    dsc->len = (uint32_t)(16 * n);
    dsc->flags = VRING_DESC_F_INDIRECT;
    q->chain_len[head] = 1;
    put_avail(q, head);
    return head;
}

void vq_notify(struct vq *q) {
    rt_wmb();
    q->avail->idx = q->avail_idx;
    q->kicked_idx = q->avail_idx;
    rt_mb();
    if (q->notify32) mmio_write32(q->notify_addr, q->index);
    else mmio_write16(q->notify_addr, q->index);
    q->notifications++;
}

int vq_kick(struct vq *q) {
    uint16_t old = q->kicked_idx, now = q->avail_idx;
    rt_wmb();
    q->avail->idx = now;
    q->kicked_idx = now;
    rt_mb();                                        /* publish idx before reading the device's wishes */
    int need;
    if (q->event_idx) {
        uint16_t ev = *q->avail_event;
        need = (uint16_t)(now - ev - 1) < (uint16_t)(now - old);
    } else {
        need = !(q->used->flags & VRING_USED_F_NO_NOTIFY);
    }
    if (need) {
        if (q->notify32) mmio_write32(q->notify_addr, q->index);
        else mmio_write16(q->notify_addr, q->index);
        q->notifications++;
    }
    return need;
}

int vq_get_used(struct vq *q, uint32_t *len) {
    if (q->used->idx == q->last_used) return -1;
    rt_rmb();
    volatile struct vring_used_elem *e = &q->used->ring[q->last_used & (q->size - 1)];
    uint32_t id = e->id;
    if (len) *len = e->len;
    q->last_used++;
    if (id >= q->size || !q->chain_len[id]) return -2;
    /* Return the chain to the free list. */
    uint16_t n = q->chain_len[id], i = (uint16_t)id;
    q->chain_len[id] = 0;
    for (uint16_t k = 1; k < n; k++) i = q->desc[i].next;
    q->desc[i].next = q->free_head;
    q->free_head = (uint16_t)id;
    q->num_free = (uint16_t)(q->num_free + n);
    if (q->event_idx && q->want_irq) *q->used_event = q->last_used;
    return (int)id;
}

void vq_enable_interrupts(struct vq *q) {
    q->want_irq = 1;
    if (q->event_idx) *q->used_event = q->last_used;
    else q->avail->flags = 0;
    rt_mb();
}
void vq_disable_interrupts(struct vq *q) {
    q->want_irq = 0;
    if (q->event_idx) *q->used_event = (uint16_t)(q->last_used - 1);   /* only after a wrap */
    else q->avail->flags = VRING_AVAIL_F_NO_INTERRUPT;
}

int vq_wait_used(struct vq *q, uint32_t timeout_ms) {
    uint64_t end = rt_deadline(timeout_ms);
    while (q->used->idx == q->last_used) {
        if (rt_expired(end)) return -1;
        cpu_pause();
    }
    return 0;
}

/* ---------------------------------------------------------------- MSI-X interrupt counting */
volatile uint32_t vmsi_count[VMSI_COUNT];

static void vmsi_handler(struct rt_frame *f) {
    if (f->vector >= VMSI_BASE && f->vector < VMSI_BASE + VMSI_COUNT) vmsi_count[f->vector - VMSI_BASE]++;
    rt_lapic_eoi();
}

void vmsi_install(uint8_t vector) { rt_set_handler(vector, vmsi_handler, 0); }

int vmsi_wait(uint8_t vector, uint32_t seen, uint32_t timeout_ms) {
    if (vector < VMSI_BASE || vector >= VMSI_BASE + VMSI_COUNT) return -1;
    uint64_t end = rt_deadline(timeout_ms);
    while (vmsi_count[vector - VMSI_BASE] <= seen) {
        if (rt_expired(end)) return -1;
        cpu_pause();
    }
    return 0;
}

int vdrv_main(long (*run)(void *), uint8_t vector, uint8_t *apic_id) {
    rt_lapic_enable();
    *apic_id = (uint8_t)rt_lapic_id();
    vmsi_install(vector);
    long r = rt_run_user(run, 0, 3);
    if (r == RT_USER_FAULTED)
        rt_fail("ring3", "driver faulted: %s error %lx at rip %lx", rt_exception_name(rt_user_fault_vector),
                (uint64_t)rt_user_fault_error, (uint64_t)rt_user_fault_rip);
    return 0;
}
