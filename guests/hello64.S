/* hello64: 64-bit long mode, ring 0, ELF64 at 1 MiB.
 * Prints "hello from long mode" and exits with 0.
 */
        .include "vmm.inc"
        .section .text.entry, "ax"
        .globl _start
_start:
        lea     msg(%rip), %rdi
        mov     $msg_len, %esi
        call    puts
        xor     %edi, %edi
        call    exit

        .section .rodata
msg:    .ascii "hello from long mode\n"
        .set msg_len, . - msg

        .include "lib64.S"
