/*
 * A small modern virtio-pci (virtio 1.x) driver library for the guest test programs.
 *
 * Finds a device by vendor 0x1af4 and device 0x1040 + type (or a transitional 0x1000-0x103f
 * device whose subsystem ID is the type), walks its vendor capabilities (common, notify, ISR,
 * device configuration), negotiates VERSION_1 plus the requested features, sets up split
 * virtqueues in pages from the runtime allocator, submits descriptor chains (direct or through an
 * indirect table), honours EVENT_IDX in both directions, and programs MSI-X vectors that target a
 * LAPIC.
 *
 * Nothing here executes a privileged instruction, so every function may run in ring 3 (through
 * rt_run_user with IOPL 3), where guest code runs natively on PVM hosts. Functions that report
 * errors return a static message (NULL on success) naming what failed.
 */
#ifndef RT_VIRTIO_H
#define RT_VIRTIO_H

#include "rt.h"

#define VIRTIO_PCI_VENDOR 0x1af4
#define VIRTIO_ID_NET     1
#define VIRTIO_ID_BLOCK   2
#define VIRTIO_ID_CONSOLE 3
#define VIRTIO_ID_RNG     4

/* Device status bits. */
#define VIRTIO_STATUS_ACKNOWLEDGE 0x01
#define VIRTIO_STATUS_DRIVER      0x02
#define VIRTIO_STATUS_DRIVER_OK   0x04
#define VIRTIO_STATUS_FEATURES_OK 0x08
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED      0x80

/* Transport feature bits. */
#define VIRTIO_F_INDIRECT_DESC 28
#define VIRTIO_F_EVENT_IDX     29
#define VIRTIO_F_VERSION_1     32
#define VIRTIO_BIT(n) (1ull << (n))

/* virtio-pci capability cfg_type values. */
#define VIRTIO_PCI_CAP_COMMON_CFG 1
#define VIRTIO_PCI_CAP_NOTIFY_CFG 2
#define VIRTIO_PCI_CAP_ISR_CFG    3
#define VIRTIO_PCI_CAP_DEVICE_CFG 4
#define VIRTIO_PCI_CAP_PCI_CFG    5

/* Common configuration structure offsets (virtio 1.x 4.1.4.3). */
#define VCOMMON_DFSELECT      0x00
#define VCOMMON_DF            0x04
#define VCOMMON_GFSELECT      0x08
#define VCOMMON_GF            0x0c
#define VCOMMON_MSIX          0x10
#define VCOMMON_NUMQ          0x12
#define VCOMMON_STATUS        0x14
#define VCOMMON_CFGGENERATION 0x15
#define VCOMMON_Q_SELECT      0x16
#define VCOMMON_Q_SIZE        0x18
#define VCOMMON_Q_MSIX        0x1a
#define VCOMMON_Q_ENABLE      0x1c
#define VCOMMON_Q_NOFF        0x1e
#define VCOMMON_Q_DESC        0x20
#define VCOMMON_Q_AVAIL       0x28
#define VCOMMON_Q_USED        0x30

#define VIRTIO_MSI_NO_VECTOR 0xffff

/* Split virtqueue layout (virtio 1.x 2.7). */
#define VRING_DESC_F_NEXT     1
#define VRING_DESC_F_WRITE    2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY     1

struct vring_desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };
struct vring_avail { uint16_t flags; uint16_t idx; uint16_t ring[]; };
struct vring_used_elem { uint32_t id; uint32_t len; };
struct vring_used { uint16_t flags; uint16_t idx; struct vring_used_elem ring[]; };

/* The largest queue this library sets up (descriptor bookkeeping is static per queue). */
#define VQ_MAX_SIZE 256

/* virtio-mmio (version 2) registers (virtio 1.x 4.2.2). */
#define VMMIO_MAGIC            0x000
#define VMMIO_VERSION          0x004
#define VMMIO_DEVICE_ID        0x008
#define VMMIO_VENDOR_ID        0x00c
#define VMMIO_DEVICE_FEATURES  0x010
#define VMMIO_DEVICE_FEATURES_SEL 0x014
#define VMMIO_DRIVER_FEATURES  0x020
#define VMMIO_DRIVER_FEATURES_SEL 0x024
#define VMMIO_QUEUE_SEL        0x030
#define VMMIO_QUEUE_NUM_MAX    0x034
#define VMMIO_QUEUE_NUM        0x038
#define VMMIO_QUEUE_READY      0x044
#define VMMIO_QUEUE_NOTIFY     0x050
#define VMMIO_INTERRUPT_STATUS 0x060
#define VMMIO_INTERRUPT_ACK    0x064
#define VMMIO_STATUS           0x070
#define VMMIO_QUEUE_DESC_LOW   0x080
#define VMMIO_QUEUE_DESC_HIGH  0x084
#define VMMIO_QUEUE_DRIVER_LOW 0x090
#define VMMIO_QUEUE_DRIVER_HIGH 0x094
#define VMMIO_QUEUE_DEVICE_LOW 0x0a0
#define VMMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VMMIO_CONFIG_GENERATION 0x0fc
#define VMMIO_CONFIG           0x100
#define VMMIO_MAGIC_VALUE      0x74726976u   /* "virt" */

