/* SwiftKVM guest test runtime (see rt.h). Ring-0 code here is emulated on PVM hosts: keep it short. */
#include "rt.h"

int main(void);

/* ---------------------------------------------------------------- libc bits */
void *memset(void *d, int c, size_t n) {
    uint8_t *p = d;
    while (n--) *p++ = (uint8_t)c;
    return d;
}
void *memcpy(void *d, const void *s, size_t n) {
    uint8_t *p = d;
    const uint8_t *q = s;
    while (n--) *p++ = *q++;
    return d;
}
int memcmp(const void *a, const void *b, size_t n) {
    const uint8_t *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q) return *p - *q;
    return 0;
}
size_t strlen(const char *s) {
    size_t n = 0;
    while (s[n]) n++;
    return n;
}
int strncmp(const char *a, const char *b, size_t n) {
    for (; n; n--, a++, b++) {
        if (*a != *b) return (uint8_t)*a - (uint8_t)*b;
        if (!*a) return 0;
    }
    return 0;
}

/* ---------------------------------------------------------------- time */
uint64_t rt_deadline(uint32_t ms) { return rdtsc() + (RT_TSC_HZ_GUESS / 1000) * ms; }
int rt_expired(uint64_t deadline) { return (int64_t)(rdtsc() - deadline) >= 0; }

/* ---------------------------------------------------------------- serial */
static void serial_init(void) {
    outb(COM1 + 1, 0x00);   /* IER: no interrupts */
    outb(COM1 + 3, 0x80);   /* LCR: DLAB */
    outb(COM1 + 0, 0x01);   /* 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);   /* 8N1 */
    outb(COM1 + 2, 0xc7);   /* FIFO on, cleared, 14-byte trigger */
    outb(COM1 + 4, 0x03);   /* DTR | RTS */
}

void rt_putc(char c) {
    /* Bounded wait for THRE: a UART that never reports it must not hang the program. */
    for (int i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++) cpu_pause();
    outb(COM1, (uint8_t)c);
}
void rt_puts(const char *s) { while (*s) rt_putc(*s++); }

int rt_getc_timeout(uint32_t timeout_ms) {
    uint64_t end = rt_deadline(timeout_ms);
    do {
        if (inb(COM1 + 5) & 0x01) return inb(COM1);
        cpu_pause();
    } while (!rt_expired(end));
    return -1;
}

static void put_num(uint64_t v, unsigned base, int width, char pad, int upper) {
    char buf[24];
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    int n = 0;
    do { buf[n++] = digits[v % base]; v /= base; } while (v && n < 24);
    while (width > n && width-- > 0) rt_putc(pad);
    while (n) rt_putc(buf[--n]);
}
void rt_put_hex(uint64_t v) { rt_puts("0x"); put_num(v, 16, 0, '0', 0); }
void rt_put_dec(uint64_t v) { put_num(v, 10, 0, '0', 0); }

void rt_vprintf(const char *f, va_list ap) {
    for (; *f; f++) {
        if (*f != '%') { rt_putc(*f); continue; }
        f++;
        char pad = ' ';
        int width = 0, lng = 0;
        if (*f == '0') { pad = '0'; f++; }
        while (*f >= '0' && *f <= '9') width = width * 10 + (*f++ - '0');
        while (*f == 'l' || *f == 'z') { lng++; f++; }
        switch (*f) {
        case 'd': case 'i': {
            int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
            if (v < 0) { rt_putc('-'); v = -v; }
            put_num((uint64_t)v, 10, width, pad, 0);
            break;
        }
        case 'u': put_num(lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 10, width, pad, 0); break;
        case 'x': put_num(lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 16, width, pad, 0); break;
        case 'X': put_num(lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 16, width, pad, 1); break;
        case 'p': rt_put_hex((uint64_t)(uintptr_t)va_arg(ap, void *)); break;
        case 'c': rt_putc((char)va_arg(ap, int)); break;
        case 's': { const char *s = va_arg(ap, const char *); rt_puts(s ? s : "(null)"); break; }
        case '%': rt_putc('%'); break;
        case 0: return;
        default: rt_putc('%'); rt_putc(*f); break;
        }
    }
}
void rt_printf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    rt_vprintf(fmt, ap);
    va_end(ap);
}

