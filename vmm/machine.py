"""``Machine``: memory + devices + vCPUs on a backend; ``run()`` -> :class:`RunResult`.

The build is a recipe in a fixed order (Firecracker's builder), unwound by an
ExitStack on any error; devices are listed here explicitly, never registered by
import side effects. One thread per vCPU runs the backend's loop; the main thread
waits for the first terminal event or the timeout, then stops and kicks the rest.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from vmm.backends import open_backend
from vmm.backends.base import Backend, StopFlag, VcpuOutcome, VcpuRunner
from vmm.bootinfo import write_boot_info
from vmm.config import MachineConfig
from vmm.cpu.layout import BootLayout, CpuMode
from vmm.cpu.state import boot_state, write_system_tables
from vmm.devices import Bus, ExitPort, Marker, PostCode, Serial16550
from vmm.devices.exit_port import EXIT_PORT
from vmm.devices.marker import MARK_PORT
from vmm.devices.post import POST_PORT
from vmm.devices.serial import COM1
from vmm.errors import VmmError
from vmm.loader import ImagePlan, plan_image

log = logging.getLogger("vmm.machine")

STATUS_HALTED = 0
STATUS_BAD_INPUT = 2
STATUS_CRASHED = 4
STATUS_TIMEOUT = 124
STATUS_INTERRUPTED = 130
JOIN_GRACE_SECONDS = 2.0


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

    @property
    def total_exits(self) -> int:
        return sum(sum(v for k, v in e.items() if k != "interrupted") for e in self.exits)

    def summary(self) -> str:
        """One line for a terminal."""
        n = self.vcpus
        return (
            f"{self.reason} (status {self.status}) after {self.seconds:.3f} s on {self.backend}, "
            f"{n} vCPU{'s' if n != 1 else ''}, {self.total_exits} exits"
        )

    def to_json(self) -> dict[str, Any]:
        """The ``vmm run --json`` object."""
        out: dict[str, Any] = {
            "status": self.status,
            "reason": self.reason,
            "console": self.console.decode("utf-8", errors="replace"),
            "vcpus": self.vcpus,
            "exits": self.exits,
            "seconds": round(self.seconds, 6),
            "backend": self.backend,
            "exit_value": self.exit_value,
            "image": self.image,
            "mode": self.mode,
            "marks": [{"ns": ns, "vcpu": cpu, "value": value} for ns, cpu, value in self.marks],
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
        return out


class _StuckVcpus(VmmError):
    """vCPU threads that did not stop within JOIN_GRACE_SECONDS of the end of the run."""

    status = 4


class Console:
    """Collects serial output; optionally streams it live to ``stream``."""

    def __init__(self, stream: IO[bytes] | None = None) -> None:
        self._buf = bytearray()
        self._stream = stream
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            self._buf += data
            if self._stream is not None:
                self._stream.write(data)
                if data.endswith(b"\n"):
                    self._stream.flush()

    def flush(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.flush()

    @property
    def data(self) -> bytes:
        with self._lock:
            return bytes(self._buf)


class Machine:
    """A guest image on a backend. ``Machine(config).run()`` builds, runs, tears down.

    ``console`` receives serial output live (``vmm run`` passes stdout); ``notice`` gets
    one-line messages for the user (the backend fallback). ``before_boot(machine)`` runs
    once everything is built and loaded, before any vCPU starts (tests poke guest RAM or
    drive the kernel there); ``after_run(machine)`` runs after every vCPU stopped, before
    the memory is released (tests inspect guest RAM there).
    """

    def __init__(
        self,
        config: MachineConfig,
        *,
        console: IO[bytes] | None = None,
        notice: Callable[[str], None] | None = None,
        progress: bool = False,
        before_boot: Callable[[Machine], None] | None = None,
        after_run: Callable[[Machine], None] | None = None,
    ) -> None:
        self.config = config
        self.before_boot = before_boot
        self.after_run = after_run
        self.console = Console(console)
        self.notice = notice or (lambda message: log.info("%s", message))
        self.progress = progress
        self.stop = StopFlag()
        self.backend: Backend | None = None
        self.vcpus: list[VcpuRunner] = []
        self.image: ImagePlan | None = None
        self.marker = Marker()
        self.bus = Bus(strict=config.strict)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._exit_value: int | None = None
        self._crash: Crash | None = None
        self._outcomes: dict[int, VcpuOutcome] = {}
        self._prefault_report: Any = None

    # --- building ------------------------------------------------------------------------
    def _build(self, stack: contextlib.ExitStack) -> None:
        cfg = self.config
        ram_ranges = BootLayout.ram_ranges(cfg.mem_bytes)
        # The image is read and checked before any fd or mapping exists: bad input fails
        # first, with nothing to unwind and no backend notice before the error line.
        image = plan_image(
            cfg.image,
            ram_ranges,
            mode=CpuMode(cfg.mode) if cfg.mode else None,
            load_addr=cfg.load_addr,  # type: ignore[arg-type]
            entry=cfg.entry,  # type: ignore[arg-type]
        )
        self.image = image
        backend = open_backend(cfg.backend, self.notice)
        stack.callback(backend.close)
        self.backend = backend
        for gpa, size in ram_ranges:
            backend.add_ram(gpa, size, cfg.memory)  # type: ignore[arg-type]
        if cfg.prefault and cfg.prefault != "none":
            self._prefault_report = self._prefault(backend, ram_ranges)
        memory = backend.memory
        write_system_tables(memory, image.mode)
        image.load(memory)
        write_boot_info(
            memory,
            ram_ranges=ram_ranges,
            nr_vcpus=cfg.vcpus,
            mode=image.mode,
            image_start=image.start,
            image_end=image.end,
            args=cfg.args,
        )
        self._attach_devices()
        for index in range(cfg.vcpus):
            runner = backend.create_vcpu(index)
            self.vcpus.append(runner)
            runner.set_state(boot_state(image.mode, image.entry, index))
        if self.before_boot is not None:
            self.before_boot(self)

    def _attach_devices(self) -> None:
        bus = self.bus
        bus.register_pio(COM1, Serial16550.WIDTH, Serial16550(self.console.write))
        bus.register_pio(EXIT_PORT, 1, ExitPort(self._request_exit))
        bus.register_pio(POST_PORT, 1, PostCode())
        bus.register_pio(MARK_PORT, 1, self.marker)

    def _prefault(self, backend: Backend, ranges: list[tuple[int, int]]) -> Any:
        from vmm.prefault import prefault_backend

        return prefault_backend(
            backend,
            ranges,
            strategy=self.config.prefault or "auto",
            threads=self.config.prefault_threads,
            progress=self.progress,
        )

    # --- events from vCPU threads --------------------------------------------------------
    def _request_exit(self, value: int) -> None:
        with self._lock:
            if self._exit_value is None and self._crash is None:
                self._exit_value = value
        self._stop_all()

    def _record_crash(self, crash: Crash) -> None:
        with self._lock:
            if self._crash is None and self._exit_value is None:
                self._crash = crash
        self._stop_all()

    def _stop_all(self) -> None:
        self.stop.requested = True
        for runner in self.vcpus:
            runner.kick()
        self._done.set()

    def _vcpu_thread(self, runner: VcpuRunner, remaining: list[int]) -> None:
        self.marker.bind_vcpu(runner.index)
        try:
            outcome = runner.run_loop(self.bus, self.stop)
        except VmmError as e:
            outcome = VcpuOutcome("crashed", str(e), None)
        except Exception as e:  # a bug in a device must not hang the machine
            log.exception("vCPU %d loop failed", runner.index)
            outcome = VcpuOutcome("crashed", f"internal error in the VMM: {e!r}", None)
        self._outcomes[runner.index] = outcome
        if outcome.kind == "crashed":
            regs: dict[str, int] = {}
            with contextlib.suppress(Exception):
                regs = runner.regs()
            rip = outcome.rip if outcome.rip is not None else regs.get("rip")
            self._record_crash(Crash(runner.index, outcome.detail, rip, outcome.triple_fault, regs))
        with self._lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                self._done.set()

    # --- running -------------------------------------------------------------------------
    def run(self, timeout: float | None = None) -> RunResult:
        """Build the machine, run it to its end, release everything, return the result.
        ``timeout`` (seconds; None or 0 = the config's) bounds the guest's run time."""
        timeout = self.config.timeout if timeout is None else timeout
        with contextlib.ExitStack() as stack:
            self._build(stack)
            try:
                return self._run_built(timeout or None)
            except _StuckVcpus:
                # A vCPU thread ignored every kick and may still touch guest memory or its
                # kvm_run page: leak them rather than unmap them under its feet.
                stack.pop_all()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _run_built(self, timeout: float | None) -> RunResult:
        remaining = [len(self.vcpus)]
        threads = [
            threading.Thread(target=self._vcpu_thread, args=(r, remaining), name=f"vcpu-{r.index}", daemon=True)
            for r in self.vcpus
        ]
        started = time.monotonic()
        for t in threads:
            t.start()
        timed_out = interrupted = False
        try:
            finished = self._done.wait(timeout)
            timed_out = not finished
        except KeyboardInterrupt:
            interrupted = True
        seconds = time.monotonic() - started
        self._stop_all()
        deadline = time.monotonic() + JOIN_GRACE_SECONDS
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            raise _StuckVcpus(f"vCPU threads did not stop after the run ended: {', '.join(stuck)}")
        self.console.flush()
        if self.after_run is not None:
            self.after_run(self)
        return self._result(seconds, timed_out, interrupted, timeout)

    def _result(self, seconds: float, timed_out: bool, interrupted: bool, timeout: float | None) -> RunResult:
        if self._crash is not None:
            status, reason = STATUS_CRASHED, f"guest crashed: {self._crash.describe()}"
        elif self._exit_value is not None:
            status = exit_status_for_value(self._exit_value)
            reason = f"guest exited with value {self._exit_value}"
        elif interrupted:
            status, reason = STATUS_INTERRUPTED, "interrupted"
        elif timed_out:
            status, reason = STATUS_TIMEOUT, f"timeout after {timeout:g} s"
        else:
            status, reason = STATUS_HALTED, "all vCPUs halted"
        assert self.backend is not None and self.image is not None
        return RunResult(
            status=status,
            reason=reason,
            console=self.console.data,
            vcpus=len(self.vcpus),
            exits=[r.counts.as_dict() for r in self.vcpus],
            seconds=seconds,
            backend=self.backend.name,
            exit_value=self._exit_value,
            crash=self._crash,
            marks=list(self.marker.marks),
            prefault=self._prefault_report,
            image=self.config.image,
            mode=self.image.mode.value,
        )
