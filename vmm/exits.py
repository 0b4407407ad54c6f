"""Typed vCPU exits, how a vCPU's run ends, and the one function that acts on an exit.

``Vcpu.run()`` decodes ``kvm_run`` into one of the exit types below (the only decoder of
that page); the emulator backend expresses what stops its engine as the same exits. Both
backends hand them to :func:`dispatch`, which does what the exit asks of the devices and
says what the run loop does next: run the vCPU again, look at the stop flag, or end with a
:class:`VcpuOutcome`. ``dispatch`` touches no KVM and no engine, so it is tested with
synthetic exits (as Firecracker tests ``handle_kvm_exit``).

Payload views borrow the vCPU's shared page: they are valid until the next ``run()``; copy
with ``bytes()`` to keep them. Exits without data are singletons (compare with ``is``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import TYPE_CHECKING

from kvm_abi import ExitReason
from kvm_abi import InternalError as _Suberror
from kvm_abi import SystemEvent as _SysEvent

if TYPE_CHECKING:
    from vmm.devices.bus import Bus


@dataclass(slots=True)
class IoOut:
    """OUT/OUTS: ``count`` items of ``size`` bytes in ``data``, for ``port``."""

    port: int
    size: int
    count: int
    data: memoryview


@dataclass(slots=True)
class IoIn:
    """IN/INS: fill ``data`` (``count`` items of ``size`` bytes) before the next run()."""

    port: int
    size: int
    count: int
    data: memoryview


@dataclass(slots=True)
class MmioRead:
    """A load from an address no memslot backs: fill ``data`` before the next run()."""

    addr: int
    data: memoryview


@dataclass(slots=True)
class MmioWrite:
    """A store to an address no memslot backs."""

    addr: int
    data: memoryview


class _Singleton:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


HLT = _Singleton("HLT")
"""The vCPU executed HLT with interrupts it cannot take (no in-kernel irqchip)."""
SHUTDOWN = _Singleton("SHUTDOWN")
"""Triple fault: the CPU shut down."""
INTERRUPTED = _Singleton("INTERRUPTED")
"""run() returned early because of a kick (signal + immediate_exit) or a pending signal."""


@dataclass(slots=True)
class FailEntry:
    """KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest."""

    reason: int
    cpu: int

    def describe(self) -> str:
        return f"VM entry failed (hardware reason {self.reason:#x} on host cpu {self.cpu})"


@dataclass(slots=True)
class InternalError:
    """KVM_EXIT_INTERNAL_ERROR with the suberror and data decoded."""

    suberror: int
    data: tuple[int, ...]
    insn_bytes: bytes = b""

    def describe(self) -> str:
        try:
            what = {
                _Suberror.EMULATION: "instruction emulation failed",
                _Suberror.SIMUL_EX: "exception while delivering an exception",
                _Suberror.DELIVERY_EV: "event delivery failed",
                _Suberror.UNEXPECTED_EXIT_REASON: "unexpected exit reason",
            }[_Suberror(self.suberror)]
        except ValueError:
            what = "unknown suberror"
        text = f"KVM internal error: {what} (suberror {self.suberror})"
        if self.insn_bytes:
            text += f", instruction bytes {self.insn_bytes.hex(' ')}"
        elif self.data:
            text += ", data " + " ".join(f"{d:#x}" for d in self.data)
        return text


@dataclass(slots=True)
class SystemEvent:
    """KVM_EXIT_SYSTEM_EVENT: shutdown, reset, crash, ..."""

    type: int
    data: tuple[int, ...]

    def describe(self) -> str:
        try:
            name = _SysEvent(self.type).name.lower()
        except ValueError:
            name = f"type {self.type}"
        return f"system event: {name}"


@dataclass(slots=True)
class MemoryFault:
    """KVM_EXIT_MEMORY_FAULT (delivered with EFAULT/EHWPOISON from KVM_RUN)."""

    flags: int
    gpa: int
    size: int

    def describe(self) -> str:
        return f"memory fault at gpa {self.gpa:#x} size {self.size:#x} flags {self.flags:#x}"


@dataclass(slots=True)
class Debug:
    """KVM_EXIT_DEBUG: a debug exception with guest debugging enabled (a hardware
    breakpoint or a single step: vector 1, DR6 says which; a software one: vector 3)."""

    exception: int
    pc: int
    dr6: int = field(default=0, compare=False)

    def describe(self) -> str:
        return f"debug exit (vector {self.exception}) at {self.pc:#x} with no debugger attached"


@dataclass(slots=True)
class RunFailed:
    """KVM_RUN failed with an errno that is neither a kick (EINTR, EAGAIN) nor a memory
    fault: the vCPU cannot run on."""

    errno: int
    detail: str

    def describe(self) -> str:
        return self.detail


@dataclass(slots=True)
class Unsupported:
    """An exit reason this VMM does not handle; not an exception by itself."""

    reason: int

    def describe(self) -> str:
        try:
            name = ExitReason(self.reason).name
        except ValueError:
            name = "unknown"
        return f"unhandled exit reason {self.reason} ({name})"


Exit = (
    IoOut
    | IoIn
    | MmioRead
    | MmioWrite
    | _Singleton
    | FailEntry
    | InternalError
    | SystemEvent
    | MemoryFault
    | Debug
    | RunFailed
    | Unsupported
)


# --- how a run ends --------------------------------------------------------------------


class Ending(StrEnum):
    """How a vCPU's run loop ended (a str, so reports and JSON print its value)."""

    HALTED = "halted"
    """HLT with nothing left to wake the vCPU, or a vCPU that never started."""
    STOPPED = "stopped"
    """The machine asked (exit request, another vCPU's crash, timeout)."""
    CRASHED = "crashed"
    """Triple fault, internal error, failed entry, unhandled exit, an undeliverable fault."""


