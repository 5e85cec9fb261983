/* ACPI/MP-table CPU discovery and AP startup (INIT-SIPI-SIPI) for guest test programs. */
#include "rt.h"

/* ---------------------------------------------------------------- ACPI */
int rt_checksum_ok(const void *p, uint32_t len) {
    const uint8_t *b = p;
    uint8_t sum = 0;
    for (uint32_t i = 0; i < len; i++) sum = (uint8_t)(sum + b[i]);
    return sum == 0;
}

static const uint8_t *scan(uint64_t start, uint64_t end, const char *sig, uint32_t siglen, uint32_t sumlen) {
    for (uint64_t a = start; a + sumlen <= end; a += 16) {
        const uint8_t *p = (const uint8_t *)(uintptr_t)a;
        if (!memcmp(p, sig, siglen) && rt_checksum_ok(p, sumlen)) return p;
    }
    return 0;
}

const uint8_t *rt_acpi_rsdp(void) {
    uint64_t ebda = (uint64_t)*(const uint16_t *)(uintptr_t)0x40e << 4;
    const uint8_t *p = 0;
    if (ebda >= 0x80000 && ebda < 0xa0000) p = scan(ebda, ebda + 1024, "RSD PTR ", 8, 20);
    if (!p) p = scan(0xe0000, 0x100000, "RSD PTR ", 8, 20);
    return p;
}

/* A table with a valid header and checksum at a, or NULL. */
static const uint8_t *acpi_table_at(uint64_t a) {
    if (!a || a >= (4ull << 30)) return 0;
    const uint8_t *t = (const uint8_t *)(uintptr_t)a;
    uint32_t len = *(const uint32_t *)(t + 4);
    if (len < 36 || len > (1u << 20) || a + len > (4ull << 30)) return 0;
    return rt_checksum_ok(t, len) ? t : 0;
}

const uint8_t *rt_acpi_table(const char *sig) {
    const uint8_t *rsdp = rt_acpi_rsdp();
    if (!rsdp) return 0;
    const uint8_t *root = 0;
    int wide = 0;
    if (rsdp[15] >= 2 && rt_checksum_ok(rsdp, *(const uint32_t *)(rsdp + 20) <= 64 ? *(const uint32_t *)(rsdp + 20) : 36)) {
        root = acpi_table_at(*(const uint64_t *)(rsdp + 24));
        wide = root != 0;
    }
    if (!root) root = acpi_table_at(*(const uint32_t *)(rsdp + 16));
    if (!root) return 0;
    uint32_t len = *(const uint32_t *)(root + 4), step = wide ? 8 : 4;
    for (uint32_t off = 36; off + step <= len; off += step) {
        uint64_t a = wide ? *(const uint64_t *)(root + off) : *(const uint32_t *)(root + off);
        const uint8_t *t = acpi_table_at(a);
        if (t && !memcmp(t, sig, 4)) return t;
    }
    return 0;
}

/* ---------------------------------------------------------------- CPU list */
static uint32_t mp_cpus(uint32_t *ids, uint32_t max) {
    uint64_t ebda = (uint64_t)*(const uint16_t *)(uintptr_t)0x40e << 4;
    const uint8_t *fp = 0;
    if (ebda >= 0x80000 && ebda < 0xa0000) fp = scan(ebda, ebda + 1024, "_MP_", 4, 16);
    if (!fp) fp = scan(0x9fc00, 0xa0000, "_MP_", 4, 16);
    if (!fp) fp = scan(0xf0000, 0x100000, "_MP_", 4, 16);
    if (!fp) return 0;
    uint32_t cfg_addr = *(const uint32_t *)(fp + 4);
    if (!cfg_addr || cfg_addr >= 0x100000) return 0;
    const uint8_t *cfg = (const uint8_t *)(uintptr_t)cfg_addr;
    uint16_t len = *(const uint16_t *)(cfg + 4), count = *(const uint16_t *)(cfg + 34);
    if (memcmp(cfg, "PCMP", 4) || len < 44 || !rt_checksum_ok(cfg, len)) return 0;
    uint32_t n = 0, off = 44;
    for (uint16_t i = 0; i < count && off < len; i++) {
        uint8_t type = cfg[off];
        if (type == 0) {
            if (off + 20 > len) break;
            if ((cfg[off + 3] & 1) && n < max) ids[n++] = cfg[off + 1];
            off += 20;
        } else if (type <= 4) {
            off += 8;
        } else {
            break;
        }
    }
    return n;
}

