/* Small 64-bit helpers shared by the 64-bit guests (ring 0 and ring 3 alike:
 * ring-3 guests run with IOPL 3, so in/out work there too).
 * Calling convention: System V (args rdi, rsi, rdx; rax returned; rbx, rbp, r12-r15 kept).
 */
        .text

/* puts(rdi = string, rsi = length): one `rep outsb` to COM1. */
puts:
        push    %rsi
        mov     %rsi, %rcx
        mov     %rdi, %rsi
        mov     $COM1, %dx
        cld
        rep outsb
        pop     %rsi
        ret

/* put_hex(rdi = value): "0x" and 16 hex digits. */
put_hex:
        sub     $24, %rsp
        movw    $0x7830, (%rsp)         /* "0x" */
        lea     17(%rsp), %r8           /* last digit slot */
        mov     $16, %ecx
1:      mov     %edi, %eax
        and     $15, %eax
        lea     hex_digits(%rip), %r9
        movb    (%r9,%rax), %al
        movb    %al, (%r8)
        dec     %r8
        shr     $4, %rdi
        dec     %ecx
        jnz     1b
        mov     %rsp, %rdi
        mov     $18, %esi
        call    puts
        add     $24, %rsp
        ret

/* put_dec(rdi = value): decimal digits. */
put_dec:
        sub     $40, %rsp
        lea     32(%rsp), %r8           /* digits grow down from here */
        mov     %rdi, %rax
        mov     $10, %r9
1:      xor     %edx, %edx
        div     %r9
        add     $'0', %dl
        dec     %r8
        movb    %dl, (%r8)
        test    %rax, %rax
        jnz     1b
        mov     %r8, %rdi
        lea     32(%rsp), %rsi
        sub     %r8, %rsi
        call    puts
        add     $40, %rsp
        ret

/* exit(dil = value): write it to the exit port; never returns. */
exit:
        mov     %edi, %eax
        out     %al, $EXIT_PORT
1:      jmp     1b

/* mark(edi = event id): timestamped by the VMM. */
mark:
        mov     %edi, %eax
        mov     $MARK_PORT, %dx
        out     %eax, %dx
        ret

/* arg_u64(rdi = NUL-terminated key, rsi = default) -> rax: the value of "key=N" in the
 * boot arguments (decimal, or hex with 0x), or the default if the key is absent. */
arg_u64:
        mov     $BOOT_INFO + BI_ARGS, %r8       /* current "key=value" string */
1:      cmpb    $0, (%r8)
        je      9f                              /* empty string: end of the list */
        mov     %rdi, %r9                       /* compare key */
        mov     %r8, %r10
2:      movb    (%r9), %al
        test    %al, %al
        jz      3f
        cmpb    %al, (%r10)
        jne     5f
        inc     %r9
        inc     %r10
        jmp     2b
3:      cmpb    $'=', (%r10)
        jne     5f
        lea     1(%r10), %r10                   /* parse the number at r10 */
        xor     %eax, %eax
        mov     $10, %r11
        cmpb    $'0', (%r10)
        jne     4f
        movb    1(%r10), %cl
        or      $0x20, %cl
        cmp     $'x', %cl
        jne     4f
        add     $2, %r10
        mov     $16, %r11
4:      movzbl  (%r10), %ecx
        mov     %ecx, %edx
        sub     $'0', %edx
        cmp     $9, %edx
        jbe     6f
        or      $0x20, %ecx
        lea     -'a'(%rcx), %edx
        cmp     $5, %edx
        ja      8f
        cmp     $16, %r11
        jne     8f
        add     $10, %edx
6:      imul    %r11, %rax
        add     %rdx, %rax
        inc     %r10
        jmp     4b
5:      cmpb    $0, (%r8)                       /* skip to the next string */
        je      7f
        inc     %r8
        jmp     5b
7:      inc     %r8
        jmp     1b
8:      ret
9:      mov     %rsi, %rax
        ret

        .section .rodata
hex_digits:
        .ascii "0123456789abcdef"
        .text
