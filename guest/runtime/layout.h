/* Segment selectors and fixed vectors shared by entry.S and the C runtime. */
#ifndef RT_LAYOUT_H
#define RT_LAYOUT_H
#define SEL_KCODE   0x08
#define SEL_KDATA   0x10
#define SEL_UCODE32 0x18
#define SEL_UDATA   0x20
#define SEL_UCODE64 0x28
#define SEL_TSS     0x30
#define SEL_KCODE32 0x40
/* Where rt_start_ap copies the real-mode AP trampoline (SIPI vector 0x70). */
#define RT_AP_TRAMPOLINE 0x70000
/* int 0x80: the user-callable probe gate of the usermode program. */
#define RT_VEC_INT80        0x80
#endif
