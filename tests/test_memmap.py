"""The PC RAM map (e820 / Multiboot mmap) and the allocator over it (pure; no KVM needed)."""

from __future__ import annotations

import struct

import pytest

from vmm.cpu.layout import BootLayout
from vmm.platform.memmap import (
    E820_RAM,
    E820_RESERVED,
    RamAllocator,
    RamMapEntry,
    e820_table,
    find_free,
    in_usable,
    lower_upper_kib,
    multiboot_mmap,
    pc_ram_map,
    usable_ranges,
)

MiB, GiB = 1 << 20, 1 << 30
PC_LOW = [
    RamMapEntry(0, 0x9FC00, E820_RAM),
    RamMapEntry(0x9FC00, 0x400, E820_RESERVED),
    RamMapEntry(0xF0000, 0x10000, E820_RESERVED),
]


def test_map_of_64_mib_mirrors_a_pc():
    assert list(pc_ram_map(BootLayout.ram_ranges(64 * MiB))) == [*PC_LOW, RamMapEntry(MiB, 63 * MiB, E820_RAM)]


def test_map_above_4_gib():
    entries = pc_ram_map(BootLayout.ram_ranges(5 * GiB))
    assert list(entries) == [
        *PC_LOW,
        RamMapEntry(MiB, 3 * GiB - MiB, E820_RAM),
        RamMapEntry(4 * GiB, 2 * GiB, E820_RAM),
    ]
    assert usable_ranges(entries, below=4 * GiB) == [(0, 0x9FC00), (MiB, 3 * GiB - MiB)]
    assert usable_ranges(entries)[-1] == (4 * GiB, 2 * GiB)


def test_map_of_exactly_1_mib_has_no_upper_memory():
    assert list(pc_ram_map([(0, MiB)])) == PC_LOW
    assert lower_upper_kib(pc_ram_map([(0, MiB)])) == (639, 0)


def test_adjacent_ram_ranges_merge_and_bad_ones_are_refused():
    assert pc_ram_map([(0, 2 * MiB), (2 * MiB, 2 * MiB)])[-1] == RamMapEntry(MiB, 3 * MiB, E820_RAM)
    with pytest.raises(ValueError, match="overlap"):
        pc_ram_map([(0, 2 * MiB), (MiB, 2 * MiB)])
    with pytest.raises(ValueError, match="bad RAM range"):
        pc_ram_map([(0, 0)])


@pytest.mark.parametrize(("size", "upper"), [(64 * MiB, 63 * 1024), (5 * GiB, (3 * GiB - MiB) // 1024)])
def test_lower_and_upper_kib(size, upper):
    assert lower_upper_kib(pc_ram_map(BootLayout.ram_ranges(size))) == (639, upper)


def test_multiboot_mmap_and_e820_bytes():
    entries = pc_ram_map(BootLayout.ram_ranges(5 * GiB))
    mmap = multiboot_mmap(entries)
    assert len(mmap) == 24 * len(entries)
    decoded = [struct.unpack_from("<IQQI", mmap, i) for i in range(0, len(mmap), 24)]
    assert decoded == [(20, e.base, e.length, e.type) for e in entries]
    table = e820_table(entries)
    assert [struct.unpack_from("<QQI", table, i) for i in range(0, len(table), 20)] == [
        (e.base, e.length, e.type) for e in entries
    ]


def test_in_usable():
    entries = pc_ram_map(BootLayout.ram_ranges(64 * MiB))
    assert in_usable(entries, 0x1000, 0x1000)
    assert not in_usable(entries, 0x9F000, 0x1000)  # runs into the EBDA
    assert not in_usable(entries, 0xF0000, 16)  # BIOS area
    assert in_usable(entries, MiB, 63 * MiB) and not in_usable(entries, MiB, 63 * MiB + 1)
    assert not in_usable(entries, 0x1000, 0x1000, below=0x1800)


def test_find_free_aligns_skips_reserved_and_avoids():
    entries = pc_ram_map(BootLayout.ram_ranges(64 * MiB))
    assert find_free(entries, 0x100, align=0x1000, lowest=0x1001) == 0x2000
    assert find_free(entries, 0x100, avoid=[(0, 0x500)]) == 0x500
    # Nothing at or above 0x9f000 in conventional memory: the next usable RAM is at 1 MiB.
    assert find_free(entries, 0x2000, align=0x1000, lowest=0x9F000) == MiB
    assert find_free(entries, 0x1000, align=0x1000, avoid=[(0, 0x9FC00), (MiB, 0x1234)]) == MiB + 0x2000
    assert find_free(entries, 64 * MiB) is None
    assert find_free(entries, 0x1000, lowest=0x9F000, below=0xA0000) is None
    with pytest.raises(ValueError):
        find_free(entries, 16, align=3)


def test_allocator_hands_out_disjoint_ranges():
    space = RamAllocator(pc_ram_map(BootLayout.ram_ranges(4 * MiB)))
    space.reserve(0x1000, 0x3000)
    got = [space.alloc(0x800, align=0x1000) for _ in range(3)]
    assert got == [0, 0x4000, 0x5000]
    assert space.overlaps(0x4400, 1) and not space.overlaps(0x6000, 0x1000)
    assert space.top == 0x5800
    assert space.alloc(3 * MiB + 1, lowest=MiB) is None
    assert space.alloc(3 * MiB, lowest=MiB) == MiB
    assert space.taken[-1] == (MiB, 3 * MiB)
