/* memtouch64: touches guest RAM; ring 3 (VMM note "user"), so it runs natively.
 *
 * For each of `passes` passes (boot argument, default 1):
 *   mark MARK_PASS_START | pass on the marker port,
 *   write one qword (gpa + pass) at the start of every 4 KiB page of RAM above the
 *   image (from the boot info's RAM ranges), then read every one back and check it,
 *   mark MARK_PASS_END | pass.
 * Then prints "memtouch: <pages> pages x <passes> passes, checksum 0x<sum>" (the sum of
 * every qword read) and exits 0; on a mismatch prints the address and exits 1.
 */
        .include "vmm.inc"
        VMM_MODE_NOTE user
        .section .text.entry, "ax"
        .globl _start
_start:
        lea     key_passes(%rip), %rdi
        mov     $1, %esi
        call    arg_u64
        mov     %rax, %r12              /* r12 = passes */
        xor     %r13, %r13              /* r13 = pass */
        xor     %r14, %r14              /* r14 = checksum */
        xor     %r15, %r15              /* r15 = pages per pass */
pass_loop:
        cmp     %r12, %r13
        jae     report
        mov     %r13d, %edi
        or      $MARK_PASS_START, %edi
        call    mark
        /* write phase */
        xor     %r15, %r15
        xor     %ebx, %ebx              /* rbx = range index */
w_range:
        cmp     BOOT_INFO + BI_NR_RANGES, %ebx
        jae     r_start
        call    range_bounds            /* rsi = first page, rdx = end */
w_page:
        cmp     %rdx, %rsi
        jae     w_next
        lea     (%rsi,%r13), %rax
        mov     %rax, (%rsi)
        inc     %r15
        add     $4096, %rsi
        jmp     w_page
w_next:
        inc     %ebx
        jmp     w_range
r_start:
        /* read phase */
        xor     %ebx, %ebx
r_range:
        cmp     BOOT_INFO + BI_NR_RANGES, %ebx
        jae     pass_done
        call    range_bounds
r_page:
        cmp     %rdx, %rsi
        jae     r_next
        mov     (%rsi), %rax
        lea     (%rsi,%r13), %rcx
        cmp     %rcx, %rax
        jne     mismatch
        add     %rax, %r14
        add     $4096, %rsi
        jmp     r_page
r_next:
        inc     %ebx
        jmp     r_range
pass_done:
        mov     %r13d, %edi
        or      $MARK_PASS_END, %edi
        call    mark
        inc     %r13
        jmp     pass_loop

report:
        lea     msg_head(%rip), %rdi
        mov     $msg_head_len, %esi
        call    puts
        mov     %r15, %rdi
        call    put_dec
        lea     msg_pages(%rip), %rdi
        mov     $msg_pages_len, %esi
        call    puts
        mov     %r12, %rdi
        call    put_dec
        lea     msg_passes(%rip), %rdi
        mov     $msg_passes_len, %esi
        call    puts
        mov     %r14, %rdi
        call    put_hex
        lea     newline(%rip), %rdi
        mov     $1, %esi
        call    puts
        xor     %edi, %edi
        call    exit

mismatch:
        push    %rsi
        lea     msg_bad(%rip), %rdi
        mov     $msg_bad_len, %esi
        call    puts
        pop     %rdi
        call    put_hex
        lea     newline(%rip), %rdi
        mov     $1, %esi
        call    puts
        mov     $1, %edi
        call    exit

/* range_bounds(ebx = range index) -> rsi = first page to touch, rdx = end of range.
 * Pages start above the image (BI_IMAGE_END rounded up to 4 KiB). */
range_bounds:
        mov     %ebx, %eax
        shl     $4, %eax
        mov     BOOT_INFO + BI_RANGES(%rax), %rsi       /* base */
        mov     BOOT_INFO + BI_RANGES + 8(%rax), %rdx   /* size */
        add     %rsi, %rdx                              /* end */
        mov     BOOT_INFO + BI_IMAGE_END, %rax
        add     $4095, %rax
        and     $-4096, %rax
        cmp     %rax, %rsi
        jae     1f
        mov     %rax, %rsi
1:      ret

        .section .rodata
key_passes: .asciz "passes"
msg_head:   .ascii "memtouch: "
        .set msg_head_len, . - msg_head
msg_pages:  .ascii " pages x "
        .set msg_pages_len, . - msg_pages
msg_passes: .ascii " passes, checksum "
        .set msg_passes_len, . - msg_passes
msg_bad:    .ascii "memtouch: mismatch at "
        .set msg_bad_len, . - msg_bad
newline:    .ascii "\n"

        .include "lib64.S"
