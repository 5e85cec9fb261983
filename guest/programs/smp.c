/* smp: finds the CPUs (ACPI MADT, else the MP table) and starts every AP with INIT-SIPI-SIPI;
 * each AP reports in from long mode with its APIC ID. "cpus=N" on the command line also checks
 * that N CPUs are listed; "linger=MS", "haltall" and "nostart" (APs never started) test the VMM's
 * power-off-by-halt decision. */
#include "rt.h"

const char rt_program_name[] = "smp";

static void ap_hello(uint32_t id) {
    uint16_t cs = read_cs();
    uint64_t efer = rdmsr(MSR_EFER);
    rt_check("ap-online", cs == SEL_KCODE && (efer & 0x400), "APIC ID %u in long mode (CS %x, EFER %lx)", id, cs, efer);
}

int main(void) {
    uint32_t ids[64];
    const char *source = "none";
    uint32_t n = rt_cpu_apic_ids(ids, 64, &source);
    uint32_t bsp = (rt_lapic_enable(), rt_lapic_id());
    rt_check("cpus-listed", n >= 1, "%u CPUs from %s, BSP APIC ID %u", n, source, bsp);
    uint64_t want = rt_cmdline_uint("cpus", 0);
    if (want) rt_check("cpu-count", n == want, "%u listed, %lu expected", n, want);
    /* "noacpi": the machine has no ACPI tables (-no-acpi), and the MP table lists the CPUs. */
    if (rt_cmdline_has("noacpi")) rt_check("no-acpi", rt_acpi_rsdp() == 0 && source[0] == 'M', "RSDP %p, CPUs from %s", rt_acpi_rsdp(), source);
    uint32_t started = 0;
    if (rt_cmdline_has("nostart")) {                /* leave the APs waiting for INIT/SIPI */
        rt_printf("# nostart: %u APs left unstarted\n", n - 1);
        n = 1;
    }
    for (uint32_t i = 0; i < n; i++) {
        if (ids[i] == bsp) continue;
        if (rt_start_ap(ids[i], ap_hello, 5000) == 0) started++;
        else rt_fail("ap-start", "APIC ID %u did not report within ~5 s", ids[i]);
    }
    if (n > 1) rt_check("all-aps-started", started == n - 1 && rt_ap_online == n - 1, "%u of %u APs", started, n - 1);
    else rt_printf("# single CPU: no AP to start\n");
    /* The APs are now halted with interrupts off. "linger=MS": the BSP keeps running that long,
     * which must not look like a power-off to the VMM. "haltall": the BSP halts too (cli; hlt),
     * which is a power-off without ACPI: the VMM must exit with status 0. */
    uint64_t linger = rt_cmdline_uint("linger", 0);
    if (linger) {
        uint64_t end = rt_deadline((uint32_t)linger);
        while (!rt_expired(end)) cpu_pause();
        rt_okf("bsp-alive", "still running %lu ms after the APs halted", linger);
    }
    if (rt_cmdline_has("haltall")) {
        rt_printf("SMP-HALTALL\n");
        for (;;) __asm__ volatile("cli; hlt");
    }
    return 0;
}
