"""cffi builder for the compiled fast path, ``kvm_abi._kvm_cffi`` (API mode).

Run at install time by ``setup.py``; ``python kvm_abi/_build.py`` builds it in
place. Everything the module is built from is in ``_cdefs.py`` (declarations and
the whole C source); the module embeds their digest, and ``_ffi`` uses it only
while that still matches the sources. Without it, ``kvm_abi`` falls back to ABI
mode (``dlopen``), which works everywhere but costs ~1.5 us more per ioctl (see
host-kvm.md).
"""

import importlib.util
import os
from types import ModuleType

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_cdefs() -> ModuleType:
    # Load _cdefs.py by path: importing the kvm_abi package here would import a stale
    # compiled module while we are rebuilding it.
    spec = importlib.util.spec_from_file_location("_kvm_abi_cdefs", os.path.join(_HERE, "_cdefs.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_cdefs = _load_cdefs()
ffibuilder = FFI()
ffibuilder.cdef(_cdefs.API_CDEF)
# The limited API: one abi3 build serves every CPython >= 3.11 (setup.py tags the wheel).
ffibuilder.set_source("kvm_abi._kvm_cffi", _cdefs.api_source(), py_limited_api=True)

if __name__ == "__main__":
    # The file name `pip install` gives it (cffi builds for the limited API): a build here
    # must replace that one, not sit beside it under a name the import system prefers.
    ffibuilder.compile(tmpdir=os.path.dirname(_HERE), verbose=False, target="_kvm_cffi.abi3.so")
    for leftover in ("_kvm_cffi.o",):
        path = os.path.join(_HERE, leftover)
        if os.path.exists(path):
            os.remove(path)
