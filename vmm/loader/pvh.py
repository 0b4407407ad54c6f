"""Uncompressed Linux ``vmlinux`` ELF kernels by the PVH entry (Xen's HVM direct boot ABI, which
QEMU, Firecracker and Cloud Hypervisor also offer): the kernel's ``XEN_ELFNOTE_PHYS32_ENTRY``
note names a 32-bit physical entry point, and the loader passes an ``hvm_start_info``
(include/xen/interface/hvm/start_info.h) instead of a zero page.

The ELF's ``PT_LOAD`` segments go to their physical addresses (``p_paddr``; every offset and
size checked against the file, in usable RAM below 4 GiB, not overlapping each other or the
VMM's structures). The low layout is :mod:`vmm.loader.linux`'s: the VMM's flat GDT
(:func:`vmm.cpu.state.gdt_table`) at 0x2000, ``hvm_start_info`` version 1 at 0x7000 with the
module list and the memory map (the PC RAM map) after it, the command line at 0x20000, the MP
table at 0xf0000. The initrd is module 0, page-aligned as high as possible below 2 GiB (what a
bzImage's ``initrd_addr_max`` allows; the PVH ABI has no field for it), above 1 MiB and clear of
the kernel's segments.

Entry, as the ABI asks: 32-bit protected mode, paging off, CR4 = 0, interrupts off, flat CS and
data segments, a 32-bit TSS in TR, EBX = the start info. That is
:func:`vmm.cpu.state.pc_boot_state` (the GDT's selectors are the VMM's), which
:func:`vmm.loader.linux.linux_boot_state` uses for a PVH plan. The kernel builds its own
page tables and enters long mode itself (PAE + LME + PG from protected mode).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from types import MappingProxyType

from vmm.cpu.layout import CpuMode
from vmm.cpu.state import gdt_table
from vmm.errors import InputError
from vmm.loader import Segment
from vmm.loader.linux import (
    CMDLINE_ADDR,
    CMDLINE_SPACE,
    GDT_ADDR,
    PAGE,
    ZERO_PAGE_ADDR,
    LinuxPlan,
    alloc_high,
)
from vmm.loader.pvh_note import PT_LOAD, elf64_headers, pvh_entry
from vmm.memory import describe_ranges
from vmm.platform.memmap import FOUR_GIB, HIGH_START, RamAllocator, in_usable, pc_ram_map, usable_ranges
from vmm.platform.mptable import MP_TABLE_ADDR, mp_table

START_INFO_MAGIC = 0x336EC578  # "xEn3" with the 0x80 bit of the "E" set
START_INFO = struct.Struct("<IIIIQQQQII")  # struct hvm_start_info, version 1: 56 bytes
MODLIST_ENTRY = struct.Struct("<QQQQ")  # struct hvm_modlist_entry: paddr, size, cmdline_paddr, reserved
MEMMAP_ENTRY = struct.Struct("<QQII")  # struct hvm_memmap_table_entry: addr, size, type, reserved
INITRD_BELOW = 0x80000000
MAX_CMDLINE = CMDLINE_SPACE - 1  # x86 Linux keeps 2047 bytes of it (COMMAND_LINE_SIZE)


def plan_pvh(
    path: str,
    data: bytes,
    ram: Sequence[tuple[int, int]],
    *,
    cmdline: str,
    initrd: tuple[str, bytes] | None,
    nr_vcpus: int,
    cpu_signature: int | None = None,
    cpu_features: int | None = None,
    irq0_pin: int = 0,
) -> LinuxPlan:
    """Plan the PVH boot of ELF ``data`` against guest RAM ``ram``, with ``initrd`` ((path,
    contents) or None), the whole command line ``cmdline`` and an MP table for ``nr_vcpus``
    (the last three arguments as :func:`vmm.loader.linux.plan_linux`). Pure; one-line
    InputError for a kernel without a PVH entry, or anything that does not parse or fit."""
    elf64_headers(path, data)  # the ELF's own errors first
    entry = pvh_entry(path, data)
    if entry is None:
        raise InputError(f"{path}: an ELF kernel without a PVH entry (no XEN_ELFNOTE_PHYS32_ENTRY note)")
    raw_cmdline = os.fsencode(cmdline)
    if b"\0" in raw_cmdline:
        raise InputError("the kernel command line contains a NUL byte")
    if len(raw_cmdline) > MAX_CMDLINE:
        raise InputError(f"the kernel command line is {len(raw_cmdline)} bytes; at most {MAX_CMDLINE}")
    raw_cmdline += b"\0"
    entries = pc_ram_map(ram)
    usable = describe_ranges(usable_ranges(entries, FOUR_GIB))
    space = RamAllocator(entries, below=FOUR_GIB)
    gdt = gdt_table()
    info_size = START_INFO.size + MODLIST_ENTRY.size + len(entries) * MEMMAP_ENTRY.size
    for base, size, what in (
        (GDT_ADDR, len(gdt), "the GDT"),
        (ZERO_PAGE_ADDR, info_size, "the start info"),
        (CMDLINE_ADDR, len(raw_cmdline), "the command line"),
    ):
        if not in_usable(entries, base, size):
            raise InputError(f"guest RAM ({describe_ranges(ram)}) has no room for {what} at {base:#x}; give more --mem")
        space.reserve(base, size)
    mp_addr, mp_bytes = mp_table(
        nr_vcpus, address=MP_TABLE_ADDR, cpu_signature=cpu_signature, cpu_features=cpu_features, irq0_pin=irq0_pin
    )
    if not any(b <= mp_addr and mp_addr + len(mp_bytes) <= b + s for b, s in ram):
        raise InputError(f"guest RAM ({describe_ranges(ram)}) does not reach the MP table at {mp_addr:#x}")

    segments, in_image = [], False
    for p_type, offset, paddr, filesz, memsz in elf64_headers(path, data):
        if p_type != PT_LOAD or memsz == 0:
            continue
        if not in_usable(entries, paddr, memsz):
            raise InputError(
                f"{path}: segment at {paddr:#x} ({memsz:,} bytes) is not in usable guest RAM below 4 GiB "
                f"({usable}); give more --mem"
            )
        if space.overlaps(paddr, memsz):
            raise InputError(f"{path}: segment at {paddr:#x} overlaps another segment or the VMM's boot tables")
        space.reserve(paddr, memsz)
        segments.append(Segment(paddr, data[offset : offset + filesz], memsz))
        in_image = in_image or paddr <= entry < paddr + filesz
    if not segments:
        raise InputError(f"{path}: ELF has no loadable segments")
    if not in_image:
        raise InputError(f"{path}: PVH entry {entry:#x} is not inside a loaded segment")

    kernel_start = min(s.gpa for s in segments)
    kernel_end = max(s.gpa + s.memsz for s in segments)
    modules = b""
    initrd_at = None
    if initrd is not None:
        name, blob = initrd
        if not blob:
            raise InputError(f"initrd {name}: empty file")
        addr = alloc_high(space, len(blob), align=PAGE, lowest=HIGH_START, below=INITRD_BELOW)
        if addr is None:
            raise InputError(
                f"initrd {name} ({len(blob):,} bytes) does not fit in usable guest RAM between 1 MiB and "
                f"{INITRD_BELOW:#x} beside the kernel ({usable}); give more --mem"
            )
        initrd_at = (addr, len(blob))
        modules = MODLIST_ENTRY.pack(addr, len(blob), 0, 0)
        segments.append(Segment(addr, blob, len(blob)))

    modlist = ZERO_PAGE_ADDR + START_INFO.size
    memmap = modlist + MODLIST_ENTRY.size
    info = START_INFO.pack(
        START_INFO_MAGIC, 1, 0, 1 if modules else 0, modlist if modules else 0, CMDLINE_ADDR, 0, memmap, len(entries), 0
    )
    info += modules.ljust(MODLIST_ENTRY.size, b"\0")
    info += b"".join(MEMMAP_ENTRY.pack(e.base, e.length, e.type, 0) for e in entries)
    segments += [
        Segment(ZERO_PAGE_ADDR, info, len(info)),
        Segment(CMDLINE_ADDR, raw_cmdline, len(raw_cmdline)),
        Segment(GDT_ADDR, gdt, len(gdt)),
        Segment(mp_addr, mp_bytes, len(mp_bytes)),
    ]
    return LinuxPlan(
        path,
        "pvh",
        entry,
        CpuMode.PROTECTED,
        tuple(segments),
        pc=True,
        regs=MappingProxyType({"rbx": ZERO_PAGE_ADDR}),
        gdt=GDT_ADDR,
        load_addr=kernel_start,
        kernel_window=(kernel_start, kernel_end - kernel_start),
        zero_page=ZERO_PAGE_ADDR,
        initrd=initrd_at,
        mp_table=mp_addr,
    )
