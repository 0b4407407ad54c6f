/* apic-timer: a Multiboot v1 ELF32 that takes local-APIC timer interrupts. It reads
 * "ticks=N" from the command line (1..100000, default 10), switches itself to 64-bit long
 * mode (32-bit `iret` is what some KVM hosts' ring-0 emulation lacks; `iretq` works) and
 * installs a 64-bit IDT: vector 0x20 the timer (the handler counts and EOIs), 0xff the
 * spurious vector, 0-31 "FAIL: exception". The 8259s and LINT0 are masked (a BIOS leaves
 * the PIT ticking on IRQ 0, vector 8). The timer runs periodic (divide by 16, initial
 * count PERIOD_COUNT) until the handler has counted N interrupts, waiting with
 * `sti; hlt`; then masked and drained, then one-shot once: exactly one more interrupt,
 * after which the current count stays 0. Then, if CPUID.1:ECX bit 24 offers it,
 * TSC-deadline mode once (IA32_TSC_DEADLINE reads 0 after it fired). Prints:
 *
 *   timer: <N> periodic, 1 one-shot
 *   timer: tsc-deadline 1 interrupt          or
 *   timer: tsc-deadline not offered (CPUID.1:ECX[24] clear)
 *   PASS apic-timer
 */
        .include "pc.inc"
        .set WANT_LONG_MODE, 1

        MULTIBOOT_HEADER MB_PAGE_ALIGN | MB_MEMORY_INFO
        PC_ENTRY main

        .set TIMER_VECTOR,      0x20
        .set DEFAULT_TICKS,     10
        .set MAX_TICKS,         100000
        .set PERIOD_COUNT,      0x10000         /* x16 = 1 Mi bus cycles: ~1 ms at 1 GHz */
        .set ONESHOT_COUNT,     0x10000
        .set DRAIN_SPINS,       10000           /* with IF=1: lets an interrupt already in IRR in */
        .set QUIET_SPINS,       100000          /* after the one-shot: nothing more may arrive */
        .set DEADLINE_DELTA,    100000          /* TSC cycles */

        .text
        .code32
main:
        mov     MBI_FLAGS(%ebx), %eax           /* ticks=N from the command line, if any */
        test    $MBI_F_CMDLINE, %eax
        jz      2f
        mov     MBI_CMDLINE(%ebx), %esi
        mov     $key_ticks, %edi
        call    cmdline_arg
        test    %eax, %eax
        jz      2f
        mov     %eax, %esi
        call    parse_dec
        test    %ecx, %ecx
        jz      1f
        cmp     $9, %ecx
        ja      1f
        movb    (%esi,%ecx), %dl                /* the number must end the word */
        test    %dl, %dl
        jz      3f
        cmp     $' ', %dl
        jne     1f
3:      test    %eax, %eax
        jz      1f
        cmp     $MAX_TICKS, %eax
        ja      1f
        mov     %eax, target
        jmp     2f
1:      mov     $msg_bad_ticks, %esi
        jmp     fail
2:      mov     $long_main, %eax
        jmp     enter_long_mode

        .code64
long_main:
        mov     $LAPIC_BASE, %r15d              /* r15 = the APIC (a 64-bit disp32 would sign-extend) */
        mov     LAPIC_VERSION(%r15), %eax
        cmp     $0xffffffff, %eax
        jne     1f
        lea     msg_no_lapic(%rip), %rsi
        jmp     fail64
1:      mov     $0xff, %al
        out     %al, $PIC1_DATA
        out     %al, $PIC2_DATA
        movl    $LVT_MASKED, LAPIC_LVT_LINT0(%r15)
        call    build_idt
        lidt    idt_desc(%rip)
        movl    $SVR_ENABLE | SPURIOUS_VECTOR, LAPIC_SVR(%r15)
        movl    $0, LAPIC_TPR(%r15)

        /* periodic */
        movl    $TIMER_DIV_16, LAPIC_TIMER_DIV(%r15)
        movl    $TIMER_VECTOR | LVT_PERIODIC, LAPIC_LVT_TIMER(%r15)
        movl    $PERIOD_COUNT, LAPIC_TIMER_INIT(%r15)
        mov     target(%rip), %ebx
        call    wait_ticks
        movl    $TIMER_VECTOR | LVT_MASKED, LAPIC_LVT_TIMER(%r15)
        movl    $0, LAPIC_TIMER_INIT(%r15)
        mov     $DRAIN_SPINS, %ecx
        call    spin_sti

        /* one-shot */
        mov     ticks(%rip), %ebx
        inc     %ebx
        movl    $TIMER_VECTOR | LVT_ONESHOT, LAPIC_LVT_TIMER(%r15)
        movl    $ONESHOT_COUNT, LAPIC_TIMER_INIT(%r15)
        call    wait_ticks
        mov     $QUIET_SPINS, %ecx
        call    spin_sti
        cmp     ticks(%rip), %ebx
        je      1f
        lea     msg_oneshot_again(%rip), %rsi
        mov     ticks(%rip), %eax
        sub     %ebx, %eax
        jmp     fail_hex64