/* A virtio device: PCI-attached, or a virtio-mmio window when `mmio` is set. */
struct vdev {
    uint64_t mmio;                   /* virtio-mmio register window (0 = a PCI device) */
    uint32_t mmio_irq;               /* its interrupt (GSI) */
    uint8_t mmio_vector;             /* the vector its interrupt was routed to (vmmio_route_irq), 0 = none */
    uint8_t bus, slot, fn;
    uint16_t device_id, type;
    uint64_t bar[6];                 /* decoded memory BAR addresses (0 = none) */
    uint64_t bar_size[6];
    uint64_t common, notify, isr, devcfg;   /* MMIO addresses of the structures */
    uint32_t notify_mult, devcfg_len;
    uint8_t msix_cap;                /* config-space offset of the MSI-X capability, 0 = none */
    uint16_t msix_count;
    uint64_t msix_table, msix_pba;
    uint64_t device_features, features;
};

/* A split virtqueue. */
struct vq {
    struct vdev *dev;
    uint16_t index, size;
    uint16_t msix;                   /* vector read back from the device (VIRTIO_MSI_NO_VECTOR = none) */
    volatile struct vring_desc *desc;
    volatile struct vring_avail *avail;
    volatile struct vring_used *used;
    volatile uint16_t *used_event;   /* avail->ring[size] (EVENT_IDX) */
    volatile uint16_t *avail_event;  /* used->ring[size] (EVENT_IDX) */
    uint64_t notify_addr;
    int event_idx;
    int want_irq;                    /* keep used_event current (EVENT_IDX) */
    uint16_t free_head, num_free;
    uint16_t avail_idx;              /* driver's next avail index (published by vq_kick) */
    uint16_t kicked_idx;             /* avail index at the last vq_kick */
    uint16_t last_used;
    uint16_t chain_len[VQ_MAX_SIZE]; /* descriptors in the chain headed by each index */
    int notify32;                    /* virtio-mmio: QueueNotify takes a 32-bit write */
    uint64_t notifications;          /* notify-register writes issued by vq_kick */
};

/* One buffer of a chain. */
struct vbuf { const volatile void *addr; uint32_t len; };

/* ---------------------------------------------------------------- virtio-mmio discovery */
/* One virtio-mmio window as announced to the guest. */
struct vmmio_entry { uint64_t base, size; uint32_t irq; };
#define VMMIO_MAX 32
/* The windows of the DSDT's LNRO0005 devices (in DSDT order): count, or -1 with *why set when the tables
 * are missing or malformed. */
int vmmio_from_acpi(struct vmmio_entry *out, int max, const char **why);
/* The windows of the command line's virtio_mmio.device=SIZE@BASE:IRQ items (Linux's syntax, K/M/G sizes),
 * in order: count, or -1 with *why set on a malformed item. */
int vmmio_from_cmdline(struct vmmio_entry *out, int max, const char **why);
/* From now on vdev_find looks at these windows (reading each one's DeviceID) instead of PCI bus 0. */
void vmmio_use(const struct vmmio_entry *entries, int count);
/* "mmio" on the command line: switches vdev_find to the windows of `source=acpi` (default) or `source=cmdline`;
 * 0 when it did (or "mmio" is absent), -1 after reporting a FAIL. */
int vmmio_setup_from_cmdline(void);
/* Routes a virtio-mmio device's interrupt through the I/O APIC (edge, active high) to `vector` on LAPIC
 * `apic_id`; its queues then report q->msix 0 ("has an interrupt"). */
void vmmio_route_irq(struct vdev *d, uint8_t apic_id, uint8_t vector);

/* ---------------------------------------------------------------- device discovery */
/* The nth (0-based) virtio device of this type on bus 0; 0 on success, -1 when absent. Fills
 * bus/slot/fn/device_id/type only. */
int vdev_find(uint16_t type, int nth, struct vdev *d);
/* Enables memory space and bus mastering, reads (and when unassigned or above 4 GiB, assigns
 * in the 0xC0000000 window) the BARs, walks the capabilities. */
const char *vdev_map(struct vdev *d);
/* Moves memory BAR `bar` to `addr` (decode off while its registers change) and updates the structure
 * addresses that lie in it. Queues keep their notify address: move them by the same delta. */
const char *vdev_move_bar(struct vdev *d, int bar, uint64_t addr);
/* Resets (status 0, waits until it reads 0), sets ACKNOWLEDGE|DRIVER, negotiates VERSION_1 plus
 * `wanted` & the device's features, sets FEATURES_OK and checks it stuck. */
