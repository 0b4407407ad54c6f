"""Typed vCPU exits, shared by both backends.

``Vcpu.run()`` (and the emulator's vCPU) return one of these. Payload views borrow
the vCPU's shared page: they are valid until the next ``run()``; copy with
``bytes()`` to keep them. Exits without data are singletons (compare with ``is``).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvm_abi import ExitReason
from kvm_abi import InternalError as _Suberror
from kvm_abi import SystemEvent as _SysEvent


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
    """KVM_EXIT_DEBUG: a debug exception with guest debugging enabled."""

    exception: int
    pc: int


@dataclass(slots=True)
class GuestFault:
    """A fault the vCPU could not deliver (the emulator's invalid opcode, unmapped fetch, ...)."""

    what: str
    rip: int

    def describe(self) -> str:
        return f"{self.what} at rip {self.rip:#x}"


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
    | GuestFault
    | Unsupported
)
