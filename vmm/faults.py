"""Count the page faults KVM handles for chosen threads, through tracefs.

What is counted (arch/x86/kvm/trace.h and mmu/mmutrace.h):

``kvm_page_fault`` (kvm)
    One per VM exit that KVM handles as a guest page fault: an NPF (AMD) or EPT violation
    (Intel) on a two-dimensional-paging host, an intercepted guest #PF under shadow paging.
    This is the fault a guest's first touch of an unmapped page takes.  PVM's exit path
    does not emit it.
``kvm_mmu_spte_requested`` (kvmmmu)
    The MMU's slow path is about to install a leaf SPTE for a fault (gfn, pfn, level): one
    per mapping made, on every MMU (TDP, shadow, PVM).  KVM_PRE_FAULT_MEMORY goes through the
    same path, so it fires on the thread that pre-faults too.
``fast_page_fault`` (kvmmmu)
    The lockless fast path looked at a fault on a present SPTE (write-protection, access
    tracking), whether it fixed it or fell back to the slow path.

The headline figure, ``faults``, is the larger of the first two: on a host that traces its
page-fault exits every mapping made during a run follows one of them, and where the exits
are not traced (PVM) the mappings are what is left to count.

How: a private tracefs *instance* per (thread, event), created under ``instances/`` and
removed again, so other tracers' buffers and settings are never touched.  Its
``set_event_pid`` keeps only the chosen threads (or a whole process and the threads it
starts, with ``event-fork``), and the count is read from the ring buffer's own statistics
(entries + overrun + read, per CPU): exact however many events arrive, with a buffer of two
pages per CPU and no event ever parsed.  Nothing happens at import; a counter costs only
while it exists.

>>> with FaultCounter(tids=[tid]) as counter:             # doctest: +SKIP
...     run_the_guest()
>>> counter.counts[tid]["faults"]                           # doctest: +SKIP
65541
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from vmm.devices.marker import MAX_MARKS, Marker
from vmm.errors import Unavailable

log = logging.getLogger("vmm.faults")

TRACEFS_MOUNT = Path("/sys/kernel/tracing")
#: Where older setups reach tracefs (debugfs automounts it there).
TRACEFS_PATHS = (TRACEFS_MOUNT, Path("/sys/kernel/debug/tracing"))
PAGE_FAULT = "kvm/kvm_page_fault"
SPTE_REQUESTED = "kvmmmu/kvm_mmu_spte_requested"
FAST_PAGE_FAULT = "kvmmmu/fast_page_fault"
#: The events a counter counts by default ("system/event" under ``events/``).
EVENTS = (PAGE_FAULT, SPTE_REQUESTED, FAST_PAGE_FAULT)
#: The events the headline figure comes from; at least one must exist.
HEADLINE_EVENTS = (PAGE_FAULT, SPTE_REQUESTED)
INSTANCE_PREFIX = "vmm-faults-"
#: The ring buffer's smallest size (the kernel rounds it up to two pages per CPU).
BUFFER_KB = 4
MOUNT_TIMEOUT = 10.0

_counter_ids = itertools.count()


class FaultCountingUnavailable(Unavailable):
    """This host cannot count KVM's page faults; the message says why."""


def event_name(event: str) -> str:
    """``"kvm/kvm_page_fault"`` -> ``"kvm_page_fault"`` (the key in :attr:`FaultCounter.counts`)."""
    return event.rsplit("/", 1)[-1]


def headline(counts: Mapping[str, int]) -> int:
    """The ``faults`` figure of one thread's per-event counts (see the module docstring)."""
    return max((counts.get(event_name(e), 0) for e in HEADLINE_EVENTS), default=0)


def _is_tracefs(path: Path) -> bool:
    return (path / "instances").is_dir() and (path / "events").is_dir()


