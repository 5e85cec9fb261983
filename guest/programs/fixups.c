/* fixups: instructions a PVM host fails to emulate in ring 0 (HOST-KVM.md), which the VMM's fix-ups must turn into
 * what hardware does (issue 14 part 7): `int imm8` reaches its gate; xgetbv with CR4.OSXSAVE clear, and invpcid,
 * clac/stac, clwb and rdpru where CPUID says they are absent, raise #UD at the instruction; a non-canonical LSTAR
 * write raises #GP and LSTAR reads back what was written. Each fault is caught by this program's own handler (the
 * runtime's fault recovery: the faulting RIP must be the instruction's). On a hardware KVM host every check holds
 * without fix-ups. */
#include "rt.h"

const char rt_program_name[] = "fixups";

extern volatile uint64_t rt_fixup_rip, rt_fixup_to, rt_fixup_vector;
static volatile uint64_t soft_count, soft_rip;
extern const uint8_t int_site[], after_int[];

static void on_soft(struct rt_frame *f) { soft_count++; soft_rip = f->rip; }

/* Runs one instruction (the asm between the labels) with fault recovery: returns the vector it raised, or -1. */
#define TRY(insn, ...)                                                                 \
    ({                                                                                 \
        rt_fixup_vector = 0xffffffff;                                                  \
        __asm__ volatile("leaq 1f(%%rip), %%r8\n\t"                                    \
                         "movq %%r8, rt_fixup_rip(%%rip)\n\t"                          \
                         "leaq 2f(%%rip), %%r8\n\t"                                    \
                         "movq %%r8, rt_fixup_to(%%rip)\n\t"                           \
                         "1: " insn "\n\t"                                             \
                         "2: movq $0, rt_fixup_rip(%%rip)" __VA_ARGS__);               \
        rt_fixup_vector == 0xffffffff ? -1 : (int)rt_fixup_vector;                    \
    })

static int has(uint32_t leaf, uint32_t sub, int reg, int bit) {
    uint32_t r[4];
    cpuid(leaf & 0x80000000u, 0, r);
    if (r[0] < leaf) return 0;
    cpuid(leaf, sub, r);
    return (r[reg] >> bit) & 1;
}

