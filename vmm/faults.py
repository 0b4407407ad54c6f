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

How: a private tracefs *instance* per (thread, event) (:mod:`vmm.tracefs`), so other
tracers' buffers and settings are never touched; ``set_event_pid`` keeps only the chosen
threads (or a whole process and the threads it starts), and the count is the ring buffer's
own statistics: exact however many events arrive, with no event ever parsed.  Nothing
happens at import; a counter costs only while it exists.

>>> with FaultCounter(tids=[tid]) as counter:             # doctest: +SKIP
...     run_the_guest()
>>> counter.counts[tid]["faults"]                           # doctest: +SKIP
65541
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType

from vmm.devices.marker import MAX_MARKS, Marker
from vmm.tracefs import (
    EVENTS,
    INSTANCE_PREFIX,
    FaultCountingUnavailable,
    Instance,
    check_events,
    event_name,
    fault_counting_available,
    find_tracefs,
    headline,
    process_tids,
    sweep_stale,
)

__all__ = [
    "EVENTS",
    "INSTANCE_PREFIX",
    "FaultCounter",
    "FaultCountingUnavailable",
    "PassMarker",
    "event_name",
    "fault_counting_available",
    "find_tracefs",
    "headline",
    "sweep_stale",
]

log = logging.getLogger("vmm.faults")
_counter_ids = itertools.count()


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
        self._instances: dict[int, list[Instance]] = {}
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
            self._root, present = check_events(self._tracefs, self.requested_events)
            sweep_stale(self._root)
            self.events = tuple(present)
            self._final = None
            self._lost = 0
            self.running = True
            try:
                if self.pid is not None:
                    self._add(self.pid, process_tids(self.pid), follow=True)
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
        made: list[Instance] = []
        try:
            for event in self.events:
                name = f"{INSTANCE_PREFIX}{os.getpid()}-{self._id}-{key}-{event_name(event)}"
                made.append(Instance(self._root, name, event, pids, follow))
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
