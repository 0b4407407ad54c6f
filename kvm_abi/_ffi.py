"""The FFI object: the compiled module when it was built, else ABI mode.

``VMM_CFFI=abi`` in the environment forces ABI mode (benchmarks compare both).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from cffi import FFI

from kvm_abi._cdefs import LIBC_ABI, TYPES, digest

ffi: Any
lib: Any
COMPILED: bool

_compiled: Any = None
if os.environ.get("VMM_CFFI", "") != "abi":
    try:
        import importlib

        # By name: the compiled module exists only after a build, so type checkers cannot see it.
        _compiled = importlib.import_module("kvm_abi._kvm_cffi")
    except ImportError:  # not built: an sdist install without a compiler, or a bare checkout
        _compiled = None


def _built_digest(module: Any) -> str:
    get = getattr(module.lib, "vmm_cdefs_digest", None)
    return module.ffi.string(get()).decode() if get is not None else ""


if _compiled is not None and _built_digest(_compiled) != digest():
    warnings.warn(
        "kvm_abi's compiled module is stale (built from older declarations); using cffi ABI mode. "
        "Reinstall the project (pip install -e .) to rebuild it.",
        RuntimeWarning,
        stacklevel=2,
    )
    _compiled = None

if _compiled is not None:
    ffi, lib, COMPILED = _compiled.ffi, _compiled.lib, True
else:
    ffi = FFI()
    ffi.cdef(TYPES + LIBC_ABI)
    lib = ffi.dlopen(None)
    COMPILED = False