@dataclass(frozen=True, slots=True)
class VcpuOutcome:
    """How a vCPU's run loop ended: ``kind``, what happened (``detail``) and, when known,
    where (``rip``)."""

    kind: Ending
    detail: str = ""
    rip: int | None = None
    triple_fault: bool = False

    def at(self, rip: int | None) -> VcpuOutcome:
        """The same outcome, located at ``rip``."""
        return VcpuOutcome(self.kind, self.detail, rip, self.triple_fault)


HALTED = VcpuOutcome(Ending.HALTED, "halted")
NEVER_STARTED = VcpuOutcome(Ending.HALTED, "never started (waited for INIT/SIPI)")
STOPPED = VcpuOutcome(Ending.STOPPED, "stopped")
TRIPLE_FAULT = VcpuOutcome(Ending.CRASHED, "triple fault (shutdown)", triple_fault=True)


def crashed(detail: str, rip: int | None = None) -> VcpuOutcome:
    """A crash outcome."""
    return VcpuOutcome(Ending.CRASHED, detail, rip)


# --- dispatch --------------------------------------------------------------------------


class Next(Enum):
    """What the run loop does after an exit that does not end the run."""

    RUN = "run"
    """Handled: enter the guest again."""
    CHECK_STOP = "check-stop"
    """A kick or a signal: end if the machine asked (the stop flag), else run again."""


def dispatch(bus: Bus, exit_: Exit) -> Next | VcpuOutcome:
    """Act on one exit: port and MMIO accesses go to ``bus`` (an MMIO read's data is zeroed
    first: KVM leaves the previous exit's bytes there, and a device may fill only part of
    it); every other exit ends the run, or asks the loop to look at its stop flag. The
    outcome has no RIP: the backend knows where the vCPU is."""
    if type(exit_) is IoOut:
        bus.pio_write(exit_.port, exit_.size, exit_.data)
        return Next.RUN
    if type(exit_) is IoIn:
        bus.pio_read(exit_.port, exit_.size, exit_.data)
        return Next.RUN
    if type(exit_) is MmioWrite:
        bus.mmio_write(exit_.addr, exit_.data)
        return Next.RUN
    if type(exit_) is MmioRead:
        exit_.data[:] = bytes(len(exit_.data))
        bus.mmio_read(exit_.addr, exit_.data)
        return Next.RUN
    return ending(exit_)


def ending(exit_: Exit) -> Next | VcpuOutcome:
    """The outcome of an exit that is not a device access (see :func:`dispatch`)."""
    if exit_ is INTERRUPTED:
        return Next.CHECK_STOP
    if exit_ is HLT:
        return HALTED
    if exit_ is SHUTDOWN:
        return TRIPLE_FAULT
    if isinstance(exit_, SystemEvent):
        kind = Ending.CRASHED if exit_.type == _SysEvent.CRASH else Ending.HALTED
        return VcpuOutcome(kind, exit_.describe())
    if isinstance(exit_, FailEntry | InternalError | SystemEvent | MemoryFault | Debug | RunFailed | Unsupported):
        return crashed(exit_.describe())
    return crashed(f"unexpected exit {exit_!r}")


def count_field(exit_: Exit) -> str:
    """The :class:`~vmm.backends.base.ExitCounts` field an exit counts in."""
    kind = type(exit_)
    if kind is IoOut or kind is IoIn:
        return "io"
    if kind is MmioRead or kind is MmioWrite:
        return "mmio"
    if exit_ is HLT:
        return "hlt"
    if exit_ is INTERRUPTED:
        return "interrupted"
    return "other"
