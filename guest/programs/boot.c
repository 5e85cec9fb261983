/* boot: multiboot entry state and debug-exit codes.
 * Checks the multiboot magic and information (memory sizes, memory map, command line), that the
 * runtime reached 64-bit mode at CPL0. With "exit=N" on the command line it writes N to the
 * debug-exit port after the report instead of the pass/fail code (status (N << 1) | 1).
 * Modules (multiboot flags bit 3): one line each, `MODULE i start=S end=E fnv=H cmdline="…"`, where H is
 * the 32-bit FNV-1a hash of the module's bytes, so the host can check what the guest sees. */
#include "rt.h"

const char rt_program_name[] = "boot";

int main(void) {
    if (rt_boot_magic != 0x2BADB002) {
        rt_printf("# entered through the flat 64-bit entry: no multiboot information\n");
    } else {
        rt_ok("multiboot-magic");
        const struct mb_info *mb = rt_mbi;
        if (rt_check("multiboot-info", mb != 0, "info at %p flags %x", (const void *)mb, mb ? mb->flags : 0)) {
            if (rt_check("memory-sizes", (mb->flags & 1) && mb->mem_lower >= 500 && mb->mem_lower <= 640 && mb->mem_upper >= 1024,
                         "flags bit 0 %u, mem_lower %u KiB, mem_upper %u KiB", mb->flags & 1, mb->mem_lower, mb->mem_upper))
                rt_printf("# memory: %u KiB low, %u MiB high\n", mb->mem_lower, mb->mem_upper / 1024);
            if (mb->flags & (1u << 6)) {
                uint64_t usable_at_1m = 0;
                uint32_t entries = 0;
                for (uint32_t off = 0; off + 24 <= mb->mmap_length && entries < 64; entries++) {
                    const uint8_t *e = (const uint8_t *)(uintptr_t)(mb->mmap_addr + off);
                    uint32_t size = *(const uint32_t *)e;
                    uint64_t base = *(const uint64_t *)(e + 4), len = *(const uint64_t *)(e + 12);
                    uint32_t type = *(const uint32_t *)(e + 20);
                    rt_printf("# mmap %lx-%lx type %u\n", base, base + len, type);
                    if (type == 1 && base <= 0x100000 && base + len > 0x100000) usable_at_1m = base + len - 0x100000;
                    off += size + 4;
                }
                rt_check("memory-map", usable_at_1m >= (1u << 20), "%u entries, %lu KiB usable from 1 MiB", entries, usable_at_1m / 1024);
            } else {
                rt_fail("memory-map", "flags %x lack bit 6 (memory map)", mb->flags);
            }
            if (mb->flags & 4) rt_okf("cmdline", "\"%s\"", rt_cmdline);
            else rt_printf("# no command line (flags bit 2 clear)\n");
            if (mb->flags & 8) {
                const uint32_t *mods = (const uint32_t *)(uintptr_t)mb->mods_addr;
                for (uint32_t i = 0; i < mb->mods_count && i < 16; i++) {
                    uint32_t start = mods[i * 4], end = mods[i * 4 + 1];
                    const char *name = (const char *)(uintptr_t)mods[i * 4 + 2];
                    uint32_t h = 2166136261u;
                    for (uint32_t a = start; a < end; a++) h = (h ^ *(const volatile uint8_t *)(uintptr_t)a) * 16777619u;
                    rt_printf("MODULE %u start=%x end=%x fnv=%x cmdline=\"%s\"\n", i, start, end, h, name ? name : "");
                }
            }
        }
    }
    uint64_t efer = rdmsr(MSR_EFER);
    rt_check("long-mode", (efer & 0x500) == 0x500, "EFER %lx", efer);
    rt_check("cpl0", (read_cs() & 3) == 0, "CS %x", read_cs());

    uint64_t code = rt_cmdline_uint("exit", 0x100);
    if (code < 0x100) {
        rt_printf("RESULT pass %u fail %u\n", rt_pass_count(), rt_fail_count());
        rt_printf("# debug-exit %lu: expect status %lu\n", code, (code << 1) | 1);
        rt_exit((uint8_t)code);
    }
    return 0;
}
