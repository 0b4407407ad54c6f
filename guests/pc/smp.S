/* smp: a Multiboot v1 ELF32 that starts its application processors the PC way.
 *
 * The BSP reads the CPU count from fw_cfg (signature "QEMU" at key 0, then NB_CPUS at
 * key 5: a 16-bit selector write to 0x510, two data bytes from 0x511), enables its local
 * APIC (SVR) and, for each AP id 1..n-1 in turn, sends INIT, SIPI, SIPI (ICR at
 * 0xfee00300/0x310, waiting for the delivery status to clear after each) pointing at a
 * real-mode trampoline it copied to 0x7000 (TRAMPOLINE: a page below 1 MiB this image,
 * linked at 1 MiB, does not occupy). Each AP switches to 32-bit protected mode, takes a
 * stack of its own, prints "cpu <apic id> up" under a spinlock, counts itself with
 * `lock incl` and halts (cli; hlt). The BSP waits for each AP before starting the next
 * (so the console is the same on every run), with a bounded pause loop (FAIL if an AP
 * never checks in), then prints:
 *
 *   smp: fw_cfg QEMU, <n> cpus, bsp apic id 0
 *   cpu 1 up
 *   ...
 *   cpu <n-1> up
 *   smp: <n> cpus
 *   PASS smp
 */
        .include "pc.inc"

        MULTIBOOT_HEADER MB_PAGE_ALIGN | MB_MEMORY_INFO
        PC_ENTRY main

        .set TRAMPOLINE,        0x7000
        .set MAX_CPUS,          64
        .set AP_STACK_SIZE,     512
        /* Pause-loop iterations the BSP waits for each AP: ~15 s on this host's KVM
         * (ring 0 emulated, ~1.1 M iterations/s), ~2 s on QEMU TCG; an AP needs a few
         * hundred instructions and a few dozen port writes to check in. */
        .set SPIN_LIMIT,        0x01000000
        .set ICR_SPIN_LIMIT,    0x00100000

        .text
main:
        /* fw_cfg: the signature, then the CPU count */
        mov     $FW_CFG_SIGNATURE, %eax
        call    fw_cfg_select
        call    fw_cfg_read32
        cmp     $0x554d4551, %eax               /* "QEMU", little endian */
        je      1f
        mov     $msg_fw_cfg_sig, %esi
        jmp     fail_hex
1:      mov     $FW_CFG_NB_CPUS, %eax
        call    fw_cfg_select
        call    fw_cfg_read16
        mov     %eax, nr_cpus
        test    %eax, %eax
        jz      2f
        cmp     $MAX_CPUS, %eax
        jbe     1f
2:      mov     $msg_nr_cpus, %esi
        jmp     fail_hex

        /* the local APIC: present, BSP at id 0, enabled */
1:      mov     LAPIC_BASE + LAPIC_VERSION, %eax
        cmp     $0xffffffff, %eax
        jne     1f
        mov     $msg_no_lapic, %esi
        jmp     fail
1:      mov     LAPIC_BASE + LAPIC_ID, %eax
        shr     $24, %eax
        jz      1f
        mov     $msg_bsp_id, %esi
        jmp     fail_hex
1:      movl    $SVR_ENABLE | SPURIOUS_VECTOR, LAPIC_BASE + LAPIC_SVR

        mov     $str_hello, %esi
        call    puts
        mov     nr_cpus, %eax
        call    put_dec
        mov     $str_hello_cpus, %esi
        call    puts

        /* the trampoline, copied to its page below 1 MiB */
        mov     $trampoline, %esi
        mov     $TRAMPOLINE, %edi
        mov     $trampoline_end - trampoline, %ecx
        rep movsb

        mov     $1, %ebx                        /* ebx = the AP's APIC id */
start_next:
        cmp     nr_cpus, %ebx
        jae     all_up
        mov     $ICR_INIT, %eax
        call    send_ipi
        mov     $ICR_STARTUP | (TRAMPOLINE >> 12), %eax
        call    send_ipi
        call    send_ipi                        /* the second SIPI, as the MP spec says */
        mov     $SPIN_LIMIT, %ecx
1:      cmp     ap_count, %ebx
        jbe     2f
        pause
        loop    1b
        mov     $msg_ap_timeout, %esi
        mov     %ebx, %eax
        jmp     fail_hex
2:      inc     %ebx
        jmp     start_next

all_up:
        mov     ap_count, %eax
        inc     %eax
        cmp     nr_cpus, %eax
        je      1f
        mov     $msg_ap_count, %esi
        jmp     fail_hex
1:      mov     $str_smp, %esi
        call    puts
        call    put_dec
        mov     $str_cpus, %esi
        call    puts
        mov     $str_name, %esi
        jmp     pass_exit

