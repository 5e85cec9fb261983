/* usermode: drops to ring 3 (64-bit user code segment 0x2b, TSS for the way back) and makes an
 * `int 0x80` (IDT gate with DPL 3) and a `syscall` (EFER.SCE, STAR, LSTAR, FMASK set by the
 * runtime), reporting for each whether the handler ran at CPL0 with the right CS.
 *
 * Summary line for `swiftkvm check`:
 *   USERMODE ring3=<ok|fault> int80=<cpl0|fault|none> syscall=<cpl0|cpl3|fault|none> user-cs=<hex>
 * On PVM hosts (HOST-KVM.md) user code sees CS 0x33 whatever selector was loaded, `int 0x80`
 * from ring 3 raises #UD (int80=fault), and syscall=cpl3 is the syscall quirk: the host jumps to
 * LSTAR but stays at CPL3, so a kernel cannot run its entry code. A VMM fix-up turns it into cpl0. */
#include "rt.h"

const char rt_program_name[] = "usermode";

static volatile uint64_t user_cs, int80_frame_cs, int80_handler_cs, int80_rax, int80_count;
static volatile uint64_t after_syscall_cs, syscall_rax_back;

static void on_int80(struct rt_frame *f) {
    int80_count++;
    int80_frame_cs = f->cs;
    int80_handler_cs = read_cs();
    int80_rax = f->rax;
    f->rax = 0x80c0de;
}

static long probe_int80(void *arg) {
    (void)arg;
    user_cs = read_cs();
    uint64_t rax = 0x1234;
    __asm__ volatile("int $0x80" : "+a"(rax) :: "memory");
    return (long)rax;
}

static long probe_syscall(void *arg) {
    (void)arg;
    uint64_t rax = 0x5c;
    __asm__ volatile("syscall" : "+a"(rax) :: "rcx", "r11", "r10", "memory");
    syscall_rax_back = rax;
    after_syscall_cs = read_cs();
    return 7;
}

int main(void) {
    rt_set_handler(RT_VEC_INT80, on_int80, 3);
    const char *ring3 = "fault", *int80 = "none", *sys = "none";

    long r = rt_run_user(probe_int80, 0, 0);
    if (r == RT_USER_FAULTED) {
        rt_fail("int80", "user code faulted: %s error %lx at rip %lx", rt_exception_name(rt_user_fault_vector),
                (uint64_t)rt_user_fault_error, (uint64_t)rt_user_fault_rip);
        if (int80_count == 0) int80 = "fault";
    }
    if (rt_check("ring3-entered", (user_cs & 3) == 3, "CS in user code %lx%s", (uint64_t)user_cs,
                 user_cs != (SEL_UCODE64 | 3) ? " (not the selector loaded, 0x2b: the host substitutes its own)" : ""))
        ring3 = "ok";
    if (int80_count) {
        int ok = (int80_handler_cs == SEL_KCODE) && (int80_frame_cs & 3) == 3 && int80_rax == 0x1234 && r == 0x80c0de;
        rt_check("int80", ok, "handler CS %lx, interrupted CS %lx, rax in %lx, result %lx",
                 (uint64_t)int80_handler_cs, (uint64_t)int80_frame_cs, (uint64_t)int80_rax, (uint64_t)r);
        int80 = int80_handler_cs == SEL_KCODE ? "cpl0" : "fault";
    } else if (r != RT_USER_FAULTED) {
        rt_fail("int80", "handler never ran (result %lx)", (uint64_t)r);
    }

    /* "no511": PML4 slot 511 empty when LSTAR is written (a guest without kernel-half mappings there). The VMM then
     * must leave LSTAR alone: a syscall may hit the host's quirk, but never a #PF at its trampoline. */
    extern uint64_t pml4[];
    uint64_t slot511 = pml4[511];
    if (rt_cmdline_has("no511")) {
        uint64_t lstar = 0;
        rt_rdmsr_safe(MSR_LSTAR, &lstar);
        pml4[511] = 0;
        __asm__ volatile("mov %%cr3, %%rax; mov %%rax, %%cr3" ::: "rax", "memory");
        rt_wrmsr_safe(MSR_LSTAR, lstar);
    }
    r = rt_run_user(probe_syscall, 0, 0);
    if (rt_cmdline_has("no511"))
        rt_check("no-trampoline-fault", !(r == RT_USER_FAULTED && rt_user_fault_vector == 14 && rt_user_fault_rip >> 39 == 0x1ffffff),
                 "result %lx, fault vector %lu at rip %lx", (uint64_t)r, (uint64_t)rt_user_fault_vector, (uint64_t)rt_user_fault_rip);
    pml4[511] = slot511;
    if (r == RT_USER_FAULTED) {
        rt_fail("syscall", "user code faulted: %s error %lx at rip %lx (entry reached %lu times, CS there %lx)",
                rt_exception_name(rt_user_fault_vector), (uint64_t)rt_user_fault_error, (uint64_t)rt_user_fault_rip,
                (uint64_t)rt_syscall_count, (uint64_t)rt_syscall_cs);
        sys = "fault";
    } else if (rt_syscall_count == 0) {
        rt_fail("syscall", "returned %ld without reaching LSTAR", r);
    } else {
        sys = (rt_syscall_cs & 3) == 0 ? "cpl0" : "cpl3";
        rt_check("syscall", rt_syscall_cs == SEL_KCODE,
                 "entry CS %lx (want %x)%s", (uint64_t)rt_syscall_cs, SEL_KCODE,
                 (rt_syscall_cs & 3) ? ": entered LSTAR at CPL3 (the PVM syscall quirk)" : "");
        rt_check("syscall-return-state", (rt_syscall_r11 & 0x200) && rt_syscall_rcx > 0x100000 && rt_syscall_rcx < 0x200000 &&
                 syscall_rax_back == 0x5c && r == 7,
                 "RCX %lx R11 %lx rax %lx result %ld", (uint64_t)rt_syscall_rcx, (uint64_t)rt_syscall_r11,
                 (uint64_t)syscall_rax_back, r);
        rt_check("sysret-to-ring3", (after_syscall_cs & 3) == 3, "CS after return %lx", (uint64_t)after_syscall_cs);
    }
    rt_printf("USERMODE ring3=%s int80=%s syscall=%s user-cs=%lx\n", ring3, int80, sys, (uint64_t)user_cs);
    return 0;
}
