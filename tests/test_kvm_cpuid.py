"""What each vCPU's CPUID says to a Linux guest, read back with KVM_GET_CPUID2 after the KVM
backend set it: the hypervisor bit, KVM's signature leaf (0x40000000, "KVMKVMKVM") and
feature leaf (0x40000001, as KVM_GET_SUPPORTED_CPUID offers it: kvmclock among them), and
each vCPU's own APIC id (leaf 1 EBX[31:24], the x2APIC id of leaves 0xb/0x1f)."""

from __future__ import annotations

import struct

import pytest

from vmm.backends.kvm import KvmBackend

HYPERVISOR = 1 << 31
KVM_FEATURE_CLOCKSOURCE, KVM_FEATURE_CLOCKSOURCE2 = 1 << 0, 1 << 3


def leaves(cpuid) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    return {
        (int(e.function), int(e.index)): (int(e.eax), int(e.ebx), int(e.ecx), int(e.edx))
        for e in (cpuid.entries[i] for i in range(cpuid.nent))
    }


@pytest.fixture
def vcpus_cpuid():
    backend = KvmBackend()
    try:
        runners = [backend.create_vcpu(i) for i in range(3)]
        supported = leaves(backend.kvm.get_supported_cpuid())
        yield supported, [leaves(r.vcpu.get_cpuid2()) for r in runners]
    finally:
        backend.close()


@pytest.mark.kvm
@pytest.mark.lab
def test_every_vcpu_is_told_it_runs_on_kvm(vcpus_cpuid):
    supported, per_vcpu = vcpus_cpuid
    if (0x40000000, 0) not in supported:
        pytest.skip("this KVM's KVM_GET_SUPPORTED_CPUID has no paravirtual leaves")
    for cpuid in per_vcpu:
        assert cpuid[(1, 0)][2] & HYPERVISOR
        eax, ebx, ecx, edx = cpuid[(0x40000000, 0)]
        assert struct.pack("<III", ebx, ecx, edx) == b"KVMKVMKVM\0\0\0" and eax >= 0x40000001
        features = cpuid[(0x40000001, 0)][0]
        assert features == supported[(0x40000001, 0)][0]
        assert features & (KVM_FEATURE_CLOCKSOURCE | KVM_FEATURE_CLOCKSOURCE2)  # kvmclock


@pytest.mark.kvm
@pytest.mark.lab
def test_each_vcpu_has_its_own_apic_id(vcpus_cpuid):
    _, per_vcpu = vcpus_cpuid
    for index, cpuid in enumerate(per_vcpu):
        assert cpuid[(1, 0)][1] >> 24 == index
        for leaf in (0xB, 0x1F):
            for (function, _sub), (_a, _b, _c, edx) in cpuid.items():
                if function == leaf:
                    assert edx == index
