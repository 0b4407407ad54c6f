/* mbinfo: a Multiboot v1 ELF32 (header flags: page-align + memory info) that prints what
 * its loader handed over, one line per item, then exits with 0:
 *
 *   mem_lower=<KiB> mem_upper=<KiB>                              (decimal)
 *   cmdline=<the command line>
 *   modules=<count>
 *   module <i>: string=<its string> size=<bytes> head=<first 8 bytes, hex>
 *   mmap base=0x<16 hex digits> len=0x<16 hex digits> type=<hex>  (one per entry)
 *   loader=<boot loader name>
 *   PASS mbinfo
 *
 * An item the info flags say is absent prints as "<item>: none" (cmdline, modules,
 * loader); missing memory sizes or memory map, a module that is not page aligned or
 * ends before it starts, or a malformed map entry print "FAIL: ..." and exit with 1.
 */
        .include "pc.inc"

        .set MB_FLAGS, MB_PAGE_ALIGN | MB_MEMORY_INFO
        MULTIBOOT_HEADER MB_FLAGS
        PC_ENTRY main

        .set MAX_MODULES, 256
        .set MAX_MMAP_ENTRIES, 128
        .set MMAP_ENTRY_MIN, 20         /* base, len, type */

        .text
main:                                   /* ebx = multiboot info */
        mov     MBI_FLAGS(%ebx), %ebp   /* ebp = info flags throughout */

        test    $MBI_F_MEM, %ebp
        jnz     1f
        mov     $msg_no_mem, %esi
        mov     %ebp, %eax
        jmp     fail_hex
1:      mov     $str_mem_lower, %esi
        call    puts
        mov     MBI_MEM_LOWER(%ebx), %eax
        call    put_dec
        mov     $str_mem_upper, %esi
        call    puts
        mov     MBI_MEM_UPPER(%ebx), %eax
        call    put_dec
        call    newline

        test    $MBI_F_CMDLINE, %ebp
        jnz     1f
        mov     $str_cmdline_none, %esi
        call    puts
        jmp     2f
1:      mov     $str_cmdline, %esi
        call    puts
        mov     MBI_CMDLINE(%ebx), %esi
        mov     $CMDLINE_MAX, %ecx
        call    putsn
        call    newline
2:
        test    $MBI_F_MODS, %ebp
        jnz     1f
        mov     $str_modules_none, %esi
        call    puts
        jmp     mmap
1:      mov     MBI_MODS_COUNT(%ebx), %eax
        cmp     $MAX_MODULES, %eax
        jbe     1f
        mov     $msg_too_many_modules, %esi
        jmp     fail_hex
1:      mov     $str_modules, %esi
        call    puts
        call    put_dec
        call    newline
        mov     %eax, %edi              /* edi = modules left */
        mov     MBI_MODS_ADDR(%ebx), %ebx   /* ebx = current module entry (info no longer needed) */
        xor     %ecx, %ecx              /* ecx = module index */
mod_loop:
        test    %edi, %edi
        jz      mmap
        mov     MOD_START(%ebx), %edx
        mov     MOD_END(%ebx), %eax
        cmp     %edx, %eax
        jae     1f
        mov     $msg_mod_backwards, %esi
        mov     %ecx, %eax
        jmp     fail_hex
1:      test    $0xfff, %edx
        jz      1f
        mov     $msg_mod_unaligned, %esi
        mov     %edx, %eax
        jmp     fail_hex
1:      mov     $str_module, %esi
        call    puts
        mov     %ecx, %eax
        call    put_dec
        mov     $str_string, %esi
        call    puts
        mov     MOD_STRING(%ebx), %esi
        test    %esi, %esi
        jz      1f
        push    %ecx
        mov     $CMDLINE_MAX, %ecx
        call    putsn
        pop     %ecx
1:      mov     $str_size, %esi
        call    puts
        mov     MOD_END(%ebx), %eax
        sub     %edx, %eax              /* eax = size */
        call    put_dec
        mov     $str_head, %esi
        call    puts
        cmp     $8, %eax                /* head: the first min(8, size) bytes */
        jbe     1f
        mov     $8, %eax
