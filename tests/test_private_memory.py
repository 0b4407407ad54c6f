"""Private guest memory (guest_memfd + KVM_MEMORY_ATTRIBUTE_PRIVATE) and pre-faulting it.

This host has only the default VM type, so most of this runs in the lab built with
CONFIG_KVM_SW_PROTECTED_VM (`make lab-test-private`); here it skips naming the type.
kvm-abi.md §9-C 25: a private range pre-faults like a shared one; a private gfn whose
slot has no guest_memfd answers EFAULT.
"""

from __future__ import annotations

import errno

import pytest

from kvm_abi import KVM_MEMORY_ATTRIBUTE_PRIVATE, VmType
from vmm.errors import ConfigError, GuestMemoryError, Unavailable
from vmm.prefault import HelperVcpus, kernel, prefault_vm
from vmm.prefault.contract import PrefaultError, drive_pre_fault, new_range

pytestmark = pytest.mark.kvm

SZ_2M = 2 << 20
PAGE = 4096
BASE = SZ_2M
SIZE = SZ_2M + PAGE  # the mainline selftest's TEST_SIZE


def test_private_memory_needs_a_private_vm_type(kvm):
    with kvm.create_vm() as vm:
        with pytest.raises(Unavailable) as info:
            vm.add_memory(BASE, SIZE, "guest-memfd", private=True)
        assert "KVM_CAP_MEMORY_ATTRIBUTES" in str(info.value)
        assert len(vm.memory) == 0
        with pytest.raises(ConfigError, match="guest-memfd"):
            vm.add_memory(BASE, SIZE, "anon", private=True)


@pytest.mark.requires_vm_type("SW_PROTECTED")
def test_private_memory_is_bound_and_hidden_from_the_host(kvm):
    with kvm.create_vm(VmType.SW_PROTECTED) as vm:
        region = vm.add_memory(BASE, SIZE, "guest-memfd", private=True)
        assert region.private and region.guest_memfd >= 0
        with pytest.raises(GuestMemoryError, match="private memory"):
            vm.memory.read(BASE, 8)
        vm.discard(BASE, PAGE)  # punches the guest_memfd: allowed
        vm.remove_memory(region)
        assert region.guest_memfd == -1


@pytest.mark.requires_vm_type("SW_PROTECTED")
@pytest.mark.requires_cap("PRE_FAULT_MEMORY")
def test_prefault_over_a_private_range_gives_the_selftest_results(kvm):
    with kvm.create_vm(VmType.SW_PROTECTED) as vm:
        vm.add_memory(BASE, SIZE, "guest-memfd", private=True)
        (vcpu,) = HelperVcpus(vm).get(1)  # closed with the VM
        # A: the whole 2 MiB
        assert drive_pre_fault(kernel.pre_fault_memory, vcpu, BASE, SZ_2M) == SZ_2M
        # B: runs off the end of the slot: one page done, then ENOENT with one page left
        rng = new_range(BASE + SZ_2M, 2 * PAGE)
        assert kernel.pre_fault_memory(vcpu, rng) == 0
        assert (rng.gpa, rng.size) == (BASE + SZ_2M + PAGE, PAGE)
        assert kernel.pre_fault_memory(vcpu, rng) == errno.ENOENT
        assert rng.size == PAGE
        # C: entirely outside
        rng = new_range(BASE + SIZE, PAGE)
        assert kernel.pre_fault_memory(vcpu, rng) == errno.ENOENT
        assert (rng.gpa, rng.size) == (BASE + SIZE, PAGE)


@pytest.mark.requires_vm_type("SW_PROTECTED")
@pytest.mark.requires_cap("PRE_FAULT_MEMORY")
def test_private_gfn_in_a_slot_without_guest_memfd_is_efault(kvm):
    with kvm.create_vm(VmType.SW_PROTECTED) as vm:
        vm.add_memory(BASE, SZ_2M, "anon")
        vm.set_memory_attributes(BASE, SZ_2M, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        (vcpu,) = HelperVcpus(vm).get(1)  # closed with the VM
        with pytest.raises(PrefaultError) as info:
            drive_pre_fault(kernel.pre_fault_memory, vcpu, BASE, SZ_2M)
        assert info.value.errno == errno.EFAULT


@pytest.mark.requires_vm_type("SW_PROTECTED")
@pytest.mark.requires_cap("PRE_FAULT_MEMORY")
def test_auto_prefault_allocates_and_maps_private_memory(kvm):
    with kvm.create_vm(VmType.SW_PROTECTED) as vm:
        vm.add_memory(BASE, SZ_2M, "guest-memfd", private=True)
        report = prefault_vm(vm, strategy="auto")
        assert report.strategy == "host+kernel", report.summary()
        assert report.bytes_done == SZ_2M
        assert report.backing == "private"
        assert any("private memory is never host-mapped" in limit for limit in report.limits)
