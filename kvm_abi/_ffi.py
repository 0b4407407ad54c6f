"""The FFI object: the compiled module when it was built from the current sources, else ABI mode.

``VMM_CFFI=abi`` in the environment forces ABI mode (benchmarks compare both).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from kvm_abi._cdefs import LIBC_ABI, TYPES, digest

ffi: Any
lib: Any
COMPILED: bool


def built_digest(module: Any) -> str:
    """The source digest a compiled module was built from ("" for a build too old to say)."""
    get = getattr(module.lib, "vmm_source_digest", None)
    return str(module.ffi.string(get()).decode()) if get is not None else ""


def is_current(module: Any) -> bool:
    """Whether ``module`` was built from today's ``_cdefs.py``: declarations and C source alike,
    so a build from before an edit of ``vmm_run_vcpu`` is refused, not run."""
    return built_digest(module) == digest()


_compiled: Any = None
if os.environ.get("VMM_CFFI", "") != "abi":
    try:
        import importlib

        # By name: the compiled module exists only after a build, so type checkers cannot see it.
        _compiled = importlib.import_module("kvm_abi._kvm_cffi")
    except ImportError:  # not built: an sdist install without a compiler, or a bare checkout
        _compiled = None

if _compiled is not None and not is_current(_compiled):
    warnings.warn(
        "kvm_abi's compiled module is stale (built from older sources); using cffi ABI mode. "
        "Reinstall the project (pip install -e .) to rebuild it.",
        RuntimeWarning,
        stacklevel=2,
    )
    _compiled = None

if _compiled is not None:
    ffi, lib, COMPILED = _compiled.ffi, _compiled.lib, True
else:
    from cffi import FFI  # only here: the compiled module brings its own ffi

    ffi = FFI()
    ffi.cdef(TYPES + LIBC_ABI)
    lib = ffi.dlopen(None)
    COMPILED = False