1:      push    %ecx
        mov     %eax, %ecx
        mov     %edx, %esi
        jecxz   3f
2:      movzbl  (%esi), %eax
        push    %ecx
        mov     $2, %ecx
        call    put_hex
        pop     %ecx
        inc     %esi
        loop    2b
3:      pop     %ecx
        call    newline
        add     $MOD_SIZE, %ebx
        inc     %ecx
        dec     %edi
        jmp     mod_loop

mmap:
        mov     mb_info, %ebx
        test    $MBI_F_MMAP, %ebp
        jnz     1f
        mov     $msg_no_mmap, %esi
        mov     %ebp, %eax
        jmp     fail_hex
1:      mov     MBI_MMAP_ADDR(%ebx), %esi   /* esi = current entry */
        mov     MBI_MMAP_LENGTH(%ebx), %edi
        add     %esi, %edi                  /* edi = end of the map */
        mov     $MAX_MMAP_ENTRIES, %ecx
mmap_loop:
        cmp     %edi, %esi
        jae     loader
        mov     MMAP_SIZE(%esi), %eax
        cmp     $MMAP_ENTRY_MIN, %eax
        jae     1f
        mov     $msg_mmap_size, %esi
        jmp     fail_hex
1:      push    %esi
        mov     $str_mmap_base, %esi
        call    puts
        pop     %esi
        mov     MMAP_BASE(%esi), %eax
        mov     MMAP_BASE + 4(%esi), %edx
        call    put_hex64
        push    %esi
        mov     $str_mmap_len, %esi
        call    puts
        pop     %esi
        mov     MMAP_LEN(%esi), %eax
        mov     MMAP_LEN + 4(%esi), %edx
        call    put_hex64
        push    %esi
        mov     $str_mmap_type, %esi
        call    puts
        pop     %esi
        mov     MMAP_TYPE(%esi), %eax
        call    put_hex_min
        call    newline
        mov     MMAP_SIZE(%esi), %eax
        lea     4(%esi, %eax), %esi
        loop    mmap_loop
        mov     $msg_mmap_long, %esi
        mov     $MAX_MMAP_ENTRIES, %eax
        jmp     fail_hex

loader:
        test    $MBI_F_LOADER, %ebp
        jnz     1f
        mov     $str_loader_none, %esi
        call    puts
        jmp     2f
1:      mov     $str_loader, %esi
        call    puts
        mov     MBI_LOADER_NAME(%ebx), %esi
        mov     $CMDLINE_MAX, %ecx
        call    putsn
        call    newline
2:      mov     $str_name, %esi
        jmp     pass_exit

        .section .rodata
str_name:               .asciz "mbinfo"
str_mem_lower:          .asciz "mem_lower="
str_mem_upper:          .asciz " mem_upper="
str_cmdline:            .asciz "cmdline="
str_cmdline_none:       .asciz "cmdline: none\n"
str_modules:            .asciz "modules="
str_modules_none:       .asciz "modules: none\n"
str_module:             .asciz "module "
str_string:             .asciz ": string="
str_size:               .asciz " size="
str_head:               .asciz " head="
str_mmap_base:          .asciz "mmap base="
str_mmap_len:           .asciz " len="
str_mmap_type:          .asciz " type="
str_loader:             .asciz "loader="
str_loader_none:        .asciz "loader: none\n"
msg_no_mem:             .asciz "no mem_lower/mem_upper though the header asks for memory info; info flags"
msg_no_mmap:            .asciz "no memory map though the header asks for memory info; info flags"
msg_too_many_modules:   .asciz "implausible module count"
msg_mod_backwards:      .asciz "module ends before it starts: module"
msg_mod_unaligned:      .asciz "module not page aligned though the header asks for it: start"
msg_mmap_size:          .asciz "memory-map entry too short: size"
msg_mmap_long:          .asciz "memory map longer than"


        .include "lib32.S"
