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

from collections.abc import Callable
from typing import Any

from kvm_abi import constants
from kvm_abi._ffi import COMPILED, ffi, lib
from kvm_abi.constants import *  # noqa: F403  (the constants are part of this package's API)
from kvm_abi.constants import PIO_DATA_OFFSET, ExitReason
from kvm_abi.errors import KvmError, errno_name
from kvm_abi.ioc import *  # noqa: F403
from kvm_abi.ioc import ALL_IOCTLS, KVM_RUN, Ioctl, ioc

__all__ = [
    "ALL_IOCTLS",
    "COMPILED",
    "FAST_IO",
    "PIO_DATA_OFFSET",
    "Ioctl",
    "KvmError",
    "constants",
    "errno_name",
    "fast_io_fields",
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


# run_vcpu's result for a single port access with its data in the PIO page: this bit, the
# direction and size in a byte each, the port in the low 16 bits (below 2**32, so no exit
# reason and no -errno looks like one).
FAST_IO = 1 << 32
"""``run_vcpu`` result bit: one port access whose data sits in the PIO page."""
_DIRECTION_SHIFT, _SIZE_SHIFT = 24, 16
_IO_REASON = int(ExitReason.IO)
_KVM_RUN_NUMBER = KVM_RUN.number


def fast_io_fields(code: int) -> tuple[int, int, int]:
    """``(direction, size, port)`` of a ``run_vcpu`` result that has :data:`FAST_IO` set;
    direction is KVM_EXIT_IO_IN or KVM_EXIT_IO_OUT, the data is ``size`` bytes at
    :data:`PIO_DATA_OFFSET` of the vCPU's mapping."""
    return (code >> _DIRECTION_SHIFT) & 0xFF, (code >> _SIZE_SHIFT) & 0xFF, code & 0xFFFF


def _run_vcpu_abi(fd: int, run: Any) -> int:
    """``run_vcpu`` in Python, for ABI mode: the same results as ``vmm_run_vcpu`` in
    ``_cdefs.FAST_PATH``, from the same constants."""
    if _ioctl_int(fd, _KVM_RUN_NUMBER, 0) < 0:
        return -int(ffi.errno)
    reason: int = run.exit_reason
    if reason == _IO_REASON:
        io = run.io
        if io.count == 1 and io.data_offset == PIO_DATA_OFFSET:
            code: int = FAST_IO | io.direction << _DIRECTION_SHIFT | io.size << _SIZE_SHIFT | io.port
            return code
    return reason


run_vcpu: Callable[[int, Any], int]
"""KVM_RUN for the hot path: -errno; a :data:`FAST_IO` code (:func:`fast_io_fields`) for a
single port access with its data in the PIO page; otherwise the exit reason. No exception,
no allocation. C in the compiled module, ``_run_vcpu_abi`` in ABI mode."""
if COMPILED:
    # The C function hard-codes none of these numbers: it gets them from the tables, once.
    lib.vmm_fast_path_init(_KVM_RUN_NUMBER, _IO_REASON, PIO_DATA_OFFSET, FAST_IO, _DIRECTION_SHIFT, _SIZE_SHIFT)
    run_vcpu = lib.vmm_run_vcpu
else:
    run_vcpu = _run_vcpu_abi


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
