/* An LD_PRELOAD library that counts calls to the allocator (malloc, calloc, realloc, the aligned variants)
 * and prints "MALLOC-COUNT N" to stderr at exit. Built and used by the no-allocation-per-exit test
 * (Tests/IntegrationTests/GuestProgramTests.swift). glibc only: it forwards to __libc_malloc and friends. */
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <unistd.h>
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
static atomic_ulong count;
static void bump(void) { atomic_fetch_add_explicit(&count, 1, memory_order_relaxed); }
void *malloc(size_t n) { bump(); return __libc_malloc(n); }
void *calloc(size_t a, size_t b) { bump(); return __libc_calloc(a, b); }
void *realloc(void *p, size_t n) { bump(); return __libc_realloc(p, n); }
void *memalign(size_t a, size_t n) { bump(); return __libc_memalign(a, n); }
void *aligned_alloc(size_t a, size_t n) { bump(); return __libc_memalign(a, n); }
int posix_memalign(void **p, size_t a, size_t n) { bump(); *p = __libc_memalign(a, n); return *p ? 0 : 12; }
__attribute__((destructor)) static void report(void) {
    char b[64];
    int n = snprintf(b, sizeof b, "MALLOC-COUNT %lu\n", (unsigned long)atomic_load(&count));
    if (n > 0) write(2, b, (size_t)n);
}
