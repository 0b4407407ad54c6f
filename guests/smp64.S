/* smp64: 64-bit long mode, ring 0, any number of vCPUs. Each vCPU prints
 * "cpu <index> of <count>" (index from rsi at entry, count from the boot info)
 * under a spinlock so lines never interleave, then counts itself done; the last
 * vCPU to finish exits with 0, the others halt.
 */
        .include "vmm.inc"
        .section .text.entry, "ax"
        .globl _start
_start:
        mov     %rsi, %r12                      /* r12 = my index */
        lea     print_lock(%rip), %rbx
1:      mov     $1, %eax
        xchg    %eax, (%rbx)                    /* take the lock */
        test    %eax, %eax
        jz      2f
        pause
        jmp     1b
2:      lea     msg_cpu(%rip), %rdi
        mov     $msg_cpu_len, %esi
        call    puts
        mov     %r12, %rdi
        call    put_dec
        lea     msg_of(%rip), %rdi
        mov     $msg_of_len, %esi
        call    puts
        mov     BOOT_INFO + BI_NR_VCPUS, %edi
        call    put_dec
        lea     newline(%rip), %rdi
        mov     $1, %esi
        call    puts
        movl    $0, (%rbx)                      /* release */
        mov     $1, %eax
        lock xadd %eax, done_count(%rip)
        inc     %eax
        cmp     BOOT_INFO + BI_NR_VCPUS, %eax
        jne     3f
        xor     %edi, %edi
        call    exit
3:      hlt
        jmp     3b

        .section .rodata
msg_cpu: .ascii "cpu "
        .set msg_cpu_len, . - msg_cpu
msg_of:  .ascii " of "
        .set msg_of_len, . - msg_of
newline: .ascii "\n"

        .data
        .balign 64
print_lock: .long 0
        .balign 64
done_count: .long 0

        .include "lib64.S"
