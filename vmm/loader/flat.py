"""Flat binaries: the bytes go to one address; execution starts there (or at --entry).

Defaults: real mode at 0x7c00 (a boot sector's address); in other modes, 0x100000.
"""

from __future__ import annotations

from collections.abc import Sequence

from vmm.cpu.layout import BootLayout, CpuMode
from vmm.loader import ImagePlan, Segment, check_placement


def plan_flat(
    path: str,
    data: bytes,
    ram: Sequence[tuple[int, int]],
    *,
    mode: CpuMode | None = None,
    load_addr: int | None = None,
    entry: int | None = None,
) -> ImagePlan:
    """``data`` at ``load_addr`` (default by mode), starting at ``entry`` (default: there)."""
    mode = mode or CpuMode.REAL
    if load_addr is None:
        load_addr = BootLayout.FLAT_REAL_LOAD if mode is CpuMode.REAL else BootLayout.FLAT_LOAD
    check_placement(path, ram, mode, load_addr, len(data))
    start = load_addr if entry is None else entry
    return ImagePlan(path, "flat", start, mode, (Segment(load_addr, data, len(data)),))
