/* 32-bit helpers for the PC-convention guests (guests/pc/), flat protected mode, ring 0.
 * Included at the end of each image, after pc.inc and PC_ENTRY. Registers: arguments as
 * each routine says; every routine keeps every register it does not return in (EFLAGS
 * aside). Output goes to COM1 one byte at a time, polling LSR.THRE first (QEMU's UART
 * can drop bytes sent while it is busy). With WANT_LONG_MODE set before including it, it also has
 * enter_long_mode, 64-bit versions of the print helpers (putc64, puts64, ...) and a
 * 64-bit IDT (`idt`, `idt_desc`, set_gate64).
 */
        .ifndef STACK_SIZE
        .set STACK_SIZE, 4096
        .endif
        .set CMDLINE_MAX, 8192          /* bound on any string the loader hands us */

        .text
        .code32

/* putc(al): one byte to COM1. */
putc:
        push    %edx
        push    %eax
        mov     $COM1_LSR, %dx
1:      in      %dx, %al
        test    $LSR_THRE, %al
        jz      1b
        pop     %eax
        mov     $COM1, %dx
        out     %al, %dx
        pop     %edx
        ret

/* putsn(esi = string, ecx = most bytes): up to the NUL or ecx bytes. */
putsn:
        push    %esi
        push    %ecx
        push    %eax
        jecxz   2f
1:      lodsb
        test    %al, %al
        jz      2f
        call    putc
        loop    1b
2:      pop     %eax
        pop     %ecx
        pop     %esi
        ret

/* puts(esi = NUL-terminated string of ours). */
puts:
        push    %ecx
        mov     $CMDLINE_MAX, %ecx
        call    putsn
        pop     %ecx
        ret

/* newline: "\n". */
newline:
        push    %eax
        mov     $'\n', %al
        call    putc
        pop     %eax
        ret

/* put_dec(eax): unsigned decimal. */
put_dec:
        push    %eax
        push    %ecx
        push    %edx
        push    %edi
        sub     $12, %esp
        lea     11(%esp), %edi          /* digits grow down from here */
        movb    $0, (%edi)
        mov     $10, %ecx
1:      xor     %edx, %edx
        div     %ecx
        add     $'0', %dl
        dec     %edi
        mov     %dl, (%edi)
        test    %eax, %eax
        jnz     1b
        push    %esi
        mov     %edi, %esi
        call    puts
        pop     %esi
        add     $12, %esp
        pop     %edi
        pop     %edx
        pop     %ecx
        pop     %eax
        ret

/* put_hex(eax = value, ecx = digits, 1..8): the low `ecx` nibbles, no prefix. */
put_hex:
        push    %eax
        push    %ecx
        push    %edx
        mov     %eax, %edx
        mov     $8, %eax
        sub     %ecx, %eax
        shl     $2, %eax                /* skip the unwanted top nibbles */
        xchg    %eax, %ecx
        shl     %cl, %edx
        mov     %eax, %ecx
1:      rol     $4, %edx
        mov     %edx, %eax
        and     $15, %eax
        movb    hex_digits(%eax), %al
        call    putc
        loop    1b
        pop     %edx
        pop     %ecx
        pop     %eax
        ret

/* put_hex_min(eax): hex without leading zeros (at least one digit), no prefix. */
put_hex_min:
        push    %ecx
        push    %edx
        mov     $1, %ecx
        mov     %eax, %edx
1:      shr     $4, %edx
        jz      2f
        inc     %ecx
        jmp     1b
2:      call    put_hex
        pop     %edx
        pop     %ecx
        ret

/* put_hex64(edx:eax): "0x" and 16 digits. */
put_hex64:
        push    %esi
        push    %ecx
        push    %eax
        mov     $str_0x, %esi
        call    puts
        mov     $8, %ecx
        mov     %edx, %eax
        call    put_hex
        pop     %eax
        call    put_hex
        pop     %ecx
        pop     %esi
        ret

/* put_hex32(eax): "0x" and 8 digits. */
put_hex32:
        push    %esi
        push    %ecx
        mov     $str_0x, %esi
        call    puts
        mov     $8, %ecx
        call    put_hex
        pop     %ecx
        pop     %esi
        ret

/* exit(al): write it to the exit port; if that returns (no such device), halt forever. */
exit:
        out     %al, $EXIT_PORT
        cli
1:      hlt
        jmp     1b

/* pass_exit(esi = what): "PASS <what>\n", then exit value 0. */
pass_exit:
        push    %esi
        mov     $str_pass, %esi
        call    puts
        pop     %esi
        call    puts
        call    newline
        mov     $EXIT_PASS, %al
        jmp     exit

/* fail(esi = what): "FAIL: <what>\n", then exit value 1. */
fail:
        call    fail_prefix
        call    newline
        mov     $EXIT_FAIL, %al
        jmp     exit

