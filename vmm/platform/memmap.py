"""The RAM map a PC-convention guest is given, and a small allocator over it.

The VMM's RAM is ``[0, min(size, 3 GiB))`` and, beyond that, ``[4 GiB, ...)``
(:meth:`vmm.cpu.layout.BootLayout.ram_ranges`). A PC guest (Multiboot, Linux) expects the
map a BIOS reports, so :func:`pc_ram_map` mirrors what QEMU with SeaBIOS gives a PC in e820:

======================== ========== ============================================
0x00000000-0x0009fbff    usable     conventional memory
0x0009fc00-0x0009ffff    reserved   the extended BIOS data area (1 KiB, SeaBIOS's)
0x000a0000-0x000effff    (absent)   VGA window and option ROMs: not listed, as on a PC
0x000f0000-0x000fffff    reserved   the BIOS area
0x00100000-end of low    usable     up to the 3 GiB MMIO hole (or the end of RAM)
0x100000000-             usable     RAM beyond 3 GiB
======================== ========== ============================================

SeaBIOS's own reservations (its tables at the top of low RAM, the ROM at 0xfffc0000) are
left out: this VMM has no BIOS. RAM does exist behind the reserved and absent windows; the
guest is only told not to use it. The table is format-neutral: :func:`multiboot_mmap` and
:func:`e820_table` turn it into the bytes each boot protocol wants.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vmm.cpu.layout import GiB, KiB, MiB

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5

EBDA_START = 0x9FC00
VGA_START = 0xA0000
BIOS_START = 0xF0000
HIGH_START = 1 * MiB
FOUR_GIB = 4 * GiB

# (start, end, type) of the PC's first MiB; None = not listed. Everything from 1 MiB up is RAM.
_PC_LOW: tuple[tuple[int, int, int | None], ...] = (
    (0, EBDA_START, E820_RAM),
    (EBDA_START, VGA_START, E820_RESERVED),
    (VGA_START, BIOS_START, None),
    (BIOS_START, HIGH_START, E820_RESERVED),
)

_MB_MMAP_ENTRY = struct.Struct("<IQQI")  # size (20: the bytes after it), base, length, type
_E820_ENTRY = struct.Struct("<QQI")  # Linux's struct boot_e820_entry (packed)
MULTIBOOT_MMAP_ENTRY_SIZE = _MB_MMAP_ENTRY.size  # 24
E820_ENTRY_SIZE = _E820_ENTRY.size  # 20


@dataclass(frozen=True, slots=True)
class RamMapEntry:
    """One range of the guest's physical address space and what it is (an ``E820_*`` type)."""

    base: int
    length: int
    type: int

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.base + self.length


def pc_ram_map(ram: Sequence[tuple[int, int]]) -> tuple[RamMapEntry, ...]:
    """The PC RAM map (sorted, adjacent same-type ranges merged) for the VMM's RAM ranges
    ``ram`` ((base, size) pairs): see the table in the module docstring."""
    pieces: list[RamMapEntry] = []
    for base, size in sorted(ram):
        if base < 0 or size <= 0:
            raise ValueError(f"bad RAM range {base:#x}+{size:#x}")
        end = base + size
        for lo, hi, kind in (*_PC_LOW, (HIGH_START, max(end, HIGH_START), E820_RAM)):
            start, stop = max(base, lo), min(end, hi)
            if kind is not None and start < stop:
                pieces.append(RamMapEntry(start, stop - start, kind))
    merged: list[RamMapEntry] = []
    for entry in pieces:
        if merged and merged[-1].end > entry.base:
            raise ValueError(f"RAM ranges overlap at {entry.base:#x}")
        if merged and merged[-1].end == entry.base and merged[-1].type == entry.type:
            last = merged.pop()
            entry = RamMapEntry(last.base, last.length + entry.length, entry.type)
        merged.append(entry)
    return tuple(merged)


def multiboot_mmap(entries: Iterable[RamMapEntry]) -> bytes:
    """Multiboot v1's memory map: per entry ``size`` (= 20), ``base_addr``, ``length``,
    ``type``; ``mmap_length`` is the length of these bytes."""
    return b"".join(_MB_MMAP_ENTRY.pack(_MB_MMAP_ENTRY.size - 4, e.base, e.length, e.type) for e in entries)