/* ---------------------------------------------------------------- report */
static uint32_t passes, fails;
uint32_t rt_pass_count(void) { return passes; }
uint32_t rt_fail_count(void) { return fails; }

void rt_ok(const char *name) { passes++; rt_printf("ok %s\n", name); }
void rt_okf(const char *name, const char *fmt, ...) {
    va_list ap;
    passes++;
    rt_printf("ok %s: ", name);
    va_start(ap, fmt);
    rt_vprintf(fmt, ap);
    va_end(ap);
    rt_putc('\n');
}
void rt_fail(const char *name, const char *fmt, ...) {
    va_list ap;
    fails++;
    rt_printf("FAIL %s: ", name);
    va_start(ap, fmt);
    rt_vprintf(fmt, ap);
    va_end(ap);
    rt_putc('\n');
}
int rt_check(const char *name, int cond, const char *fmt, ...) {
    va_list ap;
    if (cond) passes++; else fails++;
    rt_printf("%s %s: ", cond ? "ok" : "FAIL", name);
    va_start(ap, fmt);
    rt_vprintf(fmt, ap);
    va_end(ap);
    rt_putc('\n');
    return cond;
}

void rt_exit(uint8_t v) {
    outb(RT_DEBUG_EXIT_PORT, v);
    for (;;) __asm__ volatile("cli; hlt");
}
void rt_finish(void) {
    rt_printf("RESULT pass %u fail %u\n", passes, fails);
    rt_exit(fails ? RT_EXIT_FAIL : RT_EXIT_PASS);
}

/* ---------------------------------------------------------------- boot information */
const struct mb_info *rt_mbi;
const char *rt_cmdline = "";

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n'; }

/* Start of the value of "key=" as a whole word in the command line, or NULL. */
static const char *cmdline_find(const char *key) {
    size_t n = strlen(key);
    for (const char *p = rt_cmdline; *p; p++) {
        if ((p == rt_cmdline || is_space(p[-1])) && !strncmp(p, key, n) && p[n] == '=') return p + n + 1;
    }
    return 0;
}
uint64_t rt_cmdline_uint(const char *key, uint64_t def) {
    const char *p = cmdline_find(key);
    if (!p) return def;
    uint64_t v = 0, base = 10;
    if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) { base = 16; p += 2; }
    int digits = 0;
    for (;; p++, digits++) {
        int d;
        if (*p >= '0' && *p <= '9') d = *p - '0';
        else if (base == 16 && *p >= 'a' && *p <= 'f') d = *p - 'a' + 10;
        else if (base == 16 && *p >= 'A' && *p <= 'F') d = *p - 'A' + 10;
        else break;
        v = v * base + (uint64_t)d;
    }
    return digits ? v : def;
}
int rt_cmdline_str(const char *key, char *buf, size_t max) {
    const char *p = cmdline_find(key);
    if (!p || !max) return -1;
    size_t n = 0;
    while (p[n] && !is_space(p[n]) && n + 1 < max) { buf[n] = p[n]; n++; }
    buf[n] = 0;
    return (int)n;
}
int rt_cmdline_has(const char *word) {
    size_t n = strlen(word);
    for (const char *p = rt_cmdline; *p; p++)
        if ((p == rt_cmdline || is_space(p[-1])) && !strncmp(p, word, n) && (is_space(p[n]) || !p[n])) return 1;
    return 0;
}

/* ---------------------------------------------------------------- GDT/TSS, IDT */
extern uint64_t rt_gdt[];
extern uint8_t rt_interrupt_stack_top[], rt_user_stack_top[], rt_isr_stubs[];
extern uint8_t __image_end[];

static struct {
    uint32_t reserved0;
    uint64_t rsp0, rsp1, rsp2, reserved1, ist[7], reserved2;
    uint16_t reserved3, iomap_base;
    uint8_t iomap[8192 + 1];        /* all ports allowed (0 bits); the last byte is the 0xff terminator */
} __attribute__((packed)) tss;

