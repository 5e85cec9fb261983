/* int3: breakpoints and FPU waits in ring 0, as Linux's boot uses them (int3 self-test,
 * text_poke_bp). On PVM hosts both fail to emulate and need the VMM's fix-ups (HOST-KVM.md):
 * the #BP handler must see RIP = address after the int3, exactly once, and execution continues
 * right after the instruction; `fwait` is a no-op. Also `ud2` must reach the #UD handler. */
#include "rt.h"

const char rt_program_name[] = "int3";

extern const uint8_t int3_site[], after_int3[], ud2_site[], after_ud2[], selftest_site[], int3_magic[];
static volatile uint64_t bp_count, bp_rip, ud_count, ud_rip;

/* Linux's int3_selftest (arch/x86/kernel/alternative.c): the #BP handler emulates
 * `call int3_magic` from the int3 (push the address after the 5-byte site, jump), and int3_magic
 * stores 1 through RDI. */
__asm__(".text\n.globl int3_magic\nint3_magic: movl $1, (%rdi)\n ret\n");

static void on_bp(struct rt_frame *f) {
    bp_count++;
    bp_rip = f->rip;
    if (f->rip - 1 == (uint64_t)(uintptr_t)selftest_site) {
        f->rsp -= 8;
        *(uint64_t *)(uintptr_t)f->rsp = (uint64_t)(uintptr_t)selftest_site + 5;
        f->rip = (uint64_t)(uintptr_t)int3_magic;
    }
}
static void on_ud(struct rt_frame *f) {
    ud_count++;
    ud_rip = f->rip;
    if (f->rip == (uint64_t)(uintptr_t)ud2_site) f->rip += 2;
}

int main(void) {
    rt_set_handler(3, on_bp, 0);
    rt_set_ist(3, 1);
    rt_set_handler(6, on_ud, 0);
    uint64_t marker = 0;
    __asm__ volatile(
        ".globl int3_site, after_int3\n"
        "int3_site: int3\n"
        "after_int3: movq $0x42, %0\n"
        : "=r"(marker) :: "memory");
    rt_check("int3-handler", bp_count == 1 && bp_rip == (uint64_t)(uintptr_t)after_int3,
             "%lu #BP, frame RIP %lx (int3 at %p, next instruction %p)", (uint64_t)bp_count, (uint64_t)bp_rip,
             (const void *)int3_site, (const void *)after_int3);
    rt_check("int3-continues", marker == 0x42, "marker %lx after the int3", marker);

    /* Linux's self-test sequence: int3; nop x4, with RDI pointing at val. */
    uint32_t val = 0;
    bp_count = 0;
    __asm__ volatile(
        ".globl selftest_site\n"
        "selftest_site: int3; nop; nop; nop; nop\n"
        :: "D"(&val) : "memory");
    rt_check("int3-emulated-call", val == 1 && bp_count == 1,
             "val %u after the Linux int3 self-test sequence (%lu #BP, frame RIP %lx, int3 at %p)", val,
             (uint64_t)bp_count, (uint64_t)bp_rip, (const void *)selftest_site);

    uint64_t m2 = 0;
    __asm__ volatile("fwait\n movq $0x43, %0" : "=r"(m2) :: "memory");
    rt_check("fwait", m2 == 0x43, "marker %lx after fwait", m2);

    uint64_t m3 = 0;
    __asm__ volatile(
        ".globl ud2_site, after_ud2\n"
        "ud2_site: ud2\n"
        "after_ud2: movq $0x44, %0\n"
        : "=r"(m3) :: "memory");
    rt_check("ud2", ud_count == 1 && ud_rip == (uint64_t)(uintptr_t)ud2_site && m3 == 0x44,
             "%lu #UD, frame RIP %lx (ud2 at %p), marker %lx", (uint64_t)ud_count, (uint64_t)ud_rip, (const void *)ud2_site, m3);
    return 0;
}