def e820_table(entries: Iterable[RamMapEntry]) -> bytes:
    """Linux's e820 table (``boot_params.e820_table``): per entry ``addr``, ``size``, ``type``."""
    return b"".join(_E820_ENTRY.pack(e.base, e.length, e.type) for e in entries)


def usable_ranges(entries: Iterable[RamMapEntry], below: int | None = None) -> list[tuple[int, int]]:
    """(base, size) of the usable RAM, clipped to end at ``below`` if given."""
    out = []
    for e in entries:
        end = e.end if below is None else min(e.end, below)
        if e.type == E820_RAM and e.base < end:
            out.append((e.base, end - e.base))
    return out


def lower_upper_kib(entries: Iterable[RamMapEntry]) -> tuple[int, int]:
    """(KiB of usable RAM from 0, at most 640; KiB of usable RAM from 1 MiB to the first hole):
    what a BIOS reports as conventional and extended memory (Multiboot's mem_lower/mem_upper)."""
    lower = upper = 0
    for e in entries:
        if e.type != E820_RAM:
            continue
        if e.base == 0:
            lower = min(e.end, 640 * KiB) // KiB
        elif e.base <= HIGH_START < e.end:
            upper = (e.end - HIGH_START) // KiB
    return lower, upper


def in_usable(entries: Iterable[RamMapEntry], base: int, size: int, below: int = FOUR_GIB) -> bool:
    """Whether [base, base+size) lies inside one usable entry and ends at or below ``below``."""
    if base < 0 or size < 0 or base + size > below:
        return False
    return any(e.type == E820_RAM and e.base <= base and base + size <= e.end for e in entries)


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def find_free(
    entries: Iterable[RamMapEntry],
    size: int,
    *,
    align: int = 16,
    avoid: Iterable[tuple[int, int]] = (),
    lowest: int = 0,
    below: int = FOUR_GIB,
) -> int | None:
    """The lowest ``align``-aligned address at or above ``lowest`` where ``size`` bytes fit
    inside one usable entry, end at or below ``below`` and overlap none of ``avoid``
    ((base, size) pairs); None if there is none."""
    if size <= 0 or align <= 0 or align & (align - 1):
        raise ValueError(f"find_free: bad size {size} or alignment {align}")
    blocked = sorted((b, b + s) for b, s in avoid if s > 0)
    for e in sorted(entries, key=lambda e: e.base):
        if e.type != E820_RAM:
            continue
        limit = min(e.end, below)
        addr = _align_up(max(e.base, lowest), align)
        while addr + size <= limit:
            clash = next((stop for start, stop in blocked if start < addr + size and addr < stop), None)
            if clash is None:
                return addr
            addr = _align_up(clash, align)
    return None


class RamAllocator:
    """Hands out non-overlapping pieces of usable RAM below ``below``, around ranges already
    taken (an image, say). A loader plans with it; nothing is written."""

    def __init__(self, entries: Iterable[RamMapEntry], *, below: int = FOUR_GIB) -> None:
        self.entries = tuple(entries)
        self.below = below
        self._taken: list[tuple[int, int]] = []

    @property
    def taken(self) -> tuple[tuple[int, int], ...]:
        """(base, size) of everything reserved or allocated so far, in that order."""
        return tuple(self._taken)

    @property
    def top(self) -> int:
        """One past the highest byte taken (0 if nothing is)."""
        return max((b + s for b, s in self._taken), default=0)

    def overlaps(self, base: int, size: int) -> bool:
        """Whether [base, base+size) overlaps anything taken."""
        return any(b < base + size and base < b + s for b, s in self._taken if s > 0)

    def reserve(self, base: int, size: int) -> None:
        """Mark [base, base+size) as taken (the caller checked where it is)."""
        self._taken.append((base, size))

    def alloc(self, size: int, *, align: int = 16, lowest: int = 0, below: int | None = None) -> int | None:
        """Take ``size`` bytes at the lowest fitting address at or above ``lowest`` (and ending
        at or below ``below``, default the allocator's limit); None if nothing fits."""
        limit = self.below if below is None else min(below, self.below)
        addr = find_free(self.entries, size, align=align, avoid=self._taken, lowest=lowest, below=limit)
        if addr is not None:
            self._taken.append((addr, size))
        return addr