static struct { uint16_t lo; uint16_t sel; uint8_t ist; uint8_t type; uint16_t mid; uint32_t hi; uint32_t zero; }
    __attribute__((packed)) idt[256];
static rt_handler handlers[256];
volatile uint64_t rt_spurious_count;

static void set_gate(uint8_t v, int dpl) {
    uint64_t a = (uint64_t)(uintptr_t)rt_isr_stubs + 16u * v;
    idt[v].lo = (uint16_t)a;
    idt[v].sel = SEL_KCODE;
    idt[v].ist = 0;
    idt[v].type = (uint8_t)(0x8e | (dpl << 5));    /* present, 64-bit interrupt gate */
    idt[v].mid = (uint16_t)(a >> 16);
    idt[v].hi = (uint32_t)(a >> 32);
    idt[v].zero = 0;
}

void rt_set_handler(uint8_t vector, rt_handler h, int dpl) {
    handlers[vector] = h;
    set_gate(vector, dpl);
}

static uint8_t ist_stack[4096] __attribute__((aligned(16)));
void rt_set_ist(uint8_t vector, int on) {
    tss.ist[0] = (uint64_t)(uintptr_t)(ist_stack + sizeof ist_stack);
    idt[vector].ist = on ? 1 : 0;
}

/* Loads the shared IDT (BSP at start, each AP in rt_ap_main). */
void rt_load_idt(void) {
    struct { uint16_t limit; uint64_t base; } __attribute__((packed)) idtr = { sizeof idt - 1, (uint64_t)(uintptr_t)idt };
    __asm__ volatile("lidt %0" :: "m"(idtr));
}

static void tables_init(void) {
    uint64_t base = (uint64_t)(uintptr_t)&tss, limit = sizeof tss - 1;
    tss.rsp0 = (uint64_t)(uintptr_t)rt_interrupt_stack_top;
    /* An all-zero I/O bitmap: ring 3 may use every port. Some hosts (PVM) check the bitmap even
     * when IOPL is 3, which rt_run_user also sets on request. */
    tss.iomap_base = (uint16_t)__builtin_offsetof(__typeof__(tss), iomap);
    tss.iomap[8192] = 0xff;
    rt_gdt[SEL_TSS / 8] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ull << 40) |
                          (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
    rt_gdt[SEL_TSS / 8 + 1] = base >> 32;
    __asm__ volatile("ltr %w0" :: "r"(SEL_TSS));

    for (int v = 0; v < 256; v++) set_gate((uint8_t)v, 0);
    rt_load_idt();

    wrmsr(MSR_STAR, ((uint64_t)SEL_UCODE32 << 48) | ((uint64_t)SEL_KCODE << 32));
    wrmsr(MSR_LSTAR, (uint64_t)(uintptr_t)rt_syscall_entry);
    wrmsr(MSR_FMASK, 0x700);                         /* clear TF, IF, DF on SYSCALL */
}

static const char *const exception_names[32] = {
    "#DE divide error", "#DB debug", "NMI", "#BP breakpoint", "#OF overflow", "#BR bound range",
    "#UD invalid opcode", "#NM device not available", "#DF double fault", "coprocessor overrun",
    "#TS invalid TSS", "#NP segment not present", "#SS stack fault", "#GP general protection",
    "#PF page fault", "reserved 15", "#MF x87 error", "#AC alignment check", "#MC machine check",
    "#XM SIMD error", "#VE virtualization", "#CP control protection", "reserved 22", "reserved 23",
    "reserved 24", "reserved 25", "reserved 26", "reserved 27", "#HV hypervisor injection",
    "#VC VMM communication", "#SX security", "reserved 31",
};
const char *rt_exception_name(uint64_t v) { return v < 32 ? exception_names[v] : "interrupt"; }

/* Fault recovery for the *_safe helpers: a fault at rt_fixup_rip resumes at rt_fixup_to. */
volatile uint64_t rt_fixup_rip, rt_fixup_to, rt_fixup_vector;

