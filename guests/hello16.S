/* hello16: real mode, flat binary loaded at 0x7c00 (CS:IP = 0:0x7c00, DS = 0).
 * Prints "hello from real mode" on COM1, polling LSR before every byte as a
 * driver for real hardware would, then writes 0 to the exit port.
 */
        .include "vmm.inc"
        .code16
        .text
        .globl start
start:
        cld
        xor     %ax, %ax
        mov     %ax, %ds
        mov     $msg, %si
next:
        lodsb
        test    %al, %al
        jz      done
        mov     %al, %bl
        mov     $COM1_LSR, %dx
wait:   in      %dx, %al                /* wait for THR empty */
        test    $LSR_THRE, %al
        jz      wait
        mov     $COM1, %dx
        mov     %bl, %al
        out     %al, %dx
        jmp     next
done:
        xor     %al, %al
        out     %al, $EXIT_PORT
        hlt

msg:    .asciz "hello from real mode\n"
