/* fwcfg: QEMU's firmware configuration device (ports 0x510/0x511, DMA at 0x514/0x518) as test
 * kernels and firmware read it. Checks the "QEMU" signature, the ID (traditional + DMA), the DMA
 * port's "QEMU CFG", the CPU counts against "cpus=N" and the RAM size against "ram_mb=N" on the
 * command line, the file directory (bootorder, etc/e820, the ACPI files), a DMA read of etc/e820
 * equal to the same file read through the data port (its RAM summing to the RAM size), a DMA skip,
 * and a DMA write (no item is writable) coming back with the error bit.
 * Prints "FWCFG cpus=N ram=BYTES files=N". */
#include "rt.h"

const char rt_program_name[] = "fwcfg";

#define FW_CTL  0x510
#define FW_DATA 0x511
#define FW_DMA_HI 0x514
#define FW_DMA_LO 0x518

static uint32_t bswap32(uint32_t v) { return __builtin_bswap32(v); }
static uint64_t bswap64(uint64_t v) { return __builtin_bswap64(v); }

static void fw_select(uint16_t key) { outw(FW_CTL, key); }
static void fw_read(void *buf, uint32_t n) { uint8_t *p = buf; while (n--) *p++ = inb(FW_DATA); }

struct dma_access { uint32_t control, length; uint64_t address; } __attribute__((packed));
static volatile struct dma_access dma __attribute__((aligned(16)));

/* Runs one DMA access; returns the control word the device wrote back (host order). */
static uint32_t fw_dma(uint32_t control, void *buf, uint32_t len) {
    dma.control = bswap32(control);
    dma.length = bswap32(len);
    dma.address = bswap64((uint64_t)(uintptr_t)buf);
    rt_mb();
    uint64_t a = (uint64_t)(uintptr_t)&dma;
    outl(FW_DMA_HI, bswap32((uint32_t)(a >> 32)));
    outl(FW_DMA_LO, bswap32((uint32_t)a));
    rt_mb();
    return bswap32(dma.control);
}

struct file { uint32_t size; uint16_t key; char name[57]; };
static struct file files[64];
static uint8_t port_buf[4096], dma_buf[4096 + 16];

static struct file *find(uint32_t n, const char *name) {
    for (uint32_t i = 0; i < n; i++) if (!strncmp(files[i].name, name, 56)) return &files[i];
    return 0;
}

int main(void) {
    char sig[5] = {0};
    fw_select(0x0000); fw_read(sig, 4);
    if (!rt_check("signature", !memcmp(sig, "QEMU", 4), "\"%s\"", sig)) rt_finish();
    uint32_t id = 0;
    fw_select(0x0001); fw_read(&id, 4);
    rt_check("id-dma", (id & 3) == 3, "ID %x (bit 0 traditional, bit 1 DMA)", id);
    uint8_t dsig[8];
    for (int i = 0; i < 8; i++) dsig[i] = inb(FW_DMA_HI + i);
    rt_check("dma-signature", !memcmp(dsig, "QEMU CFG", 8), "%c%c%c%c%c%c%c%c", dsig[0], dsig[1], dsig[2], dsig[3],
             dsig[4], dsig[5], dsig[6], dsig[7]);

    uint16_t cpus = 0, max_cpus = 0;
    fw_select(0x0005); fw_read(&cpus, 2);
    fw_select(0x000f); fw_read(&max_cpus, 2);
    uint64_t want_cpus = rt_cmdline_uint("cpus", 1);
    rt_check("cpu-count", cpus == want_cpus && max_cpus >= cpus, "NB_CPUS %u, MAX_CPUS %u, expected %lu", cpus, max_cpus, want_cpus);
    uint64_t ram = 0;
    fw_select(0x0003); fw_read(&ram, 8);
    uint64_t want_ram = rt_cmdline_uint("ram_mb", 0) << 20;
    rt_check("ram-size", ram == want_ram, "RAM_SIZE %lx, expected %lx", ram, want_ram);
    uint64_t numa = 1;
    fw_select(0x000d); fw_read(&numa, 8);
    rt_check("numa-none", numa == 0, "%lu NUMA nodes", numa);

    uint32_t count_be = 0;
    fw_select(0x0019); fw_read(&count_be, 4);
    uint32_t count = bswap32(count_be), n = count < 64 ? count : 64;
    int sorted = 1;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t e[64];
        fw_read(e, 64);
        files[i].size = bswap32(*(uint32_t *)e);
        files[i].key = (uint16_t)(e[4] << 8 | e[5]);
        memcpy(files[i].name, e + 8, 56);
        files[i].name[56] = 0;
        rt_printf("# file %04x %6u %s\n", files[i].key, files[i].size, files[i].name);
        if (i && strncmp(files[i - 1].name, files[i].name, 56) >= 0) sorted = 0;
    }
    struct file *e820 = find(n, "etc/e820");
    rt_check("file-dir", count >= 6 && count < 64 && sorted && find(n, "bootorder") && e820 && find(n, "etc/table-loader") &&
             find(n, "etc/acpi/tables") && find(n, "etc/acpi/rsdp"),
             "%u files, %s", count, sorted ? "sorted" : "NOT sorted");
    if (!e820 || e820->size == 0 || e820->size > sizeof port_buf || e820->size % 20) {
        rt_fail("e820", "etc/e820 missing or of bad size %u", e820 ? e820->size : 0);
        rt_finish();
    }

    /* The same file through the data port and through DMA (select + read). */
    fw_select(e820->key); fw_read(port_buf, e820->size);
    memset(dma_buf, 0xa5, sizeof dma_buf);
    uint32_t st = fw_dma((uint32_t)e820->key << 16 | 0x08 | 0x02, dma_buf, e820->size + 8);
    int zero_tail = 1;
    for (uint32_t i = e820->size; i < e820->size + 8; i++) if (dma_buf[i]) zero_tail = 0;
    rt_check("dma-read", st == 0 && !memcmp(port_buf, dma_buf, e820->size) && zero_tail && dma_buf[e820->size + 8] == 0xa5,
             "control %x after the access, %u bytes equal to the port read, zeros past the end", st, e820->size);
    uint64_t ram_sum = 0;
    for (uint32_t i = 0; i < e820->size; i += 20)
        if (*(uint32_t *)(dma_buf + i + 16) == 1) ram_sum += *(uint64_t *)(dma_buf + i + 8);
    rt_check("e820-ram", ram_sum == ram, "RAM entries sum to %lx", ram_sum);

    /* Skip the first entry, then read the second's address: it follows the first. */
    uint64_t second = 0;
    st = fw_dma((uint32_t)e820->key << 16 | 0x08 | 0x04, 0, 20);
    uint32_t st2 = fw_dma(0x02, &second, 8);
    rt_check("dma-skip", st == 0 && st2 == 0 && (e820->size < 40 || second == *(uint64_t *)(dma_buf + 20)),
             "control %x %x, second entry at %lx", st, st2, second);
    st = fw_dma((uint32_t)e820->key << 16 | 0x08 | 0x10, port_buf, 4);
    rt_check("dma-write-refused", st & 1, "control %x (error bit set: items are read-only)", st);

    rt_printf("FWCFG cpus=%u ram=%lu files=%u\n", cpus, ram, count);
    return 0;
}
