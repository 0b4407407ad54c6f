"""The Linux KVM userspace ABI through cffi: structs, constants, ioctl numbers, and the
one function that issues ``ioctl(2)``.

Nothing here knows policy: no threads, no logging, no retries. ``vmm`` builds on it.

The compiled cffi module (``kvm_abi._kvm_cffi``, built at install time) is used when it is
present and current; otherwise ABI mode (``dlopen``), as an install without a C compiler
gets. ``VMM_CFFI=abi`` in the environment forces ABI mode (benchmarks and tests of that
fallback use it); ``COMPILED`` says which is in use. In ABI mode the kick signal handler can
only be installed from the main thread (``install_kick_handler`` returns False).

>>> import kvm_abi
>>> kvm_abi.KVM_PRE_FAULT_MEMORY.number == 0xC040AED5
True
"""

from __future__ import annotations

from typing import Any

from kvm_abi import constants
from kvm_abi._ffi import COMPILED, ffi, lib
from kvm_abi.constants import *  # noqa: F403  (the constants are part of this package's API)
from kvm_abi.constants import ExitReason
from kvm_abi.errors import KvmError
from kvm_abi.ioc import *  # noqa: F403
from kvm_abi.ioc import ALL_IOCTLS, Ioctl, ioc

__all__ = [
    "ALL_IOCTLS",
    "COMPILED",
    "FAST_IO",
    "PIO_DATA_OFFSET",
    "Ioctl",
    "KvmError",
    "constants",
    "fast_io_code",
    "ffi",
    "install_kick_handler",
    "ioc",
    "ioctl",
    "libc_fallocate",
    "libc_madvise",
    "libc_mincore",
    "libc_mmap",
    "libc_munmap",
    "run_vcpu",
]


if COMPILED:
    _ioctl_ptr = lib.vmm_ioctl_ptr
    _ioctl_int = lib.vmm_ioctl_int
else:
    _raw_ioctl = lib.ioctl
    _ULONG = ffi.typeof("unsigned long")

    def _ioctl_ptr(fd: int, request: int, arg: Any) -> int:
        return int(_raw_ioctl(fd, ffi.cast(_ULONG, request), arg))

    def _ioctl_int(fd: int, request: int, arg: int) -> int:
        return int(_raw_ioctl(fd, ffi.cast(_ULONG, request), ffi.cast(_ULONG, arg)))


def ioctl(fd: int, op: Ioctl, arg: Any = 0, *, target: str = "", detail: str = "") -> int:
    """Issue ``op`` on ``fd``; the only call of ioctl(2) in the project.

    ``arg`` is an int (passed by value, as ``unsigned long``: no INT_MAX ceiling) or a
    cdata pointer the kernel reads and/or writes in place. Returns the non-negative
    result; raises :class:`KvmError` carrying errno, ``op.name``, ``target`` and ``detail``.
    """
    rc: int = _ioctl_int(fd, op.number, arg) if isinstance(arg, int) else _ioctl_ptr(fd, op.number, arg)
    if rc < 0:
        raise KvmError(ffi.errno, op.name, target, detail)
    return rc


FAST_IO = 1 << 32
"""``run_vcpu`` result bit: one port access whose data sits in the PIO page."""
PIO_DATA_OFFSET = 4096  # KVM_PIO_PAGE_OFFSET * PAGE_SIZE: where x86 KVM puts port data


def fast_io_code(direction: int, size: int, port: int) -> int:
    """The ``run_vcpu`` result for one ``size``-byte access to ``port`` (KVM_EXIT_IO_IN/OUT)."""
    return FAST_IO | direction << 24 | size << 16 | port


if COMPILED:
    run_vcpu = lib.vmm_run_vcpu
else:
    _IO_REASON = int(ExitReason.IO)
    _KVM_RUN_NUMBER = KVM_RUN.number  # noqa: F405  (the compiled run_vcpu() has it inlined)

    def run_vcpu(fd: int, run: Any) -> int:
        """KVM_RUN for the hot path: -errno; ``fast_io_code(...)`` for a single port access
        with its data in the PIO page; otherwise the exit reason. No exception, no
        allocation: the compiled module does this in C."""
        if _ioctl_int(fd, _KVM_RUN_NUMBER, 0) < 0:
            return -int(ffi.errno)
        reason: int = run.exit_reason
        if reason == _IO_REASON:
            io = run.io
            if io.count == 1 and io.data_offset == PIO_DATA_OFFSET:
                code: int = FAST_IO | io.direction << 24 | io.size << 16 | io.port
                return code
        return reason


def libc_mmap(length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """mmap(2) at a kernel-chosen address; returns the address as an int."""
    ptr = lib.mmap(ffi.NULL, length, prot, flags, fd, offset)
    addr = int(ffi.cast("uintptr_t", ptr))
    if addr == constants.MAP_FAILED:
        raise KvmError(ffi.errno, "mmap", detail=f"length={length:#x} flags={flags:#x} fd={fd}")
    return addr


def libc_munmap(addr: int, length: int) -> None:
    """munmap(2)."""
    if lib.munmap(ffi.cast("void *", addr), length) < 0:
        raise KvmError(ffi.errno, "munmap", detail=f"addr={addr:#x} length={length:#x}")


def libc_madvise(addr: int, length: int, advice: int) -> None:
    """madvise(2); raises KvmError naming the advice number."""
    if lib.madvise(ffi.cast("void *", addr), length, advice) < 0:
        raise KvmError(ffi.errno, "madvise", detail=f"advice={advice} addr={addr:#x} length={length:#x}")


def libc_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (Python's os.posix_fallocate cannot pass one)."""
    if lib.fallocate(fd, mode, offset, length) < 0:
        raise KvmError(ffi.errno, "fallocate", detail=f"mode={mode:#x} offset={offset:#x} len={length:#x}")


def libc_mincore(addr: int, length: int) -> bytes:
    """mincore(2): one byte per page, bit 0 set when the page is resident."""
    pages = (length + constants.PAGE_SIZE - 1) // constants.PAGE_SIZE
    vec = ffi.new("unsigned char[]", pages)
    if lib.mincore(ffi.cast("void *", addr), length, vec) < 0:
        raise KvmError(ffi.errno, "mincore", detail=f"addr={addr:#x} length={length:#x}")
    return bytes(ffi.buffer(vec, pages))


def install_kick_handler(signo: int) -> bool:
    """Install a C no-op handler for ``signo`` (without SA_RESTART) so that the signal
    interrupts a blocking KVM_RUN with EINTR. Returns False when only ABI mode is
    available; the caller then installs a Python handler from the main thread."""
    if not COMPILED:
        return False
    if lib.vmm_install_kick_handler(signo) < 0:
        raise KvmError(ffi.errno, "sigaction", detail=f"signal {signo}")
    return True
