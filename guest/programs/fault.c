/* fault: the runtime's exception path. Reads an unmapped address (above the 4 GiB identity map);
 * the #PF handler must print "FAIL exception: vector 14 (#PF page fault) …" with CR2 and exit with
 * RT_EXIT_CRASH (status 37). "kind=ud" raises #UD instead, "kind=de" a divide error. */
#include "rt.h"

const char rt_program_name[] = "fault";

int main(void) {
    uint64_t kind = rt_cmdline_has("kind=ud") ? 6 : rt_cmdline_has("kind=de") ? 0 : 14;
    rt_ok("before-fault");
    rt_printf("# raising %s\n", rt_exception_name(kind));
    if (kind == 6) {
        __asm__ volatile("ud2");
    } else if (kind == 0) {
        __asm__ volatile("xorl %%ecx, %%ecx; movl $1, %%eax; xorl %%edx, %%edx; divl %%ecx" ::: "eax", "ecx", "edx");
    } else {
        (void)mmio_read32(0x0000100000000000ull);
    }
    rt_fail("fault", "no exception was raised");
    return 0;
}