/* fail_hex(esi = what, eax = value): "FAIL: <what> 0x<value>\n", then exit value 1. */
fail_hex:
        call    fail_prefix
        push    %eax
        mov     $' ', %al
        call    putc
        pop     %eax
        call    put_hex32
        call    newline
        mov     $EXIT_FAIL, %al
        jmp     exit

fail_prefix:
        push    %esi
        mov     $str_fail, %esi
        call    puts
        pop     %esi
        jmp     puts

/* cmdline_arg(esi = command line or 0, edi = "key=") -> eax: the first character of the
 * value of the first word that starts with the key, or 0. Words are separated by spaces
 * (QEMU puts the kernel's file name first: it is just another word). */
cmdline_arg:
        push    %ecx
        push    %edx
        push    %esi
        xor     %eax, %eax
        test    %esi, %esi
        jz      9f
        mov     $CMDLINE_MAX, %ecx
        mov     $' ', %dl               /* the character before the current one */
1:      cmpb    $0, (%esi)
        je      8f
        cmp     $' ', %dl
        jne     4f
        push    %esi                    /* at a word start: compare with the key */
        push    %edi
2:      movb    (%edi), %dh
        test    %dh, %dh
        jz      3f                      /* the whole key matched */
        cmpb    %dh, (%esi)
        jne     5f
        inc     %esi
        inc     %edi
        jmp     2b
3:      mov     %esi, %eax
        pop     %edi
        pop     %esi
        jmp     9f
5:      pop     %edi
        pop     %esi
4:      movb    (%esi), %dl
        inc     %esi
        loop    1b
8:      xor     %eax, %eax
9:      pop     %esi
        pop     %edx
        pop     %ecx
        ret

/* parse_dec(esi = digits) -> eax = value, ecx = number of digits (0: none; more than 9:
 * the value is not trusted). Stops at the first non-digit. */
parse_dec:
        push    %edx
        push    %esi
        xor     %eax, %eax
        xor     %ecx, %ecx
1:      movzbl  (%esi), %edx
        sub     $'0', %edx
        cmp     $9, %edx
        ja      2f
        imul    $10, %eax, %eax
        add     %edx, %eax
        inc     %esi
        inc     %ecx
        cmp     $10, %ecx
        jb      1b
2:      pop     %esi
        pop     %edx
        ret

        .ifdef WANT_LONG_MODE
/* enter_long_mode(eax = 64-bit entry point below 4 GiB): identity-maps the first 4 GiB
 * with 2 MiB pages (the top GiB, where the APIC and other MMIO live, uncached), turns on
 * PAE, EFER.LME and paging, and far-jumps to the entry in the 64-bit code segment with
 * flat data segments and the same stack. Never returns. (Long mode, because 32-bit and
 * legacy PAE paging do not work on every KVM host this project runs on.) */
enter_long_mode:
        mov     %eax, long_entry
        mov     $pml4, %edi                     /* the tables: zero, then fill */
        mov     $PAGE_TABLES_SIZE / 4, %ecx
        xor     %eax, %eax
        rep stosl
        movl    $pdpt + PTE_P_W, pml4
        mov     $pdpt, %edi
        mov     $pd + PTE_P_W, %eax
        mov     $4, %ecx
1:      mov     %eax, (%edi)
        add     $4096, %eax
        add     $8, %edi
        loop    1b
        mov     $pd, %edi
        mov     $PTE_P_W | PTE_PS, %eax
        mov     $4 * 512, %ecx
1:      mov     %eax, %edx
        cmp     $512, %ecx                      /* the last 512 entries: 3 GiB - 4 GiB */
        ja      2f
        or      $PTE_PWT | PTE_PCD, %edx
2:      mov     %edx, (%edi)
        add     $0x200000, %eax
        add     $8, %edi
        loop    1b
        mov     %cr4, %eax
        or      $CR4_PAE, %eax
        mov     %eax, %cr4
        mov     $pml4, %eax
        mov     %eax, %cr3
        mov     $MSR_EFER, %ecx
        rdmsr
        or      $EFER_LME, %eax
        wrmsr
        mov     %cr0, %eax
        or      $CR0_PG | CR0_PE, %eax
        mov     %eax, %cr0
        ljmp    $SEL_CODE64, $1f
        .code64
1:      mov     $SEL_DATA, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     long_entry(%rip), %eax        /* RIP-relative: an ELF32 has no 64-bit relocations */
        jmp     *%rax

/* The 64-bit versions of the print helpers, for code after enter_long_mode. */

/* putc64(al) */
putc64:
        push    %rdx
        push    %rax
        mov     $COM1_LSR, %dx
1:      in      %dx, %al
        test    $LSR_THRE, %al
        jz      1b
        pop     %rax
        mov     $COM1, %dx
        out     %al, %dx
        pop     %rdx
        ret

/* puts64(rsi = NUL-terminated string), at most CMDLINE_MAX bytes. */
puts64:
        push    %rsi
        push    %rcx
        push    %rax
        mov     $CMDLINE_MAX, %ecx
