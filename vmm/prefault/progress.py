"""Progress for long populations: a thread-safe byte counter, and a bar on a terminal.

Worker threads add bytes to a :class:`Progress`; the thread that waits for them calls
:meth:`Progress.tick` every few tens of milliseconds, which redraws the bar. The bar only
appears once a population has run for :data:`SHOW_AFTER_SECONDS` and only when its stream
is a terminal, so short populations, ``--json`` runs and pipes stay silent.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import IO

SHOW_AFTER_SECONDS = 1.0
"""A population shorter than this never draws a bar (the issue's "about a second")."""

BAR_WIDTH = 30

ProgressSink = Callable[[int, int], None]
"""``sink(done_bytes, total_bytes)``: called from the waiting thread, never from workers."""


class Progress:
    """Bytes done out of ``total``, updated by any thread, reported by one."""

    __slots__ = ("total", "_done", "_lock", "_sink", "_last")

    def __init__(self, total: int, sink: ProgressSink | None = None) -> None:
        self.total = total
        self._done = 0
        self._lock = threading.Lock()
        self._sink = sink
        self._last = -1

    def add(self, nbytes: int) -> None:
        """Record ``nbytes`` more done (any thread)."""
        with self._lock:
            self._done += nbytes

    @property
    def done(self) -> int:
        with self._lock:
            return self._done

    def tick(self) -> None:
        """Report the current count to the sink if it changed (the waiting thread only)."""
        done = self.done
        if self._sink is not None and done != self._last:
            self._last = done
            self._sink(done, self.total)

    def finish(self) -> None:
        """Final report, then let the sink clean up (a bar erases its line)."""
        self.tick()
        close = getattr(self._sink, "close", None)
        if close is not None:
            close()


class TerminalBar:
    """A one-line bar on ``stream`` (stderr), drawn only on a TTY and only after
    :data:`SHOW_AFTER_SECONDS`; erased when the population ends."""

    def __init__(self, label: str, stream: IO[str] | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.monotonic()
        self.drawn = False
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or time.monotonic() - self.started < SHOW_AFTER_SECONDS:
            return
        fraction = done / total if total else 1.0
        filled = int(fraction * BAR_WIDTH)
        elapsed = time.monotonic() - self.started
        rate = done / elapsed / (1 << 30) if elapsed > 0 else 0.0
        line = (
            f"\r{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
            f"{fraction * 100:5.1f}% {done >> 20}/{total >> 20} MiB {rate:.2f} GiB/s"
        )
        self.stream.write(line)
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False


def make_sink(progress: bool | ProgressSink | None, label: str) -> ProgressSink | None:
    """``True`` -> a :class:`TerminalBar` on stderr; a callable is used as is; else None."""
    if progress is True:
        return TerminalBar(label)
    if callable(progress):
        return progress
    return None
