"""The XSETBV probe (vmm/backends/kvm_xsave.py): which CPUID needs it, what hiding XSAVE
changes, and the probe itself on this host's KVM (in the lab: a KVM nested under TCG,
whose CPUID 0xD.0 EBX does not follow the guest's XSETBV)."""

from __future__ import annotations

import pytest

from kvm_abi import ffi
from vmm.backends import kvm_xsave as xs


def cpuid(*entries: tuple[int, int, int, int, int, int]):
    """A kvm_cpuid2 of (function, index, eax, ebx, ecx, edx) entries."""
    c = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
    for i, (function, index, eax, ebx, ecx, edx) in enumerate(entries):
        e = c.entries[i]
        e.function, e.index, e.eax, e.ebx, e.ecx, e.edx = function, index, eax, ebx, ecx, edx
    return c


AVX_CPU = (
    (1, 0, 0x800F12, 0, xs.CPUID1_ECX_XSAVE | xs.CPUID1_ECX_AVX | xs.CPUID1_ECX_FMA | 1, 0x178BFBFF),
    (7, 0, 0, (1 << 5) | (1 << 3) | (1 << 16), 0, 0),
    (0xD, 0, 0x7, 0x240, 0x340, 0),
    (0xD, 1, 0x5, 0, 0, 0),
    (0xD, 2, 0x100, 0x240, 0, 0),
)


def test_only_a_cpu_with_state_beyond_sse_needs_the_probe():
    assert xs.extended_xcr0(cpuid(*AVX_CPU)) == (0x7, 0x340)
    assert xs.extended_xcr0(cpuid((1, 0, 0, 0, xs.CPUID1_ECX_XSAVE, 0), (0xD, 0, 0x3, 0x240, 0x240, 0))) is None
    assert xs.extended_xcr0(cpuid((1, 0, 0, 0, 0, 0), (0xD, 0, 0x7, 0x240, 0x340, 0))) is None


def test_hiding_xsave_leaves_x87_sse_and_the_rest_of_the_cpu():
    c = cpuid(*AVX_CPU)
    xs.without_xsave(c)
    leaf1, leaf7, d0, d1, d2 = (c.entries[i] for i in range(5))
    assert leaf1.ecx == 1 and leaf1.edx == 0x178BFBFF and leaf1.eax == 0x800F12  # SSE3 and the rest kept
    assert leaf7.ebx == 1 << 3  # BMI1 kept; AVX2 and AVX-512F gone
    assert (d0.eax, d0.ebx, d0.ecx, d0.edx) == (0x3, 576, 576, 0)
    assert (d1.eax, d2.eax, d2.ebx) == (0, 0, 0)
    assert xs.extended_xcr0(c) is None


@pytest.mark.kvm
@pytest.mark.lab
def test_the_probe_reads_the_xsave_size_kvm_reports_after_xsetbv(kvm):
    supported = kvm.get_supported_cpuid()
    wanted = xs.extended_xcr0(supported)
    if wanted is None:
        assert xs.xsetbv_reaches_kvm(kvm, supported)  # nothing depends on XCR0: no probe
        pytest.skip("this KVM offers no XSAVE state beyond x87/SSE, so CPUID 0xD.0 EBX never changes")
    size = xs._probe(kvm, supported, wanted[0])
    # 576 (x87+SSE: KVM never saw the XSETBV, the lab's TCG) or the size of every feature.
    assert size in (576, wanted[1])
    assert xs.xsetbv_reaches_kvm(kvm, supported) == (size == wanted[1])
