/* mmio64: 64-bit long mode, ring 0. Reads a dword from 0xd0000000 (in the MMIO
 * hole; no device there), prints "mmio read 0x<value>" (all-ones by the VMM's
 * contract), writes to it, and exits with 0. Under --strict the VMM stops it at
 * the read instead (status 4).
 */
        .include "vmm.inc"
        .set UNMAPPED, 0xd0000000
        .section .text.entry, "ax"
        .globl _start
_start:
        mov     $UNMAPPED, %ebx
        mov     (%rbx), %eax
        mov     %rax, %r12
        lea     msg(%rip), %rdi
        mov     $msg_len, %esi
        call    puts
        mov     %r12, %rdi
        call    put_hex
        lea     newline(%rip), %rdi
        mov     $1, %esi
        call    puts
        movl    $0x12345678, (%rbx)
        xor     %edi, %edi
        call    exit

        .section .rodata
msg:    .ascii "mmio read "
        .set msg_len, . - msg
newline: .ascii "\n"

        .include "lib64.S"
