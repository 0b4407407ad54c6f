"""The host's standard streams, used without trusting them.

A user may run ``vmm`` with stdout closed, piped into ``head``, redirected to a full disk,
or with stderr closed. None of that may change what the guest's status is or turn into a
traceback: notices to a dead stderr are dropped; a broken stdout (EPIPE) ends the command
with the shell's status 141, quietly (:class:`BrokenStdout`); any other stdout error is
reported in one line on stderr.
"""

from __future__ import annotations

import errno
import sys
from typing import IO


class BrokenStdout(Exception):
    """stdout's reader went away (EPIPE): the command ends with status 141, quietly."""


def stdout_text() -> IO[str] | None:
    """sys.stdout, or None when it is closed or absent."""
    out = sys.stdout
    if out is None or getattr(out, "closed", False):
        return None
    return out


def stdout_binary() -> IO[bytes] | None:
    """The binary stdout for the console, or None when stdout is closed or absent."""
    out = stdout_text()
    buffer = getattr(out, "buffer", None)
    if buffer is None or getattr(buffer, "closed", False):
        return None
    return buffer  # type: ignore[no-any-return]


def write_text(text: str, *, stderr: bool = False) -> None:
    """Write to stdout (or stderr) and flush. A broken stdout raises BrokenStdout; other
    stdout errors are reported on stderr; stderr errors are dropped."""
    stream = sys.stderr if stderr else stdout_text()
    if stream is None or getattr(stream, "closed", False):
        return
    try:
        stream.write(text)
        stream.flush()
    except OSError as e:
        if stderr:
            return
        if e.errno == errno.EPIPE:
            _silence_stdout()
            raise BrokenStdout from None
        notice(f"cannot write to stdout: {e.strerror or e}")
    except ValueError:  # closed underneath us
        return


def notice(message: str) -> None:
    """One line ``vmm: message`` on stderr; nothing if stderr is closed or broken."""
    err = sys.stderr
    if err is None:
        return
    try:
        err.write(f"vmm: {message}\n")
        err.flush()
    except (OSError, ValueError):
        pass


def _silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the interpreter's final flush is quiet."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


class StderrProxy:
    """A stream for logging that never raises (stderr may be closed)."""

    def write(self, text: str) -> int:
        err = sys.stderr
        if err is not None:
            try:
                err.write(text)
            except (OSError, ValueError):
                pass
        return len(text)

    def flush(self) -> None:
        err = sys.stderr
        if err is not None:
            try:
                err.flush()
            except (OSError, ValueError):
                pass
