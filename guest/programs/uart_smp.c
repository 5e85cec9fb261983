/* uart_smp: the UART under concurrent writers and input. Every AP (up to 3) writes its own marker
 * byte ('~', '^', '|') to COM1 count=N times (default 300), all at the same time, while the BSP
 * reads a line the host types (it prints UART-SMP-READY first) and echoes it as
 * `echo-smp: LINE`. The host counts the marker bytes: none may be lost or doubled. Checks:
 * `aps-started`, `input-line` and `aps-done`; prints `UART-SMP writers=W count=N`. */
#include "rt.h"

const char rt_program_name[] = "uart_smp";

static volatile uint32_t started, done, go;
static const char markers[3] = { '~', '^', '|' };
static uint32_t count;

static void writer(uint32_t apic_id) {
    (void)apic_id;
    uint32_t me = __atomic_fetch_add(&started, 1, __ATOMIC_SEQ_CST);
    while (!__atomic_load_n(&go, __ATOMIC_ACQUIRE)) cpu_pause();
    char c = markers[me % 3];
    for (uint32_t i = 0; i < count; i++) {
        while (!(inb(COM1 + 5) & 0x20)) cpu_pause();    /* transmitter holding register empty */
        outb(COM1, (uint8_t)c);
    }
    __atomic_fetch_add(&done, 1, __ATOMIC_SEQ_CST);
}

int main(void) {
    count = (uint32_t)rt_cmdline_uint("count", 300);
    uint32_t ids[64];
    const char *source = "none";
    uint32_t n = rt_cpu_apic_ids(ids, 64, &source);
    uint32_t bsp = (rt_lapic_enable(), rt_lapic_id());
    uint32_t writers = 0;
    for (uint32_t i = 0; i < n && writers < 3; i++) {
        if (ids[i] == bsp) continue;
        (void)rt_start_ap(ids[i], writer, 50);            /* returns on timeout: the writer waits for `go` */
        writers++;
    }
    uint64_t end = rt_deadline(5000);
    while (__atomic_load_n(&started, __ATOMIC_SEQ_CST) < writers && !rt_expired(end)) cpu_pause();
    if (!rt_check("aps-started", started == writers && writers > 0, "%u of %u writers started", started, writers))
        return 0;
    rt_printf("UART-SMP writers=%u count=%u\n", writers, count);
    rt_printf("UART-SMP-READY\n");
    __atomic_store_n(&go, 1, __ATOMIC_RELEASE);
    char line[64];
    uint32_t len = 0;
    int c;
    while (len + 1 < sizeof line && (c = rt_getc_timeout(60000)) >= 0 && c != '\n' && c != '\r') line[len++] = (char)c;
    line[len] = 0;
    end = rt_deadline(60000);
    while (__atomic_load_n(&done, __ATOMIC_SEQ_CST) < writers && !rt_expired(end)) cpu_pause();
    rt_printf("\necho-smp: %s\n", line);
    rt_check("input-line", len > 0, "%u bytes read while %u CPUs wrote", len, writers);
    rt_check("aps-done", done == writers, "%u of %u writers finished", done, writers);
    return 0;
}
