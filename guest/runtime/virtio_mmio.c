/* virtio-mmio (version 2) support of the virtio driver library (see virtio.h): discovery through the DSDT's
 * LNRO0005 devices or the command line's virtio_mmio.device= items, and the transport's side of vdev_map,
 * vdev_negotiate and vq_setup. Ring-3 safe: only memory accesses. */
#include "virtio.h"

static struct vmmio_entry mmio_list[VMMIO_MAX];
static int mmio_count = -1;             /* -1: PCI discovery */

int vmmio_active(void) { return mmio_count >= 0; }

void vmmio_use(const struct vmmio_entry *entries, int count) {
    if (count > VMMIO_MAX) count = VMMIO_MAX;
    for (int i = 0; i < count; i++) mmio_list[i] = entries[i];
    mmio_count = count < 0 ? 0 : count;
}

/* ---------------------------------------------------------------- the DSDT */
static uint32_t le32(const uint8_t *p) { return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

/* AML PkgLength at p (within end): the length it encodes (counted from p) and its own size in *bytes. */
static uint32_t pkg_length(const uint8_t *p, const uint8_t *end, int *bytes) {
    if (p >= end) return 0;
    int n = p[0] >> 6;
    if (p + n >= end) return 0;
    *bytes = n + 1;
    if (!n) return p[0] & 0x3f;
    uint32_t v = p[0] & 0x0f;
    for (int k = 1; k <= n; k++) v |= (uint32_t)p[k] << (4 + 8 * (k - 1));
    return v;
}

static const uint8_t *find(const uint8_t *from, const uint8_t *end, const uint8_t *what, size_t n) {
    for (const uint8_t *p = from; p + n <= end; p++)
        if (!memcmp(p, what, n)) return p;
    return 0;
}

/* The _CRS buffer of a device body [p, end): Memory32Fixed base/size and the first interrupt. 0 when found. */
static int parse_crs(const uint8_t *p, const uint8_t *end, struct vmmio_entry *e) {
    static const uint8_t crs[] = { '_', 'C', 'R', 'S', 0x11 };            /* Name (_CRS, Buffer…) */
    const uint8_t *c = find(p, end, crs, sizeof crs);
    if (!c) return -1;
    c += sizeof crs;
    int lb = 0;
    uint32_t len = pkg_length(c, end, &lb);
    if (!len || c + len > end) return -1;
    const uint8_t *bend = c + len;
    c += lb;
    if (c >= bend) return -1;
    if (*c == 0x0a) c += 2; else if (*c == 0x0b) c += 3; else if (*c == 0x0c) c += 5; else return -1;   /* BufferSize */
    int have_mem = 0, have_irq = 0;
    while (c < bend) {
        uint8_t tag = c[0];
        if (tag == 0x79) break;                                           /* End Tag */
        if (tag & 0x80) {                                                 /* large item */
            if (c + 3 > bend) return -1;
            uint32_t n = c[1] | (uint32_t)c[2] << 8;
            const uint8_t *d = c + 3;
            if (d + n > bend) return -1;
            if (tag == 0x86 && n >= 9) { e->base = le32(d + 1); e->size = le32(d + 5); have_mem = 1; }
            if (tag == 0x89 && n >= 6 && d[1] >= 1 && !have_irq) { e->irq = le32(d + 2); have_irq = 1; }
            c = d + n;
        } else {                                                          /* small item */
            uint32_t n = tag & 7;
            if (c + 1 + n > bend) return -1;
            if (((tag >> 3) & 0xf) == 4 && n >= 2 && !have_irq) {          /* IRQ: lowest set bit */
                uint16_t mask = (uint16_t)(c[1] | c[2] << 8);
                for (int b = 0; b < 16; b++) if (mask & (1u << b)) { e->irq = (uint32_t)b; have_irq = 1; break; }
            }
            c += 1 + n;
        }
    }
    return have_mem && have_irq ? 0 : -1;
}

int vmmio_from_acpi(struct vmmio_entry *out, int max, const char **why) {
    const uint8_t *fadt = rt_acpi_table("FACP");
    if (!fadt) { *why = "no FADT"; return -1; }
    uint32_t flen = le32(fadt + 4);
    uint64_t dsdt_addr = le32(fadt + 40);
    if (flen >= 148) { uint64_t x = le32(fadt + 140) | (uint64_t)le32(fadt + 144) << 32; if (x) dsdt_addr = x; }
    const uint8_t *dsdt = (const uint8_t *)(uintptr_t)dsdt_addr;
    if (!dsdt_addr || memcmp(dsdt, "DSDT", 4)) { *why = "the FADT's DSDT pointer does not point at a DSDT"; return -1; }
    uint32_t len = le32(dsdt + 4);
    if (len < 36 || len > (1u << 20) || !rt_checksum_ok(dsdt, len)) { *why = "DSDT length or checksum"; return -1; }
    static const uint8_t hid[] = { 0x0d, 'L', 'N', 'R', 'O', '0', '0', '0', '5', 0 };
    static const uint8_t devop[] = { 0x5b, 0x82 };
    const uint8_t *end = dsdt + len;
    int count = 0;
    for (const uint8_t *p = dsdt + 36; p + 2 < end; p++) {
        if (p[0] != 0x5b || p[1] != 0x82) continue;                       /* DeviceOp */
        int lb = 0;
        uint32_t plen = pkg_length(p + 2, end, &lb);
        if (plen < (uint32_t)lb + 4 || p + 2 + plen > end) continue;
        const uint8_t *body = p + 2 + lb, *dend = p + 2 + plen;
        const uint8_t *h = find(body, dend, hid, sizeof hid);
        if (!h) continue;
        const uint8_t *nested = find(body, dend, devop, sizeof devop);
        if (nested && nested < h) continue;                               /* an inner device's _HID */
        struct vmmio_entry e = {0, 0, 0};
        if (parse_crs(h, dend, &e)) { *why = "an LNRO0005 device without Memory32Fixed and interrupt in _CRS"; return -1; }
        if (count < max) out[count] = e;
        count++;
    }
    return count < max ? count : max;
}

/* ---------------------------------------------------------------- the command line */
/* A number (decimal or 0x hex) at *p; advances *p. -1 when there are no digits. */
static int parse_num(const char **p, uint64_t *v) {
    const char *s = *p;
    int hex = s[0] == '0' && (s[1] == 'x' || s[1] == 'X');
    if (hex) s += 2;
    uint64_t r = 0;
    const char *start = s;
    for (;; s++) {
        char c = *s;
        int d = c >= '0' && c <= '9' ? c - '0' : hex && c >= 'a' && c <= 'f' ? c - 'a' + 10 : hex && c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) break;
        r = r * (hex ? 16 : 10) + (uint64_t)d;
    }
    if (s == start) return -1;
    *v = r;
    *p = s;
    return 0;
}

