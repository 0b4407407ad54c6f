"""MSRs and CPUID as the emulator's vCPUs present them (what the MSR trap of
:mod:`vmm.backends.emulator_stubs` and a CPUID hook decide).

MSRs, for RDMSR and WRMSR at CPL 0 (at CPL 3 QEMU raises #GP itself):

* emulated here: IA32_APIC_BASE (0x1b: 0xfee00900 on the BSP, 0xfee00800 on the
  others; bit 11 enables the APIC), IA32_TSC_DEADLINE (0x6e0), IA32_TSC (0x10, read:
  the host TSC, which RDTSC returns too);
* left to QEMU, which models them: EFER, STAR, LSTAR, CSTAR, FMASK, the FS/GS bases,
  TSC_AUX, the SYSENTER MSRs, PAT, MTRRs, the machine-check MSRs, MISC_ENABLE,
  FEATURE_CONTROL, TSC_ADJUST, SMI_COUNT, the architectural PMU registers, and a few
  every Intel CPU has that QEMU reads as 0 (platform ID, microcode revision, EBL_CR_POWERON);
* anything else: #GP(0), as KVM does for an MSR it does not know;
* not modelled, ending the run naming it: the x2APIC MSRs (0x800-0x8ff) and writing
  IA32_TSC.

CPUID: QEMU's answers (unicorn's default CPU model, vendor GenuineIntel), except leaf 1:
EBX[31:24] is the vCPU's APIC ID, ECX bit 24 (TSC-deadline timer) is set and bit 21
(x2APIC) clear, EDX bit 9 (APIC) follows IA32_APIC_BASE's enable bit.
"""

from __future__ import annotations

import enum

from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn import x86_const as X

from vmm.backends.emulator_apic import LocalApic, Unmodelled
from vmm.backends.emulator_timer import read_tsc

IA32_TSC = 0x10
IA32_APIC_BASE = 0x1B
IA32_TSC_DEADLINE = 0x6E0
X2APIC_MSRS = range(0x800, 0x900)

QEMU_MSRS = frozenset(
    {0x17, 0x2A, 0x34, 0x3A, 0x3B, 0x8B, 0xFE, 0x174, 0x175, 0x176, 0x179, 0x17A, 0x1A0, 0x277, 0x2FF}
    | set(range(0xC1, 0xC9))  # PMU general-purpose counters
    | set(range(0x186, 0x18E))  # PMU event selects
    | set(range(0x200, 0x210))  # variable-range MTRRs
    | {0x250, 0x258, 0x259}
    | set(range(0x268, 0x270))  # fixed-range MTRRs
    | {0x309, 0x30A, 0x30B, 0x38D, 0x38E, 0x38F, 0x390}  # PMU fixed counters and globals
    | set(range(0x400, 0x500))  # machine-check banks
    | set(range(0xC0000080, 0xC0000085))  # EFER, STAR, LSTAR, CSTAR, FMASK
    | set(range(0xC0000100, 0xC0000104))  # FS_BASE, GS_BASE, KERNEL_GS_BASE, TSC_AUX
)

CPUID_TSC_DEADLINE = 1 << 24
CPUID_X2APIC = 1 << 21
CPUID_APIC = 1 << 9


class Msr(enum.Enum):
    """What to do with an MSR access besides returning a value."""

    DONE = "done"  # emulated (for RDMSR: the value goes to EDX:EAX)
    QEMU = "qemu"  # let unicorn's own code perform it
    GP = "gp"  # raise #GP(0)


def read_msr(apic: LocalApic, msr: int) -> tuple[Msr, int]:
    """RDMSR ``msr`` on the vCPU of ``apic``: (what, value)."""
    if msr == IA32_APIC_BASE:
        return Msr.DONE, apic.base
    if msr == IA32_TSC_DEADLINE:
        return Msr.DONE, apic.read_tsc_deadline()
    if msr == IA32_TSC:
        return Msr.DONE, read_tsc()
    if msr in X2APIC_MSRS:
        raise Unmodelled(f"RDMSR of x2APIC MSR {msr:#x}: the emulator models the xAPIC (MMIO) only")
    return (Msr.QEMU, 0) if msr in QEMU_MSRS else (Msr.GP, 0)


def write_msr(apic: LocalApic, msr: int, value: int) -> Msr:
    """WRMSR ``value`` to ``msr`` on the vCPU of ``apic``."""
    if msr == IA32_APIC_BASE:
        return Msr.DONE if apic.write_base(value) else Msr.GP
    if msr == IA32_TSC_DEADLINE:
        apic.write_tsc_deadline(value)
        return Msr.DONE
    if msr == IA32_TSC:
        raise Unmodelled("writing IA32_TSC (MSR 0x10) is not modelled by the emulator")
    if msr in X2APIC_MSRS:
        raise Unmodelled(f"WRMSR to x2APIC MSR {msr:#x}: the emulator models the xAPIC (MMIO) only")
    return Msr.QEMU if msr in QEMU_MSRS else Msr.GP


_leaf1: tuple[int, int, int, int] | None = None


def qemu_leaf1() -> tuple[int, int, int, int]:
    """EAX, EBX, ECX, EDX of unicorn's CPUID leaf 1 (asked once, of a scratch engine)."""
    global _leaf1
    if _leaf1 is None:
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map(0, 0x1000, UC_PROT_ALL)
        uc.mem_write(0, bytes.fromhex("0fa2f4"))  # cpuid; hlt
        uc.reg_write(X.UC_X86_REG_RAX, 1)
        uc.reg_write(X.UC_X86_REG_RCX, 0)
        uc.emu_start(0, 3)
        regs = (X.UC_X86_REG_EAX, X.UC_X86_REG_EBX, X.UC_X86_REG_ECX, X.UC_X86_REG_EDX)
        eax, ebx, ecx, edx = (int(uc.reg_read(r)) for r in regs)
        _leaf1 = (eax, ebx, ecx, edx)
    return _leaf1


def cpuid_leaf1(apic: LocalApic) -> tuple[int, int, int, int]:
    """Leaf 1 as this vCPU reports it."""
    eax, ebx, ecx, edx = qemu_leaf1()
    ebx = (ebx & 0x00FFFFFF) | (apic.apic_id << 24)
    ecx = (ecx | CPUID_TSC_DEADLINE) & ~CPUID_X2APIC
    edx = edx | CPUID_APIC if apic.enabled else edx & ~CPUID_APIC
    return eax, ebx, ecx, edx
