"""The guest boot layout (guests/README.md documents it for guest authors).

======================= ==================================================
0x00000-0x00fff         real-mode IVT (left zero)
0x01000-0x01fff         boot info (:mod:`vmm.bootinfo`): RAM map, vCPU count, arguments
0x02000-0x02fff         GDT (selectors below)
0x03000-0x05fff         64-bit TSS with an I/O permission bitmap allowing every port
0x10000-0x5ffff         identity page tables: PML4, PDPT, one PD per GiB (2 MiB pages)
0x60000-0x9ffff         vCPU stacks, 4 KiB each; vCPU i's stack top is 0xa0000 - i*0x1000
0x100000-               the image (ELF images choose; flat images default to 0x7c00 in
                        real mode and 0x100000 otherwise)
3 GiB-4 GiB             MMIO hole: never RAM (RAM beyond 3 GiB continues at 4 GiB)
======================= ==================================================
"""

from __future__ import annotations

from enum import StrEnum

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


class CpuMode(StrEnum):
    """The CPU mode a guest starts in."""

    REAL = "real"  # 16-bit real mode
    PROTECTED = "protected"  # 32-bit flat protected mode, no paging
    LONG = "long"  # 64-bit long mode, ring 0, identity-mapped
    USER = "user"  # 64-bit long mode, ring 3 (IOPL 3), identity-mapped, user pages


class BootLayout:
    """Addresses of the structures the VMM places in guest RAM."""

    BOOT_INFO = 0x1000
    GDT = 0x2000
    GDT_LIMIT = 0x47
    TSS = 0x3000
    TSS_IOPB_OFFSET = 104
    TSS_LIMIT = 104 + 8192  # base TSS + one bit per port + the terminating 0xff byte - 1
    PAGE_TABLES = 0x10000
    PAGE_TABLES_END = 0x60000
    STACKS_BOTTOM = 0x60000
    STACKS_TOP = 0xA0000
    STACK_SIZE = 0x1000
    SYSTEM_END = 0xA0000  # first byte after the VMM's structures (non-real modes)
    REAL_SYSTEM_END = 0x2000  # real mode only uses the IVT and the boot info
    FLAT_REAL_LOAD = 0x7C00
    FLAT_LOAD = 0x100000
    MMIO_HOLE_START = 3 * GiB
    MMIO_HOLE_END = 4 * GiB
    MAX_VCPUS = (STACKS_TOP - STACKS_BOTTOM) // STACK_SIZE  # 64
    # PML4 + PDPT + one PD per GiB must fit between PAGE_TABLES and PAGE_TABLES_END.
    MAX_MAPPED = ((PAGE_TABLES_END - PAGE_TABLES) // 0x1000 - 2) * GiB
    MAX_RAM = 64 * GiB

    @staticmethod
    def stack_top(vcpu: int) -> int:
        """Initial stack pointer of vCPU ``vcpu``."""
        return BootLayout.STACKS_TOP - vcpu * BootLayout.STACK_SIZE

    @staticmethod
    def ram_ranges(size: int) -> list[tuple[int, int]]:
        """(gpa, size) of guest RAM for ``size`` bytes: below the 3 GiB hole, then above 4 GiB."""
        low = min(size, BootLayout.MMIO_HOLE_START)
        ranges = [(0, low)]
        if size > low:
            ranges.append((BootLayout.MMIO_HOLE_END, size - low))
        return ranges


# GDT selectors (index * 8 | RPL)
SEL_CODE64 = 0x08
SEL_DATA = 0x10
SEL_CODE32 = 0x18
SEL_USER_DATA = 0x20 | 3
SEL_USER_CODE64 = 0x28 | 3
SEL_TSS = 0x30
