/* exceptions: a Multiboot v1 ELF32 that switches itself to 64-bit long mode (its own
 * identity page tables, 2 MiB pages, the first 4 GiB), installs a 64-bit IDT and raises,
 * one case at a time, in the order "cases=a,b,..." on the command line names them
 * (default: all six, in this order):
 *
 *   de   #DE: div by zero              vector 0,    no error code, RIP = the div
 *   ud   #UD: ud2                      vector 6,    no error code, RIP = the ud2
 *   gp   #GP: mov 0x5b to DS           vector 13,   error code 0x58 (the selector,
 *        (beyond the GDT's limit)                   RPL dropped), RIP = the mov
 *   pf   #PF: write to 0x100001234     vector 14,   error code 0x2 (write, not present),
 *        (above the 4 GiB mapped)                   CR2 = the address, RIP = the mov
 *   bp   int3                          vector 3,    no error code, RIP = after the int3
 *   int  int $0x40                     vector 0x40, no error code, RIP = after the int
 *
 * The one handler checks vector, error code, saved RIP (and CR2 for #PF) against what
 * the case expects, steps over a faulting instruction by its length and returns with
 * iretq. Prints "PASS <case>" per case, then "PASS exceptions: <n> cases"; a mismatch,
 * a missing exception or an unknown case name prints "FAIL: <case>: ..." (exit value 1).
 * (`int3` and `int n` at ring 0 are what some KVM hosts cannot emulate: leave them out
 * with cases=de,ud,gp,pf there.)
 */
        .include "pc.inc"
        .set WANT_LONG_MODE, 1

        MULTIBOOT_HEADER MB_PAGE_ALIGN | MB_MEMORY_INFO
        PC_ENTRY main

        .set BAD_SELECTOR,      0x5b            /* GDT index 11, RPL 3: beyond the limit */
        .set PF_ADDR,           0x100001234     /* not mapped: only 4 GiB are */
        .set PF_ERROR,          0x2             /* write, page not present, supervisor */
        .set VECTOR_INT,        0x40
        .set NAME_MAX,          8

        .text
        .code32
main:
        mov     MBI_FLAGS(%ebx), %eax           /* "cases=" from the command line, if any */
        test    $MBI_F_CMDLINE, %eax
        jz      1f
        mov     MBI_CMDLINE(%ebx), %esi
        mov     $key_cases, %edi
        call    cmdline_arg
        test    %eax, %eax
        jz      1f
        mov     %eax, cases
1:      mov     $long_main, %eax
        jmp     enter_long_mode

        .code64
long_main:
        call    build_idt
        lidt    idt_desc(%rip)
        mov     cases(%rip), %esi               /* rsi = the next case name */
        xor     %r12d, %r12d                    /* r12 = cases run */
next_case:
        lea     case_name(%rip), %rdi           /* copy the name (up to , space or NUL) */
        xor     %ecx, %ecx
1:      movb    (%rsi), %al
        cmp     $',', %al
        je      2f
        cmp     $' ', %al
        je      2f
        test    %al, %al
        jz      2f
        cmp     $NAME_MAX, %ecx
        jae     bad_case
        mov     %al, (%rdi,%rcx)
        inc     %ecx
        inc     %rsi
        jmp     1b
2:      movb    $0, (%rdi,%rcx)
        test    %ecx, %ecx
        jz      bad_case
        mov     %rsi, %r13                      /* r13 = at the terminator */
        lea     case_table(%rip), %rbx          /* look it up */
3:      mov     (%rbx), %rdi
        test    %rdi, %rdi
        jz      bad_case
        lea     case_name(%rip), %rsi
        call    streq
        je      4f
        add     $16, %rbx
        jmp     3b
4:      movb    $0, seen(%rip)
        call    *8(%rbx)
        cmpb    $1, seen(%rip)
        je      5f
        lea     msg_no_exception(%rip), %rsi
        movzbl  seen(%rip), %eax
        jmp     case_fail