/* User-mode bookkeeping (rt_run_user). */
volatile uint64_t rt_kernel_rsp, rt_user_active;
volatile uint64_t rt_user_fault_vector, rt_user_fault_error, rt_user_fault_rip;
volatile uint64_t rt_syscall_cs, rt_syscall_rcx, rt_syscall_r11, rt_syscall_count;
extern uint8_t rt_user_resume[], rt_user_exit_ud2[];

static void return_to_kernel(struct rt_frame *f, long result) {
    rt_user_active = 0;
    f->rip = (uint64_t)(uintptr_t)rt_user_resume;
    f->cs = SEL_KCODE;
    f->ss = SEL_KDATA;
    f->rsp = rt_kernel_rsp;
    f->rflags = 0x2;
    f->rax = (uint64_t)result;
}

void rt_interrupt(struct rt_frame *f) {
    uint64_t v = f->vector;
    if (v < 32 && rt_fixup_rip && f->rip == rt_fixup_rip) {
        rt_fixup_vector = v;
        f->rip = rt_fixup_to;
        return;
    }
    if (handlers[v]) { handlers[v](f); return; }
    if (v == 6 && (f->cs & 3) && rt_user_active && f->rip == (uint64_t)(uintptr_t)rt_user_exit_ud2) {
        return_to_kernel(f, (long)f->rax);
        return;
    }
    if (v < 32 && (f->cs & 3) && rt_user_active) {
        rt_user_fault_vector = v;
        rt_user_fault_error = f->error;
        rt_user_fault_rip = f->rip;
        return_to_kernel(f, RT_USER_FAULTED);
        return;
    }
    if (v < 32) {
        fails++;
        rt_printf("FAIL exception: vector %u (%s) error %lx at rip %lx cs %lx rflags %lx rsp %lx cr2 %lx\n",
                  (unsigned)v, rt_exception_name(v), f->error, f->rip, f->cs, f->rflags, f->rsp, read_cr2());
        rt_printf("RESULT pass %u fail %u\n", passes, fails);
        rt_exit(RT_EXIT_CRASH);
    }
    /* Unexpected device interrupt: count it, acknowledge it where it may have come from. */
    rt_spurious_count++;
    if (v >= RT_PIC_BASE && v < RT_PIC_BASE + 16 && v != RT_PIC_BASE + 7 && v != RT_PIC_BASE + 15)
        rt_pic_eoi((uint8_t)(v - RT_PIC_BASE));
    else if (v != 0xff && (rdmsr(MSR_APIC_BASE) & 0x800))
        rt_lapic_eoi();
}

int rt_rdmsr_safe(uint32_t msr, uint64_t *value) {
    uint32_t lo = 0, hi = 0;
    rt_fixup_vector = 0xffffffff;
    __asm__ volatile(
        "leaq 1f(%%rip), %%r8\n\t"
        "movq %%r8, rt_fixup_rip(%%rip)\n\t"
        "leaq 2f(%%rip), %%r8\n\t"
        "movq %%r8, rt_fixup_to(%%rip)\n\t"
        "1: rdmsr\n\t"
        "2: movq $0, rt_fixup_rip(%%rip)"
        : "=a"(lo), "=d"(hi) : "c"(msr) : "r8", "memory");
    if (rt_fixup_vector != 0xffffffff) return (int)rt_fixup_vector;
    *value = ((uint64_t)hi << 32) | lo;
    return 0;
}
int rt_wrmsr_safe(uint32_t msr, uint64_t value) {
    rt_fixup_vector = 0xffffffff;
    __asm__ volatile(
        "leaq 1f(%%rip), %%r8\n\t"
        "movq %%r8, rt_fixup_rip(%%rip)\n\t"
        "leaq 2f(%%rip), %%r8\n\t"
        "movq %%r8, rt_fixup_to(%%rip)\n\t"
        "1: wrmsr\n\t"
        "2: movq $0, rt_fixup_rip(%%rip)"
        :: "c"(msr), "a"((uint32_t)value), "d"((uint32_t)(value >> 32)) : "r8", "memory");
    return rt_fixup_vector != 0xffffffff ? (int)rt_fixup_vector : 0;
}

