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


EMULATOR_MISSING = "the in-process emulator needs the unicorn package: pip install 'vmm[emulator]'"


def emulator_usable() -> tuple[bool, str]:
    """(True, "") if the emulator backend can be imported (unicorn is installed); else
    (False, why), with the install hint when it is unicorn that is missing."""
    try:
        import vmm.backends.emulator  # noqa: F401
    except ImportError as e:
        return False, _emulator_missing(e)
    return True, ""


def _emulator_missing(e: ImportError) -> str:
    # unicorn is an extra (vmm[emulator]); any other ImportError is reported as it is.
    if (e.name or "").split(".")[0] == "unicorn":
        return EMULATOR_MISSING
    return f"the in-process emulator is not available: {e}"


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
        usable, why = emulator_usable()
        if not usable:  # one line: why not KVM, and why not the fallback either
            raise Unavailable(f"{reason}; {why}")
        if notice is not None:
            notice(f"{reason}; running on the in-process emulator")
    return _open_emulator()


def _open_emulator() -> Backend:
    try:
        from vmm.backends.emulator import EmulatorBackend
    except ImportError as e:
        raise Unavailable(_emulator_missing(e)) from e
    return EmulatorBackend()
