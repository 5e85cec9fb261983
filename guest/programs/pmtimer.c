/* pmtimer: the ACPI PM timer as an OS finds and calibrates it.
 * - pmtimer-fadt: the FADT gives PM_TMR_BLK (and X_PM_TMR_BLK, SystemIO, 32 bits) with PM_TMR_LEN 4;
 *   TMR_VAL_EXT says 24 or 32 bits;
 * - pmtimer-monotonic: 2000 reads never go backwards (modulo the counter width);
 * - pmtimer-rate: over about 200 ms of PM timer (measured 3 times, the median kept), the PM
 *   timer's rate against the TSC at tsc_khz=N (from the command line, else CPUID) is
 *   3.579545 MHz within tolerance=PERCENT (default 10).
 * Prints "PMTIMER hz=H tsc_khz=K". */
#include "rt.h"

const char rt_program_name[] = "pmtimer";

static uint16_t port;
static uint32_t mask;
static uint32_t pm(void) { return inl(port) & mask; }

int main(void) {
    const uint8_t *fadt = rt_acpi_table("FACP");
    if (!rt_check("fadt", fadt != 0, "FADT at %p", (const void *)fadt)) rt_finish();
    uint32_t blk = *(const uint32_t *)(fadt + 76);
    uint8_t len = fadt[91];
    uint32_t flags = *(const uint32_t *)(fadt + 112);
    const uint8_t *xblk = fadt + 208;
    uint64_t xport = *(const uint64_t *)(xblk + 4);
    int ext = (flags >> 8) & 1;
    rt_check("pmtimer-fadt", blk && blk < 0x10000 && len == 4 && xblk[0] == 1 && xblk[1] == 32 && xport == blk,
             "PM_TMR_BLK %x, PM_TMR_LEN %u, X_PM_TMR_BLK space %u width %u port %lx, TMR_VAL_EXT %d (%u bits)",
             blk, len, xblk[0], xblk[1], xport, ext, ext ? 32 : 24);
    port = (uint16_t)blk;
    mask = ext ? 0xffffffffu : 0x00ffffffu;

    int backwards = 0, changes = 0;
    uint32_t prev = pm();
    for (int i = 0; i < 2000; i++) {
        uint32_t v = pm();
        uint32_t d = (v - prev) & mask;
        if (d > mask / 2) backwards++;
        if (v != prev) changes++;
        prev = v;
    }
    rt_check("pmtimer-monotonic", backwards == 0 && changes > 0, "%d steps back, %d changes in 2000 reads", backwards, changes);

    uint64_t khz = rt_tsc_khz();
    if (!rt_check("tsc-rate-known", khz > 0, "tsc_khz %lu", khz)) rt_finish();
    uint64_t hz[3];
    for (int run = 0; run < 3; run++) {
        const uint32_t span = 3579545 / 5;            /* ~200 ms of PM timer */
        uint32_t p0 = pm();
        uint64_t t0 = rdtsc();
        uint32_t p1;
        uint64_t end = rt_deadline(20000);
        while ((((p1 = pm()) - p0) & mask) < span && !rt_expired(end)) cpu_pause();
        uint64_t t1 = rdtsc();
        uint64_t ticks = (p1 - p0) & mask;
        /* hz = ticks / seconds, seconds = (t1 - t0) / (khz * 1000) */
        hz[run] = t1 > t0 ? ticks * khz * 1000 / (t1 - t0) : 0;
        rt_printf("# run %d: %lu PM ticks in %lu TSC ticks: %lu Hz\n", run, ticks, t1 - t0, hz[run]);
    }
    /* median of three */
    uint64_t a = hz[0], b = hz[1], c = hz[2], med;
    if ((a <= b && b <= c) || (c <= b && b <= a)) med = b;
    else if ((b <= a && a <= c) || (c <= a && a <= b)) med = a;
    else med = c;
    uint64_t tol = rt_cmdline_uint("tolerance", 10);
    uint64_t lo = 3579545 * (100 - tol) / 100, hi = 3579545 * (100 + tol) / 100;
    rt_check("pmtimer-rate", med >= lo && med <= hi, "%lu Hz against the TSC (3579545 expected, %lu%% tolerance)", med, tol);
    rt_printf("PMTIMER hz=%lu tsc_khz=%lu\n", med, khz);
    return 0;
}
