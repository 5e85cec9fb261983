/*
 * Guest runtime entry: multiboot v1 header, 32-bit protected-mode entry that switches to long
 * mode with static identity page tables, a flat 64-bit entry, interrupt stubs, user-mode glue
 * and the SYSCALL entry point.
 *
 * Memory map of every program: image linked at 0x100000 (1 MiB). The first 8 GiB are identity
 * mapped with 2 MiB pages, all user-accessible (test programs touch MMIO from ring 3);
 * 3-4 GiB (LAPIC, IOAPIC, PCI hole) is mapped uncached; 4-8 GiB is RAM for guests with more than
 * 3 GiB. PML4 slot 511 points to an empty PDPT.
 *
 * Entries:
 *   _start    (32-bit, multiboot: EAX = 0x2BADB002, EBX = multiboot info)  = ELF entry
 *   _start64  (64-bit, flat binary at 0x100000, entry 0x100040, any identity-mapping page
 *              tables and GDT the loader chose; the runtime loads its own)
 */
#include "layout.h"

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* page-align modules, memory information */

    .section .multiboot, "ax"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .org 0x40
    .code64
    .globl _start64
_start64:
    jmp start64_flat

/* ------------------------------------------------------------------ 32-bit entry */
    .section .text.entry, "ax"
    .code32
    .globl _start
_start:
    cli
    movl %eax, rt_boot_magic
    movl %ebx, rt_boot_info
    lgdt gdt_ptr
    movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl $kernel_stack_top, %esp
    movl %cr4, %eax
    orl $0x20, %eax                 /* PAE */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx          /* EFER */
    rdmsr
    orl $0x101, %eax                /* LME | SCE */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax           /* PG | PE */
    movl %eax, %cr0
    ljmp $SEL_KCODE, $long_entry

    .code64
long_entry:
    movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    jmp common64

/* ------------------------------------------------------------------ flat 64-bit entry */
start64_flat:
    cli
    movl $0, rt_boot_magic(%rip)
    movl $0, rt_boot_info(%rip)
    lgdt gdt_ptr(%rip)
    movq $pml4, %rax
    movq %rax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x001, %eax                /* SCE */
    wrmsr
    movq $kernel_stack_top, %rsp
    pushq $SEL_KCODE
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:  movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs

common64:
    movq $kernel_stack_top, %rsp
    cld
    /* .bss (IDT, counters) is small: clear it. Stacks live in .stack and are not cleared. */
    movq $__bss_start, %rdi
    movq $__bss_end, %rcx
    subq %rdi, %rcx
    shrq $3, %rcx
    xorl %eax, %eax
    rep stosq
    movl rt_boot_magic(%rip), %edi
    movl rt_boot_info(%rip), %esi
    call rt_start
2:  cli
    hlt
    jmp 2b

/* ------------------------------------------------------------------ interrupts */
/* 256 stubs, 16 bytes apart (rt_isr_stubs + 16 * vector): push a dummy error code where the CPU
 * pushes none, push the vector, jump to the common path. */
    .text
    .align 16
    .globl rt_isr_stubs
rt_isr_stubs:
    .set vec, 0
    .rept 256
    .align 16
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
    .endr

isr_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    cld
    call rt_interrupt
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq

/* ------------------------------------------------------------------ user mode */
/* long rt_run_user_asm(long (*fn)(void *), uint64_t user_rsp, uint64_t rflags, void *arg)
 * iretq to CPL3 at user_entry, which calls fn(arg) and returns to the kernel with a ud2 at
 * rt_user_exit_ud2.
 * The interrupt handler sends control back to rt_user_resume with RSP = rt_kernel_rsp and
 * RAX = the result (fn's return value, or a negative code after a fault). */
    .globl rt_run_user_asm
rt_run_user_asm:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, rt_kernel_rsp(%rip)
    pushq $(SEL_UDATA | 3)
    pushq %rsi
    pushq %rdx
    pushq $(SEL_UCODE64 | 3)
    leaq user_entry(%rip), %rax
    pushq %rax
    movq %rdi, %rax
    movq %rcx, %rdi
    iretq

user_entry:
    andq $-16, %rsp
    call *%rax
    /* Back to the kernel through #UD at a known address: PVM hosts turn every `int N` from
     * ring 3 into #UD, while exceptions are delivered everywhere. */
    .globl rt_user_exit_ud2
rt_user_exit_ud2:
    ud2

    .globl rt_user_resume
rt_user_resume:
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    ret