/* send_ipi(eax = ICR low word, ebx = destination APIC id): waits until the ICR is idle,
 * sends, waits until it is idle again. */
send_ipi:
        call    icr_wait
        push    %ebx
        shl     $24, %ebx
        mov     %ebx, LAPIC_BASE + LAPIC_ICR_HI
        pop     %ebx
        mov     %eax, LAPIC_BASE + LAPIC_ICR_LO
        jmp     icr_wait

icr_wait:
        push    %ecx
        mov     $ICR_SPIN_LIMIT, %ecx
1:      testl   $ICR_BUSY, LAPIC_BASE + LAPIC_ICR_LO
        jz      2f
        pause
        loop    1b
        mov     $msg_icr_busy, %esi
        mov     %ebx, %eax
        jmp     fail_hex
2:      pop     %ecx
        ret

/* fw_cfg_select(ax = key) */
fw_cfg_select:
        push    %edx
        mov     $FW_CFG_PORT_SEL, %dx
        out     %ax, %dx
        pop     %edx
        ret

/* fw_cfg_read16 / fw_cfg_read32 -> eax: the next bytes of the selected item, little endian. */
fw_cfg_read16:
        push    %ecx
        mov     $2, %ecx
        jmp     fw_cfg_read
fw_cfg_read32:
        push    %ecx
        mov     $4, %ecx
fw_cfg_read:
        push    %edx
        push    %edi
        movl    $0, fw_cfg_buf
        mov     $fw_cfg_buf, %edi
        mov     $FW_CFG_PORT_DATA, %dx
1:      in      %dx, %al
        stosb
        loop    1b
        mov     fw_cfg_buf, %eax
        pop     %edi
        pop     %edx
        pop     %ecx
        ret

/* The AP trampoline: copied to TRAMPOLINE and entered in real mode at CS:IP =
 * (TRAMPOLINE >> 4):0 by the SIPI. Position independent but for the GDT pointer, which
 * it addresses relative to DS = CS. */
        .code16
trampoline:
        cli
        mov     %cs, %ax
        mov     %ax, %ds
        lgdtl   trampoline_gdt_desc - trampoline
        mov     %cr0, %eax
        or      $1, %eax                        /* CR0.PE */
        mov     %eax, %cr0
        ljmpl   $SEL_CODE32, $ap_entry32
        .balign 4
        .word   0
trampoline_gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt
trampoline_end:
        .code32

ap_entry32:
        mov     $SEL_DATA, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     %ax, %fs
        mov     %ax, %gs
        mov     $1, %eax                        /* a stack of its own: the next free slot */
        lock xadd %eax, ap_next
        cmp     $MAX_CPUS - 1, %eax
        jae     ap_halt                         /* more APs than slots: stay out of the way */
        inc     %eax
        imul    $AP_STACK_SIZE, %eax, %esp
        add     $ap_stacks, %esp
        mov     LAPIC_BASE + LAPIC_ID, %ebx
        shr     $24, %ebx
1:      mov     $1, %eax                        /* take the print lock */
        xchg    %eax, print_lock
        test    %eax, %eax
        jz      2f
        pause
        jmp     1b
2:      mov     $str_cpu, %esi
        call    puts
        mov     %ebx, %eax
        call    put_dec
        mov     $str_up, %esi
        call    puts
        movl    $0, print_lock
        lock incl ap_count                      /* after printing: the BSP may exit at once */
ap_halt:
        cli
1:      hlt
        jmp     1b

        .section .rodata
str_name:       .asciz "smp"
str_hello:      .asciz "smp: fw_cfg QEMU, "
str_hello_cpus: .asciz " cpus, bsp apic id 0\n"
str_cpu:        .asciz "cpu "
str_up:         .asciz " up\n"
str_smp:        .asciz "smp: "
str_cpus:       .asciz " cpus\n"
msg_fw_cfg_sig: .asciz "fw_cfg signature (key 0) is not \"QEMU\":"
msg_nr_cpus:    .asciz "fw_cfg NB_CPUS (key 5) is 0 or more than 64:"
msg_no_lapic:   .asciz "no local APIC at 0xfee00000 (its version register reads all-ones)"
msg_bsp_id:     .asciz "the BSP's APIC id is not 0:"
msg_icr_busy:   .asciz "ICR delivery status never cleared sending to APIC id"
msg_ap_timeout: .asciz "AP did not check in: APIC id"
msg_ap_count:   .asciz "AP count mismatch:"

        .data
        .balign 4
nr_cpus:        .long 0
fw_cfg_buf:     .long 0
ap_next:        .long 0
        .balign 64
ap_count:       .long 0
        .balign 64
print_lock:     .long 0

        .bss
        .balign 16
ap_stacks:      .skip MAX_CPUS * AP_STACK_SIZE

        .include "lib32.S"