5:      lea     str_pass(%rip), %rsi
        call    puts64
        lea     case_name(%rip), %rsi
        call    puts64
        call    newline64
        inc     %r12
        mov     %r13, %rsi
        cmpb    $',', (%rsi)
        jne     all_done
        inc     %rsi
        jmp     next_case
all_done:
        lea     str_summary(%rip), %rsi
        call    puts64
        mov     %r12, %rax
        call    put_dec64
        lea     str_cases(%rip), %rsi
        call    puts64
        mov     $EXIT_PASS, %al
        jmp     exit64

bad_case:                                       /* the name so far is in case_name */
        movb    $0, (%rdi,%rcx)
        lea     str_fail(%rip), %rsi
        call    puts64
        lea     case_name(%rip), %rsi
        call    puts64
        lea     msg_unknown_case(%rip), %rsi
        call    puts64
        mov     $EXIT_FAIL, %al
        jmp     exit64

/* streq(rsi, rdi): ZF set if the NUL-terminated strings are equal. */
streq:
        push    %rsi
        push    %rdi
1:      movb    (%rsi), %al
        cmpb    (%rdi), %al
        jne     2f
        inc     %rsi
        inc     %rdi
        test    %al, %al
        jnz     1b
2:      pop     %rdi
        pop     %rsi
        ret

/* case_fail(rsi = what, rax = value): "FAIL: <case>: <what> 0x<value>", exit value 1. */
case_fail:
        push    %rsi
        push    %rax
        lea     str_fail(%rip), %rsi
        call    puts64
        lea     case_name(%rip), %rsi
        call    puts64
        lea     str_colon(%rip), %rsi
        call    puts64
        pop     %rax
        pop     %rsi
        call    puts64
        push    %rax
        mov     $' ', %al
        call    putc64
        pop     %rax
        call    put_hex64q
        call    newline64
        mov     $EXIT_FAIL, %al
        jmp     exit64

/* EXPECT vector, error, rip, skip, cr2: what the handler must see for this case. */
        .macro EXPECT vector, error, rip, skip, cr2=0
        movq    $\vector, expect_vector(%rip)
        movq    $\error, expect_error(%rip)
        lea     \rip(%rip), %rax
        mov     %rax, expect_rip(%rip)
        movq    $\skip, expect_skip(%rip)
        movabs  $\cr2, %rax
        mov     %rax, expect_cr2(%rip)
        .endm

case_de:
        EXPECT  0, 0, de_insn, (de_end-de_insn)
        xor     %edx, %edx
        mov     $1, %eax
        xor     %ecx, %ecx
de_insn:
        div     %ecx
de_end: ret

case_ud:
        EXPECT  6, 0, ud_insn, (ud_end-ud_insn)
ud_insn:
        ud2
ud_end: ret

case_gp:
        EXPECT  13, (BAD_SELECTOR&0xfffc), gp_insn, (gp_end-gp_insn)
        mov     $BAD_SELECTOR, %eax
gp_insn:
        mov     %eax, %ds
gp_end: mov     %ds, %eax                       /* DS must be untouched */
        cmp     $SEL_DATA, %eax
        je      1f
        lea     msg_ds_changed(%rip), %rsi
        jmp     case_fail
1:      ret

case_pf:
        EXPECT  14, PF_ERROR, pf_insn, (pf_end-pf_insn), PF_ADDR
        movabs  $PF_ADDR, %rbx
pf_insn:
        movl    $0, (%rbx)
pf_end: ret

case_bp:
        EXPECT  3, 0, bp_end, 0
        int3
bp_end: ret

case_int:
        EXPECT  VECTOR_INT, 0, int_end, 0
        int     $VECTOR_INT
int_end:
        ret

/* The handler every stub enters: stack = vector, error code (0 where the CPU pushes
 * none), RIP, CS, RFLAGS, RSP, SS. */
        .set FRAME, 9 * 8                       /* the registers saved below */
