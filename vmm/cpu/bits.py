"""x86 architectural bits, named as in the Intel SDM: control registers, EFER, RFLAGS and
page-table entries. One definition for the boot code, the loaders and the emulator."""

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31

CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
CR4_LA57 = 1 << 12

EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

RFLAGS_FIXED = 1 << 1
RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_IOPL3 = 3 << 12
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18

# Page-table entries (every level; PS only in PDPTEs and PDEs).
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
