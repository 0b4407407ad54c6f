/* readpages64: loads one qword from every 4 KiB page of a guest-physical range; ring 3
 * (VMM note "user"), so it runs natively.
 *
 * The guest half of the kernel's pre_fault_memory_test: after the host pre-faults a
 * range, the guest reads every page of it and reports back. Boot arguments:
 *   base   first byte to read (default: the first page above the image)
 *   pages  how many pages (default: every page from base to the end of its RAM range)
 * Prints "readpages: <pages> pages from 0x<base>, checksum 0x<sum>" (the sum of every
 * qword read, so the host can check what the guest saw) and exits 0.
 */
        .include "vmm.inc"
        VMM_MODE_NOTE user
        .section .text.entry, "ax"
        .globl _start
_start:
        mov     BOOT_INFO + BI_IMAGE_END, %rsi  /* default base: above the image */
        add     $4095, %rsi
        and     $-4096, %rsi
        lea     key_base(%rip), %rdi
        call    arg_u64
        mov     %rax, %r12              /* r12 = base */
        mov     %r12, %rdi
        call    pages_to_range_end
        lea     key_pages(%rip), %rdi
        mov     %rax, %rsi
        call    arg_u64
        mov     %rax, %r13              /* r13 = pages */
        xor     %r14, %r14              /* r14 = checksum */
        mov     %r12, %rsi
        mov     %r13, %rcx
        test    %rcx, %rcx
        jz      report
read_page:
        add     (%rsi), %r14
        add     $4096, %rsi
        dec     %rcx
        jnz     read_page

report:
        lea     msg_head(%rip), %rdi
        mov     $msg_head_len, %esi
        call    puts
        mov     %r13, %rdi
        call    put_dec
        lea     msg_from(%rip), %rdi
        mov     $msg_from_len, %esi
        call    puts
        mov     %r12, %rdi
        call    put_hex
        lea     msg_sum(%rip), %rdi
        mov     $msg_sum_len, %esi
        call    puts
        mov     %r14, %rdi
        call    put_hex
        lea     newline(%rip), %rdi
        mov     $1, %esi
        call    puts
        xor     %edi, %edi
        call    exit

/* pages_to_range_end(rdi = gpa) -> rax: pages from gpa to the end of the RAM range
 * (boot info) that holds it, 0 if none does. */
pages_to_range_end:
        xor     %ecx, %ecx              /* range index */
1:      cmp     BOOT_INFO + BI_NR_RANGES, %ecx
        jae     3f
        mov     %ecx, %eax
        shl     $4, %eax
        mov     BOOT_INFO + BI_RANGES(%rax), %rdx       /* base */
        mov     BOOT_INFO + BI_RANGES + 8(%rax), %r8    /* size */
        add     %rdx, %r8                               /* end */
        cmp     %rdx, %rdi
        jb      2f
        cmp     %r8, %rdi
        jae     2f
        mov     %r8, %rax
        sub     %rdi, %rax
        shr     $12, %rax
        ret
2:      inc     %ecx
        jmp     1b
3:      xor     %eax, %eax
        ret

        .section .rodata
key_base:   .asciz "base"
key_pages:  .asciz "pages"
msg_head:   .ascii "readpages: "
        .set msg_head_len, . - msg_head
msg_from:   .ascii " pages from "
        .set msg_from_len, . - msg_from
msg_sum:    .ascii ", checksum "
        .set msg_sum_len, . - msg_sum
newline:    .ascii "\n"

        .include "lib64.S"
