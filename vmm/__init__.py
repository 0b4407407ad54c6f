"""A small, fast virtual machine monitor that drives /dev/kvm through cffi.

>>> from vmm import Machine, MachineConfig, guests                 # doctest: +SKIP
>>> result = Machine(MachineConfig.parse(image=guests.path("hello64"))).run(timeout=5)
>>> result.status, result.console
(1, b'hello from long mode\\n')

The names below are imported on first use (PEP 562), not with the package: loading
``vmm.pytest_plugin`` in an unrelated pytest run, or ``vmm --help``, must not load cffi,
the ABI layer and the machine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vmm.config import MachineConfig
    from vmm.errors import GuestMemoryError, InputError, Unavailable, VmmError
    from vmm.kvm import Kvm
    from vmm.machine import Machine, RunResult
    from vmm.memory import Backing, GuestMemory, GuestRegion
    from vmm.vcpu import Vcpu
    from vmm.vm import Vm

__version__ = "0.1.0"

_EXPORTS = {
    "Backing": "vmm.memory",
    "GuestMemory": "vmm.memory",
    "GuestMemoryError": "vmm.errors",
    "GuestRegion": "vmm.memory",
    "InputError": "vmm.errors",
    "Kvm": "vmm.kvm",
    "Machine": "vmm.machine",
    "MachineConfig": "vmm.config",
    "RunResult": "vmm.machine",
    "Unavailable": "vmm.errors",
    "Vcpu": "vmm.vcpu",
    "Vm": "vmm.vm",
    "VmmError": "vmm.errors",
}

__all__ = [
    "Backing",
    "GuestMemory",
    "GuestMemoryError",
    "GuestRegion",
    "InputError",
    "Kvm",
    "Machine",
    "MachineConfig",
    "RunResult",
    "Unavailable",
    "Vcpu",
    "Vm",
    "VmmError",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vmm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
