"""The protocol every backend implements, so the machine, devices and loaders do not
care where vCPUs execute (KVM in the kernel, or the in-process emulator)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from vmm.cpu.state import CpuState
from vmm.devices.bus import Bus
from vmm.exits import HALTED, NEVER_STARTED, STOPPED, TRIPLE_FAULT, Debug, Ending, Exit, VcpuOutcome, count_field
from vmm.memory import Backing, GuestMemory, GuestRegion

__all__ = [
    "HALTED",
    "NEVER_STARTED",
    "STOPPED",
    "TRIPLE_FAULT",
    "Backend",
    "DebugHook",
    "Ending",
    "ExitCounts",
    "StopFlag",
    "VcpuOutcome",
    "VcpuRunner",
]


class StopFlag:
    """Set once by the machine (exit request, crash, timeout); read by every vCPU loop
    after each exit. A plain attribute: cheaper than an Event on the hot path."""

    __slots__ = ("requested",)

    def __init__(self) -> None:
        self.requested = False


@dataclass
class ExitCounts:
    """Exits of one vCPU, by kind."""

    io: int = 0
    mmio: int = 0
    hlt: int = 0
    interrupted: int = 0
    other: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        out = {"io": self.io, "mmio": self.mmio, "hlt": self.hlt, "interrupted": self.interrupted, "other": self.other}
        out.update(self.extra)
        return out

    def record(self, exit_: Exit) -> None:
        """Count one exit in its field (:func:`vmm.exits.count_field`)."""
        name = count_field(exit_)
        setattr(self, name, getattr(self, name) + 1)

    @property
    def total(self) -> int:
        return self.io + self.mmio + self.hlt + self.interrupted + self.other


class DebugHook(Protocol):
    """A debugger holding vCPUs (:class:`vmm.gdb.session.DebugSession`); a KVM runner
    calls it when its loop starts and ends, on KVM_EXIT_DEBUG, before it ends in a crash,
    and after a kick while ``paused`` is set. Its methods block while the debugger holds the vCPU."""

    paused: bool

    def enter(self, runner: VcpuRunner) -> None: ...

    def leave(self, runner: VcpuRunner) -> None: ...

    def debug_exit(self, runner: VcpuRunner, exit_: Debug) -> None: ...

    def crashed(self, runner: VcpuRunner) -> None: ...

    def park(self, runner: VcpuRunner) -> None: ...


class VcpuRunner(Protocol):
    """One vCPU of a backend."""

    index: int
    counts: ExitCounts

    def set_state(self, state: CpuState) -> None:
        """Load the boot register state: the vCPU starts there when its loop runs."""

    def park(self) -> None:
        """Instead of ``set_state``: the vCPU waits, as a PC's application processors do,
        for INIT/SIPI from another vCPU's local APIC. Its loop returns ``NEVER_STARTED``
        (a "halted" outcome) once nothing can start it any more."""

    def run_loop(self, bus: Bus, stop: StopFlag) -> VcpuOutcome:
        """Run (on the calling thread) until halt, crash, or ``stop.requested``; port and
        MMIO accesses go to ``bus``. Must return promptly after ``kick()``."""

    def kick(self) -> None:
        """From another thread: make ``run_loop`` notice ``stop`` soon."""

    def regs(self) -> dict[str, int]:
        """General registers (rax..r15, rip, rflags) for reports."""

    def close(self) -> None:
        """Release the vCPU (idempotent)."""


class Backend(Protocol):
    """Where a machine's vCPUs execute."""

    name: str

    @property
    def memory(self) -> GuestMemory:
        """Guest RAM, as loaders and devices see it."""

    def add_ram(self, gpa: int, size: int, backing: Backing) -> GuestRegion:
        """Allocate guest RAM at ``gpa`` and make the vCPUs see it."""

    def create_vcpu(self, index: int) -> VcpuRunner:
        """vCPU ``index``."""

    def close(self) -> None:
        """Release vCPUs, memory and handles (idempotent)."""