int vmmio_from_cmdline(struct vmmio_entry *out, int max, const char **why) {
    static const char key[] = "virtio_mmio.device=";
    int count = 0;
    for (const char *p = rt_cmdline; *p; p++) {
        if ((p != rt_cmdline && p[-1] != ' ') || strncmp(p, key, sizeof key - 1)) continue;
        const char *s = p + sizeof key - 1;
        uint64_t size, base, irq;
        if (parse_num(&s, &size)) { *why = "virtio_mmio.device: no size"; return -1; }
        if (*s == 'K' || *s == 'k') { size <<= 10; s++; } else if (*s == 'M' || *s == 'm') { size <<= 20; s++; }
        else if (*s == 'G' || *s == 'g') { size <<= 30; s++; }
        if (*s++ != '@' || parse_num(&s, &base)) { *why = "virtio_mmio.device: no @base"; return -1; }
        if (*s++ != ':' || parse_num(&s, &irq)) { *why = "virtio_mmio.device: no :irq"; return -1; }
        if (*s == ':') { uint64_t id; s++; if (parse_num(&s, &id)) { *why = "virtio_mmio.device: bad :id"; return -1; } }
        if (*s && *s != ' ') { *why = "virtio_mmio.device: trailing characters"; return -1; }
        if (count < max) { out[count].base = base; out[count].size = size; out[count].irq = (uint32_t)irq; }
        count++;
    }
    return count < max ? count : max;
}

int vmmio_setup_from_cmdline(void) {
    if (!rt_cmdline_has("mmio")) return 0;
    char source[16] = "acpi";
    rt_cmdline_str("source", source, sizeof source);
    struct vmmio_entry list[VMMIO_MAX];
    const char *why = "";
    int n = !strncmp(source, "cmdline", 8) ? vmmio_from_cmdline(list, VMMIO_MAX, &why) : vmmio_from_acpi(list, VMMIO_MAX, &why);
    if (!rt_check("mmio-discovery", n > 0, "%d virtio-mmio windows from %s%s%s", n, source, n < 0 ? ": " : "", n < 0 ? why : ""))
        return -1;
    vmmio_use(list, n);
    return 0;
}

/* ---------------------------------------------------------------- the transport */
int vmmio_find(uint16_t type, int nth, struct vdev *d) {
    for (int i = 0; i < mmio_count; i++) {
        uint64_t b = mmio_list[i].base;
        if (mmio_list[i].size < 0x200 || mmio_read32(b + VMMIO_MAGIC) != VMMIO_MAGIC_VALUE) continue;
        uint32_t id = mmio_read32(b + VMMIO_DEVICE_ID);
        if (id != type || nth-- > 0) continue;
        memset(d, 0, sizeof *d);
        d->mmio = b;
        d->mmio_irq = mmio_list[i].irq;
        d->slot = (uint8_t)i;
        d->device_id = (uint16_t)id;
        d->type = type;
        d->devcfg = b + VMMIO_CONFIG;
        d->devcfg_len = (uint32_t)(mmio_list[i].size - VMMIO_CONFIG);
        return 0;
    }
    return -1;
}

