"""The few unicorn entry points the emulator calls natively, in one place.

The Python binding wraps every hook in three Python frames and an exception guard;
the emulator's hot path (IN/OUT hooks) registers raw ``ctypes`` callbacks instead,
which costs a third as much per exit (measured on unicorn 2.1.4: 3.3 M vs 1.0 M
empty OUT hooks per second). That needs two of the binding's internals, named only
here: its ``ctypes.CDLL`` with the prototypes set (``uclib``), and an engine's native
handle (``Uc._uch``). The ``unicorn>=2.1.1,<2.2`` pin in pyproject.toml covers both.

Callbacks must outlive their registration: unicorn keeps raw function pointers, so
the caller holds every ``CFUNCTYPE`` object for as long as the engine lives.
"""

from __future__ import annotations

import ctypes
from typing import Any

from unicorn import UC_ERR_OK, Uc, UcError
from unicorn.unicorn_py3.unicorn import uclib

# Callback signatures, from unicorn.h.
_ENGINE = ctypes.c_void_p
OutCallback = ctypes.CFUNCTYPE(None, _ENGINE, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p)
InCallback = ctypes.CFUNCTYPE(ctypes.c_uint32, _ENGINE, ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p)
IntrCallback = ctypes.CFUNCTYPE(None, _ENGINE, ctypes.c_uint32, ctypes.c_void_p)
BlockCallback = ctypes.CFUNCTYPE(None, _ENGINE, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p)
UnmappedCallback = ctypes.CFUNCTYPE(
    ctypes.c_bool, _ENGINE, ctypes.c_int, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
)
MmioReadCallback = ctypes.CFUNCTYPE(ctypes.c_uint64, _ENGINE, ctypes.c_uint64, ctypes.c_uint, ctypes.c_void_p)
MmioWriteCallback = ctypes.CFUNCTYPE(None, _ENGINE, ctypes.c_uint64, ctypes.c_uint, ctypes.c_uint64, ctypes.c_void_p)


def _check(status: int) -> None:
    if status != UC_ERR_OK:
        raise UcError(status)


def hook_add(uc: Uc, kind: int, callback: Any, *extra: Any) -> int:
    """uc_hook_add over the whole address space; ``extra`` is the instruction id for
    UC_HOOK_INSN. Returns the hook handle."""
    handle = ctypes.c_size_t()
    _check(
        uclib.uc_hook_add(
            uc._uch,
            ctypes.byref(handle),
            kind,
            ctypes.cast(callback, ctypes.c_void_p),
            None,
            ctypes.c_uint64(1),
            ctypes.c_uint64(0),
            *extra,
        )
    )
    return int(handle.value)


def hook_del(uc: Uc, handle: int) -> None:
    """uc_hook_del. Unicorn frees the hook at the end of the next emulation, and never
    calls it again meanwhile."""
    _check(uclib.uc_hook_del(uc._uch, ctypes.c_size_t(handle)))


def mmio_map(uc: Uc, gpa: int, size: int, read: Any, write: Any) -> None:
    """uc_mmio_map with ``gpa`` as both callbacks' user data, so one callback pair can
    serve every range (ctypes hands a NULL user data to Python as None)."""
    _check(
        uclib.uc_mmio_map(
            uc._uch, gpa, size, ctypes.cast(read, ctypes.c_void_p), gpa, ctypes.cast(write, ctypes.c_void_p), gpa
        )
    )


def emu_stop(uc: Uc) -> None:
    """uc_emu_stop: safe from any thread (it sets a flag and exits the current block);
    harmless when the engine is not emulating (the next uc_emu_start clears it)."""
    uclib.uc_emu_stop(uc._uch)


def emu_stop_handle(handle: int) -> None:
    """uc_emu_stop on the native handle a callback receives."""
    uclib.uc_emu_stop(handle)


def close_engine(uc: Uc) -> None:
    """uc_close now rather than whenever the binding's finalizer runs; the finalizer then
    does nothing. The engine must not be used afterwards."""
    finalizer = getattr(uc, "_Uc__finalizer", None)
    if finalizer is None:  # a binding without the finalizer: let it close on collection
        return
    finalizer()
