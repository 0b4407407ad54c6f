/* uartecho64: 64-bit long mode, ring 0, ELF64 at 1 MiB. Reads the 16550's receive side by
 * polling LSR.DR (so it needs no interrupt controller: both backends), echoes every byte
 * back to COM1, and stops at the first Ctrl-D (0x04): it exits with the number of bytes
 * it read before it (mod 256). Prints "echo: ready\n" first, so a test knows it is
 * reading.
 */
        .include "vmm.inc"
        .section .text.entry, "ax"
        .globl _start
_start:
        lea     msg(%rip), %rdi
        mov     $msg_len, %esi
        call    puts
        xor     %ebx, %ebx              /* bytes read */
1:      mov     $COM1 + 5, %dx          /* LSR */
        in      %dx, %al
        test    $1, %al                 /* DR: a byte waits in RBR */
        jz      1b
        mov     $COM1, %dx
        in      %dx, %al                /* RBR */
        cmp     $4, %al
        je      2f
        out     %al, %dx                /* THR */
        inc     %ebx
        jmp     1b
2:      mov     %ebx, %edi
        call    exit

        .section .rodata
msg:    .ascii "echo: ready\n"
        .set msg_len, . - msg

        .include "lib64.S"