/* ---------------------------------------------------------------- user mode */
long rt_run_user_asm(long (*fn)(void *), uint64_t user_rsp, uint64_t rflags, void *arg);

long rt_run_user(long (*fn)(void *), void *arg, int iopl) {
    rt_user_fault_vector = rt_user_fault_error = rt_user_fault_rip = 0;
    rt_user_active = 1;
    uint64_t rflags = 0x202 | ((uint64_t)(iopl & 3) << 12);   /* IF on so timers keep running */
    return rt_run_user_asm(fn, (uint64_t)(uintptr_t)rt_user_stack_top, rflags, arg);
}

/* ---------------------------------------------------------------- PIC / PIT */
void rt_pic_init(void) {
    outb(0x20, 0x11); outb(0xa0, 0x11);              /* ICW1: edge, cascade, ICW4 */
    outb(0x21, RT_PIC_BASE); outb(0xa1, RT_PIC_BASE + 8);
    outb(0x21, 0x04); outb(0xa1, 0x02);              /* cascade on IRQ2 */
    outb(0x21, 0x01); outb(0xa1, 0x01);              /* 8086 mode */
    rt_pic_mask_all();
}
void rt_pic_mask_all(void) { outb(0x21, 0xff); outb(0xa1, 0xff); }
void rt_pic_unmask(uint8_t irq) {
    if (irq < 8) {
        outb(0x21, inb(0x21) & (uint8_t)~(1u << irq));
    } else if (irq < 16) {
        outb(0xa1, inb(0xa1) & (uint8_t)~(1u << (irq - 8)));
        outb(0x21, inb(0x21) & (uint8_t)~(1u << 2));
    }
}
void rt_pic_eoi(uint8_t irq) {
    if (irq >= 8) outb(0xa0, 0x20);
    outb(0x20, 0x20);
}
void rt_pit_periodic(uint16_t divisor) {
    outb(0x43, 0x34);                                /* channel 0, lo/hi, mode 2 */
    outb(0x40, (uint8_t)divisor);
    outb(0x40, (uint8_t)(divisor >> 8));
}
void rt_pit_stop(void) {
    outb(0x43, 0x30);                                /* channel 0, mode 0; no count written: stays idle */
}

/* ---------------------------------------------------------------- LAPIC / IOAPIC */
uint64_t rt_lapic_base(void) { return rdmsr(MSR_APIC_BASE) & 0xffffff000ull; }
uint32_t rt_lapic_read(uint32_t reg) { return mmio_read32(rt_lapic_base() + reg); }
void rt_lapic_write(uint32_t reg, uint32_t v) { mmio_write32(rt_lapic_base() + reg, v); }
void rt_lapic_eoi(void) { rt_lapic_write(LAPIC_EOI, 0); }
uint32_t rt_lapic_id(void) { return rt_lapic_read(LAPIC_ID) >> 24; }
void rt_lapic_enable(void) {
    uint64_t b = rdmsr(MSR_APIC_BASE);
    if (!(b & 0x800)) wrmsr(MSR_APIC_BASE, b | 0x800);
    rt_lapic_write(LAPIC_TPR, 0);
    rt_lapic_write(LAPIC_SVR, 0x1ff);
    rt_lapic_write(LAPIC_LVT_LINT0, 0x700);          /* ExtINT: the PIC */
    rt_lapic_write(LAPIC_LVT_LINT1, 0x400);          /* NMI */
}

uint32_t rt_ioapic_read(uint32_t reg) {
    mmio_write32(IOAPIC_BASE, reg);
    return mmio_read32(IOAPIC_BASE + 0x10);
}
void rt_ioapic_write(uint32_t reg, uint32_t v) {
    mmio_write32(IOAPIC_BASE, reg);
    mmio_write32(IOAPIC_BASE + 0x10, v);
}
uint32_t rt_ioapic_pins(void) { return ((rt_ioapic_read(1) >> 16) & 0xff) + 1; }
void rt_ioapic_route(uint32_t pin, uint8_t vector, uint8_t dest, int masked) {
    rt_ioapic_write(0x11 + 2 * pin, (uint32_t)dest << 24);
    rt_ioapic_write(0x10 + 2 * pin, vector | (masked ? 0x10000u : 0));
}

