"""Guest memory pre-population: one entry point, six strategies, one report.

>>> from vmm.prefault import prefault_vm                         # doctest: +SKIP
>>> report = prefault_vm(vm, [(0, 64 << 20)], strategy="auto")   # doctest: +SKIP
>>> report.summary()                                             # doctest: +SKIP
'auto -> emulated (KVM_CAP_PRE_FAULT_MEMORY is 0 ...): 64.0 MiB in 0.009 s ...'

These are functions over a small protocol (:mod:`.target`: a VM-like thing that has guest
memory and capabilities and can create a vCPU), so :class:`~vmm.vm.Vm` stays mechanism
and never imports this package. The vCPUs the kernel strategies issue their ioctls on are
the caller's (``vcpus=``: a list, or a :class:`~.kernel.HelperVcpus` kept across calls),
else helpers created for the one call and closed at its end.

Strategies (``vmm run --prefault STRATEGY``, ``prefault_vm(vm, strategy=...)``):

``kernel``      KVM_PRE_FAULT_MEMORY on vCPU fds (:mod:`.kernel`), ranges split across
                ``threads`` vCPUs; KVM maps as a read fault, so anonymous memory stays
                the zero page until the guest writes.
``map-memory``  the RFC's KVM_MAP_MEMORY with WRITE (:mod:`.map_memory`), only where a
                kernel carries it (detected safely, see that module).
``emulated``    the in-process implementation of the same contract
                (:mod:`.emulated`): populates the host memory for real, cannot fill
                KVM's stage-2 tables, and says so in the report.
``host``        populate the backing only (MADV_POPULATE_WRITE, parallel threads).
``none``        nothing.
``auto``        host population, then the kernel call where the capability exists
                (KVM_PRE_FAULT_MEMORY, or the RFC ioctl on a kernel that has only that);
                else ``emulated``. It is the only strategy that falls back, and its
                report says so. Asking for ``kernel`` or ``map-memory`` where the kernel
                lacks it raises :class:`~vmm.errors.Unavailable` naming the capability.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias

from kvm_abi import MemoryMappingFlag, VmType
from vmm.errors import InputError, Unavailable
from vmm.memory import Backing, GuestMemory
from vmm.prefault import host as _host
from vmm.prefault import kernel as _kernel
from vmm.prefault import map_memory as _map
from vmm.prefault.contract import (
    PAGE_SIZE,
    PrefaultError,
    PrefaultInterrupted,
    drive_map_memory,
    drive_pre_fault,
    errno_name,
    new_range,
)
from vmm.prefault.emulated import EmulatedPrefault
from vmm.prefault.kernel import HelperVcpus
from vmm.prefault.progress import Progress, ProgressSink, make_sink
from vmm.prefault.report import PrefaultReport, Step
from vmm.prefault.target import KvmSystem, PrefaultVcpu, PrefaultVm
from vmm.strategies import STRATEGIES, parse_strategy

__all__ = [
    "STRATEGIES",
    "EmulatedPrefault",
    "HelperVcpus",
    "KvmSystem",
    "PrefaultError",
    "PrefaultInterrupted",
    "PrefaultReport",
    "PrefaultVcpu",
    "PrefaultVm",
    "Step",
    "parse_strategy",
    "prefault_backend",
    "prefault_memory",
    "prefault_vm",
]

_PRIVATE_MEM_TYPES = (VmType.SW_PROTECTED, VmType.SNP, VmType.TDX)
_STAGE2_LIMIT = (
    "KVM's stage-2 page tables are not filled: the guest's first touch of each page still takes one KVM "
    "fault (cheap, since the host page exists)"
)
_READ_FAULT_LIMIT = (
    "KVM pre-faults as a read fault: anonymous memory nobody wrote stays the shared zero page until the "
    "guest writes it (auto populates the host first)"
)


_PRIVATE_RESIDENCY_LIMIT = (
    "private memory is never host-mapped and its guest_memfd does not report what it holds, so the "
    "resident figure leaves it out"
)


def prefault_backend(
    backend: Any,
    ranges: Iterable[tuple[int, int]] | None,
    *,
    strategy: str = "auto",
    threads: int | None = None,
    progress: bool | ProgressSink = False,
) -> PrefaultReport:
    """Pre-populate a machine backend's guest RAM (what ``vmm run --prefault`` calls).

    A KVM backend (it has ``.vm``) gets every strategy; any other backend (the emulator)
    has only ``.memory``, so ``kernel`` and ``map-memory`` are unavailable there and
    ``auto`` means ``emulated``."""
    vm = getattr(backend, "vm", None)
    if vm is not None:
        return prefault_vm(vm, ranges, strategy=strategy, threads=threads, progress=progress)
    name = getattr(backend, "name", "this")
    return prefault_memory(
        backend.memory,
        ranges,
        strategy=strategy,
        threads=threads,
        progress=progress,
        no_kvm=f"the {name} backend has no KVM",
    )


Vcpus: TypeAlias = Sequence[PrefaultVcpu] | HelperVcpus
"""The vCPUs kernel calls are issued on: exactly these, or as many as needed from a pool."""


def prefault_vm(
    vm: PrefaultVm,
    ranges: Iterable[tuple[int, int]] | None = None,
    *,
    strategy: str = "auto",
    threads: int | None = None,
    progress: bool | ProgressSink = False,
    vcpus: Vcpus | None = None,
) -> PrefaultReport:
    """Pre-populate ``ranges`` ((gpa, size) pairs) of a KVM VM's RAM (every region when
    None) with ``strategy`` on ``threads`` threads (default: one per host CPU); returns
    the report. ``progress``: True for a bar on a terminal, or a ``(done, total)`` callback.

    ``vcpus``: the vCPUs to issue kernel calls on, one thread each; they must not be
    inside KVM_RUN (their ioctls would wait for it). A :class:`HelperVcpus` is drawn from
    as needed and stays the caller's; by default helpers are created for this call only
    and closed before it returns (KVM keeps them, idle, until the VM is closed: pass one
    ``HelperVcpus`` when pre-faulting the same VM many times)."""
    return prefault_memory(vm.memory, ranges, strategy=strategy, threads=threads, progress=progress, vm=vm, vcpus=vcpus)


def prefault_memory(
    memory: GuestMemory,
    ranges: Iterable[tuple[int, int]] | None = None,
    *,
    strategy: str = "auto",
    threads: int | None = None,
    progress: bool | ProgressSink = False,
    vm: PrefaultVm | None = None,
    vcpus: Vcpus | None = None,
    no_kvm: str = "no KVM VM was given",
) -> PrefaultReport:
    """The one implementation behind :func:`prefault_vm` and :func:`prefault_backend`."""
    strategy = parse_strategy(strategy)
    if threads is not None and threads < 1:
        raise InputError(f"prefault threads must be at least 1, not {threads}")
    normalized = _host.normalize_ranges(memory, ranges)
    count = threads or _host.default_threads()
    if isinstance(vcpus, HelperVcpus):
        return _Run(memory, normalized, count, progress, vm, vcpus.get).execute(strategy, no_kvm)
    if vcpus or vm is None:
        given = list(vcpus or ())
        return _Run(memory, normalized, count, progress, vm, lambda n: given[:n]).execute(strategy, no_kvm)
    with HelperVcpus(vm) as helpers:  # this call's own: created only if a strategy needs them
        return _Run(memory, normalized, count, progress, vm, helpers.get).execute(strategy, no_kvm)


class _Run:
    """One population: the steps it ran, timed, and the report they make."""

    def __init__(
        self,
        memory: GuestMemory,
        ranges: list[tuple[int, int]],
        threads: int,
        progress: bool | ProgressSink,
        vm: PrefaultVm | None,
        take_vcpus: Callable[[int], list[PrefaultVcpu]],
    ) -> None:
        self.memory = memory
        self.ranges = ranges
        self.total = sum(size for _, size in ranges)
        self.threads = threads
        self.progress = progress
        self.vm = vm
        self.take_vcpus = take_vcpus  # n -> up to n vCPUs (at least one) for the kernel calls
        self.steps: list[Step] = []
        self.used_threads = 1

    # --- the strategies ------------------------------------------------------------------
    def execute(self, strategy: str, no_kvm: str) -> PrefaultReport:
        before = _host.resident_bytes(self.memory, self.ranges)
        started = time.perf_counter()
        used, reason, limits = self._dispatch(strategy, no_kvm)
        seconds = time.perf_counter() - started
        after = _host.resident_bytes(self.memory, self.ranges)
        pieces = _host.split(self.memory, self.ranges, 1)
        backings = sorted({"private" if p.region.private else p.region.host.backing.value for p in pieces})
        if any(p.region.private for p in pieces):
            limits = [*limits, _PRIVATE_RESIDENCY_LIMIT]
        return PrefaultReport(
            requested=strategy,
            strategy=used,
            reason=reason,
            bytes_requested=self.total,
            bytes_done=self.steps[-1].bytes if self.steps else 0,
            seconds=seconds if self.steps else 0.0,
            resident_before=before,
            resident_bytes=after,
            threads=self.used_threads,
            backing=",".join(backings),
            steps=tuple(self.steps),
            limits=tuple(limits),
        )

    def _dispatch(self, strategy: str, no_kvm: str) -> tuple[str, str, list[str]]:
        if strategy == "none":
            return "none", "no pre-population asked for", ["nothing was populated"]
        if strategy == "host":
            self._host_step()
            threads = f"{self.used_threads} thread{'s' if self.used_threads != 1 else ''}"
            return "host", f"asked for host population only ({threads})", [_STAGE2_LIMIT]
        if strategy == "emulated":
            self._emulated_step()
            return "emulated", "asked for the in-process emulation", [_STAGE2_LIMIT]
        if strategy == "kernel":
            vm = self._need_vm("kernel", _kernel.CAPABILITY, no_kvm)
            _kernel.require(vm)
            abi, why = self._detect()
            if abi != "pre-fault":
                raise Unavailable(f"--prefault kernel: KVM_CAP_PRE_FAULT_MEMORY is set but {why}", _kernel.CAPABILITY)
            self._kernel_step()
            return "kernel", "asked for KVM_PRE_FAULT_MEMORY", self._kernel_limits()
        if strategy == "map-memory":
            vm = self._need_vm("map-memory", _map.CAPABILITY, no_kvm)
            _map.require(vm, lambda: self._vcpus(1)[0], self.ranges[0][0])
            self._map_step()
            return "map-memory", "asked for the RFC KVM_MAP_MEMORY (with WRITE)", []
        return self._auto(no_kvm)

    def _auto(self, no_kvm: str) -> tuple[str, str, list[str]]:
        vm = self.vm
        if vm is None:
            self._emulated_step()
            return "emulated", f"{no_kvm}; populated in-process instead (fallback)", [_STAGE2_LIMIT]
        value = _kernel.capability(vm)
        if not value:
            self._emulated_step()
            reason = f"{_kernel.missing_capability_reason(value)}; fell back to the in-process emulation"
            return "emulated", reason, [_STAGE2_LIMIT]
        abi, why = self._detect()
        if abi is None:
            self._emulated_step()
            return "emulated", f"{why}; fell back to the in-process emulation", [_STAGE2_LIMIT]
        self._host_step()
        if abi == "map-memory":
            self._map_step()
            return "host+map-memory", "this kernel offers only the RFC KVM_MAP_MEMORY; host population first", []
        try:
            self._kernel_step()
        except PrefaultError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            # Capability 1 but the vCPU cannot pre-fault now (e.g. a nested guest): the
            # host half is done, which is all the emulation would add.
            return "host", f"KVM_PRE_FAULT_MEMORY answered EOPNOTSUPP ({e}); kept the host population", [_STAGE2_LIMIT]
        return "host+kernel", "KVM_CAP_PRE_FAULT_MEMORY is set: host population, then KVM_PRE_FAULT_MEMORY", []

    # --- steps ---------------------------------------------------------------------------
    def _step(self, name: str, body: Callable[[Progress], int]) -> None:
        sink = make_sink(self.progress, f"prefault ({name})")
        meter = Progress(self.total, sink)
        started = time.perf_counter()
        try:
            done = body(meter)
        finally:
            meter.finish()
        self.steps.append(Step(name, done, time.perf_counter() - started))

    def _host_step(self) -> None:
        self.used_threads = max(self.used_threads, min(self.threads, len(self._pieces())))
        self._step("host", lambda meter: _host.populate(self.memory, self.ranges, self.threads, meter))

    def _emulated_step(self) -> None:
        private = self.vm is not None and self.vm.type in _PRIVATE_MEM_TYPES
        pieces = self._pieces()
        self.used_threads = max(self.used_threads, min(self.threads, len(pieces)))

        def body(meter: Progress) -> int:
            with EmulatedPrefault(self.memory, private_mem=private) as emu:
                _host.run_parallel(
                    pieces,
                    self.threads,
                    lambda _i, p: drive_pre_fault(
                        emu.pre_fault_memory, None, p.gpa, p.size, meter.add, op="KVM_PRE_FAULT_MEMORY (emulated)"
                    ),
                    meter,
                )
            return sum(p.size for p in pieces)

        self._step("emulated", body)

    def _kernel_step(self) -> None:
        pieces = self._pieces()
        vcpus = self._vcpus(min(self.threads, len(pieces)))
        self.used_threads = max(self.used_threads, len(vcpus))

        def body(meter: Progress) -> int:
            _host.run_parallel(
                pieces,
                len(vcpus),
                lambda i, p: drive_pre_fault(_kernel.pre_fault_memory, vcpus[i], p.gpa, p.size, meter.add),
                meter,
            )
            return sum(p.size for p in pieces)

        self._step("kernel", body)

    def _map_step(self) -> None:
        pieces = self._pieces()
        vcpus = self._vcpus(min(self.threads, len(pieces)))
        self.used_threads = max(self.used_threads, len(vcpus))
        write = int(MemoryMappingFlag.WRITE)

        def body(meter: Progress) -> int:
            def work(i: int, p: _host.Piece) -> None:
                # WRITE maps writable (and, for anonymous memory, allocates a real page
                # rather than the zero page); a read-only slot would answer EFAULT to it.
                flags = 0 if p.region.readonly else write
                drive_map_memory(_map.map_memory, vcpus[i], p.gpa, p.size, flags, 0, meter.add)

            _host.run_parallel(pieces, len(vcpus), work, meter)
            return sum(p.size for p in pieces)

        self._step("map-memory", body)

    # --- helpers -------------------------------------------------------------------------
    def _pieces(self) -> list[_host.Piece]:
        return _host.split(self.memory, self.ranges, self.threads)

    def _need_vm(self, strategy: str, capability: str, no_kvm: str) -> PrefaultVm:
        if self.vm is None:
            raise Unavailable(f"--prefault {strategy} needs KVM_CAP_{capability} on a KVM VM: {no_kvm}", capability)
        return self.vm

    def _vcpus(self, count: int) -> list[PrefaultVcpu]:
        return self.take_vcpus(max(1, count))

    def _detect(self) -> tuple[str | None, str]:
        """Which kernel ABI answers a valid one-page call: ``pre-fault`` (mainline),
        ``map-memory`` (the RFC), or None; and why, in words."""
        vcpu = self._vcpus(1)[0]
        gpa = self.ranges[0][0]
        rng = new_range(gpa, PAGE_SIZE)
        rc = errno.EINTR
        for _ in range(100):  # EINTR/EAGAIN are transient; a real answer comes quickly
            rc = _kernel.pre_fault_memory(vcpu, rng)
            if rc not in (errno.EINTR, errno.EAGAIN):
                break
        if rc == 0:
            return "pre-fault", "KVM_PRE_FAULT_MEMORY works"
        if rc == errno.EINVAL:  # a valid call refused: this number is not an ioctl here
            found = _map.probe(vcpu, gpa)
            if found.rfc and found.usable:
                return "map-memory", found.reason
            return None, f"KVM_PRE_FAULT_MEMORY answers EINVAL to a valid call and {found.reason}"
        return None, f"KVM_PRE_FAULT_MEMORY answered {errno_name(rc)} to a valid one-page call"

    def _kernel_limits(self) -> list[str]:
        anonymous = {Backing.ANON, Backing.THP}
        if any(p.region.host.backing in anonymous for p in _host.split(self.memory, self.ranges, 1)):
            return [_READ_FAULT_LIMIT]
        return []
