"""Backends: where vCPUs execute. ``open_backend`` picks one (psutil-style: chosen once,
behind one protocol, :mod:`vmm.backends.base`)."""

from __future__ import annotations

from collections.abc import Callable

from vmm.backends.base import Backend
from vmm.errors import Unavailable


def kvm_usable() -> tuple[bool, str]:
    """(True, "") if /dev/kvm opens and a VM can be created; else (False, why)."""
    from kvm_abi import KvmError
    from vmm.kvm import Kvm

    try:
        with Kvm() as kvm, kvm.create_vm():
            return True, ""
    except Unavailable as e:
        return False, str(e)
    except KvmError as e:
        return False, f"{e.ioctl} failed: {e.errno_name}"


def open_backend(name: str = "auto", notice: Callable[[str], None] | None = None, *, irqchip: bool = True) -> Backend:
    """``kvm``, ``emulator``, or ``auto`` (KVM when it works, else the emulator, saying why
    through ``notice``). ``irqchip``: KVM's in-kernel interrupt controllers (the emulator
    always models its local APICs)."""
    from kvm_abi import KvmError

    if name in ("kvm", "auto"):
        from vmm.backends.kvm import KvmBackend

        try:
            return KvmBackend(irqchip=irqchip)
        except Unavailable as e:
            if name == "kvm":
                raise
            reason = str(e)
        except KvmError as e:
            if name == "kvm":
                raise Unavailable(f"KVM cannot create a VM: {e}") from e
            reason = f"KVM cannot create a VM: {e}"
        if notice is not None:
            notice(f"{reason}; running on the in-process emulator")
    return _open_emulator()


def _open_emulator() -> Backend:
    try:
        from vmm.backends.emulator import EmulatorBackend
    except ImportError as e:
        raise Unavailable(f"the in-process emulator is not available: {e}") from e
    return EmulatorBackend()
