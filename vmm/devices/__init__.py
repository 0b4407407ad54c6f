"""Devices on the port and MMIO buses: one small file per device.

Every device has the same shape: a docstring saying what is emulated and what is
not, register names as constants, ``read(offset, data)`` / ``write(offset, data)``
on memoryviews, side effects through injected callables, no module-level state.
"""

from vmm.devices.bus import Bus
from vmm.devices.cmos import Cmos
from vmm.devices.exit_port import ExitPort
from vmm.devices.fw_cfg import FwCfg
from vmm.devices.i8042 import I8042
from vmm.devices.marker import Marker
from vmm.devices.post import PostCode
from vmm.devices.serial import Serial16550
from vmm.devices.sysctl import SystemControlA, SystemControlB

__all__ = [
    "I8042",
    "Bus",
    "Cmos",
    "ExitPort",
    "FwCfg",
    "Marker",
    "PostCode",
    "Serial16550",
    "SystemControlA",
    "SystemControlB",
]
