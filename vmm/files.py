"""Reading a file a user names (an image, a module, a config file) without trusting it.

A FIFO would block past any ``--timeout`` and a device such as /dev/zero never ends, so
anything but a regular file is refused; the path is stat()ed before it is opened (opening
some devices has effects), opened with O_NONBLOCK, and what was opened is fstat()ed again
before a byte is read, so no read blocks or runs unbounded. Every refusal is one
:class:`~vmm.errors.InputError` line that starts with the name the user gave."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from vmm.errors import InputError

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def kind_of(mode: int) -> str:
    """What a non-regular file is, as a user would say it: ``a FIFO``, ``a directory``..."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def read_regular_file(
    path: str | Path, *, max_size: int, what: str, label: str | None = None, too_big: Callable[[int], str]
) -> bytes:
    """The bytes of the regular file at ``path``, at most ``max_size`` of them. Refusals
    read ``<label>: is a FIFO, not <what>`` (``label`` defaults to the path),
    ``<label>: <too_big(size)>``, ``no such file``, ``permission denied``, ``cannot read:
    ...`` and ``the file changed while it was read``."""
    name = str(path) if label is None else label

    def refuse_unless_regular(mode: int) -> None:
        if not stat.S_ISREG(mode):
            raise InputError(f"{name}: is {kind_of(mode)}, not {what}")

    try:
        refuse_unless_regular(os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except PermissionError:
        raise InputError(f"{name}: permission denied") from None
    except OSError as e:
        raise InputError(f"{name}: cannot read: {e.strerror or e}") from None
    with open(fd, "rb") as f:  # closes fd
        st = os.fstat(fd)
        refuse_unless_regular(st.st_mode)  # the path may have been replaced since the stat
        if st.st_size > max_size:
            raise InputError(f"{name}: {too_big(st.st_size)}")
        try:
            # One byte beyond the size fstat gave tells a file that grows while it is read.
            data = f.read(st.st_size + 1)
        except OSError as e:
            raise InputError(f"{name}: cannot read: {e.strerror or e}") from None
    if len(data) > st.st_size:
        raise InputError(f"{name}: the file changed while it was read")
    return data
