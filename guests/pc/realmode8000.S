/* realmode8000: a Multiboot v1 ELF32 linked and loaded at 0x8000 (link-mb8000.ld) that
 * goes back from 32-bit protected mode to real mode, as kvm-unit-tests' realmode test
 * does: a far jump to a 16-bit code segment, 16-bit data segments, CR0.PE cleared, a far
 * jump to CS 0, the real-mode IVT. From real mode it finds its own address (call/pop)
 * and prints, through the UART with 16-bit code:
 *
 *   hello from real mode at 0x8000
 *   PASS realmode8000
 *
 * then writes 0 to the exit port. Image and stack stay below 0x9000 (QEMU puts its
 * Multiboot information there).
 */
        .include "pc.inc"
        .set STACK_SIZE, 512

        MULTIBOOT_HEADER MB_PAGE_ALIGN | MB_MEMORY_INFO
        PC_ENTRY main

        .text
        .code32
main:
        ljmp    $SEL_CODE16, $pm16              /* 16-bit protected mode first */

        .code16
pm16:
        mov     $SEL_DATA16, %ax                /* 64 KiB limits, as real mode expects */
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     %ax, %fs
        mov     %ax, %gs
        mov     %cr0, %eax
        and     $~CR0_PE, %eax
        mov     %eax, %cr0
        ljmp    $0, $real                       /* CS = 0: offsets are linear addresses */
real:
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     %ax, %fs
        mov     %ax, %gs
        mov     $stack_top, %sp
        lidt    ivt_desc
        call    1f                              /* where are we? */
1:      pop     %bx
        sub     $1b, %bx                        /* bx = where it runs - where it was linked */
        add     $multiboot_header, %bx          /*    + its first byte's link address */
        mov     $msg_hello, %si
        call    puts16
        mov     %bx, %ax
        call    put_hex16
        mov     $msg_pass, %si
        call    puts16
        mov     $EXIT_PASS, %al
        out     %al, $EXIT_PORT
        cli
2:      hlt
        jmp     2b

/* putc16(al) */
putc16:
        push    %dx
        push    %ax
        mov     $COM1_LSR, %dx
1:      in      %dx, %al
        test    $LSR_THRE, %al
        jz      1b
        pop     %ax
        mov     $COM1, %dx
        out     %al, %dx
        pop     %dx
        ret

/* puts16(si = NUL-terminated string) */
puts16:
        push    %si
        push    %ax
1:      lodsb
        test    %al, %al
        jz      2f
        call    putc16
        jmp     1b
2:      pop     %ax
        pop     %si
        ret

/* put_hex16(ax): four hex digits. */
put_hex16:
        push    %ax
        push    %bx
        push    %cx
        push    %dx
        mov     %ax, %dx
        mov     $4, %cx
1:      rol     $4, %dx
        mov     %dx, %bx
        and     $15, %bx
        mov     hex_digits(%bx), %al
        call    putc16
        loop    1b
        pop     %dx
        pop     %cx
        pop     %bx
        pop     %ax
        ret
        .code32

        .section .rodata
msg_hello:      .asciz "hello from real mode at 0x"
msg_pass:       .asciz "\nPASS realmode8000\n"
        .balign 4
        .word 0
ivt_desc:
        .word 0x3ff                             /* the real-mode IVT at 0 */
        .long 0

        .include "lib32.S"