/* ---------------------------------------------------------------- PCI */
static uint32_t pci_addr(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t off) {
    return 0x80000000u | ((uint32_t)bus << 16) | ((uint32_t)(dev & 31) << 11) | ((uint32_t)(fn & 7) << 8) | (off & 0xfc);
}
uint32_t rt_pci_read32(uint8_t b, uint8_t d, uint8_t f, uint8_t off) { outl(0xcf8, pci_addr(b, d, f, off)); return inl(0xcfc); }
uint16_t rt_pci_read16(uint8_t b, uint8_t d, uint8_t f, uint8_t off) { outl(0xcf8, pci_addr(b, d, f, off)); return inw(0xcfc + (off & 2)); }
uint8_t rt_pci_read8(uint8_t b, uint8_t d, uint8_t f, uint8_t off) { outl(0xcf8, pci_addr(b, d, f, off)); return inb(0xcfc + (off & 3)); }
void rt_pci_write32(uint8_t b, uint8_t d, uint8_t f, uint8_t off, uint32_t v) { outl(0xcf8, pci_addr(b, d, f, off)); outl(0xcfc, v); }
void rt_pci_write16(uint8_t b, uint8_t d, uint8_t f, uint8_t off, uint16_t v) { outl(0xcf8, pci_addr(b, d, f, off)); outw(0xcfc + (off & 2), v); }

uint64_t rt_pci_bar_size(uint8_t b, uint8_t d, uint8_t f, int bar, int *is_io, int *is_64) {
    if (bar < 0 || bar > 5) return 0;
    uint8_t off = (uint8_t)(0x10 + 4 * bar);
    uint32_t orig = rt_pci_read32(b, d, f, off);
    *is_io = orig & 1;
    *is_64 = !*is_io && ((orig >> 1) & 3) == 2 && bar < 5;
    rt_pci_write32(b, d, f, off, 0xffffffff);
    uint32_t lo = rt_pci_read32(b, d, f, off);
    rt_pci_write32(b, d, f, off, orig);
    uint64_t mask = lo & (*is_io ? ~3u : ~15u);
    if (*is_64) {
        uint32_t orig_hi = rt_pci_read32(b, d, f, off + 4);
        rt_pci_write32(b, d, f, off + 4, 0xffffffff);
        uint32_t hi = rt_pci_read32(b, d, f, off + 4);
        rt_pci_write32(b, d, f, off + 4, orig_hi);
        mask |= (uint64_t)hi << 32;
    } else {
        mask |= 0xffffffff00000000ull;
        if (*is_io) mask |= 0xffff0000ull;
    }
    /* An unimplemented BAR reads back 0 in every address bit (both halves for 64-bit). */
    if (!(mask & 0xffffffffull) && (!*is_64 || !(mask >> 32))) return 0;
    return ~mask + 1;
}
uint8_t rt_pci_find_cap(uint8_t b, uint8_t d, uint8_t f, uint8_t cap_id, uint8_t start) {
    if (!(rt_pci_read16(b, d, f, 0x06) & 0x10)) return 0;
    uint8_t p = start ? rt_pci_read8(b, d, f, start + 1) : rt_pci_read8(b, d, f, 0x34);
    for (int i = 0; i < 48 && p >= 0x40; i++) {
        p &= 0xfc;
        if (rt_pci_read8(b, d, f, p) == cap_id) return p;
        p = rt_pci_read8(b, d, f, p + 1);
    }
    return 0;
}

/* ---------------------------------------------------------------- memory */
/* The end of what the loader placed for us: the multiboot info, memory map, command lines, module list and
 * modules may sit right after the image (QEMU and swiftkvm put them above the highest segment). */
