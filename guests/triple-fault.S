/* triple-fault: real mode, flat binary at 0x7c00. Prints "triple fault next" on
 * COM1, switches to 32-bit protected mode with an empty IDT (limit 0) and executes
 * ud2: the #UD cannot be delivered, nor the #GP and #DF after it, so the CPU shuts
 * down. The VMM reports a crash (status 4) with the vCPU and RIP.
 * (A real-mode exception would not do: real mode ignores the IDT limit and jumps
 * through the IVT at address 0.)
 */
        .include "vmm.inc"
        .code16
        .text
        .globl start
start:
        cld
        cli
        xor     %ax, %ax
        mov     %ax, %ds
        mov     $msg, %si
        mov     $msg_len, %cx
        mov     $COM1, %dx
        rep outsb
        lgdtl   gdt_desc
        lidtl   empty_idt
        mov     %cr0, %eax
        or      $1, %eax                /* CR0.PE */
        mov     %eax, %cr0
        ljmpl   $0x08, $pm32
        .code32
pm32:
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %ss
        ud2                             /* #UD -> #GP -> #DF -> shutdown */
        hlt

        .balign 8
gdt:    .quad 0
        .quad 0x00cf9b000000ffff        /* 0x08: flat 32-bit code */
        .quad 0x00cf93000000ffff        /* 0x10: flat data */
gdt_desc:
        .word gdt_desc - gdt - 1
        .long gdt
empty_idt:
        .word 0                         /* limit 0: no vector can be delivered */
        .long 0
msg:    .ascii "triple fault next\n"
        .set msg_len, . - msg
