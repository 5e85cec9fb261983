/* ticker: prints "tick N" about every period_ms (default 10) from a ring-3 loop that watches the
 * TSC (ring-3 code runs natively on PVM hosts; a timer interrupt would cost ~10 ms of emulation).
 * The TSC rate comes from tsc_khz=N on the command line (the host passes its rate; default
 * 3000000). At every tick the loop also polls the i8042: on Ctrl+Alt+Del (set 1 make codes
 * 1d 38 e0 53, or set 2 14 11 e0 71) it prints "CTRL-ALT-DEL" and resets the machine through
 * the i8042 (0xFE to port 0x64), as Linux with reboot=k does. After ticks=N ticks (default
 * 500; 0 = forever) it prints "TICKER-DONE" and powers off (cli; hlt: exit status 0).
 * Used by the API lifecycle tests: while the VM is paused no tick may appear. */
#include "rt.h"

const char rt_program_name[] = "ticker";

struct ticker_args { uint64_t period, ticks; };

static int is_cad(const uint8_t *seq, int n) {
    static const uint8_t set1[] = {0x1d, 0x38, 0xe0, 0x53}, set2[] = {0x14, 0x11, 0xe0, 0x71};
    int a = 0, b = 0;
    for (int i = 0; i < n; i++) {
        if (a < 4 && seq[i] == set1[a]) a++;
        if (b < 4 && seq[i] == set2[b]) b++;
    }
    return a == 4 || b == 4;
}

static long tick_loop(void *arg) {
    struct ticker_args *t = arg;
    uint8_t keys[16];
    int nkeys = 0;
    uint64_t next = rdtsc() + t->period;
    for (uint64_t n = 1; t->ticks == 0 || n <= t->ticks; n++) {
        while (rdtsc() < next) cpu_pause();
        next += t->period;
        rt_printf("tick %lu\n", n);
        while (inb(0x64) & 0x01) {
            uint8_t b = inb(0x60);
            if (nkeys < (int)sizeof keys) keys[nkeys++] = b;
        }
        if (nkeys && is_cad(keys, nkeys)) {
            rt_printf("CTRL-ALT-DEL\n");
            for (int i = 0; i < 1000 && (inb(0x64) & 0x02); i++) cpu_pause();
            outb(0x64, 0xfe);
            for (;;) cpu_pause();
        }
    }
    return 0;
}

int main(void) {
    uint64_t khz = rt_cmdline_uint("tsc_khz", 3000000);
    uint64_t period_ms = rt_cmdline_uint("period_ms", 10);
    struct ticker_args t = { khz * (period_ms ? period_ms : 1), rt_cmdline_uint("ticks", 500) };
    rt_printf("TICKER-START tsc_khz=%lu period_ms=%lu ticks=%lu\n", khz, period_ms, t.ticks);
    long r = rt_run_user(tick_loop, &t, 3);
    if (r == RT_USER_FAULTED) {
        rt_fail("ticker", "ring 3 loop faulted: %s at rip %lx", rt_exception_name(rt_user_fault_vector),
                (uint64_t)rt_user_fault_rip);
        rt_finish();
    }
    rt_printf("TICKER-DONE\n");
    cli();
    for (;;) __asm__ volatile("hlt");
}
