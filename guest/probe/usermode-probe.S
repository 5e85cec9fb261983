/* SwiftKVM user-mode probe, embedded in `swiftkvm check` (Sources/VMM/UserModeProbe.swift).
 *
 * A flat long-mode program: load at 0x100000, enter at 0x100000 (CS 0x10, CPL 0, paging on
 * with the loader's identity tables). It
 *   1. builds its own page tables at 0x200000 (first 128 MiB identity-mapped in 2 MiB pages,
 *      user-accessible) with PML4 slot 511 present and its PUD empty, which is what the PVM
 *      SYSCALL fix-up needs to map its trampoline (PML4 511 / PUD 0);
 *   2. loads a GDT with kernel (0x10/0x18) and user (0x20 data, 0x28 code) segments, sets
 *      EFER.SCE, STAR (SYSCALL CS 0x10, SYSRET base 0x18), SFMASK and LSTAR = `entry`;
 *   3. iretq to CPL 3, stores CS to REPORT+0 (an MMIO exit the VMM observes), runs `syscall`;
 *   4. at `entry` stores CS to REPORT+8 and spins until the VMM stops it.
 * CS & 3 at `entry` is the CPL the SYSCALL entered at. Regenerate the Swift bytes with
 * ./regen.sh after editing. About 100 ring-0 instructions plus a 2048-step `rep stosq`. */
    .code64
    .set PML4,    0x200000
    .set PDPT,    0x201000
    .set PD,      0x202000
    .set PUD511,  0x203000
    .set KSTACK,  0x300000
    .set USTACK,  0x280000
    .set REPORT,  0x4000000          /* 64 MiB: unbacked in a 32 MiB guest, mapped here */
    .globl _start
_start:
    mov $KSTACK, %esp
    mov $PML4, %edi                  /* zero PML4, PDPT, PD, PUD511 */
    xor %eax, %eax
    mov $2048, %ecx
    rep stosq
    movq $(PDPT | 7), PML4
    movq $(PUD511 | 7), PML4 + 511 * 8
    movq $(PD | 7), PDPT
    mov $PD, %edi                    /* 64 x 2 MiB pages: P | RW | U | PS */
    mov $0x87, %eax
    mov $64, %ecx
1:  mov %rax, (%rdi)
    add $0x200000, %rax
    add $8, %rdi
    dec %ecx
    jnz 1b
    mov $PML4, %eax
    mov %rax, %cr3
    lgdt gdtr
    mov $0xc0000080, %ecx            /* EFER.SCE */
    rdmsr
    or $1, %eax
    wrmsr
    mov $0xc0000081, %ecx            /* STAR: SYSRET base 0x18, SYSCALL CS 0x10 */
    xor %eax, %eax
    mov $0x00180010, %edx
    wrmsr
    mov $0xc0000084, %ecx            /* SFMASK: TF IF DF */
    mov $0x700, %eax
    xor %edx, %edx
    wrmsr
    mov $0xc0000082, %ecx            /* LSTAR = entry (the fix-up traps this write) */
    mov $entry, %eax
    xor %edx, %edx
    wrmsr
    pushq $0x23                      /* SS: user data | 3 */
    pushq $USTACK
    pushq $2                         /* RFLAGS */
    pushq $0x2b                      /* CS: user code | 3 */
    pushq $user
    iretq
user:
    mov %cs, %eax
    movl %eax, REPORT                /* reached ring 3 */
    syscall
    ud2
entry:
    mov %cs, %eax
    movl %eax, REPORT + 8            /* CS after SYSCALL */
2:  pause
    jmp 2b
    .balign 8
gdt:
    .quad 0
    .quad 0x00cf9b000000ffff         /* 0x08 32-bit code (unused) */
    .quad 0x00af9b000000ffff         /* 0x10 kernel code */
    .quad 0x00cf93000000ffff         /* 0x18 kernel data */
    .quad 0x00cff3000000ffff         /* 0x20 user data */
    .quad 0x00affb000000ffff         /* 0x28 user code */
gdt_end:
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt
