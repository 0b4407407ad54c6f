"""What pre-population needs of a VM and of a vCPU: two small protocols.

Pre-population is a set of functions over these, not a method of :class:`~vmm.vm.Vm`:
``Vm`` and ``Vcpu`` satisfy them structurally and never import this package, so the
dependency points one way (``prefault`` -> ``vm``/``vcpu``). Anything else that offers
the same calls (a test double of a VM fd, another VMM's objects) can be pre-faulted too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from vmm.memory import GuestMemory


class PrefaultVcpu(Protocol):
    """A vCPU the kernel strategies issue their ioctls on (it never runs)."""

    @property
    def index(self) -> int:
        """The vCPU id (its APIC id)."""
        ...

    def pre_fault_memory(self, rng: Any) -> int:
        """KVM_PRE_FAULT_MEMORY on a ``struct kvm_pre_fault_memory *``; raises KvmError."""
        ...

    def map_memory(self, mapping: Any) -> int:
        """The RFC's KVM_MAP_MEMORY on a ``struct kvm_memory_mapping *``; raises KvmError."""
        ...

    def set_cpuid2(self, cpuid: Any) -> None:
        """KVM_SET_CPUID2 (a helper gets KVM's supported CPUID, as the kernel selftest's vCPUs do)."""
        ...

    def close(self) -> None:
        """Release the fd and its mapping (KVM keeps the vCPU itself until the VM goes)."""
        ...


class KvmSystem(Protocol):
    """The /dev/kvm side of a VM: capabilities and the CPUID helper vCPUs get."""

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm."""
        ...

    def get_supported_cpuid(self) -> Any:
        """KVM_GET_SUPPORTED_CPUID: a ``struct kvm_cpuid2 *``."""
        ...


class PrefaultVm(Protocol):
    """A VM-like thing pre-population works on: its guest memory, its type, its
    capabilities, the vCPUs that exist on it, and a way to create one more."""

    @property
    def memory(self) -> GuestMemory:
        """The guest RAM (the ranges to populate are checked against it)."""
        ...

    @property
    def type(self) -> int:
        """The VM type (private-memory types change the emulation's errno semantics)."""
        ...

    @property
    def kvm(self) -> KvmSystem:
        """The /dev/kvm the VM was created from."""
        ...

    @property
    def vcpus(self) -> Sequence[PrefaultVcpu]:
        """Every vCPU created on the VM so far (KVM counts them all against KVM_CAP_MAX_VCPUS)."""
        ...

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd."""
        ...

    def create_vcpu(self, index: int) -> PrefaultVcpu:
        """KVM_CREATE_VCPU with id ``index``; raises KvmError (EEXIST for an id in use)."""
        ...
