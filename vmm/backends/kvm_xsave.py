"""Does this KVM see its guest's XSETBV? A one-page probe VM answers, once per process.

CPUID leaf 0xD sub-leaf 0 EBX is the XSAVE area size of the features enabled in XCR0.
KVM recomputes it whenever the guest's XSETBV exits to it. A KVM nested under QEMU's TCG
(the lab: ``-cpu EPYC,+svm``) never gets that exit: TCG's SVM executes XSETBV in the
nested guest without checking the intercept. The guest's XCR0 changes, but KVM's copy
of it and the size it reports do not. Linux compares the size it computes for the
features it enabled with that EBX, finds them different ("XSAVE consistency problem"),
disables XSAVE and then oopses in ``fpstate_reset`` (6.12, 7.3).

So, before the vCPUs of a Linux guest get their CPUID, :func:`xsetbv_reaches_kvm` runs a
real-mode probe on a throwaway VM: XSETBV with every XCR0 bit KVM supports, then CPUID
0xD.0, then HLT. If EBX is not the size for that XCR0 (KVM's own 0xD.0 ECX), KVM did
not see the XSETBV, and :func:`without_xsave` hides XSAVE (and the AVX family, which
needs it) from the guest: it saves its FPU state with FXSAVE, exactly as with Linux's
``noxsave``. Where the probe cannot run or ends otherwise, CPUID is left as KVM offers it.
"""

from __future__ import annotations

from kvm_abi.types import Cpuid2
from vmm import exits as ex
from vmm.kvm import Kvm
from vmm.memory import Backing

CPUID1_ECX_FMA = 1 << 12
CPUID1_ECX_XSAVE = 1 << 26
CPUID1_ECX_OSXSAVE = 1 << 27
CPUID1_ECX_AVX = 1 << 28
CPUID1_ECX_F16C = 1 << 29
#: Leaf 7.0 EBX: AVX2 (5) and the AVX-512 family (16, 17, 21, 26, 27, 28, 30, 31).
CPUID7_EBX_NEEDS_XSAVE = (1 << 5) | (1 << 16) | (1 << 17) | (1 << 21) | (0x7 << 26) | (0x3 << 30)
XCR0_FP_SSE = 0x3
CR4_OSXSAVE = 1 << 18
PROBE_GPA = 0x1000
#: Real mode at PROBE_GPA, EDX:EAX = the XCR0 to set, ECX = 0:
#: xsetbv; mov eax, 0xd; xor ecx, ecx; cpuid; hlt
PROBE_CODE = bytes.fromhex("0f01d166b80d0000006631c90fa2f4")
PROBE_EXITS = 16  # a probe that has not halted after this many exits is not ours


def _entry(cpuid: Cpuid2, function: int, index: int = 0) -> object | None:
    for i in range(cpuid.nent):
        e = cpuid.entries[i]
        if e.function == function and e.index == index:
            return e
    return None


def extended_xcr0(supported: Cpuid2) -> tuple[int, int] | None:
    """(XCR0 mask, its XSAVE area size) when KVM offers XSAVE with a feature beyond x87
    and SSE, the only case where the size depends on XCR0; else None."""
    leaf1, leafd = _entry(supported, 1), _entry(supported, 0xD)
    if leaf1 is None or leafd is None or not leaf1.ecx & CPUID1_ECX_XSAVE:  # type: ignore[attr-defined]
        return None
    xcr0 = int(leafd.eax) | int(leafd.edx) << 32  # type: ignore[attr-defined]
    if not xcr0 & ~XCR0_FP_SSE:
        return None
    return xcr0, int(leafd.ecx)  # type: ignore[attr-defined]


def _probe(kvm: Kvm, supported: Cpuid2, xcr0: int) -> int | None:
    """CPUID 0xD.0 EBX after the probe's XSETBV, or None if the probe did not halt."""
    with kvm.create_vm() as vm:
        vm.set_tss_addr()
        vm.add_memory(0, 0x2000, Backing.ANON)
        vm.memory.write(PROBE_GPA, PROBE_CODE)
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid2(supported)
        sregs = vcpu.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        sregs.cr4 |= CR4_OSXSAVE
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip, regs.rflags = PROBE_GPA, 0x2
        regs.rax, regs.rdx, regs.rcx = xcr0 & 0xFFFFFFFF, xcr0 >> 32, 0
        vcpu.set_regs(regs)
        for _ in range(PROBE_EXITS):
            exit_ = vcpu.run()
            if exit_ is ex.HLT:
                return int(vcpu.get_regs().rbx)
            if exit_ is not ex.INTERRUPTED:
                return None
    return None


_answers: dict[tuple[int, int], bool] = {}  # per process: one host, one KVM


def xsetbv_reaches_kvm(kvm: Kvm, supported: Cpuid2) -> bool:
    """False when a guest's XSETBV leaves KVM's CPUID 0xD.0 EBX stale (see the module
    docstring); True when it does not, when nothing depends on it, or when the probe
    could not tell."""
    wanted = extended_xcr0(supported)
    if wanted is None:
        return True
    if wanted not in _answers:
        try:
            seen = _probe(kvm, supported, wanted[0])
        except OSError:
            seen = None  # the probe could not run: leave CPUID as KVM offers it
        _answers[wanted] = seen is None or seen == wanted[1]
    return _answers[wanted]


def without_xsave(cpuid: Cpuid2) -> None:
    """Hide XSAVE, OSXSAVE and the features that need it (AVX, FMA, F16C, AVX2, AVX-512)
    from ``cpuid`` in place, and leave leaf 0xD describing x87 and SSE only."""
    for i in range(cpuid.nent):
        e = cpuid.entries[i]
        if e.function == 1:
            e.ecx &= ~(CPUID1_ECX_XSAVE | CPUID1_ECX_OSXSAVE | CPUID1_ECX_AVX | CPUID1_ECX_FMA | CPUID1_ECX_F16C)
        elif e.function == 7 and e.index == 0:
            e.ebx &= ~CPUID7_EBX_NEEDS_XSAVE
        elif e.function == 0xD:
            if e.index == 0:
                e.eax, e.edx, e.ebx, e.ecx = XCR0_FP_SSE, 0, 576, 576
            else:
                e.eax = e.ebx = e.ecx = e.edx = 0