const char *vmmio_map(struct vdev *d) {
    if (mmio_read32(d->mmio + VMMIO_MAGIC) != VMMIO_MAGIC_VALUE) return "virtio-mmio: bad MagicValue";
    if (mmio_read32(d->mmio + VMMIO_VERSION) != 2) return "virtio-mmio: Version is not 2 (legacy device)";
    return 0;
}

const char *vmmio_negotiate(struct vdev *d, uint64_t wanted) {
    if (vdev_reset(d)) return "device status does not read 0 after reset";
    vdev_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
    vdev_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    mmio_write32(d->mmio + VMMIO_DEVICE_FEATURES_SEL, 0);
    uint64_t lo = mmio_read32(d->mmio + VMMIO_DEVICE_FEATURES);
    mmio_write32(d->mmio + VMMIO_DEVICE_FEATURES_SEL, 1);
    uint64_t hi = mmio_read32(d->mmio + VMMIO_DEVICE_FEATURES);
    d->device_features = lo | (hi << 32);
    if (!(d->device_features & VIRTIO_BIT(VIRTIO_F_VERSION_1))) return "device does not offer VIRTIO_F_VERSION_1";
    d->features = d->device_features & (wanted | VIRTIO_BIT(VIRTIO_F_VERSION_1));
    mmio_write32(d->mmio + VMMIO_DRIVER_FEATURES_SEL, 0);
    mmio_write32(d->mmio + VMMIO_DRIVER_FEATURES, (uint32_t)d->features);
    mmio_write32(d->mmio + VMMIO_DRIVER_FEATURES_SEL, 1);
    mmio_write32(d->mmio + VMMIO_DRIVER_FEATURES, (uint32_t)(d->features >> 32));
    vdev_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    if (!(vdev_status(d) & VIRTIO_STATUS_FEATURES_OK)) return "device cleared FEATURES_OK";
    return 0;
}

const char *vmmio_vq_setup(struct vdev *d, struct vq *q, uint16_t index, uint16_t max_size) {
    memset(q, 0, sizeof *q);
    q->dev = d;
    q->index = index;
    uint64_t b = d->mmio;
    mmio_write32(b + VMMIO_QUEUE_SEL, index);
    if (mmio_read32(b + VMMIO_QUEUE_READY)) return "QueueReady is already 1";
    uint32_t devmax = mmio_read32(b + VMMIO_QUEUE_NUM_MAX);
    if (!devmax) return "QueueNumMax 0 (queue not available)";
    uint32_t n = devmax < max_size ? devmax : max_size;
    if (n > VQ_MAX_SIZE) n = VQ_MAX_SIZE;
    while (n & (n - 1)) n &= n - 1;
    q->size = (uint16_t)n;
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
    q->want_irq = 1;
    for (uint16_t i = 0; i < n; i++) q->desc[i].next = (uint16_t)(i + 1);
    q->num_free = (uint16_t)n;
    uint64_t desc = (uint64_t)(uintptr_t)q->desc, avail = (uint64_t)(uintptr_t)q->avail, used = (uint64_t)(uintptr_t)q->used;
    mmio_write32(b + VMMIO_QUEUE_NUM, n);
    mmio_write32(b + VMMIO_QUEUE_DESC_LOW, (uint32_t)desc);
    mmio_write32(b + VMMIO_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
    mmio_write32(b + VMMIO_QUEUE_DRIVER_LOW, (uint32_t)avail);
    mmio_write32(b + VMMIO_QUEUE_DRIVER_HIGH, (uint32_t)(avail >> 32));
    mmio_write32(b + VMMIO_QUEUE_DEVICE_LOW, (uint32_t)used);
    mmio_write32(b + VMMIO_QUEUE_DEVICE_HIGH, (uint32_t)(used >> 32));
    mmio_write32(b + VMMIO_QUEUE_READY, 1);
    if (mmio_read32(b + VMMIO_QUEUE_READY) != 1) return "QueueReady does not read back 1";
    q->notify_addr = b + VMMIO_QUEUE_NOTIFY;
    q->notify32 = 1;
    q->msix = d->mmio_vector ? 0 : VIRTIO_MSI_NO_VECTOR;
    return 0;
}

void vmmio_route_irq(struct vdev *d, uint8_t apic_id, uint8_t vector) {
    rt_ioapic_route(d->mmio_irq, vector, apic_id, 0);
    d->mmio_vector = vector;
}