static uint64_t boot_data_end(void) {
    uint64_t end = (uint64_t)(uintptr_t)__image_end;
#define BUMP(a, n) do { uint64_t e_ = (uint64_t)(a) + (uint64_t)(n); if ((a) && e_ > end && e_ < (4ull << 30)) end = e_; } while (0)
    if (!rt_mbi) return end;
    BUMP((uintptr_t)rt_mbi, 128);
    if (rt_mbi->flags & (1u << 6)) BUMP(rt_mbi->mmap_addr, rt_mbi->mmap_length);
    if (rt_mbi->flags & (1u << 2)) {
        const char *c = (const char *)(uintptr_t)rt_mbi->cmdline;
        size_t n = 0;
        while (n < 65536 && c[n]) n++;
        BUMP(rt_mbi->cmdline, n + 1);
    }
    if (rt_mbi->flags & (1u << 3)) {
        BUMP(rt_mbi->mods_addr, 16ull * rt_mbi->mods_count);
        const uint32_t *m = (const uint32_t *)(uintptr_t)rt_mbi->mods_addr;
        for (uint32_t i = 0; i < rt_mbi->mods_count && i < 256; i++) {
            BUMP(m[4 * i + 1], 0);
            const char *c = (const char *)(uintptr_t)m[4 * i + 2];
            size_t n = 0;
            while (c && n < 65536 && c[n]) n++;
            BUMP(m[4 * i + 2], n + 1);
        }
    }
#undef BUMP
    return end;
}

static uint64_t heap_next, heap_end;
void *rt_alloc_pages_nozero(size_t count) {
    if (!heap_next) {
        heap_next = (boot_data_end() + 0xfff) & ~0xfffull;
        heap_end = (rt_mbi && (rt_mbi->flags & 1)) ? (uint64_t)rt_mbi->mem_upper * 1024 + 0x100000 : 64ull << 20;
        if (heap_end > (3ull << 30)) heap_end = 3ull << 30;
    }
    uint64_t size = (uint64_t)count * 4096;
    if (count == 0 || count > (1u << 20) || heap_next + size > heap_end) return 0;
    void *p = (void *)(uintptr_t)heap_next;
    heap_next += size;
    return p;
}
void *rt_alloc_pages(size_t count) {
    void *p = rt_alloc_pages_nozero(count);
    if (p) memset(p, 0, count * 4096);
    return p;
}

/* ---------------------------------------------------------------- start */
void rt_start(uint32_t magic, uint32_t info) {
    serial_init();
    tables_init();
    rt_pic_init();              /* firmware may leave the PIC at vectors 8-15 with the PIT running */
    if (magic == 0x2BADB002 && info) {
        rt_mbi = (const struct mb_info *)(uintptr_t)info;
        if ((rt_mbi->flags & 4) && rt_mbi->cmdline) {
            /* Copied: loaders (QEMU) put the command line right after the image, where
             * rt_alloc_pages hands out memory. */
            static char cmdline_copy[1024];
            const char *src = (const char *)(uintptr_t)rt_mbi->cmdline;
            size_t n = 0;
            while (src[n] && n + 1 < sizeof cmdline_copy) { cmdline_copy[n] = src[n]; n++; }
            cmdline_copy[n] = 0;
            rt_cmdline = cmdline_copy;
        }
    }
    rt_printf("# swiftkvm guest program %s (%s entry) cmdline \"%s\"\n", rt_program_name,
              magic == 0x2BADB002 ? "multiboot" : "flat 64-bit", rt_cmdline);
    main();
    rt_finish();
}

uint64_t rt_tsc_khz(void) {
    uint64_t k = rt_cmdline_uint("tsc_khz", 0);
    if (k) return k;
    uint32_t r[4];
    cpuid(1, 0, r);
    if (r[2] & (1u << 31)) {                        /* hypervisor present */
        cpuid(0x40000000, 0, r);
        if (r[0] >= 0x40000010 && r[0] < 0x40000100) {
            cpuid(0x40000010, 0, r);
            if (r[0]) return r[0];
        }
    }
    cpuid(0, 0, r);
    if (r[0] >= 0x15) {
        cpuid(0x15, 0, r);
        if (r[0] && r[1] && r[2]) return (uint64_t)r[2] * r[1] / r[0] / 1000;
    }
    return 0;
}
