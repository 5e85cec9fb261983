/*
 * SwiftKVM guest test runtime: a tiny freestanding library for 64-bit test programs.
 *
 * A program defines `const char rt_program_name[]` and `int main(void)`; the runtime enters long
 * mode, initialises the serial port (16550 at 0x3f8, polled), GDT + TSS and IDT, calls main()
 * and then rt_finish().
 *
 * Report format (one line per check, on the serial port):
 *     ok <name>[: details]
 *     FAIL <name>: <details>
 *     RESULT pass <N> fail <M>
 * Lines starting with '#' are comments; other informational lines start with the program's own
 * tags (e.g. "BENCH", "USERMODE", "RTC").
 *
 * Exit through the debug-exit port 0xf4 (QEMU isa-debug-exit semantics: value v written → the
 * VMM process exits with status (v << 1) | 1):
 *     RT_EXIT_PASS  0x10 → status 33   every check passed
 *     RT_EXIT_FAIL  0x11 → status 35   at least one check failed
 *     RT_EXIT_CRASH 0x12 → status 37   unexpected exception (vector, error code, RIP reported)
 * After the write the program halts with interrupts off, so a VMM without the port sees a
 * halted vCPU instead.
 */
#ifndef RT_H
#define RT_H

#include <stdint.h>
#include <stddef.h>
#include <stdarg.h>
#include "layout.h"

#define RT_EXIT_PASS  0x10
#define RT_EXIT_FAIL  0x11
#define RT_EXIT_CRASH 0x12
#define RT_DEBUG_EXIT_PORT 0xf4

/* ---------------------------------------------------------------- CPU primitives */
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint16_t inw(uint16_t port) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline uint8_t  mmio_read8(uint64_t a)  { return *(volatile uint8_t *)(uintptr_t)a; }
static inline uint16_t mmio_read16(uint64_t a) { return *(volatile uint16_t *)(uintptr_t)a; }
static inline uint32_t mmio_read32(uint64_t a) { return *(volatile uint32_t *)(uintptr_t)a; }
static inline uint64_t mmio_read64(uint64_t a) { return *(volatile uint64_t *)(uintptr_t)a; }
static inline void mmio_write8(uint64_t a, uint8_t v)   { *(volatile uint8_t *)(uintptr_t)a = v; }
static inline void mmio_write16(uint64_t a, uint16_t v) { *(volatile uint16_t *)(uintptr_t)a = v; }
static inline void mmio_write32(uint64_t a, uint32_t v) { *(volatile uint32_t *)(uintptr_t)a = v; }
static inline void mmio_write64(uint64_t a, uint64_t v) { *(volatile uint64_t *)(uintptr_t)a = v; }

