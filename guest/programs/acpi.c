/* acpi: reads the firmware tables as an OS would and powers off through ACPI S5.
 * Checks the RSDP (v2, both checksums), the FADT (PM1a event/control blocks, SCI, reset register,
 * DSDT and FACS pointers), the DSDT's \_S5 package, the MADT's LAPIC count ("cpus=N") and
 * SCI_EN; then writes SLP_TYP(S5) | SLP_EN to PM1a_CNT. The VMM must power off at once (exit
 * status 0): if the program is still running afterwards it reports a failure.
 * "noop" on the command line skips the power-off and ends with the normal pass/fail exit;
 * "reset" writes the FADT's RESET_VALUE to RESET_REG instead (the VMM reports a reset). */
#include "rt.h"

const char rt_program_name[] = "acpi";

/* The first SLP_TYPa in the DSDT's _S5_ package, or -1. */
static int s5_sleep_type(const uint8_t *dsdt) {
    uint32_t len = *(const uint32_t *)(dsdt + 4);
    for (uint32_t i = 36; i + 8 < len; i++) {
        if (memcmp(dsdt + i, "_S5_", 4) || dsdt[i + 4] != 0x12) continue;   /* Name(_S5_, Package */
        uint32_t p = i + 5;
        uint8_t lead = dsdt[p];
        p += 1 + (lead >> 6);                       /* PkgLength */
        p += 1;                                     /* NumElements */
        if (p >= len) return -1;
        if (dsdt[p] == 0x00) return 0;              /* ZeroOp */
        if (dsdt[p] == 0x01) return 1;              /* OneOp */
        if (dsdt[p] == 0x0a && p + 1 < len) return dsdt[p + 1];  /* BytePrefix */
        return -1;
    }
    return -1;
}

int main(void) {
    const uint8_t *rsdp = rt_acpi_rsdp();
    if (!rt_check("rsdp", rsdp != 0, "RSDP at %p", (const void *)rsdp)) rt_finish();
    rt_check("rsdp-v2", rsdp[15] == 2 && *(const uint32_t *)(rsdp + 20) == 36 && rt_checksum_ok(rsdp, 36),
             "revision %u, length %u, extended checksum %s", rsdp[15], *(const uint32_t *)(rsdp + 20),
             rt_checksum_ok(rsdp, 36) ? "ok" : "bad");

    const uint8_t *fadt = rt_acpi_table("FACP");
    if (!rt_check("fadt", fadt != 0, "FADT at %p", (const void *)fadt)) rt_finish();
    uint32_t fadt_len = *(const uint32_t *)(fadt + 4);
    uint32_t pm1a_evt = *(const uint32_t *)(fadt + 56), pm1a_cnt = *(const uint32_t *)(fadt + 64);
    uint16_t sci = *(const uint16_t *)(fadt + 46);
    rt_check("fadt-layout", fadt[8] == 6 && fadt_len >= 276 && pm1a_evt && pm1a_cnt && fadt[88] == 4 && fadt[89] == 2,
             "revision %u, length %u, PM1a_EVT %x (len %u), PM1a_CNT %x (len %u), SCI %u",
             fadt[8], fadt_len, pm1a_evt, fadt[88], pm1a_cnt, fadt[89], sci);
    uint64_t x_dsdt = *(const uint64_t *)(fadt + 140), x_facs = *(const uint64_t *)(fadt + 132);
    if (!x_facs) x_facs = *(const uint32_t *)(fadt + 36);   /* FIRMWARE_CTRL */
    const uint8_t *dsdt = (const uint8_t *)(uintptr_t)x_dsdt;
    rt_check("dsdt", x_dsdt && x_dsdt < 0x100000 && !memcmp(dsdt, "DSDT", 4) &&
             rt_checksum_ok(dsdt, *(const uint32_t *)(dsdt + 4)), "X_DSDT %lx", x_dsdt);
    rt_check("facs", x_facs && (x_facs & 63) == 0 && !memcmp((const void *)(uintptr_t)x_facs, "FACS", 4),
             "FACS at %lx", x_facs);
    const uint8_t *reset_gas = fadt + 116;
    uint64_t reset_port = *(const uint64_t *)(reset_gas + 4);
    uint8_t reset_value = fadt[128];
    uint32_t flags = *(const uint32_t *)(fadt + 112);
    rt_check("reset-register", (flags & (1u << 10)) && reset_gas[0] == 1 && reset_gas[1] == 8 && reset_port,
             "flags %x, RESET_REG space %u width %u port %lx value %x", flags, reset_gas[0], reset_gas[1],
             reset_port, reset_value);

    int slp_typ = s5_sleep_type(dsdt);
    rt_check("s5-package", slp_typ >= 0 && slp_typ < 8, "\\_S5 SLP_TYPa %d", slp_typ);

    uint32_t ids[64];
    const char *source = "";
    uint32_t n = rt_cpu_apic_ids(ids, 64, &source);
    uint64_t want = rt_cmdline_uint("cpus", 0);
    if (want) rt_check("madt-cpus", n == want, "%u local APICs from %s, %lu expected", n, source, want);

    uint16_t cnt = inw((uint16_t)pm1a_cnt);
    rt_check("sci-enabled", cnt & 1, "PM1a_CNT %x (SCI_EN set: the machine is in ACPI mode)", cnt);
    outw((uint16_t)(pm1a_evt + 2), 0x0100);          /* PWRBTN_EN */
    rt_check("pm1-enable", inw((uint16_t)(pm1a_evt + 2)) == 0x0100, "PM1a_EN reads %x", inw((uint16_t)(pm1a_evt + 2)));
    outw((uint16_t)(pm1a_evt + 2), 0);

    if (rt_cmdline_has("noop") || rt_fail_count() || slp_typ < 0) rt_finish();
    if (rt_cmdline_has("reset")) {
        rt_printf("ACPI-RESET port %lx value %x\n", reset_port, reset_value);
        outb((uint16_t)reset_port, reset_value);
    } else {
        rt_printf("ACPI-POWEROFF PM1a_CNT %x SLP_TYP %d\n", pm1a_cnt, slp_typ);
        outw((uint16_t)pm1a_cnt, (uint16_t)((slp_typ << 10) | (1 << 13)));
    }
    for (volatile int i = 0; i < 1000; i++) cpu_pause();
    rt_fail("still-running", "the VMM did not stop the machine after the ACPI write");
    rt_finish();
}
