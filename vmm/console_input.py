"""Console input: the host's stdin (or any fd) fed to the guest's 16550, as it arrives.

:class:`InputQueue` is the bounded host side (:data:`QUEUE_LIMIT` bytes): the reader
thread blocks when it is full, so a guest that never reads cannot make the VMM buffer a
whole file; the UART takes from it as its 16-byte FIFO has room.

:class:`ConsoleInput` is that reader thread: ``select`` on the fd and on a wake-up pipe,
so :meth:`ConsoleInput.stop` ends it at once, whatever the fd does. End of file just
stops input (the guest runs on). With ``escape=True`` (a terminal) it interprets QEMU's
escape key: Ctrl-A x calls ``on_quit`` (the run stops), Ctrl-A Ctrl-A sends one Ctrl-A,
Ctrl-A followed by anything else sends both bytes.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Callable

QUEUE_LIMIT = 4096
READ_SIZE = 1024
CTRL_A = 0x01
QUIT_KEYS = frozenset(b"xX")
ESCAPE_QUIT = "Ctrl-A x"


class InputQueue:
    """Bytes waiting for the guest, at most ``limit``; thread-safe."""

    def __init__(self, limit: int = QUEUE_LIMIT) -> None:
        self._buf = bytearray()
        self._limit = limit
        self._cond = threading.Condition()
        self._closed = False

    def put(self, data: bytes) -> bool:
        """Append ``data``, waiting while the queue is full. False once closed."""
        view = memoryview(data)
        with self._cond:
            while view:
                while len(self._buf) >= self._limit and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return False
                room = self._limit - len(self._buf)
                self._buf += view[:room]
                view = view[room:]
        return True

    def take(self, limit: int) -> bytes:
        """At most ``limit`` bytes, without waiting (b"" when none wait)."""
        with self._cond:
            out = bytes(self._buf[:limit])
            del self._buf[:limit]
            if out:
                self._cond.notify_all()
            return out

    def __len__(self) -> int:
        with self._cond:
            return len(self._buf)

    def close(self) -> None:
        """Wake and refuse every writer (the run is over)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class EscapeFilter:
    """QEMU's Ctrl-A escape over a byte stream; ``feed`` returns what goes to the guest."""

    def __init__(self, on_quit: Callable[[], None]) -> None:
        self._on_quit = on_quit
        self._armed = False
        self.quit = False

    def feed(self, data: bytes) -> bytes:
        """The bytes for the guest; after Ctrl-A x, nothing more (``quit`` is set)."""
        out = bytearray()
        for byte in data:
            if self.quit:
                break
            if not self._armed:
                if byte == CTRL_A:
                    self._armed = True
                else:
                    out.append(byte)
                continue
            self._armed = False
            if byte in QUIT_KEYS:
                self.quit = True
                self._on_quit()
            elif byte == CTRL_A:
                out.append(CTRL_A)
            else:
                out += bytes((CTRL_A, byte))
        return bytes(out)


class ConsoleInput:
    """A thread that copies ``fd`` into ``queue`` and calls ``notify()`` after each chunk."""

    def __init__(
        self,
        fd: int,
        queue: InputQueue,
        notify: Callable[[], None],
        *,
        escape: bool = False,
        on_quit: Callable[[], None] | None = None,
    ) -> None:
        self._fd = fd
        self._queue = queue
        self._notify = notify
        self._filter = EscapeFilter(on_quit or (lambda: None)) if escape else None
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._loop, name="console-input", daemon=True)
        self.error: str | None = None

    def start(self) -> None:
        """Start reading."""
        self._thread.start()

    def _loop(self) -> None:
        try:
            while True:
                ready, _, _ = select.select([self._fd, self._wake_r], [], [])
                if self._wake_r in ready:
                    return
                data = os.read(self._fd, READ_SIZE)
                if not data:
                    return  # end of file: no more input, the guest runs on
                if self._filter is not None:
                    data = self._filter.feed(data)
                if data and not self._queue.put(data):
                    return
                self._notify()
                if self._filter is not None and self._filter.quit:
                    return
        except OSError as e:
            self.error = f"console input stopped: {e.strerror or e}"

    def stop(self) -> None:
        """End the thread (at once: it waits in select or in a full queue) and close the
        wake-up pipe. Idempotent."""
        if self._wake_w < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._queue.close()
        if self._thread.ident is not None:
            self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1