static inline void rt_mb(void)  { __asm__ volatile("mfence" ::: "memory"); }
static inline void rt_rmb(void) { __asm__ volatile("lfence" ::: "memory"); }
static inline void rt_wmb(void) { __asm__ volatile("sfence" ::: "memory"); }
static inline void rt_barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline void cpu_pause(void) { __asm__ volatile("pause"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }

static inline uint64_t rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}
static inline uint64_t rdmsr(uint32_t msr) {
    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((uint64_t)hi << 32) | lo;
}
static inline void wrmsr(uint32_t msr, uint64_t v) {
    __asm__ volatile("wrmsr" :: "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)) : "memory");
}
static inline void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}
static inline uint16_t read_cs(void) { uint16_t v; __asm__ volatile("mov %%cs, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr0(void) { uint64_t v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr2(void) { uint64_t v; __asm__ volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr3(void) { uint64_t v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr4(void) { uint64_t v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline uint64_t read_rflags(void) { uint64_t v; __asm__ volatile("pushfq; popq %0" : "=r"(v)); return v; }

#define MSR_APIC_BASE      0x0000001b
#define MSR_TSC            0x00000010
#define MSR_EFER           0xc0000080
#define MSR_STAR           0xc0000081
#define MSR_LSTAR          0xc0000082
#define MSR_CSTAR          0xc0000083
#define MSR_FMASK          0xc0000084
#define MSR_KERNEL_GS_BASE 0xc0000102

/* rdmsr/wrmsr that survive #GP: return 0 on success, the exception vector otherwise. */
int rt_rdmsr_safe(uint32_t msr, uint64_t *value);
int rt_wrmsr_safe(uint32_t msr, uint64_t value);

/* ---------------------------------------------------------------- libc bits */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strncmp(const char *a, const char *b, size_t n);

/* ---------------------------------------------------------------- serial console (COM1) */
#define COM1 0x3f8
void rt_putc(char c);
void rt_puts(const char *s);             /* no newline added */
void rt_put_hex(uint64_t v);
void rt_put_dec(uint64_t v);
/* printf subset: %s %c %d %i %u %x %X %p %%, 'l'/'ll'/'z' modifiers, '0' flag and width. */
void rt_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void rt_vprintf(const char *fmt, va_list ap);
/* A received byte, or -1 when nothing arrived within timeout_ms (approximate, see rt_deadline). */
int rt_getc_timeout(uint32_t timeout_ms);

/* ---------------------------------------------------------------- time */
/* The TSC rate is not calibrated: deadlines assume RT_TSC_HZ_GUESS, so on a slower TSC a
 * timeout lasts longer (never shorter than intended on TSCs up to 3 GHz). Only for timeouts. */
#define RT_TSC_HZ_GUESS 3000000000ull
uint64_t rt_deadline(uint32_t ms);
int rt_expired(uint64_t deadline);

/* ---------------------------------------------------------------- report */
extern const char rt_program_name[];
void rt_ok(const char *name);
void rt_okf(const char *name, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void rt_fail(const char *name, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* ok/FAIL depending on cond; details printed in both cases. Returns cond. */
int rt_check(const char *name, int cond, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
uint32_t rt_pass_count(void);
uint32_t rt_fail_count(void);
/* Prints RESULT and exits with RT_EXIT_PASS or RT_EXIT_FAIL. */
__attribute__((noreturn)) void rt_finish(void);
/* Writes v to the debug-exit port (status (v << 1) | 1), then halts with interrupts off. */
__attribute__((noreturn)) void rt_exit(uint8_t v);

/* ---------------------------------------------------------------- boot information */
extern uint32_t rt_boot_magic;           /* 0x2BADB002 after a multiboot entry, 0 after the flat entry */
struct mb_info {
    uint32_t flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
    uint32_t syms[4];
    uint32_t mmap_length, mmap_addr;
} __attribute__((packed));
extern const struct mb_info *rt_mbi;     /* NULL after the flat entry */
extern const char *rt_cmdline;           /* "" when none */
/* Value of "key=N" (decimal or 0x hex) in the command line, or def. */
uint64_t rt_cmdline_uint(const char *key, uint64_t def);
int rt_cmdline_has(const char *word);
/* The TSC rate in kHz: tsc_khz=N on the command line, else CPUID 0x40000010 (hypervisor timing leaf),
 * else CPUID 0x15; 0 when none says. Unprivileged (usable in ring 3). */
uint64_t rt_tsc_khz(void);
/* Copies the value of "key=VALUE" (up to the next space, at most max-1 bytes, NUL-terminated)
 * into buf; returns its length, or -1 when the key is absent. */
int rt_cmdline_str(const char *key, char *buf, size_t max);

/* ---------------------------------------------------------------- interrupts */
struct rt_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error, rip, cs, rflags, rsp, ss;
};
typedef void (*rt_handler)(struct rt_frame *f);
/* Installs a handler for a vector (>= 32, or an exception to take over). dpl 3 makes the gate
 * callable with `int` from ring 3. */
void rt_set_handler(uint8_t vector, rt_handler h, int dpl);
extern volatile uint64_t rt_spurious_count;
/* Runs the handler of a vector on a separate 4 KiB stack (IST 1), so a handler may write below
 * the interrupted RSP (e.g. to emulate a call, as Linux's int3 handler does). */
void rt_set_ist(uint8_t vector, int on);
const char *rt_exception_name(uint64_t vector);

/* ---------------------------------------------------------------- PIC, PIT, LAPIC, IOAPIC */
#define RT_PIC_BASE 0x20                  /* IRQ n → vector 0x20 + n; rt_start remaps and masks the PIC */
void rt_pic_init(void);                   /* remaps to 0x20/0x28, all masked */
void rt_pic_unmask(uint8_t irq);
void rt_pic_mask_all(void);
void rt_pic_eoi(uint8_t irq);
void rt_pit_periodic(uint16_t divisor);   /* channel 0, mode 2; divisor 0 = 65536 (18.2 Hz) */
void rt_pit_stop(void);

#define LAPIC_ID      0x020
#define LAPIC_VERSION 0x030
#define LAPIC_TPR     0x080
#define LAPIC_EOI     0x0b0
#define LAPIC_SVR     0x0f0
#define LAPIC_ICR_LO  0x300
#define LAPIC_ICR_HI  0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LAPIC_LVT_ERROR 0x370
#define LAPIC_TIMER_INIT  0x380
#define LAPIC_TIMER_CUR   0x390
#define LAPIC_TIMER_DIV   0x3e0
uint64_t rt_lapic_base(void);
uint32_t rt_lapic_read(uint32_t reg);
void rt_lapic_write(uint32_t reg, uint32_t v);
/* Software-enables the LAPIC (spurious vector 0xff), LINT0 = ExtINT (PIC), LINT1 = NMI. */
void rt_lapic_enable(void);
void rt_lapic_eoi(void);
uint32_t rt_lapic_id(void);

#define IOAPIC_BASE 0xfec00000ull
uint32_t rt_ioapic_read(uint32_t reg);
void rt_ioapic_write(uint32_t reg, uint32_t v);
uint32_t rt_ioapic_pins(void);
/* Edge-triggered, active-high, fixed delivery to dest_apic_id (physical). */
void rt_ioapic_route(uint32_t pin, uint8_t vector, uint8_t dest_apic_id, int masked);

/* ---------------------------------------------------------------- user mode (ring 3) */
/* Runs fn(arg) at CPL3 in 64-bit mode on the runtime's user stack, IF on. iopl 3 (and the TSS
 * I/O bitmap, which allows every port) permits port I/O from ring 3. All memory is
 * user-accessible. fn returns to the kernel through a ud2 at rt_user_exit_ud2 (PVM hosts turn
 * `int N` from ring 3 into #UD). Returns fn's result, or RT_USER_FAULTED when fn took
 * an exception (then rt_user_fault_* describe it). */
#define RT_USER_FAULTED (-1000)
long rt_run_user(long (*fn)(void *), void *arg, int iopl);
extern volatile uint64_t rt_user_fault_vector, rt_user_fault_error, rt_user_fault_rip;
/* Written by the SYSCALL entry point (rt_syscall_entry), which rt_start installs in LSTAR with
 * STAR = kernel CS 0x08 / user base 0x18 (SYSRET → CS 0x2b, SS 0x23) and FMASK = IF|TF|DF. */
extern volatile uint64_t rt_syscall_cs, rt_syscall_rcx, rt_syscall_r11, rt_syscall_count;
void rt_syscall_entry(void);

/* ---------------------------------------------------------------- PCI (configuration mechanism #1) */
uint32_t rt_pci_read32(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t off);
uint16_t rt_pci_read16(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t off);
uint8_t rt_pci_read8(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t off);
void rt_pci_write32(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t off, uint32_t v);
void rt_pci_write16(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t off, uint16_t v);
/* Size of BAR n (0-5) found by writing all ones; 0 when unimplemented. *is_io, *is_64 out. */
uint64_t rt_pci_bar_size(uint8_t bus, uint8_t dev, uint8_t fn, int bar, int *is_io, int *is_64);
/* Offset of the first capability with this ID, walking at most 48 entries; 0 when absent. */
uint8_t rt_pci_find_cap(uint8_t bus, uint8_t dev, uint8_t fn, uint8_t cap_id, uint8_t start);

/* ---------------------------------------------------------------- memory */
/* Zeroed, page-aligned pages from a bump allocator above the image (no free). NULL when the
 * request does not fit below the top of RAM (multiboot mem_upper, or 64 MiB after a flat entry). */
void *rt_alloc_pages(size_t count);
/* The same without zeroing (zeroing is slow where ring-0 code is emulated). */
void *rt_alloc_pages_nozero(size_t count);

/* ---------------------------------------------------------------- ACPI, CPUs, APs (smp.c) */
int rt_checksum_ok(const void *p, uint32_t len);
/* The RSDP (EBDA, then 0xe0000-0xfffff), with a valid checksum; NULL when absent. */
const uint8_t *rt_acpi_rsdp(void);
/* The ACPI table with this 4-character signature from the XSDT (or RSDT), checksum verified. */
const uint8_t *rt_acpi_table(const char *sig);
/* Enabled CPUs' APIC IDs from the ACPI MADT, else the MP table; *source names which. */
uint32_t rt_cpu_apic_ids(uint32_t *ids, uint32_t max, const char **source);
/* Starts one AP with INIT-SIPI-SIPI (trampoline at RT_AP_TRAMPOLINE). The AP enters long mode
 * on the shared GDT/IDT/page tables, enables its LAPIC and calls fn(apic_id); rt_start_ap
 * returns 0 once fn returned (so APs may print), -1 on timeout. The AP then halts with IF=0. */
typedef void (*rt_ap_fn)(uint32_t apic_id);
int rt_start_ap(uint32_t apic_id, rt_ap_fn fn, uint32_t timeout_ms);
/* Prepares a wake from ACPI S3 through the AP trampoline: the real-mode address to put in the FACS waking vector
 * (0 when out of memory); the CPU that enters it there runs fn(apic_id) in long mode. */
uint32_t rt_prepare_wake(rt_ap_fn fn);
extern volatile uint32_t rt_ap_online;

#endif
