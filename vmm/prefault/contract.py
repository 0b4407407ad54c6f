"""The call shape every pre-fault implementation shares, and the loops that drive it.

An implementation is a function ``call(vcpu, struct) -> int``: it updates the struct in
place (``gpa``/``size`` for ``struct kvm_pre_fault_memory``; ``base_gfn``/``nr_pages``/
``source`` for the RFC's ``struct kvm_memory_mapping``) and answers 0 or an errno number,
exactly what the ioctl would report. Three implementations exist:

* :func:`vmm.prefault.kernel.pre_fault_memory` (the mainline ioctl),
* :func:`vmm.prefault.map_memory.map_memory` (the RFC ioctl),
* :class:`vmm.prefault.emulated.EmulatedPrefault` (in-process, both shapes).

The drivers below are the only loops over them, so the retry rules live in one place
(kvm-abi.md §2.6): retry EINTR and EAGAIN, continue after partial progress, never
re-issue with size 0, and report any other errno with the guest-physical address where
it stopped.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from kvm_abi import PAGE_SIZE, errno_name, ffi
from vmm.errors import VmmError

PAGE_SHIFT = PAGE_SIZE.bit_length() - 1
U64_MASK = (1 << 64) - 1

Call = Callable[[Any, Any], int]
"""``call(vcpu, struct) -> 0 | errno``: one ioctl-shaped pre-fault or map call."""

# The kernel answers EAGAIN (RET_PF_RETRY) while a memslot is being deleted or moved
# (6.18+); the RFC, and the emulation of it, when another vCPU is filling the same page.
# Both clear up once the other side gets to run, so a retry first yields the CPU (and the
# GIL, which the other side may need to finish), backing off up to a millisecond; only a
# call that makes no progress at all for this long is an error rather than a race.
MAX_SECONDS_WITHOUT_PROGRESS = 10.0
_BACKOFF_START, _BACKOFF_MAX = 10e-6, 1e-3


class _Retries:
    """Retry pacing for one driver loop: ``progress()`` resets, ``wait()`` backs off and
    says whether the no-progress budget is spent."""

    __slots__ = ("_delay", "_since")

    def __init__(self) -> None:
        self.progress()

    def progress(self) -> None:
        self._delay = 0.0
        self._since = time.monotonic()

    def wait(self) -> bool:
        time.sleep(self._delay)  # sleep(0) still yields the GIL
        self._delay = min(_BACKOFF_MAX, max(_BACKOFF_START, self._delay * 2))
        return time.monotonic() - self._since < MAX_SECONDS_WITHOUT_PROGRESS


class PrefaultError(VmmError):
    """A pre-fault call failed for good. ``errno`` is the call's answer; ``gpa`` and
    ``size`` say where it stopped and what was left."""

    def __init__(self, op: str, err: int, gpa: int, size: int, hint: str = "") -> None:
        self.op = op
        self.errno = err
        self.gpa = gpa
        self.size = size
        text = f"{op} failed at gpa {gpa:#x} ({size:#x} bytes left): {errno_name(err)} ({os.strerror(err)})"
        super().__init__(f"{text}; {hint}" if hint else text)


class PrefaultInterrupted(PrefaultError):
    """EINTR while the calling thread holds a blocked signal pending: retrying would only
    get EINTR again, so the caller must deal with the signal first."""


HINTS = {
    errno.ENOENT: "no memslot covers this address",
    errno.EFAULT: "the memory behind this address could not be faulted in (private memory without "
    "guest_memfd, or a host mapping that is gone)",
    errno.EOPNOTSUPP: "KVM cannot pre-fault here (shadow paging, a nested guest, or a confidential VM "
    "that is not finalized)",
    errno.EINVAL: "the arguments are invalid (alignment, size 0, wrap-around, or flags)",
    errno.EIO: "KVM hit an internal error (see the kernel log)",
}


def new_range(gpa: int, size: int, flags: int = 0) -> Any:
    """A fresh ``struct kvm_pre_fault_memory *``."""
    return ffi.new("struct kvm_pre_fault_memory *", {"gpa": gpa, "size": size, "flags": flags})


def new_mapping(base_gfn: int, nr_pages: int, flags: int = 0, source: int = 0) -> Any:
    """A fresh ``struct kvm_memory_mapping *`` (the RFC's argument)."""
    return ffi.new(
        "struct kvm_memory_mapping *",
        {"base_gfn": base_gfn, "nr_pages": nr_pages, "flags": flags, "source": source},
    )


def blocked_signal_pending() -> bool:
    """True when a signal is pending for this thread (or the process) and blocked here.

    A user-space thread can only ever see a signal as pending while it blocks it: an
    unblocked one is delivered at once (its handler runs). The emulation therefore treats
    a blocked pending signal as the kernel treats a pending one (EINTR), and the drivers
    use it to tell "the signal was delivered, retry" from "it is still there"."""
    return bool(signal.sigpending())


def drive_pre_fault(
    call: Call,
    vcpu: Any,
    gpa: int,
    size: int,
    on_progress: Callable[[int], None] | None = None,
    op: str = "KVM_PRE_FAULT_MEMORY",
) -> int:
    """Pre-fault [gpa, gpa+size) to the end with ``call``; returns the bytes done.

    The read()-style loop: 0 with ``size`` left means partial progress, so go on; EINTR
    and EAGAIN mean retry; the call is never re-issued once ``size`` is 0 (that would be
    EINVAL). Anything else raises :class:`PrefaultError` with the GPA where it stopped.
    """
    if size == 0:
        return 0
    rng = new_range(gpa, size)
    done = 0
    retries = _Retries()
    while True:
        before = rng.size
        rc = call(vcpu, rng)
        progressed = before - rng.size
        if rc == 0:
            done += progressed
            if on_progress is not None and progressed:
                on_progress(progressed)
            if rng.size == 0:
                return done
            if progressed == 0:  # the contract forbids 0 without progress: do not spin on it
                raise PrefaultError(op, errno.EIO, rng.gpa, rng.size, "returned 0 without progress")
            retries.progress()
            continue
        if progressed:  # a failure must leave the struct untouched (the XOR invariant)
            raise PrefaultError(op, rc, rng.gpa, rng.size, "failed after moving gpa/size")
        if rc == errno.EINTR:
            if blocked_signal_pending():
                raise PrefaultInterrupted(op, rc, rng.gpa, rng.size, "a blocked signal is pending")
        elif rc != errno.EAGAIN:
            raise PrefaultError(op, rc, rng.gpa, rng.size, HINTS.get(rc, ""))
        if not retries.wait():
            raise PrefaultError(op, rc, rng.gpa, rng.size, f"no progress for {MAX_SECONDS_WITHOUT_PROGRESS:g} s")


def drive_map_memory(
    call: Call,
    vcpu: Any,
    gpa: int,
    size: int,
    flags: int = 0,
    source: int = 0,
    on_progress: Callable[[int], None] | None = None,
    op: str = "KVM_MAP_MEMORY",
) -> int:
    """Map [gpa, gpa+size) with the RFC call shape; returns the bytes done.

    The RFC answers 0 only when every page is done and EAGAIN when it stopped early
    (partial progress, or a fault that raced another vCPU); both EAGAIN and EINTR are
    retried with the advanced struct. Other errors raise :class:`PrefaultError`.
    """
    if size == 0:
        return 0
    mapping = new_mapping(gpa >> PAGE_SHIFT, size >> PAGE_SHIFT, flags, source)
    done = 0
    retries = _Retries()
    while True:
        before = mapping.nr_pages
        rc = call(vcpu, mapping)
        progressed = (before - mapping.nr_pages) << PAGE_SHIFT
        done += progressed
        if on_progress is not None and progressed:
            on_progress(progressed)
        if rc == 0 and mapping.nr_pages == 0:
            return done
        where = mapping.base_gfn << PAGE_SHIFT
        left = mapping.nr_pages << PAGE_SHIFT
        if rc == 0:
            raise PrefaultError(op, errno.EIO, where, left, "returned 0 with pages left")
        if rc == errno.EINTR and not progressed and blocked_signal_pending():
            raise PrefaultInterrupted(op, rc, where, left, "a blocked signal is pending")
        if rc not in (errno.EAGAIN, errno.EINTR):
            raise PrefaultError(op, rc, where, left, HINTS.get(rc, ""))
        if progressed:
            retries.progress()
        elif not retries.wait():
            raise PrefaultError(op, rc, where, left, f"no progress for {MAX_SECONDS_WITHOUT_PROGRESS:g} s")
