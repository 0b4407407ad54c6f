"""A small, fast virtual machine monitor that drives /dev/kvm through cffi.

>>> from vmm import Machine, MachineConfig, guests                 # doctest: +SKIP
>>> result = Machine(MachineConfig.parse(image=guests.path("hello64"))).run(timeout=5)
>>> result.status, result.console
(1, b'hello from long mode\\n')
"""

from vmm.config import MachineConfig
from vmm.errors import GuestMemoryError, InputError, Unavailable, VmmError
from vmm.kvm import Kvm
from vmm.machine import Machine, RunResult
from vmm.memory import Backing, GuestMemory, GuestRegion
from vmm.vcpu import Vcpu
from vmm.vm import Vm

__version__ = "0.1.0"

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
