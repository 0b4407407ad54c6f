"""In-process pre-fault with the kernel's contract: the fallback where KVM cannot do it.

:class:`EmulatedPrefault` offers ``pre_fault_memory(vcpu, struct)`` and
``map_memory(vcpu, struct)`` with the call shape of the ioctls (struct updated in place,
0 or an errno returned) and their documented semantics, checked the same way:

``pre_fault_memory`` (mainline KVM_PRE_FAULT_MEMORY, kvm-abi.md §2.3-§2.5)
    EINVAL for flags != 0, an unaligned gpa or size, size 0 or a wrap-around (``padding``
    is not checked); then one step per 2 MiB frame (KVM's progress comes in mapping-sized
    steps), checking for a pending signal before each (EINTR); ENOENT where no memslot
    covers ``gpa``; running off a slot's end returns 0 with the rest left, and the next
    call answers ENOENT; any error after some progress is dropped (0 is returned), so
    "size decreased XOR error" always holds. Parallel callers on overlapping ranges all
    succeed: population is idempotent, as a spurious fault is for KVM.

``map_memory`` (the RFC's KVM_MAP_MEMORY, v1 of March 2024, kvm-abi.md §4)
    EINVAL for unknown flags, PRIVATE on a VM without private memory, an unaligned
    ``source``, ``nr_pages`` 0 or a wrap-around; mapping sizes 1G/2M/4K chosen from the
    alignment and count as the RFC did; ``source`` contents copied into each page as it
    is mapped and ``source`` advanced with it; no memslot -> EFAULT (the RFC turned a
    no-slot pfn into EFAULT); a WRITE to a read-only slot -> EFAULT; a signal -> EINTR;
    a page another caller is filling right now -> EAGAIN (the RFC's RET_PF_RETRY); and,
    as the RFC did, EAGAIN whenever it stopped early after some progress.

What it does for real is the host side: MADV_POPULATE_WRITE on the host mapping behind
each range (or _READ where the guest cannot write: a read-only slot, or ``map_memory``
without WRITE), which allocates anonymous, THP, memfd, hugetlb and guest_memfd pages
alike (a guest_memfd range is populated through its host mapping). What it cannot do is
fill KVM's stage-2 (EPT/NPT) or shadow page tables: the guest's first touch of each page
still costs one KVM fault, cheap once the host page exists (host-kvm.md).

``pre_fault_memory`` populates writable rather than faulting "for read" as the kernel
does, because the kernel's read fault is only useful together with its stage-2 entry;
the host half of a pre-fault is worth having only if the guest's first write finds a
real page (host-kvm.md: 794 ms vs 6,027 ms for a first pass over 1 GiB).
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Any

import kvm_abi as abi
from kvm_abi import KvmError, MemoryMappingFlag
from vmm.memory import HUGE_PAGE_SIZE, Backing, GuestMemory, GuestRegion
from vmm.prefault.contract import PAGE_SHIFT, PAGE_SIZE, U64_MASK, blocked_signal_pending

STEP = HUGE_PAGE_SIZE
"""pre_fault_memory advances at most to the next 2 MiB boundary per step."""

GIGA_PAGE = 1 << 30
_LEVELS = (GIGA_PAGE, HUGE_PAGE_SIZE, PAGE_SIZE)
_ALL_MAPPING_FLAGS = int(
    MemoryMappingFlag.WRITE | MemoryMappingFlag.EXEC | MemoryMappingFlag.USER | MemoryMappingFlag.PRIVATE
)
_LOCK_STRIPES = 64


class EmulatedPrefault:
    """The emulated ioctls over one guest-physical memory map.

    ``memory`` is the map the guest sees (``Vm.memory`` or an emulator backend's);
    ``private_mem`` says whether the VM type has private memory (it decides whether the
    RFC's PRIVATE flag is valid). ``vcpu`` arguments are accepted for the call shape and
    otherwise unused: there is no vCPU MMU state to fault into.
    """

    name = "emulated"

    def __init__(self, memory: GuestMemory, *, private_mem: bool = False) -> None:
        self.memory = memory
        self.private_mem = private_mem
        # A page being filled from `source` is held under its 2 MiB frame's stripe, so two
        # callers never interleave copies into one page; the loser answers EAGAIN.
        self._stripes = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._mem_fd = -1
        self._fd_lock = threading.Lock()

    def close(self) -> None:
        """Close /proc/self/mem if ``map_memory`` opened it (idempotent)."""
        with self._fd_lock:
            if self._mem_fd >= 0:
                fd, self._mem_fd = self._mem_fd, -1
                os.close(fd)

    def __enter__(self) -> EmulatedPrefault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- KVM_PRE_FAULT_MEMORY ------------------------------------------------------------
    def pre_fault_memory(self, vcpu: Any, rng: Any) -> int:
        """Emulated KVM_PRE_FAULT_MEMORY on ``struct kvm_pre_fault_memory *rng``."""
        gpa, size, flags = int(rng.gpa), int(rng.size), int(rng.flags)
        if flags:
            return errno.EINVAL
        if gpa % PAGE_SIZE or size % PAGE_SIZE or (gpa + size) & U64_MASK <= gpa:
            return errno.EINVAL
        progressed = False
        err = 0
        while size:
            if blocked_signal_pending():
                err = errno.EINTR
                break
            region = self.memory.region_at(gpa)
            if region is None:
                err = errno.ENOENT
                break
            end = min(gpa + size, region.end, (gpa // STEP + 1) * STEP)
            err = self._populate(region, gpa, end - gpa, write=not region.readonly)
            if err:
                break
            size -= end - gpa
            gpa = end
            rng.gpa, rng.size = gpa, size  # in place after every step, like the kernel
            progressed = True
        return 0 if progressed else err

    # --- KVM_MAP_MEMORY (RFC v1) ---------------------------------------------------------
    def map_memory(self, vcpu: Any, mapping: Any) -> int:
        """Emulated RFC KVM_MAP_MEMORY on ``struct kvm_memory_mapping *mapping``."""
        base_gfn, nr_pages = int(mapping.base_gfn), int(mapping.nr_pages)
        flags, source = int(mapping.flags), int(mapping.source)
        if flags & ~_ALL_MAPPING_FLAGS:
            return errno.EINVAL
        if flags & MemoryMappingFlag.PRIVATE and not self.private_mem:
            return errno.EINVAL
        if source % PAGE_SIZE or not nr_pages or (base_gfn + nr_pages) & U64_MASK <= base_gfn:
            return errno.EINVAL
        added = False
        err = 0
        while nr_pages:
            if blocked_signal_pending():
                err = errno.EINTR
                break
            mapped, err = self._map_one(base_gfn, nr_pages, flags, source)
            if err:
                break
            pages = mapped >> PAGE_SHIFT
            base_gfn += pages
            nr_pages -= pages
            if source:
                source += mapped
            mapping.base_gfn, mapping.nr_pages, mapping.source = base_gfn, nr_pages, source
            added = True
        if added and nr_pages:
            return errno.EAGAIN  # the RFC's "some but not all pages were done"
        return err

    def _map_one(self, base_gfn: int, nr_pages: int, flags: int, source: int) -> tuple[int, int]:
        """Map the largest page the RFC would at ``base_gfn``: (bytes mapped, errno)."""
        gpa = base_gfn << PAGE_SHIFT
        region = self.memory.region_at(gpa) if gpa <= U64_MASK else None
        if region is None:
            return 0, errno.EFAULT
        if flags & MemoryMappingFlag.WRITE and region.readonly:
            return 0, errno.EFAULT
        if flags & MemoryMappingFlag.PRIVATE and region.host.backing is not Backing.GUEST_MEMFD:
            return 0, errno.EFAULT
        size = _mapping_size(region, gpa, nr_pages)
        if not source:
            return size, self._populate(region, gpa, size, write=bool(flags & MemoryMappingFlag.WRITE))
        stripe = self._stripes[(gpa // STEP) % _LOCK_STRIPES]
        if not stripe.acquire(blocking=False):
            return 0, errno.EAGAIN
        try:
            return size, self._copy_source(region, gpa, size, source)
        finally:
            stripe.release()

    # --- the host side -------------------------------------------------------------------
    def _populate(self, region: GuestRegion, gpa: int, length: int, *, write: bool) -> int:
        """MADV_POPULATE_{WRITE,READ} [gpa, +length) of ``region``; 0 or an errno."""
        host = region.host
        if host.closed:
            return self._gone(region)
        advice = abi.MADV_POPULATE_WRITE if write else abi.MADV_POPULATE_READ
        try:
            abi.libc_madvise(region.host_addr + (gpa - region.gpa), length, advice)
        except KvmError:
            return self._gone(region)
        return 0

    def _gone(self, region: GuestRegion) -> int:
        # The host mapping failed or vanished. If the region left the map meanwhile, the
        # memslot is being deleted: EAGAIN, as KVM 6.18+ says, and ENOENT on the next
        # call. Otherwise the host cannot back the page: EFAULT, as a failed hva->pfn is.
        if region not in self.memory:
            return errno.EAGAIN
        return errno.EFAULT

    def _copy_source(self, region: GuestRegion, gpa: int, length: int, source: int) -> int:
        """Copy ``length`` bytes from the caller's address ``source`` into guest memory.

        Read through /proc/self/mem so that a bad ``source`` is an EFAULT answer, as
        copy_from_user would give, instead of a crash of the whole process."""
        if region.host.closed:
            return self._gone(region)
        view = region.host.view[region.host_offset + (gpa - region.gpa) :][:length]
        try:
            copied = os.preadv(self._proc_mem(), [view], source)
        except OSError:
            return errno.EFAULT
        return 0 if copied == length else errno.EFAULT

    def _proc_mem(self) -> int:
        with self._fd_lock:
            if self._mem_fd < 0:
                self._mem_fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
            return self._mem_fd


def _mapping_size(region: GuestRegion, gpa: int, nr_pages: int) -> int:
    """The RFC capped the level by the request (1G or 2M when ``gpa`` is aligned and the
    count reaches it, else 4K); KVM then maps a huge page only where the memslot covers
    it and guest and host addresses line up, else something smaller."""
    host = region.host_addr + (gpa - region.gpa)
    for level in _LEVELS:
        if gpa % level or nr_pages < level >> PAGE_SHIFT:
            continue
        if gpa + level <= region.end and host % level == 0:
            return level
    return PAGE_SIZE
