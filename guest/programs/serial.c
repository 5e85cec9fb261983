/* serial: 16550A UART registers, polled input and interrupt-driven input (IRQ 4 through the PIC).
 * Protocol with the host (which feeds stdin):
 *   guest prints "SERIAL-READY-POLL", host sends one line (e.g. "hello\n"),
 *   guest prints "echo-poll: <line>";
 *   guest prints "SERIAL-READY-IRQ",  host sends one line,
 *   guest prints "echo-irq: <line>".
 * Each wait gives up after ~15 s ("timeout=MS" on the command line changes it). */
#include "rt.h"

const char rt_program_name[] = "serial";

static volatile char irq_buf[80];
static volatile uint32_t irq_len, irq_count, irq_line_done;

static void com1_irq(struct rt_frame *f) {
    (void)f;
    irq_count++;
    for (int i = 0; i < 64 && (inb(COM1 + 5) & 1); i++) {
        char c = (char)inb(COM1);
        if (c == '\n' || c == '\r') { if (irq_len) irq_line_done = 1; }
        else if (irq_len < sizeof irq_buf - 1 && !irq_line_done) irq_buf[irq_len++] = c;
    }
    (void)inb(COM1 + 2);                                  /* IIR: acknowledge */
    rt_pic_eoi(4);
}

int main(void) {
    uint32_t timeout = (uint32_t)rt_cmdline_uint("timeout", 15000);

    outb(COM1 + 7, 0x5a);
    uint8_t scr = inb(COM1 + 7);
    outb(COM1 + 7, 0xa5);
    uint8_t scr2 = inb(COM1 + 7);
    rt_check("scratch-register", scr == 0x5a && scr2 == 0xa5, "read back %x, %x", scr, scr2);

    rt_check("lcr", inb(COM1 + 3) == 0x03, "LCR %x (8N1 written)", inb(COM1 + 3));
    outb(COM1 + 3, 0x83);
    outb(COM1 + 0, 0x0c);
    outb(COM1 + 1, 0x00);
    uint8_t dll = inb(COM1 + 0), dlm = inb(COM1 + 1);
    outb(COM1 + 0, 0x01);
    outb(COM1 + 3, 0x03);
    rt_check("divisor-latch", dll == 0x0c && dlm == 0, "DLL %x DLM %x", dll, dlm);

    uint8_t lsr = inb(COM1 + 5);
    rt_check("lsr-transmitter-empty", (lsr & 0x60) == 0x60, "LSR %x", lsr);
    uint8_t iir = inb(COM1 + 2);
    rt_check("iir-fifo-enabled", (iir & 0xc0) == 0xc0 && (iir & 1), "IIR %x (16550A FIFO bits, no interrupt pending)", iir);
    rt_check("mcr", (inb(COM1 + 4) & 0x1f) == 0x03, "MCR %x", inb(COM1 + 4));

    /* Polled input. */
    while (inb(COM1 + 5) & 1) (void)inb(COM1);         /* drop stale bytes */
    rt_printf("SERIAL-READY-POLL\n");
    char line[80];
    uint32_t n = 0;
    int c;
    while ((c = rt_getc_timeout(timeout)) >= 0) {
        if (c == '\n' || c == '\r') { if (n) break; else continue; }
        if (n < sizeof line - 1) line[n++] = (char)c;
    }
    line[n] = 0;
    if (rt_check("input-poll", c >= 0 && n > 0, "%u bytes%s", n, c < 0 ? " before the timeout" : ""))
        rt_printf("echo-poll: %s\n", line);

    /* Interrupt-driven input: IER.ERBFI, MCR.OUT2, PIC IRQ 4 (LAPIC LINT0 = ExtINT). */
    rt_lapic_enable();
    rt_pic_init();
    rt_set_handler(RT_PIC_BASE + 4, com1_irq, 0);
    rt_pic_unmask(4);
    outb(COM1 + 4, 0x0b);
    outb(COM1 + 1, 0x01);
    sti();
    rt_printf("SERIAL-READY-IRQ\n");
    uint64_t end = rt_deadline(timeout);
    while (!irq_line_done && !rt_expired(end)) cpu_pause();
    cli();
    outb(COM1 + 1, 0x00);
    rt_pic_mask_all();
    irq_buf[irq_len] = 0;
    if (rt_check("input-irq", irq_line_done && irq_count > 0, "%u interrupts, %u bytes", irq_count, irq_len))
        rt_printf("echo-irq: %s\n", (const char *)irq_buf);
    return 0;
}
