"""``Kvm``: the /dev/kvm system handle (one object per fd, one method per ioctl)."""

from __future__ import annotations

import errno
import os
from types import TracebackType

import kvm_abi as abi
from kvm_abi import Cap, KvmError, ffi
from kvm_abi.types import Cpuid2
from vmm.errors import Unavailable
from vmm.vm import Vm

DEFAULT_DEVICE = "/dev/kvm"
DEVICE_ENV = "VMM_KVM_DEVICE"


def kvm_device_path() -> str:
    """The KVM device to open: ``$VMM_KVM_DEVICE`` if set (to simulate a host without KVM,
    point it at a missing file), else /dev/kvm."""
    return os.environ.get(DEVICE_ENV) or DEFAULT_DEVICE


def _open_error(path: str, err: OSError) -> Unavailable:
    code = err.errno
    if code == errno.ENOENT:
        hint = "no such device (load kvm_intel or kvm_amd; the CPU needs virtualization enabled)"
    elif code in (errno.EACCES, errno.EPERM):
        hint = "permission denied (add your user to the 'kvm' group, or grant access with a udev rule)"
    elif code == errno.ENXIO or code == errno.ENODEV:
        hint = "the device exists but no KVM module is behind it"
    else:
        hint = os.strerror(code or 0)
    return Unavailable(f"{path}: {hint}")


class Kvm:
    """The KVM system fd. ``Kvm()`` opens the device and checks API version 12.

    >>> with Kvm() as kvm:                                  # doctest: +SKIP
    ...     kvm.check_extension(Cap.USER_MEMORY)
    1
    """

    __slots__ = ("_fd", "path", "_mmap_size", "__weakref__")

    def __init__(self, path: str | None = None) -> None:
        self.path = path or kvm_device_path()
        self._fd = -1
        self._mmap_size = 0
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise _open_error(self.path, e) from e
        try:
            version = self.get_api_version()
        except KvmError as e:
            self.close()
            raise Unavailable(f"{self.path}: not a KVM device ({e.errno_name} on KVM_GET_API_VERSION)") from e
        if version != abi.KVM_API_VERSION:
            self.close()
            raise Unavailable(f"{self.path}: KVM API version {version}, expected {abi.KVM_API_VERSION}")

    # --- lifetime ------------------------------------------------------------------------
    @property
    def fd(self) -> int:
        """The open /dev/kvm file descriptor."""
        if self._fd < 0:
            raise ValueError("Kvm is closed")
        return self._fd

    def close(self) -> None:
        """Close /dev/kvm (idempotent). VMs created from it stay valid until closed."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Kvm({self.path!r}, fd={self._fd})"

    # --- ioctls --------------------------------------------------------------------------
    def get_api_version(self) -> int:
        """KVM_GET_API_VERSION (12 on every kernel since 2.6.22)."""
        return abi.ioctl(self.fd, abi.KVM_GET_API_VERSION, target="kvm")

    def check_extension(self, cap: Cap | int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm: 0 if absent, else a capability-specific value."""
        return abi.ioctl(self.fd, abi.KVM_CHECK_EXTENSION, int(cap), target="kvm", detail=_cap_name(cap))

    def get_vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to mmap from a vCPU fd (kvm_run, PIO page, ...)."""
        if not self._mmap_size:
            self._mmap_size = abi.ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE, target="kvm")
        return self._mmap_size

    def get_supported_cpuid(self, max_entries: int = abi.KVM_MAX_CPUID_ENTRIES) -> Cpuid2:
        """KVM_GET_SUPPORTED_CPUID: an owned ``struct kvm_cpuid2 *`` with ``nent`` entries."""
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
        abi.ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, cpuid, target="kvm")
        return cpuid

    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores (E2BIG reports the count)."""
        probe = ffi.new("struct kvm_msr_list *", {"nmsrs": 0, "indices": 0})
        try:
            abi.ioctl(self.fd, abi.KVM_GET_MSR_INDEX_LIST, probe, target="kvm")
            return []
        except KvmError as e:
            if e.errno != errno.E2BIG:
                raise
        count = probe.nmsrs
        msrs = ffi.new("struct kvm_msr_list *", {"nmsrs": count, "indices": count})
        abi.ioctl(self.fd, abi.KVM_GET_MSR_INDEX_LIST, msrs, target="kvm")
        return list(msrs.indices[0 : msrs.nmsrs])

    def create_vm(self, vm_type: int = 0) -> Vm:
        """KVM_CREATE_VM: a new VM of ``vm_type`` (0 = KVM_X86_DEFAULT_VM)."""
        fd = abi.ioctl(self.fd, abi.KVM_CREATE_VM, vm_type, target="kvm", detail=f"type={vm_type}")
        try:
            return Vm(self, fd, vm_type)
        except BaseException:
            os.close(fd)
            raise

    # --- reports -------------------------------------------------------------------------
    def capabilities(self) -> dict[str, int]:
        """Every capability this project knows, by name (without ``KVM_CAP_``), with values."""
        return {cap.name: self.check_extension(cap) for cap in Cap}


def _cap_name(cap: Cap | int) -> str:
    try:
        return f"KVM_CAP_{Cap(cap).name}"
    except ValueError:
        return f"capability {int(cap)}"
