/* exits: VM-exit benchmark. In ring 3 (IOPL 3, user-accessible mapping; ring-0 code is emulated on
 * PVM hosts) it does N port writes (outb to port 0x80) and then N MMIO writes (to the unbacked
 * address 0xd0000000). Command line: n=COUNT (default 1000000), ring0 (run the loops in ring 0).
 * Output, for the host to timestamp:
 *   BENCH port-writes start n=N
 *   BENCH port-writes done n=N tsc=CYCLES
 *   BENCH mmio-writes start n=N
 *   BENCH mmio-writes done n=N tsc=CYCLES */
#include "rt.h"

const char rt_program_name[] = "exits";

#define BENCH_PORT 0x80
#define BENCH_MMIO 0xd0000000ull

static long port_loop(void *arg) {
    uint64_t n = *(uint64_t *)arg;
    for (uint64_t i = 0; i < n; i++) outb(BENCH_PORT, (uint8_t)i);
    return (long)n;
}
static long mmio_loop(void *arg) {
    uint64_t n = *(uint64_t *)arg;
    for (uint64_t i = 0; i < n; i++) mmio_write32(BENCH_MMIO, (uint32_t)i);
    return (long)n;
}

static void run(const char *name, long (*fn)(void *), uint64_t n, int ring0) {
    rt_printf("BENCH %s start n=%lu\n", name, n);
    uint64_t t0 = rdtsc();
    long done = ring0 ? fn(&n) : rt_run_user(fn, &n, 3);
    uint64_t t1 = rdtsc();
    rt_printf("BENCH %s done n=%ld tsc=%lu\n", name, done, t1 - t0);
    if (done == RT_USER_FAULTED)
        rt_fail(name, "ring 3 loop faulted: %s error %lx at rip %lx", rt_exception_name(rt_user_fault_vector),
                (uint64_t)rt_user_fault_error, (uint64_t)rt_user_fault_rip);
    else
        rt_check(name, (uint64_t)done == n, "%ld of %lu writes in ring %d", done, n, ring0 ? 0 : 3);
}

int main(void) {
    uint64_t n = rt_cmdline_uint("n", 1000000);
    int ring0 = rt_cmdline_has("ring0");
    run("port-writes", port_loop, n, ring0);
    run("mmio-writes", mmio_loop, n, ring0);
    return 0;
}