/* SYSCALL entry (LSTAR). Records CS, RCX, R11 as found on entry. At CPL0 it returns with SYSRETQ;
 * if the host delivered the SYSCALL without switching to CPL0 (PVM quirk), it returns to the
 * caller directly (SYSRET at CPL3 would #GP). Clobbers RCX, R11 (as SYSCALL does) and R10. */
    .globl rt_syscall_entry
rt_syscall_entry:
    movq %cs, %r10
    movq %r10, rt_syscall_cs(%rip)
    movq %rcx, rt_syscall_rcx(%rip)
    movq %r11, rt_syscall_r11(%rip)
    incq rt_syscall_count(%rip)
    testb $3, %r10b
    jnz 1f
    sysretq
1:  pushq %r11
    popfq
    jmpq *%rcx


/* ------------------------------------------------------------------ application processors */
/* Real-mode trampoline, copied to RT_AP_TRAMPOLINE (SIPI vector RT_AP_TRAMPOLINE >> 12) by
 * rt_start_ap. Position-dependent on that address only. */
    .section .rodata
    .code16
    .globl rt_ap_trampoline, rt_ap_trampoline_end
rt_ap_trampoline:
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (ap_gdtr - rt_ap_trampoline)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $SEL_KCODE32, $(RT_AP_TRAMPOLINE + ap32 - rt_ap_trampoline)
    .code32
ap32:
    movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x101, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    ljmpl $SEL_KCODE, $ap_long
    .align 8
ap_gdtr:
    .word rt_gdt_end - rt_gdt - 1
    .long rt_gdt
rt_ap_trampoline_end:

    .text
    .code64
ap_long:
    movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movq rt_ap_stack_top(%rip), %rsp
    cld
    call rt_ap_main
3:  cli
    hlt
    jmp 3b

/* ------------------------------------------------------------------ data */
    .data
    .align 16
    .globl rt_gdt
rt_gdt:
    .quad 0                         /* 0x00 null */
    .quad 0x00af9a000000ffff        /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff        /* 0x10 kernel data */
    .quad 0x00cffa000000ffff        /* 0x18 user code, 32-bit (STAR sysret base) */
    .quad 0x00cff2000000ffff        /* 0x20 user data */
    .quad 0x00affa000000ffff        /* 0x28 user code, 64-bit */
    .quad 0, 0                      /* 0x30 TSS (filled by rt_start) */
    .quad 0x00cf9a000000ffff        /* 0x40 kernel code, 32-bit (AP startup) */
rt_gdt_end:
    .align 16
gdt_ptr:
    .word rt_gdt_end - rt_gdt - 1
    .quad rt_gdt

    .globl gdt_ptr
    .globl rt_boot_magic, rt_boot_info
    .align 8
rt_boot_magic: .long 0
rt_boot_info:  .long 0

    .section .data.pagetables, "aw"
    .align 4096
    .globl pml4
pml4:
    .quad pdpt + 0x7
    .fill 510, 8, 0
    .quad pdpt_high + 0x7           /* slot 511: present but empty, like Linux's kernel half */
pdpt_high:
    /* Nothing is mapped here. PVM hosts need it: swiftkvm's syscall fix-up links its trampoline
     * (0xffffff8000000000, PUD 0 of slot 511) into the page tables current at the LSTAR write. */
    .fill 512, 8, 0
pdpt:
    .quad pd + 0x0000 + 0x7
    .quad pd + 0x1000 + 0x7
    .quad pd + 0x2000 + 0x7
    .quad pd + 0x3000 + 0x7
    .quad pd + 0x4000 + 0x7
    .quad pd + 0x5000 + 0x7
    .quad pd + 0x6000 + 0x7
    .quad pd + 0x7000 + 0x7
    .fill 504, 8, 0
pd:                                 /* 4096 x 2 MiB: present, writable, user, large */
    .set i, 0
    .rept 1536
    .quad (i << 21) | 0x87
    .set i, i + 1
    .endr
    .rept 512                       /* 3-4 GiB: also PCD | PWT */
    .quad (i << 21) | 0x9f
    .set i, i + 1
    .endr
    .rept 2048                      /* 4-8 GiB: RAM above the PCI hole of guests with more than 3 GiB */
    .quad (i << 21) | 0x87
    .set i, i + 1
    .endr

    .section .stack, "aw", @nobits
    .align 16
    .space 16384
kernel_stack_top:
    .globl rt_interrupt_stack_top
    .space 16384
rt_interrupt_stack_top:
    .globl rt_user_stack_top
    .space 16384
rt_user_stack_top:
