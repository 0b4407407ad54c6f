"""KVM constants: API version, capabilities, exit reasons, flags, VM types.

Values are from the Linux UAPI headers (6.12 and 7.2; see kvm-abi.md §7-§8).
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

KVM_API_VERSION = 12
PAGE_SIZE = 4096
"""The x86 base page size: memslot granularity, ``mincore`` pages, the vCPU mapping's pages."""

# errno values KVM returns that Python's errno module lacks (3.11 has no EHWPOISON), as
# x86 Linux numbers them (include/uapi/asm-generic/errno.h). Every other errno the
# project uses is in the errno module.
EHWPOISON = 133
"""KVM_RUN: the memory behind a guest access is hardware-poisoned (with a memory-fault exit)."""


class Cap(IntEnum):
    """KVM_CAP_* numbers. Names drop the ``KVM_CAP_`` prefix."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    PIT = 11
    MP_STATE = 14
    COALESCED_MMIO = 15
    SYNC_MMU = 16
    USER_NMI = 22
    SET_GUEST_DEBUG = 23
    REINJECT_CONTROL = 24
    IRQ_ROUTING = 25
    IRQFD = 32
    PIT2 = 33
    PIT_STATE2 = 35
    IOEVENTFD = 36
    SET_IDENTITY_MAP_ADDR = 37
    ADJUST_CLOCK = 39
    INTERNAL_ERROR_DATA = 40
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    ENABLE_CAP = 54
    XSAVE = 55
    XCRS = 56
    TSC_CONTROL = 60
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    TSC_DEADLINE_TIMER = 72
    READONLY_MEM = 81
    ENABLE_CAP_VM = 98
    CHECK_EXTENSION_VM = 105
    SPLIT_IRQCHIP = 121
    MAX_VCPU_ID = 128
    X2APIC_API = 129
    IMMEDIATE_EXIT = 136
    X86_DISABLE_EXITS = 143
    COALESCED_PIO = 162
    MANUAL_DIRTY_LOG_PROTECT2 = 168
    X86_USER_SPACE_MSR = 188
    X86_MSR_FILTER = 189
    DIRTY_LOG_RING = 192
    SET_GUEST_DEBUG2 = 195  # its value: the KVM_GUESTDBG_* bits KVM_SET_GUEST_DEBUG accepts
    BINARY_STATS_FD = 203
    XSAVE2 = 208
    SYSTEM_EVENT_DATA = 215
    X86_NOTIFY_VMEXIT = 219
    USER_MEMORY2 = 231
    MEMORY_FAULT_INFO = 232
    MEMORY_ATTRIBUTES = 233
    GUEST_MEMFD = 234
    VM_TYPES = 235
    # 236 is also the RFC's KVM_CAP_MAP_MEMORY / KVM_CAP_MEMORY_MAPPING: the number alone
    # does not tell which ABI a kernel speaks (see vmm.prefault for the safe probe).
    PRE_FAULT_MEMORY = 236
    X86_APIC_BUS_CYCLES_NS = 237
    X86_GUEST_MODE = 238
    ARM_WRITABLE_IMP_ID_REGS = 239
    ARM_EL2 = 240
    ARM_EL2_E2H0 = 241
    RISCV_MP_STATE_RESET = 242
    ARM_CACHEABLE_PFNMAP_SUPPORTED = 243
    GUEST_MEMFD_FLAGS = 244


class ExitReason(IntEnum):
    """KVM_EXIT_* values of ``kvm_run.exit_reason``."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    S390_SIEIC = 13
    S390_RESET = 14
    DCR = 15
    NMI = 16
    INTERNAL_ERROR = 17
    OSI = 18
    PAPR_HCALL = 19
    S390_UCONTROL = 20
    WATCHDOG = 21
    S390_TSCH = 22
    EPR = 23
    SYSTEM_EVENT = 24
    S390_STSI = 25
    IOAPIC_EOI = 26
    HYPERV = 27
    ARM_NISV = 28
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    AP_RESET_HOLD = 32
    X86_BUS_LOCK = 33
    XEN = 34
    RISCV_SBI = 35
    RISCV_CSR = 36
    NOTIFY = 37
    LOONGARCH_IOCSR = 38
    MEMORY_FAULT = 39
    TDX = 40
    ARM_SEA = 41


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


class InternalError(IntEnum):
    """``kvm_run.internal.suberror`` for KVM_EXIT_INTERNAL_ERROR."""

    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0


class SystemEvent(IntEnum):
    """``kvm_run.system_event.type``."""

    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6
    TDX_FATAL = 7


class VmType(IntEnum):
    """x86 KVM_CREATE_VM types (asm/kvm.h)."""

    DEFAULT = 0
    SW_PROTECTED = 1
    SEV = 2
    SEV_ES = 3
    SNP = 4
    TDX = 5


class MemFlag(IntFlag):
    """``kvm_userspace_memory_region{,2}.flags``."""

    LOG_DIRTY_PAGES = 1 << 0
    READONLY = 1 << 1
    GUEST_MEMFD = 1 << 2


class GuestMemfdFlag(IntFlag):
    """``kvm_create_guest_memfd.flags`` (Linux 6.18)."""

    MMAP = 1 << 0
    INIT_SHARED = 1 << 1


KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3


class MemoryMappingFlag(IntFlag):
    """The RFC's KVM_MEMORY_MAPPING_FLAG_* bits (x86 #PF error-code bits)."""

    WRITE = 1 << 0
    EXEC = 1 << 1
    USER = 1 << 2
    PRIVATE = 1 << 3


class MpState(IntEnum):
    """``kvm_mp_state.mp_state`` (x86 subset)."""

    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4


KVM_PIT_SPEAKER_DUMMY = 1
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0
KVM_MAX_CPUID_ENTRIES = 256
KVM_GUESTDBG_ENABLE = 0x1
KVM_GUESTDBG_SINGLESTEP = 0x2
KVM_GUESTDBG_USE_SW_BP = 0x10000
KVM_GUESTDBG_USE_HW_BP = 0x20000
KVM_GUESTDBG_INJECT_DB = 0x40000
KVM_GUESTDBG_INJECT_BP = 0x80000
KVM_GUESTDBG_BLOCKIRQ = 0x100000
KVM_PIO_PAGE_OFFSET = 1
KVM_COALESCED_MMIO_PAGE_OFFSET = 2
KVM_COALESCED_MMIO_MAX = (PAGE_SIZE - 8) // 24
"""Entries in the coalesced ring: (PAGE_SIZE - sizeof(struct kvm_coalesced_mmio_ring)) /
sizeof(struct kvm_coalesced_mmio) = (4096 - 8) / 24 = 170, as the kernel's macro."""
PIO_DATA_OFFSET = KVM_PIO_PAGE_OFFSET * PAGE_SIZE
"""Where x86 KVM puts port-I/O data in the vCPU's mapping (``kvm_run.io.data_offset``)."""

# libc / mm constants Python 3.11's mmap module lacks (x86-64 values).
PROT_READ, PROT_WRITE = 0x1, 0x2
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS = 0x01, 0x02, 0x20
MAP_NORESERVE, MAP_HUGETLB = 0x4000, 0x40000
MAP_FAILED = (1 << 64) - 1
MADV_DONTNEED = 4
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
MFD_CLOEXEC = 0x0001
