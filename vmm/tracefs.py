"""tracefs for the fault counter: finding (or mounting) it, checking that KVM's events
exist, and private *instances* under ``instances/``, one per (thread, event), created and
removed again so other tracers' buffers and settings are never touched. An instance keeps
only the chosen threads (``set_event_pid``; ``event-fork`` for a whole process) and its
count is the ring buffer's own statistics (entries + overrun + read, per CPU), exact
however many events arrive, with no event ever parsed. :mod:`vmm.faults` counts with it."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

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


def check_events(tracefs: Path | None, events: Sequence[str]) -> tuple[Path, list[str]]:
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
        root, present = check_events(tracefs, EVENTS)
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


class Instance:
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


def process_tids(pid: int) -> list[int]:
    """The thread ids of a process now; FaultCountingUnavailable if there is no such process."""
    try:
        return sorted(int(name) for name in os.listdir(f"/proc/{pid}/task") if name.isdigit())
    except FileNotFoundError:
        raise FaultCountingUnavailable(f"cannot count the page faults of process {pid}: no such process") from None
