"""Builds the compiled cffi module (kvm_abi._kvm_cffi) when a C compiler is present, and
ships the bundled guest images. Everything else is in pyproject.toml.

- The extension is built for the limited API (cffi's ``py_limited_api``), so one wheel,
  tagged ``cp311-abi3``, serves every CPython from 3.11 on. Without a compiler the install
  still succeeds and kvm_abi runs in cffi ABI mode (slower per ioctl, same results).
- The images stay beside their sources in ``guests/``; the data package
  ``vmm._guest_images`` is mapped onto that directory, so a wheel carries them and an
  editable install reads them in place (``vmm.guests`` finds them either way).
"""

from setuptools import find_packages, setup
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


setup(
    packages=[*find_packages(include=["kvm_abi", "kvm_abi.*", "vmm", "vmm.*"]), "vmm._guest_images"],
    package_dir={"vmm._guest_images": "guests"},
    cffi_modules=["kvm_abi/_build.py:ffibuilder"],
    cmdclass={"build_ext": OptionalBuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