exception:
        push    %rax
        push    %rcx
        push    %rdx
        push    %rsi
        push    %rdi
        push    %r8
        push    %r9
        push    %r10
        push    %r11
        mov     FRAME(%rsp), %rax               /* vector */
        cmp     expect_vector(%rip), %rax
        je      1f
        lea     msg_vector(%rip), %rsi
        jmp     case_fail
1:      mov     FRAME + 8(%rsp), %rax           /* error code */
        cmp     expect_error(%rip), %rax
        je      1f
        lea     msg_error(%rip), %rsi
        jmp     case_fail
1:      mov     FRAME + 16(%rsp), %rax          /* saved RIP */
        cmp     expect_rip(%rip), %rax
        je      1f
        lea     msg_rip(%rip), %rsi
        jmp     case_fail
1:      cmpq    $14, FRAME(%rsp)
        jne     1f
        mov     %cr2, %rax
        cmp     expect_cr2(%rip), %rax
        je      1f
        lea     msg_cr2(%rip), %rsi
        jmp     case_fail
1:      mov     expect_skip(%rip), %rax         /* step over a faulting instruction */
        add     %rax, FRAME + 16(%rsp)
        incb    seen(%rip)
        pop     %r11
        pop     %r10
        pop     %r9
        pop     %r8
        pop     %rdi
        pop     %rsi
        pop     %rdx
        pop     %rcx
        pop     %rax
        add     $16, %rsp                       /* vector, error code */
        iretq

/* Stubs for vectors 0-31 and 0x40: push a 0 where the CPU pushes no error code. */
        .irp v, 8,10,11,12,13,14,17,21,29,30
        .set has_error_\v, 1
        .endr
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,64
stub_\v:
        .ifndef has_error_\v
        push    $0
        .endif
        push    $\v
        jmp     exception
        .endr

/* build_idt: gates for 0-31 and 0x40; the rest stay not present (#NP, then FAIL). */
build_idt:
        xor     %ecx, %ecx
        lea     stubs(%rip), %rbx
1:      mov     (%rbx,%rcx,8), %rax
        call    set_gate64
        inc     %ecx
        cmp     $32, %ecx
        jb      1b
        mov     32 * 8(%rbx), %rax
        mov     $VECTOR_INT, %ecx
        jmp     set_gate64


        .code32

        .section .rodata
        .balign 8
stubs:
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,64
        .long stub_\v, 0                /* ELF32: 64-bit pointers as two longs */
        .endr
case_table:
        .long name_de, 0, case_de, 0
        .long name_ud, 0, case_ud, 0
        .long name_gp, 0, case_gp, 0
        .long name_pf, 0, case_pf, 0
        .long name_bp, 0, case_bp, 0
        .long name_int, 0, case_int, 0
        .long 0, 0, 0, 0
name_de:                .asciz "de"
name_ud:                .asciz "ud"
name_gp:                .asciz "gp"
name_pf:                .asciz "pf"
name_bp:                .asciz "bp"
name_int:               .asciz "int"
key_cases:              .asciz "cases="
default_cases:          .asciz "de,ud,gp,pf,bp,int"
str_colon:              .asciz ": "
str_summary:            .asciz "PASS exceptions: "
str_cases:              .asciz " cases\n"
msg_unknown_case:       .asciz ": unknown case (cases= takes de,ud,gp,pf,bp,int)\n"
msg_no_exception:       .asciz "expected one exception, saw"
msg_vector:             .asciz "unexpected vector"
msg_error:              .asciz "unexpected error code"
msg_rip:                .asciz "unexpected saved RIP"
msg_cr2:                .asciz "unexpected CR2"
msg_ds_changed:         .asciz "DS changed by the faulting load:"

        .data
        .balign 8
cases:          .long default_cases, 0
expect_vector:  .quad 0
expect_error:   .quad 0
expect_rip:     .quad 0
expect_skip:    .quad 0
expect_cr2:     .quad 0
seen:           .byte 0
case_name:      .skip NAME_MAX + 1

        .include "lib32.S"
