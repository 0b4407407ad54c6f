/* spin64: 64-bit long mode, ring 0; loops forever without an exit. The VMM's
 * --timeout must stop it (status 124).
 */
        .include "vmm.inc"
        .section .text.entry, "ax"
        .globl _start
_start:
1:      jmp     1b
