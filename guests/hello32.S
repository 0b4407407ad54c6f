/* hello32: 32-bit flat protected mode (no paging), ELF32 at 1 MiB.
 * Prints "hello from protected mode" with one `rep outsb`, then exits with 0.
 */
        .include "vmm.inc"
        .code32
        .section .text.entry, "ax"
        .globl _start
_start:
        cld
        mov     $msg, %esi
        mov     $msg_len, %ecx
        mov     $COM1, %dx
        rep outsb
        xor     %eax, %eax
        out     %al, $EXIT_PORT
        hlt

        .section .rodata
msg:    .ascii "hello from protected mode\n"
        .set msg_len, . - msg
