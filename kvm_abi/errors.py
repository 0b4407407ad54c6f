"""Errors raised by the ABI layer: an OSError that names the ioctl."""

from __future__ import annotations

import errno as _errno
import os

from kvm_abi.constants import EHWPOISON

# Names Python's errno table lacks or spells otherwise (it calls 95 ENOTSUP).
_ERRNO_NAMES = {_errno.EOPNOTSUPP: "EOPNOTSUPP", EHWPOISON: "EHWPOISON"}


def errno_name(err: int) -> str:
    """The symbolic name of an errno value as KVM's documentation spells it: ``EINVAL``,
    ``EOPNOTSUPP`` rather than Python's alias ``ENOTSUP`` for 95, ``EHWPOISON`` (which
    Python 3.11 lacks); ``errno N`` for a number with no name."""
    return _ERRNO_NAMES.get(err) or _errno.errorcode.get(err, f"errno {err}")


class KvmError(OSError):
    """An ioctl (or libc call) failed. ``errno`` and ``strerror`` are the OS's; ``ioctl``
    names the call, ``target`` the object it was issued on (``vm0``, ``vcpu1``), and
    ``detail`` the arguments that explain the failure."""

    def __init__(self, err: int, ioctl: str, target: str = "", detail: str = "") -> None:
        super().__init__(err, os.strerror(err))
        self.ioctl = ioctl
        self.target = target
        self.detail = detail

    @property
    def errno_name(self) -> str:
        """The symbolic name of ``errno`` (:func:`errno_name`)."""
        return errno_name(self.errno or 0)

    def __str__(self) -> str:
        where = f" on {self.target}" if self.target else ""
        text = f"{self.ioctl} failed{where}: {self.errno_name} ({self.strerror})"
        return f"{text} [{self.detail}]" if self.detail else text

    def __reduce__(self) -> tuple[type, tuple[int | None, str, str, str]]:
        return (type(self), (self.errno, self.ioctl, self.target, self.detail))
