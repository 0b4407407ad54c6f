/* pio-loop64: the exit benchmark. `count` (boot argument, default 100000) times
 * `out %al, $0x80`, then exit 0. Long mode ring 0 by default; run it with
 * `--mode user` for the ring-3 variant (IOPL 3 lets ring 3 do port I/O).
 * The loop is exactly `out; dec; jnz`, the same as bench/cvmm.c's guest.
 */
        .include "vmm.inc"
        .section .text.entry, "ax"
        .globl _start
_start:
        lea     key_count(%rip), %rdi
        mov     $100000, %esi
        call    arg_u64
        mov     %rax, %rcx
        test    %rcx, %rcx
        jz      2f
1:      out     %al, $POST_PORT
        dec     %rcx
        jnz     1b
2:      xor     %edi, %edi
        call    exit

        .section .rodata
key_count: .asciz "count"

        .include "lib64.S"
