"""Builds the compiled cffi module (kvm_abi._kvm_cffi) when a C compiler is present.

Without one the install still succeeds and kvm_abi runs in cffi ABI mode (slower
per ioctl, same results). Everything else is in pyproject.toml.
"""

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing: the compiled module is a fast path."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # no compiler, no headers
            self.warn(f"kvm_abi fast path not built ({e}); using cffi ABI mode")

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as e:
            self.warn(f"kvm_abi fast path not built ({e}); using cffi ABI mode")


setup(cffi_modules=["kvm_abi/_build.py:ffibuilder"], cmdclass={"build_ext": OptionalBuildExt})
