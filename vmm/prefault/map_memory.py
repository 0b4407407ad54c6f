"""KVM_MAP_MEMORY: the RFC ABI (v1, March 2024) that preceded KVM_PRE_FAULT_MEMORY.

``struct kvm_memory_mapping {base_gfn, nr_pages, flags, source}`` (32 bytes, pages not
bytes), flags WRITE/EXEC/USER/PRIVATE (x86 #PF error-code bits), ``source`` = initial
contents copied into the pages as they are mapped. It answers 0 when every page is done
and EAGAIN when it stopped early with the struct advanced. It was never merged; a kernel
carrying the patches offers it, and this module uses it only there.

Detecting it safely
-------------------
Capability 236 cannot tell the two ABIs apart: the RFC called it KVM_CAP_MAP_MEMORY, the
mainline KVM_CAP_PRE_FAULT_MEMORY, and both report 1. The ioctl numbers differ, because
the number encodes the struct size: RFC v1 is ``_IOWR(0xAE, 0xd5, 32 bytes)`` =
0xC020AED5, mainline ``_IOWR(0xAE, 0xd5, 64 bytes)`` = 0xC040AED5. On a kernel without
the RFC, 0xC020AED5 is an unknown vCPU ioctl; x86 answers those with EINVAL from the
arch handler (kvm-abi.md §1, and measured here), never with anything else except EIO
(wrong process or dead VM) and EINTR (the vCPU mutex wait was interrupted).

So the probe issues 0xC020AED5 with a call the RFC *accepts*: one page inside a memslot,
flags 0 (which RFC v1 and its TDX predecessor KVM_MEMORY_MAPPING both allow), source 0.
The RFC can only answer EINVAL to a call that is invalid, and this one is not, so EINVAL
means "not the RFC" without ambiguity. An RFC kernel maps the page and answers 0 with
``nr_pages`` 0, or fails with an error other than EINVAL (EFAULT, EAGAIN, EIO...). The
page it maps is one the caller was about to map anyway, so the probe costs nothing.
Capability 236 is checked first: where it is 0 neither ABI exists and nothing is issued.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvm_abi import Cap, KvmError
from vmm.errors import Unavailable
from vmm.prefault.contract import PAGE_SHIFT, errno_name, new_mapping
from vmm.prefault.target import PrefaultVcpu, PrefaultVm

OP = "KVM_MAP_MEMORY"
CAPABILITY = "MAP_MEMORY"


def map_memory(vcpu: PrefaultVcpu, mapping: Any) -> int:
    """One real KVM_MAP_MEMORY (RFC) ioctl in the shared call shape: 0 or the errno."""
    try:
        vcpu.map_memory(mapping)
    except KvmError as e:
        return e.errno or errno.EIO
    return 0


@dataclass(frozen=True)
class Probe:
    """What the RFC probe found: ``rfc`` is True when the kernel speaks KVM_MAP_MEMORY;
    ``usable`` when the probe call also worked; ``reason`` says what was seen."""

    rfc: bool
    usable: bool
    reason: str


def probe(vcpu: PrefaultVcpu, gpa: int) -> Probe:
    """Issue the RFC ioctl for the one page at ``gpa`` (inside a memslot) and read the
    answer as the module docstring explains. Does not check capability 236 (see
    :func:`detect`)."""
    mapping = new_mapping(gpa >> PAGE_SHIFT, 1)
    while True:
        rc = map_memory(vcpu, mapping)
        if rc != errno.EINTR:
            break
    if rc == 0 and mapping.nr_pages == 0:
        return Probe(True, True, "KVM_MAP_MEMORY (0xC020AED5) mapped a probe page")
    if rc == errno.EINVAL:
        return Probe(False, False, "KVM_MAP_MEMORY (0xC020AED5) is not a known vCPU ioctl here (EINVAL)")
    if rc == errno.EIO:
        return Probe(False, False, "the VM is unusable (EIO on a vCPU ioctl)")
    return Probe(True, False, f"KVM_MAP_MEMORY exists but failed on a valid page: {errno_name(rc)}")


def detect(vm: PrefaultVm, vcpu: Callable[[], PrefaultVcpu], gpa: int) -> Probe:
    """Capability 236 first (0: neither ABI, nothing issued, no vCPU taken), then
    :func:`probe` on the vCPU ``vcpu()`` returns."""
    value = vm.check_extension(Cap.PRE_FAULT_MEMORY)
    if not value:
        return Probe(False, False, f"capability 236 (KVM_CAP_MAP_MEMORY in the RFC) is {value}")
    return probe(vcpu(), gpa)


def require(vm: PrefaultVm, vcpu: Callable[[], PrefaultVcpu], gpa: int) -> None:
    """Unavailable (status 2, naming the capability) unless the RFC ioctl works here."""
    found = detect(vm, vcpu, gpa)
    if not found.rfc:
        raise Unavailable(
            "--prefault map-memory needs the RFC KVM_CAP_MAP_MEMORY (KVM_MAP_MEMORY, 0xC020AED5), "
            f"which this kernel lacks: {found.reason}",
            CAPABILITY,
        )
    if not found.usable:
        raise Unavailable(f"--prefault map-memory: {found.reason}", CAPABILITY)