const char *vdev_negotiate(struct vdev *d, uint64_t wanted);
/* Sets DRIVER_OK. */
void vdev_driver_ok(struct vdev *d);
uint8_t vdev_status(struct vdev *d);
void vdev_set_status(struct vdev *d, uint8_t s);
/* Writes 0 to the status and waits (bounded) until it reads 0; 0 on success. */
int vdev_reset(struct vdev *d);
static inline int vdev_has(const struct vdev *d, int bit) { return (d->features >> bit) & 1; }

/* Device configuration space reads (64-bit reads are repeated until the generation is stable). */
uint8_t vdev_cfg8(struct vdev *d, uint32_t off);
uint16_t vdev_cfg16(struct vdev *d, uint32_t off);
uint32_t vdev_cfg32(struct vdev *d, uint32_t off);
uint64_t vdev_cfg64(struct vdev *d, uint32_t off);
void vdev_cfg_write8(struct vdev *d, uint32_t off, uint8_t v);

/* ---------------------------------------------------------------- MSI-X */
/* Sets MSI-X Enable (and clears Function Mask) in Message Control; -1 when there is no MSI-X. */
int vdev_msix_enable(struct vdev *d);
/* Clears MSI-X Enable. */
void vdev_msix_disable(struct vdev *d);
/* Programs table entry `entry` to deliver `vector` (fixed, edge) to LAPIC `apic_id`, unmasked
 * unless `masked`. -1 when the entry does not exist. */
int vdev_msix_set(struct vdev *d, uint16_t entry, uint8_t apic_id, uint8_t vector, int masked);
/* Masks or unmasks one entry. */
void vdev_msix_mask(struct vdev *d, uint16_t entry, int masked);
/* Pending bit of an entry in the PBA. */
int vdev_msix_pending(struct vdev *d, uint16_t entry);
/* Writes config_msix_vector and returns what the device reads back. */
uint16_t vdev_set_config_vector(struct vdev *d, uint16_t entry);

/* ---------------------------------------------------------------- virtqueues */
/* Sets up queue `index` with min(device maximum, max_size) entries (rounded down to a power of
 * two), MSI-X entry `msix` (VIRTIO_MSI_NO_VECTOR for none) and enables it. EVENT_IDX is used
 * when negotiated. */
const char *vq_setup(struct vdev *d, struct vq *q, uint16_t index, uint16_t max_size, uint16_t msix);
/* Queues a chain of `out` device-readable then `in` device-writable buffers in the descriptor
 * table. Returns the head index, or -1 when there are not enough free descriptors. The chain is
 * not visible to the device until vq_kick. */
int vq_add(struct vq *q, const struct vbuf *bufs, int out, int in);
/* The same through an indirect table of out+in entries at `table` (16 bytes each, caller-owned
 * memory that must stay valid until completion): one ring descriptor. */
int vq_add_indirect(struct vq *q, const struct vbuf *bufs, int out, int in, volatile struct vring_desc *table);
/* Publishes the queued chains (avail idx) and notifies the device unless it suppressed
 * notifications (EVENT_IDX avail_event, or VRING_USED_F_NO_NOTIFY). Returns 1 when it notified. */
int vq_kick(struct vq *q);
/* Publishes and notifies unconditionally. */
void vq_notify(struct vq *q);
/* Next completed chain: returns its head and stores the written length, or -1 when none.
 * Frees the chain's descriptors. A head out of range (a device bug) returns -2. */
int vq_get_used(struct vq *q, uint32_t *len);
/* Number of used entries not yet consumed. */
static inline uint16_t vq_pending_used(const struct vq *q) { return (uint16_t)(q->used->idx - q->last_used); }
/* Asks for an interrupt at the next completion (EVENT_IDX used_event, or clears
 * VRING_AVAIL_F_NO_INTERRUPT). */
void vq_enable_interrupts(struct vq *q);
/* Asks for no interrupts. */
void vq_disable_interrupts(struct vq *q);
/* Waits (bounded by timeout_ms) until a used entry is available: 0 when one is, -1 on timeout. */
int vq_wait_used(struct vq *q, uint32_t timeout_ms);

/* ---------------------------------------------------------------- MSI-X interrupt counting */
/* Installs a handler for `vector` that counts interrupts in vmsi_count[vector - VMSI_BASE] and
 * sends the LAPIC EOI. Ring 0 only (it writes the IDT). The LAPIC must be enabled. */
#define VMSI_BASE 0x40
#define VMSI_COUNT 16
extern volatile uint32_t vmsi_count[VMSI_COUNT];
void vmsi_install(uint8_t vector);
/* The common main() of a ring-3 driver program: enables the LAPIC, stores its ID in *apic_id, installs the
 * counting handler for `vector`, runs `run` in ring 3 with IOPL 3 and reports a fault there as FAIL ring3. */
int vdrv_main(long (*run)(void *), uint8_t vector, uint8_t *apic_id);
/* Waits until vmsi_count[vector - VMSI_BASE] exceeds `seen` (IF must be on): 0, or -1 on timeout. */
int vmsi_wait(uint8_t vector, uint32_t seen, uint32_t timeout_ms);

#endif
