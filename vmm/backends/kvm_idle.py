"""Telling, from outside, that every vCPU of a KVM machine with an in-kernel irqchip has
halted for good.

With the in-kernel local APIC, HLT never reaches userspace: KVM blocks the vCPU thread
inside KVM_RUN until an interrupt can wake it. A guest that ends with ``cli; hlt`` (the
bundled images do, after the exit port) would therefore wait for the timeout, where
without an irqchip KVM_EXIT_HLT ends its loop. The watch restores "all vCPUs halted":

1. Cheap test, every ``interval``: a vCPU thread blocked in the kernel consumes no CPU
   time (``/proc/self/task/<tid>/schedstat``). Only when no vCPU thread ran for a whole
   interval is there anything to ask.
2. Exact test: each vCPU's loop is asked (a kick, then KVM_GET_MP_STATE and KVM_GET_REGS
   on its own thread, since those ioctls wait for KVM_RUN's vCPU mutex) for its MP state
   and RFLAGS. A vCPU can never run again by itself when it is HALTED with IF clear
   (only an NMI, INIT or SMI could wake it, and none of the VMM's devices sends one) or
   still UNINITIALIZED / INIT_RECEIVED (an AP nobody started). If every vCPU is so, the
   machine has halted. A vCPU halted with IF set waits for an interrupt: the run goes on
   (a timer may fire; if none does, the timeout ends it).

The probe costs one exit per vCPU and happens only after an idle interval, so a busy
guest pays nothing but a file read per vCPU per interval.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

from kvm_abi import MpState
from vmm.cpu.bits import RFLAGS_IF

PROBE_WAIT_SECONDS = 0.5
_ASLEEP = (int(MpState.UNINITIALIZED), int(MpState.INIT_RECEIVED))


class Probeable(Protocol):
    """What the watch needs of a vCPU runner (KvmVcpuRunner)."""

    index: int

    def request_probe(self) -> None: ...

    def wait_probe(self, timeout: float) -> tuple[int, int] | None: ...


def halted_for_good(mp_state: int, rflags: int) -> bool:
    """True if a vCPU in this state cannot run again without an NMI, INIT or SMI."""
    if mp_state in _ASLEEP:
        return True
    return mp_state == int(MpState.HALTED) and not rflags & RFLAGS_IF


def thread_cpu_ns(native_id: int) -> int | None:
    """Nanoseconds the thread has run (schedstat's first field), or None if unknown."""
    try:
        with open(f"/proc/self/task/{native_id}/schedstat", "rb") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class IdleWatch:
    """Call :meth:`all_halted` every ``interval`` seconds with the vCPU threads still in
    their loops; True once every vCPU has halted for good."""

    interval = 0.05

    def __init__(self, runners: Sequence[Probeable]) -> None:
        self._runners = runners
        self._cpu: dict[int, int | None] = {}

    def all_halted(self, threads: dict[int, threading.Thread]) -> bool:
        """``threads``: vCPU index -> its thread, for the vCPUs whose loops still run."""
        if not threads or not self._quiet(threads):
            return False
        live = [r for r in self._runners if r.index in threads]
        for runner in live:
            runner.request_probe()
        for runner in live:
            answer = runner.wait_probe(PROBE_WAIT_SECONDS)
            if answer is None or not halted_for_good(*answer):
                return False
        return True

    def _quiet(self, threads: dict[int, threading.Thread]) -> bool:
        """True if no vCPU thread ran since the last call (unknown counts as quiet, so a
        host without schedstat falls back to probing every interval)."""
        quiet = True
        for index, thread in threads.items():
            if thread.native_id is None:
                return False
            now = thread_cpu_ns(thread.native_id)
            before = self._cpu.get(index)
            self._cpu[index] = now
            if now is not None and (before is None or now - before > 1_000_000):
                quiet = False
        return quiet
