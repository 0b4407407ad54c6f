"""KVM_PRE_FAULT_MEMORY: the mainline ioctl (Linux 6.11+), on vCPU fds, in parallel.

KVM fills its stage-2 (EPT/NPT) tables for a range as if the vCPU had taken a *read*
fault there (kvm-abi.md §2.5): untouched anonymous memory gets the shared zero page, so
the guest's first write still faults. That is why ``auto`` populates the host first and
only then asks KVM.

vCPUs. The ioctl needs a vCPU, and one vCPU's ioctls are serialized by its mutex, so
parallelism needs one vCPU per thread. :class:`HelperVcpus` creates them, for whoever
owns the VM: with the highest ids the VM allows (``KVM_CAP_MAX_VCPU_ID - 1`` downwards)
so they never collide with the VM's own vCPUs 0..n-1, and with KVM's supported CPUID. They
never run. The stage-2 tables they fill are the VM's: with TDP the root is shared by every
vCPU in the same mode, so the VM's own vCPUs find the mappings in place. KVM cannot destroy
a vCPU before its VM: closing a helper releases its fd and mapping, but its id stays taken
and it still counts against ``KVM_CAP_MAX_VCPUS`` until the VM is closed, so an owner that
pre-faults more than once keeps one ``HelperVcpus`` and passes it each time.
"""

from __future__ import annotations

import errno
import threading
from types import TracebackType
from typing import Any

from kvm_abi import Cap, KvmError
from vmm.errors import Unavailable
from vmm.prefault.target import PrefaultVcpu, PrefaultVm

OP = "KVM_PRE_FAULT_MEMORY"
CAPABILITY = "PRE_FAULT_MEMORY"

OWNER_VCPUS = 64
"""vCPU slots helpers leave free for the VM's owner. KVM counts every vCPU a VM ever had
against KVM_CAP_MAX_VCPUS, and a :class:`~vmm.machine.Machine` creates its own vCPUs (at most
``BootLayout.MAX_VCPUS``, 64) after pre-population; helpers must not take their room."""

DEFAULT_MAX_VCPUS = 4
"""What KVM's API documentation says to assume when neither KVM_CAP_MAX_VCPUS nor
KVM_CAP_NR_VCPUS is reported."""

DEFAULT_MAX_VCPU_ID = 1024
"""KVM_CAP_MAX_VCPU_ID's value on kernels that do not report it (ids 0..1023)."""


def pre_fault_memory(vcpu: PrefaultVcpu, rng: Any) -> int:
    """One real KVM_PRE_FAULT_MEMORY ioctl on ``vcpu`` in the shared call shape:
    ``rng`` is updated in place by the kernel; returns 0 or the errno."""
    try:
        vcpu.pre_fault_memory(rng)
    except KvmError as e:
        return e.errno or errno.EIO
    return 0


def capability(vm: PrefaultVm) -> int:
    """KVM_CHECK_EXTENSION(KVM_CAP_PRE_FAULT_MEMORY) on the VM fd (1 iff TDP is on)."""
    return vm.check_extension(Cap.PRE_FAULT_MEMORY)


NO_TDP = "it needs two-dimensional paging (EPT or NPT), and this KVM runs with shadow paging"


def missing_capability_reason(value: int) -> str:
    """Why the kernel call is unavailable, in the words a user needs."""
    return f"KVM_CAP_PRE_FAULT_MEMORY is {value} on this kernel ({NO_TDP})"


def require(vm: PrefaultVm) -> None:
    """Unavailable (status 2, naming the capability) unless the kernel offers the ioctl."""
    value = capability(vm)
    if not value:
        raise Unavailable(
            f"--prefault kernel needs KVM_CAP_PRE_FAULT_MEMORY, which is {value} on this kernel ({NO_TDP})",
            CAPABILITY,
        )


def _cap(vm: PrefaultVm, *caps: Cap) -> int:
    """The first of ``caps`` the VM fd (else /dev/kvm) reports as non-zero; 0 if none is."""
    for cap in caps:
        value = vm.check_extension(cap) or vm.kvm.check_extension(cap)
        if value:
            return value
    return 0


def max_vcpus(vm: PrefaultVm) -> int:
    """How many vCPUs the VM may ever have: KVM_CAP_MAX_VCPUS, else KVM_CAP_NR_VCPUS, else
    KVM's documented default of 4."""
    return _cap(vm, Cap.MAX_VCPUS, Cap.NR_VCPUS) or DEFAULT_MAX_VCPUS


class HelperVcpus:
    """vCPUs of one VM reserved for pre-faulting, owned by whoever owns the VM.

    :meth:`get` creates them on first use and hands the same ones out again afterwards;
    :meth:`close` (or leaving the ``with`` block) closes their fds. Closing the VM closes
    them too. ``reserve`` vCPU slots stay free for the owner's own vCPUs.
    """

    __slots__ = ("vm", "reserve", "_vcpus", "_lock")

    def __init__(self, vm: PrefaultVm, *, reserve: int = OWNER_VCPUS) -> None:
        self.vm = vm
        self.reserve = reserve
        self._vcpus: list[PrefaultVcpu] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._vcpus)

    def __enter__(self) -> HelperVcpus:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close every helper's fd (idempotent; the ids stay taken until the VM closes)."""
        with self._lock:
            vcpus, self._vcpus = self._vcpus, []
        for vcpu in vcpus:
            vcpu.close()

    def get(self, count: int) -> list[PrefaultVcpu]:
        """``count`` helpers (created as needed, reused afterwards). Fewer when the VM has
        no room for more (KVM_CAP_MAX_VCPUS less ``reserve``), but at least one: if not
        even one can be created, KVM's refusal is raised."""
        with self._lock:
            have = self._vcpus
            if len(have) >= count:
                return have[:count]
            vm = self.vm
            room = max(0, max_vcpus(vm) - len(vm.vcpus) - self.reserve)
            want = min(count - len(have), room) if have else max(1, min(count, room))
            if want:
                self._create(want)
            return have[:count]

    def _create(self, want: int) -> None:
        vm = self.vm
        cpuid = vm.kvm.get_supported_cpuid()
        taken = {v.index for v in vm.vcpus}
        index = (_cap(vm, Cap.MAX_VCPU_ID) or DEFAULT_MAX_VCPU_ID) - 1
        while want > 0 and index > 0:  # id 0 is the boot vCPU's, always the owner's
            if index not in taken:
                try:
                    vcpu = vm.create_vcpu(index)
                except KvmError as e:
                    if e.errno == errno.EEXIST:  # taken meanwhile (another owner's helpers)
                        index -= 1
                        continue
                    if self._vcpus:  # KVM is full: make do with the helpers there are
                        return
                    raise
                try:
                    vcpu.set_cpuid2(cpuid)
                except BaseException:
                    vcpu.close()
                    raise
                self._vcpus.append(vcpu)
                want -= 1
            index -= 1
