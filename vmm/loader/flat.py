"""Flat binaries: the bytes go to one address; execution starts there (or at --entry).

Defaults: real mode at 0x7c00 (a boot sector's address); in other modes, 0x100000.
"""

from __future__ import annotations

from vmm.cpu.layout import BootLayout, CpuMode
from vmm.loader import LoadedImage, check_placement
from vmm.memory import GuestMemory


def load_flat(
    path: str,
    data: bytes,
    mem: GuestMemory,
    *,
    mode: CpuMode | None = None,
    load_addr: int | None = None,
    entry: int | None = None,
) -> LoadedImage:
    """Write ``data`` at ``load_addr`` (default by mode) and start at ``entry`` (default: there)."""
    mode = mode or CpuMode.REAL
    if load_addr is None:
        load_addr = BootLayout.FLAT_REAL_LOAD if mode is CpuMode.REAL else BootLayout.FLAT_LOAD
    check_placement(path, mem, mode, load_addr, len(data))
    mem.write(load_addr, data)
    return LoadedImage(path, "flat", load_addr if entry is None else entry, mode, load_addr, load_addr + len(data))
