/* user64: 64-bit long mode, ring 3 (the VMM note asks for "user"), ELF64 at 1 MiB.
 * Ring 3 runs natively even where the host emulates ring 0. Prints
 * "hello from user mode" and exits with 0.
 */
        .include "vmm.inc"
        VMM_MODE_NOTE user
        .section .text.entry, "ax"
        .globl _start
_start:
        lea     msg(%rip), %rdi
        mov     $msg_len, %esi
        call    puts
        xor     %edi, %edi
        call    exit

        .section .rodata
msg:    .ascii "hello from user mode\n"
        .set msg_len, . - msg

        .include "lib64.S"
