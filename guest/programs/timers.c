/* timers: PIT channel 0 through the 8259 PIC (LAPIC LINT0 ExtINT), the PIT through the IOAPIC
 * (pin 2 as QEMU and ACPI overrides route it, or pin 0 as an identity ISA routing does), and the
 * LAPIC timer in periodic mode. Each waits for 3 interrupts, up to ~5 s (timeout=MS). The PIT
 * runs at 18.2 Hz and the LAPIC timer at ~10 Hz: each guest interrupt is costly on PVM hosts. */
#include "rt.h"

const char rt_program_name[] = "timers";

#define VEC_IOAPIC_PIN0 0x30
#define VEC_IOAPIC_PIN2 0x31
#define VEC_LAPIC_TIMER 0x40

static volatile uint32_t pic_ticks, pin0_ticks, pin2_ticks, lapic_ticks;

static void on_pic_irq0(struct rt_frame *f) { (void)f; pic_ticks++; rt_pic_eoi(0); }
static void on_pin0(struct rt_frame *f) { (void)f; pin0_ticks++; rt_lapic_eoi(); }
static void on_pin2(struct rt_frame *f) { (void)f; pin2_ticks++; rt_lapic_eoi(); }
static void on_lapic_timer(struct rt_frame *f) { (void)f; lapic_ticks++; rt_lapic_eoi(); }

static void wait_for(volatile uint32_t *a, volatile uint32_t *b, uint32_t count, uint32_t ms) {
    uint64_t end = rt_deadline(ms);
    sti();
    while (*a + (b ? *b : 0) < count && !rt_expired(end)) cpu_pause();
    cli();
}

int main(void) {
    uint32_t timeout = (uint32_t)rt_cmdline_uint("timeout", 5000);
    rt_lapic_enable();
    rt_pic_init();
    rt_set_handler(RT_PIC_BASE + 0, on_pic_irq0, 0);
    rt_set_handler(VEC_IOAPIC_PIN0, on_pin0, 0);
    rt_set_handler(VEC_IOAPIC_PIN2, on_pin2, 0);
    rt_set_handler(VEC_LAPIC_TIMER, on_lapic_timer, 0);

    /* 1. PIT → PIC → LAPIC LINT0 (ExtINT). */
    rt_pic_unmask(0);
    rt_pit_periodic(0);
    wait_for(&pic_ticks, 0, 3, timeout);
    rt_pic_mask_all();
    rt_check("pit-pic", pic_ticks >= 3, "%u IRQ0 interrupts through the PIC", pic_ticks);

    /* 2. PIT → IOAPIC (PIC masked). */
    uint32_t pins = rt_ioapic_pins();
    uint32_t ver = rt_ioapic_read(1);
    rt_check("ioapic-present", pins >= 16 && pins <= 240, "version register %x: %u pins", ver, pins);
    uint8_t dest = (uint8_t)rt_lapic_id();
    rt_ioapic_route(0, VEC_IOAPIC_PIN0, dest, 0);
    rt_ioapic_route(2, VEC_IOAPIC_PIN2, dest, 0);
    wait_for(&pin0_ticks, &pin2_ticks, 3, timeout);
    rt_ioapic_route(0, VEC_IOAPIC_PIN0, dest, 1);
    rt_ioapic_route(2, VEC_IOAPIC_PIN2, dest, 1);
    rt_pit_stop();
    rt_check("pit-ioapic", pin0_ticks + pin2_ticks >= 3, "%u interrupts on IOAPIC pin 2, %u on pin 0", pin2_ticks, pin0_ticks);

    /* 3. LAPIC timer, periodic, divide by 16; 6.25 M counts ≈ 100 ms at a 1 GHz APIC bus. */
    rt_lapic_write(LAPIC_TIMER_DIV, 0x3);
    rt_lapic_write(LAPIC_LVT_TIMER, (1u << 17) | VEC_LAPIC_TIMER);
    rt_lapic_write(LAPIC_TIMER_INIT, 6250000);
    uint32_t c1 = rt_lapic_read(LAPIC_TIMER_CUR);
    for (int i = 0; i < 100; i++) cpu_pause();
    uint32_t c2 = rt_lapic_read(LAPIC_TIMER_CUR);
    rt_check("lapic-timer-counts-down", c2 < c1 && c1 <= 6250000, "current count %u then %u", c1, c2);
    wait_for(&lapic_ticks, 0, 3, timeout);
    rt_lapic_write(LAPIC_LVT_TIMER, 0x10000 | VEC_LAPIC_TIMER);
    rt_lapic_write(LAPIC_TIMER_INIT, 0);
    rt_check("lapic-timer", lapic_ticks >= 3, "%u LAPIC timer interrupts", lapic_ticks);
    if (rt_spurious_count) rt_printf("# %lu unexpected interrupts\n", (uint64_t)rt_spurious_count);
    return 0;
}