1:      mov     LAPIC_TIMER_CUR(%r15), %eax
        test    %eax, %eax
        jz      1f
        lea     msg_oneshot_reload(%rip), %rsi
        jmp     fail_hex64
1:      lea     str_timer(%rip), %rsi
        call    puts64
        mov     target(%rip), %eax
        call    put_dec64
        lea     str_periodic(%rip), %rsi
        call    puts64

        /* TSC-deadline, where CPUID offers it */
        mov     $1, %eax
        cpuid
        test    $CPUID1_ECX_TSC_DEADLINE, %ecx
        jnz     1f
        lea     str_no_deadline(%rip), %rsi
        call    puts64
        jmp     done
1:      mov     ticks(%rip), %ebx
        inc     %ebx
        movl    $TIMER_VECTOR | LVT_TSC_DEADLINE, LAPIC_LVT_TIMER(%r15)
        rdtsc
        add     $DEADLINE_DELTA, %eax
        adc     $0, %edx
        mov     $MSR_TSC_DEADLINE, %ecx
        wrmsr
        call    wait_ticks
        mov     $MSR_TSC_DEADLINE, %ecx
        rdmsr
        or      %edx, %eax
        jz      1f
        lea     msg_deadline_armed(%rip), %rsi
        jmp     fail_hex64
1:      movl    $TIMER_VECTOR | LVT_MASKED, LAPIC_LVT_TIMER(%r15)
        lea     str_deadline(%rip), %rsi
        call    puts64
done:
        lea     str_pass(%rip), %rsi
        call    puts64
        lea     str_name(%rip), %rsi
        call    puts64
        call    newline64
        mov     $EXIT_PASS, %al
        jmp     exit64

/* wait_ticks(ebx = count): halt until the handler has counted that many interrupts.
 * `sti; hlt` back to back: an interrupt cannot slip in between (STI's shadow). */
wait_ticks:
1:      cli
        cmp     ticks(%rip), %ebx
        jbe     2f
        sti
        hlt
        jmp     1b
2:      ret

/* spin_sti(ecx = iterations): a pause loop with interrupts on, then off again. */
spin_sti:
        sti
1:      pause
        loop    1b
        cli
        ret

/* build_idt: gates for 0-31 (exception stubs), 0x20 (timer), 0xff (spurious). */
build_idt:
        xor     %ecx, %ecx
        lea     exc_stubs(%rip), %rbx
1:      mov     (%rbx,%rcx,8), %rax
        call    set_gate64
        inc     %ecx
        cmp     $32, %ecx
        jb      1b
        mov     $TIMER_VECTOR, %ecx
        lea     timer_handler(%rip), %rax
        call    set_gate64
        mov     $SPURIOUS_VECTOR, %ecx
        lea     spurious_handler(%rip), %rax
        jmp     set_gate64

timer_handler:
        incl    ticks(%rip)
        push    %r15
        mov     $LAPIC_BASE, %r15d
        movl    $0, LAPIC_EOI(%r15)
        pop     %r15
        iretq

spurious_handler:                               /* no EOI for the spurious vector */
        iretq

        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
exc_\v: push    $\v
        jmp     exception
        .endr
exception:
        pop     %rax
        lea     msg_exception(%rip), %rsi
        jmp     fail_hex64
        .code32

        .section .rodata
        .balign 8
exc_stubs:
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .long exc_\v, 0                         /* ELF32: 64-bit pointers as two longs */
        .endr
str_name:               .asciz "apic-timer"
key_ticks:              .asciz "ticks="
str_timer:              .asciz "timer: "
str_periodic:           .asciz " periodic, 1 one-shot\n"
str_deadline:           .asciz "timer: tsc-deadline 1 interrupt\n"
str_no_deadline:        .asciz "timer: tsc-deadline not offered (CPUID.1:ECX[24] clear)\n"
msg_bad_ticks:          .asciz "ticks= wants a number from 1 to 100000"
msg_no_lapic:           .asciz "no local APIC at 0xfee00000 (its version register reads all-ones)"
msg_oneshot_again:      .asciz "one-shot timer fired again: extra interrupts"
msg_oneshot_reload:     .asciz "one-shot timer reloaded: current count"
msg_deadline_armed:     .asciz "IA32_TSC_DEADLINE still armed after its interrupt: low bits"
msg_exception:          .asciz "exception: vector"

        .data
        .balign 4
target:         .long DEFAULT_TICKS
ticks:          .long 0

        .include "lib32.S"
