"""``Machine``: memory + platform + devices + vCPUs on a backend; ``run()`` -> :class:`RunResult`.

The build is a recipe in a fixed order (Firecracker's builder), unwound by an
ExitStack on any error; devices are listed here explicitly, never registered by
import side effects. One thread per vCPU runs the backend's loop; the main thread
waits for the first terminal event or the timeout, then stops and kicks the rest.

Images that follow PC conventions (Linux, Multiboot kernels, flat real-mode images) start
the way a PC does: only vCPU 0 runs at the entry; the others wait in their local APIC for
INIT/SIPI. The project's own ELF contract starts every vCPU at the entry.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

from vmm import machine_extras as extras
from vmm.backends import open_backend
from vmm.backends.base import Backend, StopFlag, VcpuOutcome, VcpuRunner
from vmm.bootinfo import write_boot_info
from vmm.config import MachineConfig
from vmm.console_input import ESCAPE_QUIT, ConsoleInput, InputQueue
from vmm.cpu.layout import BootLayout, CpuMode
from vmm.cpu.state import CpuState, boot_state, pc_boot_state, write_system_tables
from vmm.devices import Bus, Marker
from vmm.errors import VmmError
from vmm.exits import Ending, crashed
from vmm.loader import ImagePlan, plan_image
from vmm.platform.devices import attach_pc_devices, load_fw_cfg_files
from vmm.result import (
    STATUS_BROKEN_PIPE,
    STATUS_CRASHED,
    STATUS_HALTED,
    STATUS_INTERRUPTED,
    STATUS_TIMEOUT,
    Console,
    Crash,
    RunResult,
    exit_status_for_value,
    run_status,
)

__all__ = [
    "STATUS_BROKEN_PIPE",
    "STATUS_CRASHED",
    "STATUS_HALTED",
    "STATUS_INTERRUPTED",
    "STATUS_TIMEOUT",
    "Crash",
    "Machine",
    "RunResult",
    "exit_status_for_value",
]

log = logging.getLogger("vmm.machine")

JOIN_GRACE_SECONDS = 2.0
GDB_TIMEOUT_POLL = 0.25  # how often the timeout is re-read while a gdb stub may hold the guest


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Block SIGINT in this thread (threads started meanwhile inherit the mask, so they never
    take it: Python runs handlers on the main thread anyway), then restore the mask, which
    delivers a SIGINT that arrived meanwhile."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _is_linux(image: ImagePlan) -> bool:
    """A Linux plan (without importing the Linux loader when no Linux plan exists)."""
    linux = sys.modules.get("vmm.loader.linux")
    return linux is not None and isinstance(image, linux.LinuxPlan)


def _pc_state(image: ImagePlan) -> CpuState:
    """vCPU 0's state at a PC-convention image's entry. The Linux loader (and the platform
    tables it pulls in) is imported only when a Linux plan exists, so only then."""
    linux = sys.modules.get("vmm.loader.linux")
    if linux is not None and isinstance(image, linux.LinuxPlan):
        state: CpuState = linux.linux_boot_state(image)
        return state
    return pc_boot_state(image)


class _StuckVcpus(VmmError):
    """vCPU threads that did not stop within JOIN_GRACE_SECONDS of the end of the run."""

    status = 4


class Machine:
    """A guest image on a backend. ``Machine(config).run()`` builds, runs, tears down.

    ``console`` receives serial output live (``vmm run`` passes stdout); ``notice`` gets
    one-line messages for the user (the backend fallback). ``before_boot(machine)`` runs
    once everything is built and loaded, before any vCPU starts (tests poke guest RAM or
    drive the kernel there); ``after_run(machine)`` runs after every vCPU stopped, before
    the memory is released (tests inspect guest RAM there). ``console_input`` is an fd
    whose bytes go to COM1's receive side as they arrive (``vmm run`` passes stdin);
    ``escape`` turns on Ctrl-A x (stop the run) on it (:mod:`vmm.console_input`).
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
        console_input: int | None = None,
        escape: bool = False,
    ) -> None:
        self.config = config
        self.before_boot = before_boot
        self.after_run = after_run
        self.console = Console(console, on_broken=self._console_broken)
        self.notice = notice or (lambda message: log.info("%s", message))
        self.progress = progress
        self.stop = StopFlag()
        self.backend: Backend | None = None
        self._run_started_ns: int | None = None
        self.vcpus: list[VcpuRunner] = []
        self.image: ImagePlan | None = None
        self.marker = Marker()
        self.bus = Bus(strict=config.strict)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._end: tuple[str, Any] | None = None  # the first terminal event: (kind, detail)
        self._outcomes: dict[int, VcpuOutcome] = {}
        self._prefault_report: Any = None
        self._faults: Any = None  # a vmm.faults.FaultCounter with --count-faults
        self._vcpu_tids: dict[int, int] = {}
        self._fault_counts: list[dict[str, int]] | None = None
        self.gdb: Any = None  # a vmm.gdb.stub.GdbStub with --gdb
        self._input_fd = console_input
        self._escape = escape
        self._input: ConsoleInput | None = None

    # --- building ------------------------------------------------------------------------
    def _build(self, stack: contextlib.ExitStack) -> None:
        cfg = self.config
        ram_ranges = BootLayout.ram_ranges(cfg.mem_bytes)
        # The image, its modules and fw_cfg files are read and checked before any fd or
        # mapping exists: bad input fails first, with nothing to unwind.
        image = plan_image(
            cfg.image,
            ram_ranges,
            mode=cfg.mode,
            load_addr=cfg.load_addr,
            entry=cfg.entry,
            cmdline=cfg.append,
            modules=cfg.modules,
            initrd=cfg.initrd,
            nr_vcpus=cfg.vcpus,
        )
        self.image = image
        log.debug("image %s: %s, %s mode, entry %#x, at %#x-%#x", *_plan_facts(image))
        fw_cfg_files = load_fw_cfg_files(cfg.fw_cfg, self.notice)
        backend = open_backend(cfg.backend, self.notice, irqchip=cfg.irqchip)
        stack.callback(backend.close)
        self.backend = backend
        log.info("backend %s (asked: %s), %d vCPU(s)", backend.name, cfg.backend, cfg.vcpus)
        for gpa, size in ram_ranges:
            backend.add_ram(gpa, size, cfg.memory)
        log.debug("guest RAM %d MiB, %s: %s", cfg.mem_bytes >> 20, cfg.memory.value, _ranges(ram_ranges))
        if cfg.prefault and cfg.prefault != "none":
            self._prefault_report = self._prefault(backend, ram_ranges)
        if cfg.count_faults:
            self._faults = extras.fault_counter(backend, stack)
        memory = backend.memory
        if image.pc:
            image.load(memory)  # the plan holds its own boot structures
        else:
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
        queue = InputQueue() if self._input_fd is not None else None
        serial = attach_pc_devices(
            self.bus,
            memory=memory,
            console=self.console.write,
            marker=self.marker,
            request_exit=self._request_exit,
            request_reset=self._request_reset,
            ram_size=cfg.mem_bytes,
            nr_vcpus=cfg.vcpus,
            fw_cfg_files=fw_cfg_files,
            interrupt_line=getattr(backend, "interrupt_line", None),
            serial_input=queue,
        )
        coalesce = getattr(backend, "coalesce", None)
        if coalesce is not None and cfg.coalesce:
            coalesce(self.bus.coalesce_ports(cfg.coalesce))
        if queue is not None and self._input_fd is not None:
            self._input = ConsoleInput(
                self._input_fd,
                queue,
                serial.pull,
                escape=self._escape,
                on_quit=lambda: self._finish("quit", ESCAPE_QUIT),
            )
            stack.callback(self._input.stop)
        check_xsave = getattr(backend, "check_xsave", None)
        if check_xsave is not None and _is_linux(image):
            note = check_xsave()
            if note:
                self.notice(note)
        pc_smp = image.pc or image.mode is CpuMode.REAL
        for index in range(cfg.vcpus):
            runner = backend.create_vcpu(index)
            self.vcpus.append(runner)
            if index and pc_smp:
                runner.park()  # an application processor: waits for INIT/SIPI
            elif image.pc:
                runner.set_state(_pc_state(image))
            else:
                runner.set_state(boot_state(image.mode, image.entry, index))
        if cfg.gdb is not None:
            self.gdb = extras.gdb_stub(
                backend, self.vcpus, cfg, kill=lambda: self._finish("gdb-kill", None), notice=self.notice, stack=stack
            )
        if self.before_boot is not None:
            self.before_boot(self)

    def _prefault(self, backend: Backend, ranges: list[tuple[int, int]]) -> Any:
        return extras.prefault_ram(backend, ranges, self.config, progress=self.progress)

    # --- events from vCPU threads (and devices) ------------------------------------------
    def _finish(self, kind: str, detail: Any) -> None:
        """Record the run's end (the first event wins) and stop every vCPU."""
        with self._lock:
            if self._end is None:
                self._end = (kind, detail)
        self._stop_all()

    def _request_exit(self, value: int) -> None:
        self._finish("exit", value)

    def _request_reset(self, source: str = "reset") -> None:
        self._finish("reset", source)

    def _console_broken(self) -> None:
        self._finish("broken-pipe", None)

    def _stop_all(self) -> None:
        self.stop.requested = True
        for runner in self.vcpus:
            runner.kick()
        if self.gdb is not None:
            # After the kicks: a vCPU parked by gdb goes back to its loop with immediate_exit
            # set, so its next KVM_RUN returns at once and it sees `stop`, running nothing.
            self.gdb.session.end()
        self._done.set()

    def _vcpu_thread(self, runner: VcpuRunner, remaining: list[int]) -> None:
        self.marker.bind_vcpu(runner.index)
        try:
            if self._faults is not None:
                tid = threading.get_native_id()
                self._vcpu_tids[runner.index] = tid
                self._faults.add_tid(tid)
            outcome = runner.run_loop(self.bus, self.stop)
        except VmmError as e:
            outcome = crashed(str(e), None)
        except Exception as e:  # a bug in a device must not hang the machine
            log.exception("vCPU %d loop failed", runner.index)
            outcome = crashed(f"internal error in the VMM: {e!r}", None)
        self._outcomes[runner.index] = outcome
        if outcome.kind is Ending.CRASHED:
            regs: dict[str, int] = {}
            with contextlib.suppress(Exception):
                regs = runner.regs()
            rip = outcome.rip if outcome.rip is not None else regs.get("rip")
            self._finish("crash", Crash(runner.index, outcome.detail, rip, outcome.triple_fault, regs))
        with self._lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                self._done.set()

    # --- running -------------------------------------------------------------------------
    def run(self, timeout: float | None = None) -> RunResult:
        """Build the machine, run it to its end, release everything, return the result.
        ``timeout`` (seconds; None = the config's, 0 = none) bounds the guest's run time,
        counted from the moment the first vCPU thread starts (building and pre-population
        are not the guest's time)."""
        from vmm.config import parse_timeout

        limit = self.config.timeout if timeout is None else parse_timeout(timeout)
        with contextlib.ExitStack() as stack:
            self._build(stack)
            result = self._run_built(stack, limit or None)
            if self.gdb is not None:
                self.gdb.finish(result.status)  # a gdb waiting on `continue` hears how it ended
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _run_built(self, stack: contextlib.ExitStack, timeout: float | None) -> RunResult:
        remaining = [len(self.vcpus)]
        threads = [
            threading.Thread(target=self._vcpu_thread, args=(r, remaining), name=f"vcpu-{r.index}", daemon=True)
            for r in self.vcpus
        ]
        timed_out = interrupted = idle = False
        run_started = time.monotonic()
        self._run_started_ns = time.monotonic_ns()  # the marker's clock: time to the first mark
        try:
            # A Ctrl-C inside Thread.start() would leave a thread that starts after teardown
            # released its vCPU: hold SIGINT until every thread runs (it is delivered then).
            with _sigint_held():
                if self.gdb is not None:
                    self.gdb.start()
                for t in threads:
                    t.start()
            if self._input is not None:
                self._input.start()
            timed_out, idle = self._wait(threads, run_started, timeout)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            seconds = time.monotonic() - run_started
            self._stop_all()
            deadline = time.monotonic() + JOIN_GRACE_SECONDS
            for t in threads:
                if t.ident is not None:
                    t.join(max(0.0, deadline - time.monotonic()))
            stuck = [t.name for t in threads if t.is_alive()]
            if stuck:
                # A vCPU thread ignored every kick and may still touch guest memory or its
                # kvm_run page: leak them rather than unmap them under its feet.
                stack.pop_all()
                raise _StuckVcpus(f"vCPU threads did not stop after the run ended: {', '.join(stuck)}")
        self.console.flush()
        if self._faults is not None:
            counts = self._faults.stop()
            self._fault_counts = [counts.get(self._vcpu_tids.get(r.index, -1), {}) for r in self.vcpus]
        if self.after_run is not None:
            self.after_run(self)
        result = self._result(seconds, timed_out, interrupted, idle, timeout)
        exits = "; ".join(" ".join(f"{k}={v}" for k, v in e.items() if v) or "none" for e in result.exits)
        log.info("%s after %.3f s; exits per vCPU: %s", result.reason, seconds, exits)
        return result

    def _wait(self, threads: list[threading.Thread], started: float, timeout: float | None) -> tuple[bool, bool]:
        """Wait for the end: (timed out, every vCPU halted for good as the idle watch saw)."""
        assert self.backend is not None
        watch_for = getattr(self.backend, "idle_watch", None)
        watch = watch_for(self.vcpus) if watch_for is not None else None
        deadline = None if timeout is None else started + timeout
        gdb = self.gdb.session if self.gdb is not None else None
        while True:
            step: float | None = None
            if deadline is not None:
                # The timeout counts the guest's time only: not while gdb holds it stopped.
                held = gdb.paused_seconds() if gdb is not None else 0.0
                step = deadline + held - time.monotonic()
                if step <= 0:
                    return not self._done.is_set(), False
                if gdb is not None:
                    step = min(step, GDB_TIMEOUT_POLL)
            if watch is not None and gdb is not None and gdb.paused:
                step = GDB_TIMEOUT_POLL if step is None else min(step, GDB_TIMEOUT_POLL)
                if self._done.wait(step):
                    return False, False
                continue  # vCPUs held by gdb are not halted
            if watch is not None:
                step = watch.interval if step is None else min(step, watch.interval)
            if self._done.wait(step):
                return False, False
            if watch is not None:
                live = {r.index: t for r, t in zip(self.vcpus, threads, strict=True) if r.index not in self._outcomes}
                if watch.all_halted(live):
                    return False, True

    def _result(
        self, seconds: float, timed_out: bool, interrupted: bool, idle: bool, timeout: float | None
    ) -> RunResult:
        assert self.backend is not None and self.image is not None
        status, reason = run_status(self._end, interrupted=interrupted, timed_out=timed_out, idle=idle, timeout=timeout)
        kind, detail = self._end if self._end is not None else ("", None)
        return RunResult(
            status=status,
            reason=reason,
            console=self.console.data,
            vcpus=len(self.vcpus),
            exits=[r.counts.as_dict() for r in self.vcpus],
            seconds=seconds,
            backend=self.backend.name,
            exit_value=detail if kind == "exit" else None,
            crash=detail if kind == "crash" else None,
            marks=list(self.marker.marks),
            run_started_ns=self._run_started_ns,
            prefault=self._prefault_report,
            image=self.config.image,
            mode=self.image.mode.value,
            console_dropped=self.console.dropped,
            marks_dropped=getattr(self.marker, "dropped", 0),
            console_error=self.console.error,
            faults=self._fault_counts,
        )


def _plan_facts(image: ImagePlan) -> tuple[str, str, str, int, int, int]:
    return image.path, image.format, image.mode.value, image.entry, image.start, image.end


def _ranges(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"{gpa:#x}-{gpa + size:#x}" for gpa, size in ranges)
