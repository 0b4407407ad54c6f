"""What a run produced (:class:`RunResult`), the exit statuses (DESIGN.md), and the
console buffer a guest fills (bounded)."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

STATUS_HALTED = 0
STATUS_RESET = 0  # as QEMU with -no-reboot: a guest reset ends the run like a power-off
STATUS_BAD_INPUT = 2
STATUS_CRASHED = 4
STATUS_TIMEOUT = 124
STATUS_INTERRUPTED = 130
STATUS_BROKEN_PIPE = 141
CONSOLE_LIMIT = 16 << 20  # bytes of console kept in memory; the stream still gets them all


def exit_status_for_value(value: int) -> int:
    """The process exit status for a value written to the exit port: (v << 1) | 1, as an
    8-bit status (QEMU's isa-debug-exit convention)."""
    return ((value << 1) | 1) & 0xFF


@dataclass
class Crash:
    """Where and how a vCPU crashed."""

    vcpu: int
    detail: str
    rip: int | None
    triple_fault: bool = False
    regs: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        where = f" at rip {self.rip:#x}" if self.rip is not None else ""
        return f"vCPU {self.vcpu}: {self.detail}{where}"


def run_status(
    end: tuple[str, Any] | None, *, interrupted: bool, timed_out: bool, idle: bool, timeout: float | None
) -> tuple[int, str]:
    """The status and reason of a run, a pure function of how it ended: ``end`` is the first
    terminal event, ``(kind, detail)`` (``exit`` value, ``crash`` Crash, ``reset`` source,
    ``gdb-kill``, ``quit``, ``broken-pipe``), or None when the run ended otherwise: a Ctrl-C
    (``interrupted``), the timeout (``timed_out``, unless every vCPU had halted for good:
    ``idle``), or every vCPU halting."""
    if end is not None:
        kind, detail = end
        if kind == "crash":
            return STATUS_CRASHED, f"guest crashed: {detail.describe()}"
        if kind == "exit":
            return exit_status_for_value(detail), f"guest exited with value {detail}"
        if kind == "reset":
            return STATUS_RESET, f"guest reset the machine ({detail})"
        if kind == "gdb-kill":
            return STATUS_HALTED, "killed from gdb"
        if kind == "quit":
            return STATUS_INTERRUPTED, f"stopped from the console ({detail})"
        if kind == "broken-pipe":
            return STATUS_BROKEN_PIPE, "stopped: the console's reader went away (broken pipe)"
    if interrupted:
        return STATUS_INTERRUPTED, "interrupted"
    if timed_out and not idle:
        return STATUS_TIMEOUT, f"timeout after {timeout:g} s"
    return STATUS_HALTED, "all vCPUs halted"


@dataclass
class RunResult:
    """What a run produced. ``status`` is the process exit status (DESIGN.md)."""

    status: int
    reason: str
    console: bytes
    vcpus: int
    exits: list[dict[str, int]]
    seconds: float
    backend: str
    exit_value: int | None = None
    crash: Crash | None = None
    marks: list[tuple[int, int, int]] = field(default_factory=list)
    prefault: Any = None
    image: str = ""
    mode: str = ""
    console_dropped: int = 0
    marks_dropped: int = 0
    console_error: str | None = None
    faults: list[dict[str, int]] | None = None  # --count-faults: per vCPU, by event and "faults"
    run_started_ns: int | None = None  # time.monotonic_ns() when the vCPUs started (the marks' clock)

    @property
    def first_mark_seconds(self) -> float | None:
        """Seconds from the start of the run to the guest's first write of the marker port
        (a Linux /init that writes it first thing: the time to init), or None."""
        if not self.marks or self.run_started_ns is None:
            return None
        return max(0, self.marks[0][0] - self.run_started_ns) / 1e9

    @property
    def total_exits(self) -> int:
        return sum(sum(v for k, v in e.items() if k != "interrupted") for e in self.exits)

    def summary(self) -> str:
        """One line for a terminal."""
        n = self.vcpus
        line = (
            f"{self.reason} (status {self.status}) after {self.seconds:.3f} s on {self.backend}, "
            f"{n} vCPU{'s' if n != 1 else ''}, {self.total_exits} exits"
        )
        if self.console_dropped:
            line += f"; {self.console_dropped} console bytes beyond {CONSOLE_LIMIT >> 20} MiB not kept"
        if self.marks_dropped:
            line += f"; {self.marks_dropped} marks dropped"
        first = self.first_mark_seconds
        if first is not None:
            line += f"; first mark after {first:.3f} s"
        if self.faults is not None:
            line += "; KVM page faults per vCPU: " + ", ".join(str(f.get("faults", 0)) for f in self.faults)
        return line

    def to_json(self) -> dict[str, Any]:
        """The ``vmm run --json`` object (schema ``vmm/schema/run.json``)."""
        from vmm.schema import SCHEMA_VERSION

        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "status": self.status,
            "reason": self.reason,
            "console": self.console.decode("utf-8", errors="replace"),
            "console_dropped": self.console_dropped,
            "vcpus": self.vcpus,
            "exits": self.exits,
            "seconds": round(self.seconds, 6),
            "backend": self.backend,
            "exit_value": self.exit_value,
            "image": self.image,
            "mode": self.mode,
            "marks": [{"ns": ns, "vcpu": cpu, "value": value} for ns, cpu, value in self.marks],
            "marks_dropped": self.marks_dropped,
            "first_mark_seconds": None if self.first_mark_seconds is None else round(self.first_mark_seconds, 6),
        }
        if self.crash is not None:
            out["crash"] = {
                "vcpu": self.crash.vcpu,
                "detail": self.crash.detail,
                "rip": self.crash.rip,
                "triple_fault": self.crash.triple_fault,
                "regs": self.crash.regs,
            }
        if self.prefault is not None:
            out["prefault"] = self.prefault.to_json()
        if self.faults is not None:
            out["faults"] = self.faults
        return out


class Console:
    """Collects serial output (at most ``limit`` bytes kept; the rest counted in
    ``dropped``) and streams it live to ``stream``. A stream that fails stops being
    written: ``on_broken()`` is called for EPIPE (its reader went away), and any other
    error is kept in ``error`` for the caller to report; the guest never sees either."""

    def __init__(
        self,
        stream: IO[bytes] | None = None,
        *,
        limit: int = CONSOLE_LIMIT,
        on_broken: Callable[[], None] | None = None,
    ) -> None:
        self._buf = bytearray()
        self._stream = stream
        self._limit = limit
        self._on_broken = on_broken
        self._lock = threading.Lock()
        self.dropped = 0
        self.broken = False
        self.error: str | None = None

    def write(self, data: bytes) -> None:
        with self._lock:
            room = self._limit - len(self._buf)
            if room >= len(data):
                self._buf += data
            else:
                self._buf += data[: max(room, 0)]
                self.dropped += len(data) - max(room, 0)
            if self._stream is not None:
                try:
                    self._stream.write(data)
                    if data.endswith(b"\n"):
                        self._stream.flush()
                except (OSError, ValueError) as e:
                    self._failed(e)

    def flush(self) -> None:
        with self._lock:
            if self._stream is not None:
                try:
                    self._stream.flush()
                except (OSError, ValueError) as e:
                    self._failed(e)

    def _failed(self, e: BaseException) -> None:
        self._stream = None
        if isinstance(e, OSError) and e.errno == errno.EPIPE:
            self.broken = True
            if self._on_broken is not None:
                self._on_broken()
        else:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            self.error = f"cannot write the guest's console to its stream: {reason}"

    @property
    def data(self) -> bytes:
        with self._lock:
            return bytes(self._buf)
