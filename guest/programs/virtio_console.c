/* virtio_console: drives a modern virtio-console PCI device (port 0 only, MULTIPORT not
 * negotiated: receiveq 0, transmitq 1). Writes `CONSOLE-READY <text>` to the console, then waits
 * for one line from the host on the console and writes back `echo: <line>`; the serial port
 * reports the checks and `echo-console: <line>`. Completions are signalled by MSI-X. The driver
 * runs in ring 3.
 * Command line: timeout=MS for the host's line (default 60000). */
#include "virtio.h"

const char rt_program_name[] = "virtio_console";

#define VEC 0x40
#define RXBUFS 8
#define RXSIZE 256

static uint8_t apic_id;

static int send(struct vq *tx, uint8_t *buf, const char *s, const char *extra) {
    size_t n = strlen(s), m = extra ? strlen(extra) : 0;
    if (n + m + 1 > 4096) return -1;
    memcpy(buf, s, n);
    if (m) memcpy(buf + n, extra, m);
    buf[n + m] = '\n';
    struct vbuf b = { buf, (uint32_t)(n + m + 1) };
    int head = vq_add(tx, &b, 1, 0);
    if (head < 0) return -1;
    vq_kick(tx);
    if (vq_wait_used(tx, 10000)) return -1;
    return vq_get_used(tx, 0) == head ? 0 : -1;
}

static long run(void *arg) {
    (void)arg;
    static struct vdev d;
    static struct vq rx, tx;
    if (vmmio_setup_from_cmdline()) return 0;
    int found = vdev_find(VIRTIO_ID_CONSOLE, 0, &d);
    if (!rt_check("console-found", found == 0, "virtio-console at 00:%02x.%u device %04x", d.slot, d.fn, d.device_id))
        return 0;
    const char *e = vdev_map(&d);
    if (!e && d.msix_cap && (vdev_msix_set(&d, 0, apic_id, VEC, 0) || vdev_msix_enable(&d))) e = "MSI-X setup failed";
    if (!e && d.mmio) vmmio_route_irq(&d, apic_id, VEC);     /* virtio-mmio: the window's interrupt */
    if (!e) e = vdev_negotiate(&d, 0);
    if (!e) e = vq_setup(&d, &rx, 0, 64, d.msix_cap ? 0 : VIRTIO_MSI_NO_VECTOR);
    if (!e) e = vq_setup(&d, &tx, 1, 64, d.msix_cap ? 0 : VIRTIO_MSI_NO_VECTOR);
    if (!rt_check("console-setup", !e, "%s: features %lx of %lx, rx queue %u, tx queue %u, msix %x/%x", e ? e : "ready",
                  d.features, d.device_features, rx.size, tx.size, rx.msix, tx.msix))
        return 0;
    uint8_t *rxmem = rt_alloc_pages(RXBUFS * RXSIZE / 4096 + 1);
    uint8_t *txbuf = rt_alloc_pages(1);
    int heads[RXBUFS];
    for (int i = 0; i < RXBUFS; i++) {
        struct vbuf b = { rxmem + i * RXSIZE, RXSIZE };
        heads[i] = vq_add(&rx, &b, 0, 1);
    }
    vdev_driver_ok(&d);
    vq_kick(&rx);

    uint32_t seen = vmsi_count[VEC - VMSI_BASE];
    int st = send(&tx, txbuf, "CONSOLE-READY hello from the guest over virtio-console", 0);
    rt_check("console-write", st == 0, "line written to the transmit queue%s", st ? " (no completion)" : "");
    rt_printf("CONSOLE-READY\n");

    /* Collect bytes until a newline. */
    char line[256];
    size_t len = 0;
    int done = 0;
    uint64_t end = rt_deadline((uint32_t)rt_cmdline_uint("timeout", 60000));
    while (!done && !rt_expired(end)) {
        if (!vq_pending_used(&rx)) { cpu_pause(); continue; }
        uint32_t n = 0;
        int id = vq_get_used(&rx, &n);
        int i = 0;
        while (i < RXBUFS && heads[i] != id) i++;
        if (i == RXBUFS || n > RXSIZE) { rt_fail("console-read", "used id %d len %u is not one of our buffers", id, n); return 0; }
        const uint8_t *p = rxmem + i * RXSIZE;
        for (uint32_t k = 0; k < n && !done; k++) {
            if (p[k] == '\n' || p[k] == '\r') { if (len) done = 1; }
            else if (len + 1 < sizeof line) line[len++] = (char)p[k];
        }
        struct vbuf b = { rxmem + i * RXSIZE, RXSIZE };
        heads[i] = vq_add(&rx, &b, 0, 1);                    /* recycle */
        vq_kick(&rx);
    }
    line[len] = 0;
    if (!rt_check("console-read", done, "%s \"%s\"", done ? "line received" : "no complete line before the timeout", line))
        return 0;
    rt_printf("echo-console: %s\n", line);
    st = send(&tx, txbuf, "echo: ", line);
    rt_check("console-echo", st == 0, "echo written");
    rt_check("console-msix", vmsi_count[VEC - VMSI_BASE] > seen, "%u MSI-X interrupts for the transfers",
             vmsi_count[VEC - VMSI_BASE] - seen);
    /* Give the host a moment to read the echo before the VMM exits. */
    uint64_t settle = rt_deadline(200);
    while (!rt_expired(settle)) cpu_pause();
    vdev_reset(&d);
    return 0;
}

int main(void) { return vdrv_main(run, VEC, &apic_id); }