1:      lodsb
        test    %al, %al
        jz      2f
        call    putc64
        loop    1b
2:      pop     %rax
        pop     %rcx
        pop     %rsi
        ret

newline64:
        push    %rax
        mov     $'\n', %al
        call    putc64
        pop     %rax
        ret

/* put_hex64q(rax): "0x" and 16 digits. */
put_hex64q:
        push    %rax
        push    %rcx
        push    %rdx
        push    %rsi
        mov     %rax, %rdx
        lea     str_0x(%rip), %rsi
        call    puts64
        mov     $16, %ecx
1:      rol     $4, %rdx
        mov     %edx, %eax
        and     $15, %eax
        lea     hex_digits(%rip), %rsi
        movb    (%rsi,%rax), %al
        call    putc64
        loop    1b
        pop     %rsi
        pop     %rdx
        pop     %rcx
        pop     %rax
        ret

/* put_dec64(rax): unsigned decimal. */
put_dec64:
        push    %rax
        push    %rcx
        push    %rdx
        push    %rsi
        sub     $24, %rsp
        lea     23(%rsp), %rsi
        movb    $0, (%rsi)
        mov     $10, %ecx
1:      xor     %edx, %edx
        div     %rcx
        add     $'0', %dl
        dec     %rsi
        mov     %dl, (%rsi)
        test    %rax, %rax
        jnz     1b
        call    puts64
        add     $24, %rsp
        pop     %rsi
        pop     %rdx
        pop     %rcx
        pop     %rax
        ret

/* exit64(al): write it to the exit port; halt forever if that returns. */
exit64:
        out     %al, $EXIT_PORT
        cli
1:      hlt
        jmp     1b

/* fail64(rsi = what): "FAIL: <what>\n", exit value 1. fail_hex64 adds " 0x<rax>". */
fail64:
        call    fail_prefix64
        call    newline64
        mov     $EXIT_FAIL, %al
        jmp     exit64
fail_hex64:
        call    fail_prefix64
        push    %rax
        mov     $' ', %al
        call    putc64
        pop     %rax
        call    put_hex64q
        call    newline64
        mov     $EXIT_FAIL, %al
        jmp     exit64
fail_prefix64:
        push    %rsi
        lea     str_fail(%rip), %rsi
        call    puts64
        pop     %rsi
        jmp     puts64

/* set_gate64(ecx = vector, rax = handler): a 64-bit interrupt gate (DPL 0, IST 0) in
 * `idt`, which `lidt idt_desc(%rip)` loads. */
set_gate64:
        push    %rdi
        push    %rdx
        push    %rax
        mov     %ecx, %edi
        shl     $4, %edi
        lea     idt(%rip), %rdx
        add     %rdx, %rdi
        mov     %ax, (%rdi)                     /* offset 15:0 */
        movw    $SEL_CODE64, 2(%rdi)
        movw    $GATE_INT64, 4(%rdi)            /* IST 0, type */
        shr     $16, %rax
        mov     %ax, 6(%rdi)                    /* offset 31:16 */
        shr     $16, %rax
        mov     %eax, 8(%rdi)                   /* offset 63:32 */
        movl    $0, 12(%rdi)
        pop     %rax
        pop     %rdx
        pop     %rdi
        ret
        .code32

        .bss
        .balign 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4 * 4096                  /* 4 GiB of 2 MiB pages */
        .set PAGE_TABLES_SIZE, . - pml4
        .set IDT64_ENTRIES, 256
idt:    .skip IDT64_ENTRIES * 16
        .section .rodata
        .balign 8
        .word 0, 0, 0
idt_desc:
        .word IDT64_ENTRIES * 16 - 1
        .long idt, 0                    /* ELF32: a 64-bit base as two longs */
        .data
        .balign 4
long_entry:     .long 0
        .text
        .endif

        .section .rodata
hex_digits:     .ascii "0123456789abcdef"
str_0x:         .asciz "0x"
str_pass:       .asciz "PASS "
str_fail:       .asciz "FAIL: "
msg_bad_magic:  .asciz "entered without the Multiboot magic in EAX:"

        .balign 8
gdt:    .quad 0
        .quad 0x00cf9b000000ffff        /* 0x08: flat 32-bit code */
        .quad 0x00cf93000000ffff        /* 0x10: flat data */
        .quad 0x00af9b000000ffff        /* 0x18: 64-bit code */
        .quad 0x00009b000000ffff        /* 0x20: 16-bit code, base 0, limit 64 KiB */
        .quad 0x000093000000ffff        /* 0x28: 16-bit data, base 0, limit 64 KiB */
gdt_end:
        .balign 4
        .word 0
gdt_desc:
        .word gdt_end - gdt - 1
        .long gdt

        .data
        .balign 4
mb_magic:       .long 0
mb_info:        .long 0

        .bss
        .balign 16
stack:  .skip STACK_SIZE
stack_top:
        .text
