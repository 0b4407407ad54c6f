"""All-stop control of a machine's KVM vCPUs for the gdb stub: pause, park, resume, step.

The vCPU threads call in (through the :class:`~vmm.backends.base.DebugHook` methods) at
three points of their loop: when it starts (:meth:`enter`), on a KVM_EXIT_DEBUG
(:meth:`debug_exit`) and after a kick while a pause is asked (:meth:`park`). A parked
thread waits on one condition variable, out of KVM_RUN, so the stub's thread may use
that vCPU's ioctls (registers, KVM_TRANSLATE, KVM_SET_GUEST_DEBUG) while it is parked:
KVM serialises vCPU ioctls on a mutex that KVM_RUN holds, and nothing runs the vCPU
then. Everything the stub does to a vCPU happens with every live vCPU parked.

Breakpoints are the four x86 debug registers (KVM_GUESTDBG_USE_HW_BP): KVM checks them
in its instruction emulator too, where an ``int3`` written into guest code cannot run on
hosts that emulate ring 0 (PVM: KVM_EXIT_INTERNAL_ERROR). Single-step is
KVM_GUESTDBG_SINGLESTEP on the stepped vCPU only; the others stay parked meanwhile.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import kvm_abi as abi
from vmm import exits as ex
from vmm.gdb.protocol import SIGSEGV, SIGTRAP
from vmm.vcpu import Vcpu

HW_BREAKPOINTS = 4
DR7_GLOBAL_EXACT = 1 << 9  # GE: exact breakpoint detection (Intel recommends it with breakpoints)
DR7_RESERVED_ONE = 1 << 10


class Runner(Protocol):
    """What the session needs of a vCPU runner (KvmVcpuRunner)."""

    index: int
    vcpu: Vcpu

    def kick(self) -> None: ...


def dr7_for(slots: Sequence[int | None]) -> int:
    """DR7 enabling instruction breakpoints (R/W = 00, LEN = 00) in the used ``slots``
    (the local-enable bit of each, as KVM's selftests and QEMU set them)."""
    dr7 = DR7_RESERVED_ONE
    for i, addr in enumerate(slots):
        if addr is not None:
            dr7 |= (1 << (2 * i)) | DR7_GLOBAL_EXACT
    return dr7


class DebugSession:
    """The pause state of a machine's vCPUs and the breakpoints gdb inserted.

    ``paused`` is read by the vCPU loops after a kick (a plain attribute, as the stop
    flag); it changes only under the lock. ``wake`` is called (from any thread) whenever
    a stop happened, so the stub's thread can leave its ``select``.
    """

    def __init__(
        self, runners: Sequence[Runner], *, start_paused: bool, wake: Callable[[], None], debug_flags: int = 0
    ) -> None:
        self.runners = list(runners)
        # A step with an interrupt pending would land in the guest's handler, not on the next
        # instruction: block interrupts during a step where KVM can (KVM_CAP_SET_GUEST_DEBUG2).
        self._step_flags = abi.KVM_GUESTDBG_SINGLESTEP | (debug_flags & abi.KVM_GUESTDBG_BLOCKIRQ)
        self._cond = threading.Condition()
        self._wake = wake
        self.paused = False
        self._live: set[int] = set()
        self._parked: set[int] = set()
        self._step: int | None = None  # the vCPU running alone for a single step
        self.ending = False
        self.attached = False  # a gdb is connected (set by the stub)
        self.stop_event: tuple[int, int] | None = None  # (vcpu index, signal) of the last stop
        self.breakpoints: list[int | None] = [None] * HW_BREAKPOINTS
        self._paused_total = 0.0
        self._paused_since: float | None = None
        if start_paused:
            self._set_paused(True)
            self.stop_event = (0, SIGTRAP)

    # --- time ------------------------------------------------------------------------
    def _set_paused(self, value: bool) -> None:
        if value and self._paused_since is None:
            self._paused_since = time.monotonic()
        elif not value and self._paused_since is not None:
            self._paused_total += time.monotonic() - self._paused_since
            self._paused_since = None
        self.paused = value

    def paused_seconds(self) -> float:
        """Seconds the guest has spent held by the debugger so far (the run's timeout does
        not count them)."""
        with self._cond:
            since = self._paused_since
            return self._paused_total + (time.monotonic() - since if since is not None else 0.0)

    # --- called on vCPU threads --------------------------------------------------------
    def enter(self, runner: Runner) -> None:
        """A vCPU loop starts: it parks at once if the guest is held (``-S``)."""
        with self._cond:
            self._live.add(runner.index)
        self.park(runner)

    def leave(self, runner: Runner) -> None:
        """A vCPU loop ended (halted, crashed, stopped): no longer waited for."""
        with self._cond:
            self._live.discard(runner.index)
            self._parked.discard(runner.index)
            if self._step == runner.index:
                self._step = None
                self._stopped_locked(runner.index, SIGTRAP)
            self._cond.notify_all()

    def debug_exit(self, runner: Runner, exit_: ex.Debug) -> None:
        """KVM_EXIT_DEBUG (a breakpoint or a completed step): stop every vCPU, park this one."""
        with self._cond:
            if self._step == runner.index:
                self._step = None
            if not self.paused:
                self._stopped_locked(runner.index, SIGTRAP)
        self.park(runner)

    def crashed(self, runner: Runner) -> None:
        """A vCPU's run is about to end in a crash: with gdb attached, stop the guest there
        first (SIGSEGV) so gdb can look at it; return when gdb continues (the run then ends
        as the crash), detaches, or the machine ends."""
        with self._cond:
            if not self.attached or self.ending:
                return
            if self._step == runner.index:
                self._step = None
            if not self.paused:
                self._stopped_locked(runner.index, SIGSEGV)
        self.park(runner)

    def park(self, runner: Runner) -> None:
        """Wait, out of KVM_RUN, while the guest is held (and while another vCPU steps
        alone); return at once when the machine is ending."""
        index = runner.index
        with self._cond:
            if not self._held(index):
                return
            self._parked.add(index)
            self._cond.notify_all()
            while self._held(index):
                self._cond.wait()
            self._parked.discard(index)

    def _held(self, index: int) -> bool:
        return not self.ending and (self.paused or (self._step is not None and self._step != index))

    def _stopped_locked(self, index: int, signal: int) -> None:
        self._set_paused(True)
        self.stop_event = (index, signal)
        for other in self.runners:
            if other.index != index:
                other.kick()
        self._wake()

    # --- called on the stub's thread ---------------------------------------------------
    def interrupt(self, signal: int) -> None:
        """Stop the guest (gdb's Ctrl-C, or a new connection): kick every vCPU into park."""
        with self._cond:
            if self.paused:
                return
            self._set_paused(True)
            self.stop_event = (0, signal)
            for runner in self.runners:
                runner.kick()
        self._wake()

    def wait_all_parked(self) -> bool:
        """Block until every live vCPU is parked (True) or the machine ends (False)."""
        with self._cond:
            self._cond.wait_for(lambda: self.ending or self._live <= self._parked)
            return not self.ending

    def resume(self, step: int | None = None) -> None:
        """Let the guest run: every vCPU, or with ``step`` only that vCPU, for one
        instruction (its loop reports the step through :meth:`debug_exit`)."""
        self._apply_debug(step)
        with self._cond:
            if step is not None and step not in self._live:
                self._stopped_locked(step, SIGTRAP)  # its loop has ended: nothing to step
                return
            self.stop_event = None
            self._step = step
            self._set_paused(False)
            self._cond.notify_all()

    def end(self) -> None:
        """The machine is stopping: release every parked vCPU for good."""
        with self._cond:
            self.ending = True
            self._cond.notify_all()
        self._wake()

    def is_live(self, index: int) -> bool:
        with self._cond:
            return index in self._live

    # --- breakpoints -------------------------------------------------------------------
    def insert_breakpoint(self, addr: int) -> bool:
        """Use a free debug register for ``addr`` (True), or False when all four are used."""
        if addr in self.breakpoints:
            return True
        try:
            slot = self.breakpoints.index(None)
        except ValueError:
            return False
        self.breakpoints[slot] = addr
        return True

    def remove_breakpoint(self, addr: int) -> None:
        """Free the debug register holding ``addr`` (nothing if none does)."""
        self.breakpoints = [None if a == addr else a for a in self.breakpoints]

    def resume_detached(self) -> None:
        """gdb detached (or hung up, or killed): forget every breakpoint, turn guest
        debugging off, let the guest run on by itself."""
        self.breakpoints = [None] * HW_BREAKPOINTS
        if self.paused:
            self._apply_debug(None, enabled=False)
        with self._cond:
            self.attached = False  # first: a crash from now on ends the run, as without gdb
            self.stop_event = None
            self._step = None
            self._set_paused(False)
            self._cond.notify_all()

    def _apply_debug(self, step: int | None, *, enabled: bool = True) -> None:
        """KVM_SET_GUEST_DEBUG on each vCPU (all parked, or never started): the debug
        registers with the breakpoints, and single-step for ``step``."""
        used = any(a is not None for a in self.breakpoints)
        debugreg = [a or 0 for a in self.breakpoints] + [0, 0, 0, dr7_for(self.breakpoints)]
        for runner in self.runners:
            control = 0
            if enabled and used:
                control |= abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_USE_HW_BP
            if enabled and step == runner.index:
                control |= abi.KVM_GUESTDBG_ENABLE | self._step_flags
            runner.vcpu.set_guest_debug(control, debugreg if control & abi.KVM_GUESTDBG_USE_HW_BP else ())


def wake_pipe() -> tuple[int, int]:
    """A non-blocking pipe: vCPU threads write a byte, the stub's ``select`` wakes."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    return r, w