def _mount_tracefs() -> str | None:
    """Mount tracefs at its usual place; None on success, else why not."""
    if not TRACEFS_MOUNT.is_dir():
        return f"{TRACEFS_MOUNT} does not exist (a kernel without CONFIG_TRACING, or no sysfs)"
    if os.geteuid() != 0:
        return f"tracefs is not mounted at {TRACEFS_MOUNT} and mounting it needs root"
    try:
        proc = subprocess.run(
            ["mount", "-t", "tracefs", "nodev", str(TRACEFS_MOUNT)],
            capture_output=True,
            text=True,
            timeout=MOUNT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"tracefs is not mounted at {TRACEFS_MOUNT} and mount(8) failed: {e}"
    if proc.returncode != 0 or not _is_tracefs(TRACEFS_MOUNT):
        why = (proc.stderr or proc.stdout).strip().splitlines()
        return f"tracefs is not mounted at {TRACEFS_MOUNT} and mounting it failed: {why[-1] if why else 'no tracefs'}"
    return None


def find_tracefs(*, mount: bool = True) -> tuple[Path | None, str]:
    """Where tracefs is, mounting it at /sys/kernel/tracing if need be (and ``mount``):
    (path, "") or (None, why not)."""
    for path in TRACEFS_PATHS:
        try:
            if _is_tracefs(path):
                return path, ""
        except PermissionError:
            return None, f"no permission to read {path} (tracefs needs root)"
    if not mount:
        return None, f"tracefs is not mounted at {TRACEFS_MOUNT}"
    why = _mount_tracefs()
    return (TRACEFS_MOUNT, "") if why is None else (None, why)


def _check(tracefs: Path | None, events: Sequence[str]) -> tuple[Path, list[str]]:
    """The tracefs root and the events it has; FaultCountingUnavailable naming what is missing."""
    if tracefs is None:
        found, why = find_tracefs()
        if found is None:
            raise FaultCountingUnavailable(f"cannot count KVM page faults: {why}")
        tracefs = found
    elif not _is_tracefs(tracefs):
        raise FaultCountingUnavailable(f"cannot count KVM page faults: {tracefs} is not a tracefs mount")
    if not os.access(tracefs / "instances", os.W_OK):
        raise FaultCountingUnavailable(
            f"cannot count KVM page faults: no permission to create trace instances in {tracefs}/instances "
            "(run as root)"
        )
    present = [e for e in events if (tracefs / "events" / e / "enable").is_file()]
    if not any(e in present for e in HEADLINE_EVENTS):
        names = " or ".join(HEADLINE_EVENTS)
        raise FaultCountingUnavailable(
            f"cannot count KVM page faults: {tracefs}/events has no {names} (is the kvm module loaded?)"
        )
    return tracefs, present


def fault_counting_available(*, mount: bool = True) -> tuple[bool, str]:
    """Whether this host can count KVM's page faults, and why not (or what it will use).

    Mounts tracefs at /sys/kernel/tracing when it is not mounted and ``mount`` is true
    (root only); never creates an instance."""
    tracefs, why = find_tracefs(mount=mount)
    if tracefs is None:
        return False, why
    try:
        root, present = _check(tracefs, EVENTS)
    except FaultCountingUnavailable as e:
        return False, str(e).removeprefix("cannot count KVM page faults: ")
    return True, f"tracefs at {root}; events: {', '.join(event_name(e) for e in present)}"


def _write(path: Path, text: str) -> None:
    # One write(2) per setting: tracefs parses each write on its own.
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _stats(text: str) -> dict[str, int]:
    """``per_cpu/cpuN/stats`` as {field: number} (the numeric fields only)."""
    out = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and value.strip().isdigit():
            out[name.strip()] = int(value)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Instance:
    """One tracefs instance counting one event for a set of threads."""

    def __init__(self, tracefs: Path, name: str, event: str, pids: Iterable[int], follow: bool) -> None:
        self.path = tracefs / "instances" / name
        self.event = event
        self.path.mkdir()
        try:
            _write(self.path / "buffer_size_kb", str(BUFFER_KB))
            _write(self.path / "options" / "event-fork", "1" if follow else "0")
            # The pid list before the event: an empty list would mean every task.
            _write(self.path / "set_event_pid", " ".join(str(p) for p in pids))
            _write(self.path / "events" / event / "enable", "1")
        except BaseException:
            self.remove()
            raise

    def count(self) -> tuple[int, int]:
        """(events recorded so far, events the buffer lost), over every CPU."""
        total = lost = 0
        for cpu in (self.path / "per_cpu").iterdir():
            stats = _stats((cpu / "stats").read_text())
            total += stats.get("entries", 0) + stats.get("overrun", 0) + stats.get("read events", 0)
            lost += stats.get("dropped events", 0) + stats.get("commit overrun", 0)
        return total, lost

    def remove(self) -> None:
        """Disable the event and remove the instance (retried once: a reader may be closing)."""
        if not self.path.is_dir():
            return
        try:
            _write(self.path / "events" / self.event / "enable", "0")
        except OSError:
            pass
        for attempt in range(2):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if attempt:
                    log.warning("could not remove the trace instance %s: %s", self.path, e)
                else:
                    time.sleep(0.01)


def sweep_stale(tracefs: Path) -> list[str]:
    """Remove the instances that counters of processes no longer alive left behind
    (after a SIGKILL); returns their names."""
    removed = []
    for path in (tracefs / "instances").glob(f"{INSTANCE_PREFIX}*"):
        owner = path.name.removeprefix(INSTANCE_PREFIX).split("-", 1)[0]
        if owner.isdigit() and not _alive(int(owner)):
            try:
                _write(path / "events" / "enable", "0")
                path.rmdir()
                removed.append(path.name)
            except OSError:
                pass
    return removed


def _process_tids(pid: int) -> list[int]:
    """The thread ids of a process now; FaultCountingUnavailable if there is no such process."""
    try:
        return sorted(int(name) for name in os.listdir(f"/proc/{pid}/task") if name.isdigit())
    except FileNotFoundError:
        raise FaultCountingUnavailable(f"cannot count the page faults of process {pid}: no such process") from None


class FaultCounter:
    """Counts the page faults KVM handles for threads while it is open (a context manager).

    ``tids``: thread ids (``threading.get_native_id()``, ``Thread.native_id``,
    ``/proc/PID/task``) counted one by one, each a key of :attr:`counts`; more may join
    while counting (:meth:`add_tid`), which is how a vCPU thread can register itself.
    ``pid``: a whole process instead, its threads now and every thread or process they
    start afterwards (tracefs ``event-fork``), counted together under the key ``pid``; start
    the counter before the threads to count.

    ``counts`` maps each key to ``{event: count, ..., "faults": headline}`` (the event
    names without their system, e.g. ``kvm_page_fault``); live while counting, final
    after the counter is closed.  ``lost`` counts events the ring buffer dropped (none
    are expected: it overwrites, and overwritten events are still counted).
    Starting raises :class:`FaultCountingUnavailable` with the reason when the host cannot
    count; whatever was created is removed again on every way out.
    """

    def __init__(
        self,
        tids: Iterable[int] = (),
        *,
        pid: int | None = None,
        events: Sequence[str] = EVENTS,
        tracefs: str | Path | None = None,
    ) -> None:
        self._tids = list(dict.fromkeys(int(tid) for tid in tids))
        if pid is not None and self._tids:
            raise ValueError("FaultCounter: give tids or pid, not both")
        self.pid = pid
        self.requested_events = tuple(events)
        self.events: tuple[str, ...] = ()
        self._tracefs = Path(tracefs) if tracefs is not None else None
        self._root: Path | None = None
        self._instances: dict[int, list[_Instance]] = {}
        self._final: dict[int, dict[str, int]] | None = None
        self._lost = 0
        self._lock = threading.RLock()
        self._id = next(_counter_ids)
        self.running = False

    # --- lifetime ------------------------------------------------------------------------
    def start(self) -> FaultCounter:
        """Create the instances and start counting (counts start at zero)."""
        with self._lock:
            if self.running:
                raise RuntimeError("this FaultCounter is already counting")
            self._root, present = _check(self._tracefs, self.requested_events)
            sweep_stale(self._root)
            self.events = tuple(present)
            self._final = None
            self._lost = 0
            self.running = True
            try:
                if self.pid is not None:
                    self._add(self.pid, _process_tids(self.pid), follow=True)
                for tid in self._tids:
                    self._add(tid, [tid], follow=False)
            except BaseException:
                self.stop()
                raise
        return self

    def stop(self) -> dict[int, dict[str, int]]:
        """Read the final counts, remove every instance, and return the counts."""
        with self._lock:
            if not self.running:
                return self.counts
            try:
                self._final = self._read()
            except OSError as e:
                log.warning("reading the fault counts failed: %s", e)
                self._final = {key: {} for key in self._instances}
            finally:
                for instances in self._instances.values():
                    for instance in instances:
                        instance.remove()
                self._instances.clear()
                self.running = False
            return self._final

    def __enter__(self) -> FaultCounter:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # --- threads -------------------------------------------------------------------------
    def add_tid(self, tid: int) -> None:
        """Count one more thread from now on (no-op if it is counted already)."""
        tid = int(tid)
        with self._lock:
            if self.pid is not None:
                raise ValueError("FaultCounter: a counter of a whole process takes no single threads")
            if tid in self._instances or (not self.running and tid in self._tids):
                return
            if not self.running:
                self._tids.append(tid)
                return
            self._add(tid, [tid], follow=False)

    def _add(self, key: int, pids: Sequence[int], *, follow: bool) -> None:
        assert self._root is not None
        made: list[_Instance] = []
        try:
            for event in self.events:
                name = f"{INSTANCE_PREFIX}{os.getpid()}-{self._id}-{key}-{event_name(event)}"
                made.append(_Instance(self._root, name, event, pids, follow))
        except OSError as e:
            for instance in made:
                instance.remove()
            raise FaultCountingUnavailable(
                f"cannot count KVM page faults: creating a trace instance failed: {e.strerror or e}"
            ) from e
        self._instances[key] = made

    # --- reading -------------------------------------------------------------------------
    def _read(self) -> dict[int, dict[str, int]]:
        out: dict[int, dict[str, int]] = {}
        lost = 0
        for key, instances in self._instances.items():
            counts: dict[str, int] = {}
            for instance in instances:
                total, dropped = instance.count()
                counts[event_name(instance.event)] = total
                lost += dropped
            counts["faults"] = headline(counts)
            out[key] = counts
        self._lost = lost
        return out

    def snapshot(self) -> dict[int, dict[str, int]]:
        """The counts now (a new dict each call); the final ones once closed."""
        with self._lock:
            if self.running:
                return self._read()
            return {key: dict(counts) for key, counts in (self._final or {}).items()}

    @property
    def counts(self) -> dict[int, dict[str, int]]:
        """``{tid or pid: {event: count, ..., "faults": n}}``: live while counting, final after."""
        return self.snapshot()

    @property
    def lost(self) -> int:
        """Events the ring buffers dropped as of the last reading (0 expected)."""
        return self._lost

    def total(self) -> dict[str, int]:
        """The counts summed over every key (``faults`` summed too)."""
        out: dict[str, int] = {}
        for counts in self.counts.values():
            for name, value in counts.items():
                out[name] = out.get(name, 0) + value
        return out


MARK_PASS_START = 0x1000  # guests/include/vmm.inc: memtouch marks MARK_PASS_START | pass
MARK_PASS_END = 0x2000


class PassMarker(Marker):
    """The marker port (0x500) that also reads a :class:`FaultCounter` at every mark, so a
    run's faults split at the guest's own marks (memtouch: ``MARK_PASS_START | n`` and
    ``MARK_PASS_END | n``). Install it before the run: ``machine.marker = PassMarker(counter)``.

    The vCPU that writes a mark waits in userspace meanwhile, so every fault it took
    before the mark is in the reading and none after. With a counter of threads, a thread
    joins it at its first mark."""

    def __init__(self, counter: FaultCounter, limit: int = MAX_MARKS) -> None:
        super().__init__(limit)
        self.counter = counter
        #: (mark value, thread id, that thread's counts at the mark), at most ``limit``.
        self.readings: list[tuple[int, int, dict[str, int]]] = []

    def write(self, offset: int, data: memoryview) -> None:
        super().write(offset, data)
        if offset != 0 or not self.counter.running:
            return
        tid = threading.get_native_id()
        key = tid if self.counter.pid is None else self.counter.pid
        if self.counter.pid is None:
            self.counter.add_tid(tid)
        counts = self.counter.snapshot().get(key, {})
        with self._lock:
            if len(self.readings) < self.limit:
                self.readings.append((int.from_bytes(data, "little"), tid, counts))

    def passes(self) -> dict[int, dict[str, int]]:
        """Per pass number, the counts from its start mark to its end mark (same thread)."""
        starts: dict[tuple[int, int], dict[str, int]] = {}
        out: dict[int, dict[str, int]] = {}
        for value, tid, counts in self.readings:
            kind, number = value & ~0xFFF, value & 0xFFF
            if kind == MARK_PASS_START:
                starts[(tid, number)] = counts
            elif kind == MARK_PASS_END and (tid, number) in starts:
                begin = starts.pop((tid, number))
                delta = {name: n - begin.get(name, 0) for name, n in counts.items() if name != "faults"}
                out[number] = {**delta, "faults": headline(delta)}
        return out
