"""The emulator's guest-physical map: RAM regions (mapped by pointer) and the MMIO
ranges around them, computed from :class:`~vmm.memory.GuestMemory` alone."""

from __future__ import annotations

from vmm.cpu.layout import BootLayout
from vmm.cpu.state import mapped_size
from vmm.memory import PAGE_SIZE, GuestMemory


def scratch_page(memory: GuestMemory) -> int | None:
    """The last page below 4 GiB without RAM (the top of the MMIO hole in the boot
    layout), or None if RAM covers everything below 4 GiB."""
    page = BootLayout.MMIO_HOLE_END - PAGE_SIZE
    while page >= 0:
        region = memory.region_at(page)
        if region is None:
            return page
        page = region.gpa - PAGE_SIZE
    return None


def mmio_ranges(memory: GuestMemory) -> list[tuple[int, int]]:
    """(gpa, size) of every gap without RAM below the top of the identity map (at least
    4 GiB, as on KVM every such address is reachable and exits as MMIO). The page
    :func:`scratch_page` names is a range of its own, so it can be lent out and given
    back without splitting a larger range."""
    limit = mapped_size(memory.top)
    gaps: list[tuple[int, int]] = []
    cursor = 0
    for region in memory:
        if region.gpa > cursor:
            gaps.append((cursor, region.gpa - cursor))
        cursor = max(cursor, region.end)
    if cursor < limit:
        gaps.append((cursor, limit - cursor))
    page = scratch_page(memory)
    out: list[tuple[int, int]] = []
    for gpa, size in gaps:
        end = gpa + size
        if page is None or not gpa <= page < end:
            out.append((gpa, size))
            continue
        if page > gpa:
            out.append((gpa, page - gpa))
        out.append((page, PAGE_SIZE))
        if page + PAGE_SIZE < end:
            out.append((page + PAGE_SIZE, end - page - PAGE_SIZE))
    return out
