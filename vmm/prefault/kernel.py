"""KVM_PRE_FAULT_MEMORY: the mainline ioctl (Linux 6.11+), on vCPU fds, in parallel.

KVM fills its stage-2 (EPT/NPT) tables for a range as if the vCPU had taken a *read*
fault there (kvm-abi.md §2.5): untouched anonymous memory gets the shared zero page, so
the guest's first write still faults. That is why ``auto`` populates the host first and
only then asks KVM.

vCPUs. The ioctl needs a vCPU, and one vCPU's ioctls are serialized by its mutex, so
parallelism needs one vCPU per thread. When the caller passes none, helper vCPUs are
created with the highest ids the VM allows (``KVM_CAP_MAX_VCPU_ID - 1`` downwards) so
they never collide with the machine's own vCPUs 0..n-1, given KVM's supported CPUID,
and kept with the VM (KVM cannot destroy a vCPU before its VM). They never run. The
stage-2 tables they fill are the VM's: with TDP the root is shared by every vCPU in the
same mode, so the machine's vCPUs find the mappings in place.
"""

from __future__ import annotations

import errno
import threading
import weakref
from typing import TYPE_CHECKING, Any

from kvm_abi import Cap, KvmError
from vmm.errors import Unavailable

if TYPE_CHECKING:
    from vmm.vcpu import Vcpu
    from vmm.vm import Vm

OP = "KVM_PRE_FAULT_MEMORY"
CAPABILITY = "PRE_FAULT_MEMORY"

_helpers: weakref.WeakKeyDictionary[Vm, list[Vcpu]] = weakref.WeakKeyDictionary()
_helpers_lock = threading.Lock()


def pre_fault_memory(vcpu: Vcpu, rng: Any) -> int:
    """One real KVM_PRE_FAULT_MEMORY ioctl on ``vcpu`` in the shared call shape:
    ``rng`` is updated in place by the kernel; returns 0 or the errno."""
    try:
        vcpu.pre_fault_memory(rng)
    except KvmError as e:
        return e.errno or errno.EIO
    return 0


def capability(vm: Vm) -> int:
    """KVM_CHECK_EXTENSION(KVM_CAP_PRE_FAULT_MEMORY) on the VM fd (1 iff TDP is on)."""
    return vm.check_extension(Cap.PRE_FAULT_MEMORY)


NO_TDP = "it needs two-dimensional paging (EPT or NPT), and this KVM runs with shadow paging"


def missing_capability_reason(value: int) -> str:
    """Why the kernel call is unavailable, in the words a user needs."""
    return f"KVM_CAP_PRE_FAULT_MEMORY is {value} on this kernel ({NO_TDP})"


def require(vm: Vm) -> None:
    """Unavailable (status 2, naming the capability) unless the kernel offers the ioctl."""
    value = capability(vm)
    if not value:
        raise Unavailable(
            f"--prefault kernel needs KVM_CAP_PRE_FAULT_MEMORY, which is {value} on this kernel ({NO_TDP})",
            CAPABILITY,
        )


def helper_vcpus(vm: Vm, count: int) -> list[Vcpu]:
    """``count`` vCPUs of ``vm`` reserved for pre-faulting (created on first use, reused
    afterwards, closed with the VM). Fewer if the VM cannot have more vCPUs (at least one
    unless none can be created, which raises)."""
    with _helpers_lock:
        have = _helpers.setdefault(vm, [])
        if len(have) >= count:
            return have[:count]
        max_id = vm.check_extension(Cap.MAX_VCPU_ID) or vm.kvm.check_extension(Cap.MAX_VCPU_ID) or 1024
        max_vcpus = vm.check_extension(Cap.MAX_VCPUS) or vm.kvm.check_extension(Cap.MAX_VCPUS) or 1
        taken = {v.index for v in vm.vcpus}
        # Leave room for the machine's own vCPUs (ids 0..63 at most, BootLayout.MAX_VCPUS).
        room = max(0, max_vcpus - len(vm.vcpus) - 64)
        want = min(count - len(have), room) if have else max(1, min(count, room))
        cpuid = vm.kvm.get_supported_cpuid() if want else None
        index = max_id - 1
        while want > 0 and index > 0:
            if index not in taken:
                vcpu = vm.create_vcpu(index)
                vcpu.set_cpuid2(cpuid)
                have.append(vcpu)
                want -= 1
            index -= 1
        return have[:count]