int main(void) {
    /* int imm8 from ring 0: the gate's handler runs with the frame's RIP after the 2-byte instruction. */
    rt_set_handler(0x40, on_soft, 0);
    __asm__ volatile(".globl int_site, after_int\nint_site: int $0x40\nafter_int: nop" ::: "memory");
    rt_check("int-imm8", soft_count == 1 && soft_rip == (uint64_t)(uintptr_t)after_int,
             "%lu calls, frame RIP %lx (int at %p)", (uint64_t)soft_count, (uint64_t)soft_rip, (const void *)int_site);

    /* xgetbv with CR4.OSXSAVE clear: #UD (with it set and XSAVE present, XCR0 reads with x87 set). */
    uint64_t cr4 = read_cr4();
    __asm__ volatile("mov %0, %%cr4" :: "r"(cr4 & ~(1ull << 18)) : "memory");
    int v = TRY("xgetbv", :: "c"(0) : "r8", "rax", "rdx", "memory");
    __asm__ volatile("mov %0, %%cr4" :: "r"(cr4) : "memory");
    rt_check("xgetbv-osxsave-clear", v == 6, "vector %d (6 = #UD)", v);
    if (has(1, 0, 2, 26) && (cr4 & (1ull << 18))) {
        uint32_t lo = 0, hi = 0;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        rt_check("xgetbv", lo & 1, "XCR0 %x:%x", hi, lo);
    }

    /* Instructions CPUID may say are absent: each must then raise #UD. */
    /* clac/stac where SMAP is present only flip RFLAGS.AC. */
    if (has(7, 0, 1, 20)) {
        uint64_t ac_on = 0, ac_off = 0;
        __asm__ volatile("stac; pushfq; popq %0; clac; pushfq; popq %1" : "=r"(ac_on), "=r"(ac_off) :: "memory");
        rt_check("stac-clac-ac", (ac_on & (1 << 18)) && !(ac_off & (1 << 18)), "RFLAGS %lx after stac, %lx after clac", ac_on, ac_off);
    }
    static uint8_t line[64] __attribute__((aligned(64)));
    static uint64_t desc[2];
    struct { const char *name; int present; int vector; } checks[4];
    checks[0].name = "invpcid"; checks[0].present = has(7, 0, 1, 10);
    checks[0].vector = TRY("invpcid (%%rax), %%rcx", :: "a"(desc), "c"(2ull) : "r8", "memory");
    checks[1].name = "clac"; checks[1].present = has(7, 0, 1, 20);
    checks[1].vector = TRY("clac", ::: "r8", "memory");
    if (checks[1].vector == -1) { int s = TRY("stac", ::: "r8", "memory"); (void)s; __asm__ volatile("clac" ::: "memory"); }
    checks[2].name = "clwb"; checks[2].present = has(7, 0, 1, 24);
    checks[2].vector = TRY("clwb (%%rax)", :: "a"(line) : "r8", "memory");
    if (checks[2].present) {   /* SIB and displacement forms (the VMM's skip must get the length right) */
        int a = TRY("clwb 0x40(%%rax,%%rcx,1)", :: "a"(line), "c"(-0x40l) : "r8", "memory");
        int b = TRY("clwb 0x1000(%%rax)", :: "a"((uintptr_t)line - 0x1000) : "r8", "memory");
        rt_check("clwb-forms", a == -1 && b == -1, "vectors %d %d", a, b);
    }
    checks[3].name = "rdpru"; checks[3].present = has(0x80000008u, 0, 1, 4);
    checks[3].vector = TRY(".byte 0x0f, 0x01, 0xfd", :: "c"(0) : "r8", "rax", "rdx", "memory");
    for (int i = 0; i < 4; i++) {
        int ok = checks[i].present ? checks[i].vector == -1 : checks[i].vector == 6;
        rt_check(checks[i].name, ok, "CPUID says %s, vector %d", checks[i].present ? "present" : "absent", checks[i].vector);
    }

    /* The KVM paravirt features whose hypercalls never complete from ring 0 on PVM hosts are hidden there ("pvm"). */
    {
        uint32_t r[4];
        cpuid(0x40000000u, 0, r);
        int kvm = r[1] == 0x4b4d564b && r[2] == 0x564b4d56 && r[3] == 0x4d;   /* "KVMKVMKVM\0\0\0" */
        cpuid(0x40000001u, 0, r);
        rt_printf("# KVM paravirt leaf: %s, features %x\n", kvm ? "present" : "absent", kvm ? r[0] : 0);
        if (rt_cmdline_has("pvm"))
            rt_check("pv-hypercall-features-hidden", !kvm || !(r[0] & ((1u << 7) | (1u << 11) | (1u << 13))),
                     "KVM features %x (PV_UNHALT bit 7, PV_SEND_IPI 11, PV_SCHED_YIELD 13)", r[0]);
    }

    /* LSTAR: the value written reads back; a non-canonical one raises #GP and leaves LSTAR as it was. */
    uint64_t lstar = 0xffffffff81000000ull, back = 0;
    int w = rt_wrmsr_safe(MSR_LSTAR, lstar);
    int r = rt_rdmsr_safe(MSR_LSTAR, &back);
    rt_check("lstar-readback", w == 0 && r == 0 && back == lstar, "wrote %lx, read %lx", lstar, back);
    int g = rt_wrmsr_safe(MSR_LSTAR, 0x0000800000000000ull);
    back = 0;
    rt_rdmsr_safe(MSR_LSTAR, &back);
    rt_check("lstar-noncanonical-gp", g == 13 && back == lstar, "vector %d (13 = #GP), LSTAR %lx after", g, back);
    return 0;
}
