"""The terminal under ``vmm run``: raw mode while the guest owns it, restored on every way out.

Raw as QEMU's ``-nographic`` makes it: no echo, no line editing, no signals from keys (so
Ctrl-C reaches the guest; Ctrl-A x is the way out, :mod:`vmm.console_input`), bytes as
typed; output processing stays on, so a guest's bare "\\n" still starts a new line. The
saved attributes come back when the block ends: a normal end, a timeout, an exception, or
SIGTERM/SIGHUP, which end the run as Ctrl-C does (status 130) while raw mode is on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import termios
from collections.abc import Iterator
from types import FrameType

_END_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def in_background(fd: int) -> bool:
    """Whether ``fd`` is a terminal whose foreground is another process group: reading it
    or changing its mode would stop this process (SIGTTIN, SIGTTOU), so it is left alone."""
    try:
        return os.tcgetpgrp(fd) != os.getpgrp()
    except OSError:
        return False


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Put the terminal ``fd`` in raw mode for the block; restore it however the block ends."""
    saved = termios.tcgetattr(fd)
    raw = termios.tcgetattr(fd)
    raw[0] &= ~(
        termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
        | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON
    )  # fmt: skip
    raw[2] = (raw[2] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    raw[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    raw[6][termios.VMIN], raw[6][termios.VTIME] = 1, 0
    handlers = {sig: signal.signal(sig, _interrupt) for sig in _END_SIGNALS}
    try:
        termios.tcsetattr(fd, termios.TCSANOW, raw)
        yield
    finally:
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