uint32_t rt_cpu_apic_ids(uint32_t *ids, uint32_t max, const char **source) {
    const uint8_t *madt = rt_acpi_table("APIC");
    if (madt) {
        uint32_t len = *(const uint32_t *)(madt + 4), n = 0;
        for (uint32_t off = 44; off + 2 <= len;) {
            uint8_t type = madt[off], elen = madt[off + 1];
            if (elen < 2 || off + elen > len) break;
            if (type == 0 && elen >= 8 && (madt[off + 4] & 1) && n < max) ids[n++] = madt[off + 3];
            if (type == 9 && elen >= 16 && (madt[off + 8] & 1) && n < max) ids[n++] = *(const uint32_t *)(madt + off + 4);
            off += elen;
        }
        if (source) *source = "ACPI MADT";
        return n;
    }
    if (source) *source = "MP table";
    uint32_t n = mp_cpus(ids, max);
    if (!n && source) *source = "none";
    return n;
}

/* ---------------------------------------------------------------- AP startup */
extern uint8_t rt_ap_trampoline[], rt_ap_trampoline_end[];
volatile uint64_t rt_ap_stack_top;
volatile uint32_t rt_ap_online, rt_ap_done;
static rt_ap_fn ap_fn;

void rt_load_idt(void);

void rt_ap_main(void) {
    rt_load_idt();
    rt_lapic_write(LAPIC_SVR, 0x1ff);
    uint32_t id = rt_lapic_id();
    __atomic_add_fetch(&rt_ap_online, 1, __ATOMIC_SEQ_CST);
    if (ap_fn) ap_fn(id);
    __atomic_add_fetch(&rt_ap_done, 1, __ATOMIC_SEQ_CST);
}

static void delay_ms(uint32_t ms) {
    uint64_t end = rt_deadline(ms);
    while (!rt_expired(end)) cpu_pause();
}

static void copy_trampoline(void) {
    static int copied;
    if (!copied) {
        memcpy((void *)(uintptr_t)RT_AP_TRAMPOLINE, rt_ap_trampoline, (size_t)(rt_ap_trampoline_end - rt_ap_trampoline));
        copied = 1;
    }
}

uint32_t rt_prepare_wake(rt_ap_fn fn) {
    copy_trampoline();
    void *stack = rt_alloc_pages_nozero(4);
    if (!stack) return 0;
    rt_ap_stack_top = (uint64_t)(uintptr_t)stack + 4 * 4096;
    ap_fn = fn;
    rt_mb();
    return RT_AP_TRAMPOLINE;
}

int rt_start_ap(uint32_t apic_id, rt_ap_fn fn, uint32_t timeout_ms) {
    copy_trampoline();
    void *stack = rt_alloc_pages_nozero(4);
    if (!stack) return -1;
    rt_ap_stack_top = (uint64_t)(uintptr_t)stack + 4 * 4096;
    ap_fn = fn;
    uint32_t online = rt_ap_online, done = rt_ap_done;
    rt_mb();
    rt_lapic_write(LAPIC_ICR_HI, apic_id << 24);
    rt_lapic_write(LAPIC_ICR_LO, 0x4500);                          /* INIT, level assert */
    delay_ms(10);
    for (int sipi = 0; sipi < 2 && rt_ap_online == online; sipi++) {
        rt_lapic_write(LAPIC_ICR_HI, apic_id << 24);
        rt_lapic_write(LAPIC_ICR_LO, 0x4600 | (RT_AP_TRAMPOLINE >> 12)); /* STARTUP */
        uint64_t wait = rt_deadline(200);
        while (rt_ap_online == online && !rt_expired(wait)) cpu_pause();
    }
    uint64_t end = rt_deadline(timeout_ms);
    while (rt_ap_done == done && !rt_expired(end)) cpu_pause();
    return rt_ap_done != done ? 0 : -1;
}
