/* rtc_irq: the CMOS RTC's update cycle and interrupts (IRQ 8 through the PIC).
 * - uip-cycle: four times, UIP (register A bit 7) rises and falls, and the seconds register advanced by
 *   exactly one across that window (the spacing of windows and their TSC interval are printed, not judged);
 * - alarm-irq: an alarm 2 s ahead (BCD, 24-hour) with AIE raises IRQ 8; in the handler register C
 *   reads IRQF|AF and the clock shows the alarm time; no alarm interrupt came before it;
 * - update-irq: with UIE, two update-ended interrupts, each reading IRQF|UF in register C;
 * - periodic-irq: with PIE at 2 Hz (rate 15), two periodic interrupts reading IRQF|PF.
 * "timeout=MS" bounds each wait (default 8000, approximate: see rt_deadline). */
#include "rt.h"

const char rt_program_name[] = "rtc_irq";

static uint8_t cmos(uint8_t reg) { outb(0x70, reg); return inb(0x71); }
static void cmos_set(uint8_t reg, uint8_t v) { outb(0x70, reg); outb(0x71, v); }
static uint8_t bcd(uint8_t v) { return (uint8_t)((v >> 4) * 10 + (v & 0x0f)); }
static uint8_t to_bcd(uint8_t v) { return (uint8_t)((v / 10) << 4 | (v % 10)); }

static volatile uint32_t irqs;
static volatile uint8_t last_c, irq_sec, irq_min, irq_hour;
static volatile uint32_t wrong_flags;
static volatile uint8_t want_flag;

static void on_rtc(struct rt_frame *f) {
    (void)f;
    uint8_t c = cmos(0x0c);
    last_c = c;
    irq_sec = cmos(0x00); irq_min = cmos(0x02); irq_hour = cmos(0x04);
    if ((c & 0x80) && (c & want_flag)) irqs++;
    else wrong_flags++;
    rt_pic_eoi(8);
}

static int wait_irqs(uint32_t n, uint32_t ms) {
    uint64_t end = rt_deadline(ms);
    sti();
    while (irqs < n && !rt_expired(end)) cpu_pause();
    cli();
    return irqs >= n;
}

int main(void) {
    uint32_t timeout = (uint32_t)rt_cmdline_uint("timeout", 8000);
    cmos_set(0x0b, 0x02);                      /* 24-hour BCD, no interrupts */
    cmos_set(0x0a, 0x26);
    (void)cmos(0x0c);

    /* UIP cycle: each window brackets exactly one update. The seconds register is read just before the read
     * of register A that sees UIP rise, and again just after UIP falls: it must have advanced by one. (Only
     * that is judged: under host load the program can miss a whole 2.2 ms window, so consecutive windows
     * are not required to be one second apart; their spacing and TSC interval are printed.) */
    int ok = 1;
    uint8_t prev_after = 0xff;
    uint64_t prev_tsc = 0;
    for (int cycle = 0; cycle < 4 && ok; cycle++) {
        uint64_t end = rt_deadline(timeout);
        uint8_t before = 0;
        for (;;) {
            before = bcd(cmos(0x00));
            if (cmos(0x0a) & 0x80) break;
            if (rt_expired(end)) { ok = 0; break; }
        }
        uint64_t rise = rdtsc();
        while (ok && (cmos(0x0a) & 0x80)) if (rt_expired(end)) { ok = 0; break; }
        if (!ok) { rt_fail("uip-cycle", "cycle %d: UIP did not rise and fall in time", cycle); break; }
        uint8_t after = bcd(cmos(0x00));
        uint8_t step = (uint8_t)((after + 60 - before) % 60);
        rt_printf("# UIP window %d: seconds %u -> %u across it, %u s after the previous window, %lu TSC ticks since its rise\n",
                  cycle, before, after, prev_after == 0xff ? 0 : (after + 60 - prev_after) % 60, prev_tsc ? rise - prev_tsc : 0);
        if (step != 1) { rt_fail("uip-cycle", "seconds went %u -> %u across one UIP window", before, after); ok = 0; }
        if (prev_after != 0xff && after == prev_after) { rt_fail("uip-cycle", "two UIP windows in second %u", after); ok = 0; }
        prev_after = after;
        prev_tsc = rise;
    }
    if (ok) rt_ok("uip-cycle");

    rt_pic_init();
    rt_set_handler(RT_PIC_BASE + 8, on_rtc, 0);
    rt_pic_unmask(8);

    /* Alarm 2 s ahead. */
    uint64_t end = rt_deadline(timeout);
    while ((cmos(0x0a) & 0x80) && !rt_expired(end)) {}
    uint8_t s = bcd(cmos(0x00)), m = bcd(cmos(0x02)), h = bcd(cmos(0x04));
    uint32_t t = ((uint32_t)h * 3600 + m * 60 + s + 2) % 86400;
    uint8_t as = (uint8_t)(t % 60), am = (uint8_t)(t / 60 % 60), ah = (uint8_t)(t / 3600);
    cmos_set(0x01, to_bcd(as)); cmos_set(0x03, to_bcd(am)); cmos_set(0x05, to_bcd(ah));
    (void)cmos(0x0c);
    want_flag = 0x20;
    irqs = 0; wrong_flags = 0;
    cmos_set(0x0b, 0x22);                      /* AIE */
    int got = wait_irqs(1, timeout);
    cmos_set(0x0b, 0x02);
    rt_check("alarm-irq", got && wrong_flags == 0 && bcd(irq_sec) == as && bcd(irq_min) == am && bcd(irq_hour) == ah,
             "set %02u:%02u:%02u at %02u:%02u:%02u; %u interrupts, C %x, clock in the handler %02x:%02x:%02x, %u unexpected",
             ah, am, as, h, m, s, irqs, last_c, irq_hour, irq_min, irq_sec, wrong_flags);

    /* Update-ended. */
    (void)cmos(0x0c);
    want_flag = 0x10;
    irqs = 0; wrong_flags = 0;
    cmos_set(0x0b, 0x12);                      /* UIE */
    got = wait_irqs(2, timeout);
    cmos_set(0x0b, 0x02);
    rt_check("update-irq", got && wrong_flags == 0, "%u interrupts, C %x, %u unexpected", irqs, last_c, wrong_flags);

    /* Periodic, 2 Hz. */
    cmos_set(0x0a, 0x2f);
    (void)cmos(0x0c);
    want_flag = 0x40;
    irqs = 0; wrong_flags = 0;
    cmos_set(0x0b, 0x42);                      /* PIE */
    got = wait_irqs(2, timeout);
    cmos_set(0x0b, 0x02);
    cmos_set(0x0a, 0x26);
    rt_check("periodic-irq", got && wrong_flags == 0, "%u interrupts, C %x, %u unexpected", irqs, last_c, wrong_flags);
    rt_pic_mask_all();
    (void)cmos(0x0c);
    return 0;
}
