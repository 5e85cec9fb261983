/* cpuid_msr: CPUID leaves and MSR reads/writes as the VMM configured them. */
#include "rt.h"

const char rt_program_name[] = "cpuid_msr";

int main(void) {
    uint32_t r[4];
    char vendor[13];
    cpuid(0, 0, r);
    uint32_t max_leaf = r[0];
    memcpy(vendor, &r[1], 4);
    memcpy(vendor + 4, &r[3], 4);
    memcpy(vendor + 8, &r[2], 4);
    vendor[12] = 0;
    int printable = 1;
    for (int i = 0; i < 12; i++) printable &= vendor[i] >= 0x20 && vendor[i] < 0x7f;
    rt_check("cpuid-vendor", printable && max_leaf >= 1, "\"%s\", max basic leaf %x", printable ? vendor : "?", max_leaf);

    cpuid(1, 0, r);
    rt_printf("# cpuid 1: eax %x ebx %x ecx %x edx %x\n", r[0], r[1], r[2], r[3]);
    rt_check("cpuid-1-features", (r[3] & (1u << 4)) && (r[3] & (1u << 5)) && (r[3] & (1u << 9)),
             "EDX %x: TSC %u MSR %u APIC %u", r[3], (r[3] >> 4) & 1, (r[3] >> 5) & 1, (r[3] >> 9) & 1);
    rt_printf("# hypervisor bit %u, cx16 %u, x2apic %u\n", (r[2] >> 31) & 1, (r[2] >> 13) & 1, (r[2] >> 21) & 1);
    uint32_t apic_id_cpuid = r[1] >> 24;
    int tcg = 0;   /* QEMU TCG: IA32_TSC reads 0 and unknown MSRs read 0 instead of #GP */
    if (r[2] & (1u << 31)) {
        uint32_t h[4];
        char hv[13];
        cpuid(0x40000000, 0, h);
        memcpy(hv, &h[1], 4); memcpy(hv + 4, &h[2], 4); memcpy(hv + 8, &h[3], 4); hv[12] = 0;
        for (int i = 0; i < 12; i++) if (hv[i] && (hv[i] < 0x20 || hv[i] >= 0x7f)) hv[i] = '?';
        rt_printf("# hypervisor leaf %x: \"%s\"\n", h[0], hv);
        if (h[0] >= 0x40000001) {
            uint32_t f[4];
            cpuid(0x40000001, 0, f);
            rt_printf("# kvm features eax %x\n", f[0]);
        }
        tcg = !memcmp(hv, "TCGTCGTCGTCG", 12);
    }

    cpuid(0x80000000, 0, r);
    uint32_t max_ext = r[0];
    if (rt_check("cpuid-extended-leaves", max_ext >= 0x80000001, "max extended leaf %x", max_ext)) {
        cpuid(0x80000001, 0, r);
        rt_check("cpuid-long-mode-syscall", (r[3] & (1u << 29)) && (r[3] & (1u << 11)),
                 "80000001 EDX %x: LM %u SYSCALL %u", r[3], (r[3] >> 29) & 1, (r[3] >> 11) & 1);
    }
    if (max_ext >= 0x80000004) {
        char brand[49];
        for (uint32_t l = 0; l < 3; l++) { cpuid(0x80000002 + l, 0, r); memcpy(brand + 16 * l, r, 16); }
        brand[48] = 0;
        for (int i = 0; i < 48; i++) if (brand[i] && (brand[i] < 0x20 || brand[i] >= 0x7f)) brand[i] = '?';
        rt_printf("# brand \"%s\"\n", brand);
    }

    uint64_t misc = 0;
    if (!rt_rdmsr_safe(0x1a0, &misc)) rt_printf("# misc_enable %lx\n", misc);
    uint64_t apic = rdmsr(MSR_APIC_BASE);
    rt_check("msr-apic-base", (apic & 0xfffff000) == 0xfee00000 && (apic & 0x100) && (apic & 0x800),
             "IA32_APIC_BASE %lx (base fee00000, BSP, enabled expected)", apic);
    rt_lapic_enable();
    uint32_t id = rt_lapic_id();
    rt_check("lapic-id-matches-cpuid", id == apic_id_cpuid, "LAPIC ID %u, CPUID.1 EBX[31:24] %u", id, apic_id_cpuid);

    uint64_t t0 = rdtsc(), m = rdmsr(MSR_TSC), t1 = rdtsc();
    if (tcg) rt_printf("# skipped msr-tsc under QEMU TCG: rdtsc %lu, IA32_TSC %lu, rdtsc %lu\n", t0, m, t1);
    else rt_check("msr-tsc", t1 > t0 && m >= t0 && m <= t1, "rdtsc %lu, IA32_TSC %lu, rdtsc %lu", t0, m, t1);

    uint64_t efer = rdmsr(MSR_EFER);
    rt_check("msr-efer", (efer & 0x501) == 0x501, "EFER %lx (SCE, LME, LMA expected)", efer);

    uint64_t pattern = 0x0000123456789ab0ull, back = 0;
    int w = rt_wrmsr_safe(MSR_KERNEL_GS_BASE, pattern);
    int rd = rt_rdmsr_safe(MSR_KERNEL_GS_BASE, &back);
    rt_check("msr-write-read", !w && !rd && back == pattern, "KERNEL_GS_BASE wrote %lx read %lx (faults %d %d)", pattern, back, w, rd);

    uint64_t lstar = 0;
    rd = rt_rdmsr_safe(MSR_LSTAR, &lstar);
    rt_check("msr-lstar", !rd && lstar == (uint64_t)(uintptr_t)rt_syscall_entry, "LSTAR %lx, wrote %p", lstar, (void *)rt_syscall_entry);

    uint64_t junk = 0;
    int v = rt_rdmsr_safe(0x12345678, &junk);
    if (tcg) rt_printf("# skipped msr-unknown-faults under QEMU TCG: %s\n", v ? rt_exception_name((uint64_t)v) : "no fault");
    else rt_check("msr-unknown-faults", v == 13, "rdmsr 0x12345678 → %s", v ? rt_exception_name((uint64_t)v) : "no fault");
    return 0;
}
