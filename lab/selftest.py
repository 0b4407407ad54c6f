"""Smoke check of the lab's KVM: run it with ``lab/run -- python3 lab/selftest.py``.

Opens /dev/kvm, prints KVM_GET_API_VERSION, KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES) and
KVM_CHECK_EXTENSION(KVM_CAP_PRE_FAULT_MEMORY), and exits 0 iff the latter is 1.  With
``--private`` it also requires VM_TYPES to include KVM_X86_SW_PROTECTED_VM (bit 1).
Standard library only (ctypes and os), so it runs with any host interpreter.
"""

from __future__ import annotations

import ctypes
import os
import sys

KVMIO = 0xAE
KVM_GET_API_VERSION = KVMIO << 8 | 0x00  # _IO(KVMIO, 0x00)
KVM_CHECK_EXTENSION = KVMIO << 8 | 0x03  # _IO(KVMIO, 0x03)
KVM_CAP_VM_TYPES = 235
KVM_CAP_PRE_FAULT_MEMORY = 236
KVM_X86_SW_PROTECTED_VM = 1

libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
libc.ioctl.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg: int = 0) -> int:
    """ioctl(2) with an integer argument; raise OSError on failure."""
    result: int = libc.ioctl(fd, request, arg)
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


def main(argv: list[str]) -> int:
    """Print the KVM facts that matter to the lab; 0 iff PRE_FAULT_MEMORY is there."""
    private = "--private" in argv
    with open("/proc/sys/kernel/osrelease") as handle:
        print(f"kernel {handle.read().strip()}")
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        api = ioctl(fd, KVM_GET_API_VERSION)
        vm_types = ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_VM_TYPES)
        prefault = ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_PRE_FAULT_MEMORY)
    finally:
        os.close(fd)
    print(f"KVM_GET_API_VERSION = {api}")
    print(f"KVM_CHECK_EXTENSION({KVM_CAP_VM_TYPES}) VM_TYPES = {vm_types:#x}")
    print(f"KVM_CHECK_EXTENSION({KVM_CAP_PRE_FAULT_MEMORY}) PRE_FAULT_MEMORY = {prefault}")
    ok = prefault == 1 and (not private or bool(vm_types & 1 << KVM_X86_SW_PROTECTED_VM))
    print("selftest: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
