/* ud64: 64-bit long mode, ring 0. Prints "invalid opcode next" and executes ud2
 * with no IDT: the guest crashes (status 4) on either backend.
 */
        .include "vmm.inc"
        .section .text.entry, "ax"
        .globl _start
_start:
        lea     msg(%rip), %rdi
        mov     $msg_len, %esi
        call    puts
        ud2

        .section .rodata
msg:    .ascii "invalid opcode next\n"
        .set msg_len, . - msg

        .include "lib64.S"
