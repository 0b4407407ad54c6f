"""Host time for the emulator's local APIC timers: one thread per machine that sleeps
until the earliest armed deadline (host ``CLOCK_MONOTONIC``) and calls its callback,
and the host TSC's rate, which TSC-deadline timers need.

The TSC: unicorn's RDTSC returns the host's TSC (measured, :mod:`emulator_stubs`), so
a guest's IA32_TSC_DEADLINE is a host TSC value. Its rate is measured once per process
against CLOCK_MONOTONIC over ``TSC_CALIBRATION_SECONDS`` (on first use).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

from vmm.backends.emulator_stubs import native_code

TSC_CALIBRATION_SECONDS = 0.01
log = logging.getLogger("vmm.emulator")

_tsc_hz: float | None = None
_tsc_lock = threading.Lock()


def read_tsc() -> int:
    """The host TSC (what the guest's RDTSC returns)."""
    return int(native_code().read_tsc())


def tsc_hz() -> float:
    """TSC ticks per second, measured once."""
    global _tsc_hz
    with _tsc_lock:
        if _tsc_hz is None:
            t0, c0 = time.monotonic_ns(), read_tsc()
            time.sleep(TSC_CALIBRATION_SECONDS)
            t1, c1 = time.monotonic_ns(), read_tsc()
            _tsc_hz = (c1 - c0) * 1e9 / max(1, t1 - t0)
        return _tsc_hz


def tsc_to_monotonic_ns(tsc: int) -> int:
    """The CLOCK_MONOTONIC time at which the host TSC reaches ``tsc``."""
    now_ns, now_tsc = time.monotonic_ns(), read_tsc()
    return now_ns + int((tsc - now_tsc) * 1e9 / tsc_hz())


class TimerThread:
    """Calls ``callback()`` at (or just after) ``when_ns``, on its own thread, for every
    timer armed and not cancelled. The thread starts with the first timer and ends at
    :meth:`close`."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[int, int, Callable[[], None]]] = []
        self._cancelled: set[int] = set()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._closed = False

    def arm(self, when_ns: int, callback: Callable[[], None]) -> int:
        """Arm a timer; returns its id for :meth:`cancel`."""
        with self._cond:
            if self._closed:
                return 0
            timer = next(self._ids)
            heapq.heappush(self._heap, (when_ns, timer, callback))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="emulator-timers", daemon=True)
                self._thread.start()
            self._cond.notify()
            return timer

    def cancel(self, timer: int) -> None:
        if timer:
            with self._cond:
                self._cancelled.add(timer)

    def close(self) -> None:
        """Stop the thread (pending timers never fire)."""
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    while self._heap and self._heap[0][1] in self._cancelled:
                        self._cancelled.discard(heapq.heappop(self._heap)[1])
                    if not self._heap:
                        self._cond.wait()
                        continue
                    delay = self._heap[0][0] - time.monotonic_ns()
                    if delay <= 0:
                        _, _, callback = heapq.heappop(self._heap)
                        break
                    self._cond.wait(delay / 1e9)
            try:
                callback()
            except Exception:  # a bug must not stop every other timer
                log.exception("emulator timer callback failed")
