"""ioctl numbers, derived from the argument types with the kernel's _IOC encoding.

Every number is computed from ``ffi.sizeof`` of its argument struct, so a wrong
struct definition shows up as a wrong number; tests pin the published values.
"""

from __future__ import annotations

from typing import NamedTuple

from kvm_abi._ffi import ffi

KVMIO = 0xAE

# asm-generic/ioctl.h
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
IOC_NONE, IOC_WRITE, IOC_READ = 0, 1, 2


class Ioctl(NamedTuple):
    """One ioctl request: its name (for errors), number, and argument type (None for _IO)."""

    name: str
    number: int
    argtype: str | None


def ioc(direction: int, nr: int, size: int, typ: int = KVMIO) -> int:
    """The kernel's _IOC(dir, type, nr, size)."""
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (direction << _IOC_DIRSHIFT) | (typ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _io(name: str, nr: int) -> Ioctl:
    return Ioctl(name, ioc(IOC_NONE, nr, 0), None)


def _ior(name: str, nr: int, ctype: str) -> Ioctl:
    return Ioctl(name, ioc(IOC_READ, nr, ffi.sizeof(ctype)), ctype)


def _iow(name: str, nr: int, ctype: str) -> Ioctl:
    return Ioctl(name, ioc(IOC_WRITE, nr, ffi.sizeof(ctype)), ctype)


def _iowr(name: str, nr: int, ctype: str) -> Ioctl:
    return Ioctl(name, ioc(IOC_READ | IOC_WRITE, nr, ffi.sizeof(ctype)), ctype)


# --- system ioctls (/dev/kvm) -------------------------------------------------------------
KVM_GET_API_VERSION = _io("KVM_GET_API_VERSION", 0x00)
KVM_CREATE_VM = _io("KVM_CREATE_VM", 0x01)  # arg: VM type
KVM_GET_MSR_INDEX_LIST = _iowr("KVM_GET_MSR_INDEX_LIST", 0x02, "struct kvm_msr_list")
KVM_CHECK_EXTENSION = _io("KVM_CHECK_EXTENSION", 0x03)  # also on a VM fd (CHECK_EXTENSION_VM)
KVM_GET_VCPU_MMAP_SIZE = _io("KVM_GET_VCPU_MMAP_SIZE", 0x04)
KVM_GET_SUPPORTED_CPUID = _iowr("KVM_GET_SUPPORTED_CPUID", 0x05, "struct kvm_cpuid2")
KVM_GET_EMULATED_CPUID = _iowr("KVM_GET_EMULATED_CPUID", 0x09, "struct kvm_cpuid2")
KVM_GET_MSR_FEATURE_INDEX_LIST = _iowr("KVM_GET_MSR_FEATURE_INDEX_LIST", 0x0A, "struct kvm_msr_list")

# --- VM ioctls -------------------------------------------------------------------------------
KVM_CREATE_VCPU = _io("KVM_CREATE_VCPU", 0x41)  # arg: vCPU id
KVM_GET_DIRTY_LOG = _iow("KVM_GET_DIRTY_LOG", 0x42, "struct kvm_dirty_log")
KVM_SET_USER_MEMORY_REGION = _iow("KVM_SET_USER_MEMORY_REGION", 0x46, "struct kvm_userspace_memory_region")
KVM_SET_TSS_ADDR = _io("KVM_SET_TSS_ADDR", 0x47)  # arg: the address itself
KVM_SET_IDENTITY_MAP_ADDR = _iow("KVM_SET_IDENTITY_MAP_ADDR", 0x48, "uint64_t")  # arg: pointer
KVM_SET_USER_MEMORY_REGION2 = _iow("KVM_SET_USER_MEMORY_REGION2", 0x49, "struct kvm_userspace_memory_region2")
KVM_CREATE_IRQCHIP = _io("KVM_CREATE_IRQCHIP", 0x60)
KVM_IRQ_LINE = _iow("KVM_IRQ_LINE", 0x61, "struct kvm_irq_level")
KVM_REGISTER_COALESCED_MMIO = _iow("KVM_REGISTER_COALESCED_MMIO", 0x67, "struct kvm_coalesced_mmio_zone")
KVM_UNREGISTER_COALESCED_MMIO = _iow("KVM_UNREGISTER_COALESCED_MMIO", 0x68, "struct kvm_coalesced_mmio_zone")
KVM_CREATE_PIT2 = _iow("KVM_CREATE_PIT2", 0x77, "struct kvm_pit_config")
KVM_ENABLE_CAP = _iow("KVM_ENABLE_CAP", 0xA3, "struct kvm_enable_cap")
KVM_SIGNAL_MSI = _iow("KVM_SIGNAL_MSI", 0xA5, "struct kvm_msi")
KVM_SET_MEMORY_ATTRIBUTES = _iow("KVM_SET_MEMORY_ATTRIBUTES", 0xD2, "struct kvm_memory_attributes")
KVM_CREATE_GUEST_MEMFD = _iowr("KVM_CREATE_GUEST_MEMFD", 0xD4, "struct kvm_create_guest_memfd")

# --- vCPU ioctls -----------------------------------------------------------------------------
KVM_RUN = _io("KVM_RUN", 0x80)
KVM_GET_REGS = _ior("KVM_GET_REGS", 0x81, "struct kvm_regs")
KVM_SET_REGS = _iow("KVM_SET_REGS", 0x82, "struct kvm_regs")
KVM_GET_SREGS = _ior("KVM_GET_SREGS", 0x83, "struct kvm_sregs")
KVM_SET_SREGS = _iow("KVM_SET_SREGS", 0x84, "struct kvm_sregs")
KVM_TRANSLATE = _iowr("KVM_TRANSLATE", 0x85, "struct kvm_translation")
KVM_GET_MSRS = _iowr("KVM_GET_MSRS", 0x88, "struct kvm_msrs")
KVM_SET_MSRS = _iow("KVM_SET_MSRS", 0x89, "struct kvm_msrs")
KVM_GET_FPU = _ior("KVM_GET_FPU", 0x8C, "struct kvm_fpu")
KVM_SET_FPU = _iow("KVM_SET_FPU", 0x8D, "struct kvm_fpu")
KVM_SET_CPUID2 = _iow("KVM_SET_CPUID2", 0x90, "struct kvm_cpuid2")
KVM_GET_CPUID2 = _iowr("KVM_GET_CPUID2", 0x91, "struct kvm_cpuid2")
KVM_GET_MP_STATE = _ior("KVM_GET_MP_STATE", 0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE = _iow("KVM_SET_MP_STATE", 0x99, "struct kvm_mp_state")
KVM_SET_GUEST_DEBUG = _iow("KVM_SET_GUEST_DEBUG", 0x9B, "struct kvm_guest_debug")
KVM_PRE_FAULT_MEMORY = _iowr("KVM_PRE_FAULT_MEMORY", 0xD5, "struct kvm_pre_fault_memory")

# The RFC's KVM_MAP_MEMORY (v1, March 2024) shares nr 0xd5 with the mainline ioctl but
# encodes a 32-byte struct, so its number differs (0xC020AED5). A mainline x86 kernel
# answers EINVAL to it: an unknown vCPU ioctl falls through to the arch handler.
KVM_MAP_MEMORY = _iowr("KVM_MAP_MEMORY", 0xD5, "struct kvm_memory_mapping")

ALL_IOCTLS: tuple[Ioctl, ...] = tuple(v for v in list(globals().values()) if isinstance(v, Ioctl))
