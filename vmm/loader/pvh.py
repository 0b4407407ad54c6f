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
from vmm.memory import describe_ranges
from vmm.platform.memmap import FOUR_GIB, HIGH_START, RamAllocator, in_usable, pc_ram_map, usable_ranges
from vmm.platform.mptable import MP_TABLE_ADDR, mp_table

XEN_ELFNOTE_PHYS32_ENTRY = 18
START_INFO_MAGIC = 0x336EC578  # "xEn3" with the 0x80 bit of the "E" set
START_INFO = struct.Struct("<IIIIQQQQII")  # struct hvm_start_info, version 1: 56 bytes
MODLIST_ENTRY = struct.Struct("<QQQQ")  # struct hvm_modlist_entry: paddr, size, cmdline_paddr, reserved
MEMMAP_ENTRY = struct.Struct("<QQII")  # struct hvm_memmap_table_entry: addr, size, type, reserved
INITRD_BELOW = 0x80000000
MAX_CMDLINE = CMDLINE_SPACE - 1  # x86 Linux keeps 2047 bytes of it (COMMAND_LINE_SIZE)

_EHDR64 = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR64 = struct.Struct("<IIQQQQQQ")
_PT_LOAD, _PT_NOTE = 1, 4
_EM_X86_64, _ET_EXEC = 62, 2


def _notes(blob: bytes) -> list[tuple[bytes, int, bytes]]:
    """(name, type, descriptor) of each whole note in a PT_NOTE segment's bytes."""
    out, pos = [], 0
    while pos + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
        desc = pos + 12 + (namesz + 3) // 4 * 4
        if desc + descsz > len(blob):
            break
        out.append((blob[pos + 12 : pos + 12 + namesz].rstrip(b"\0"), ntype, blob[desc : desc + descsz]))
        pos = desc + (descsz + 3) // 4 * 4
    return out


def _elf64(path: str, data: bytes) -> list[tuple[int, int, int, int, int]]:
    """(type, offset, paddr, filesz, memsz) of every program header, checked against the file."""
    if len(data) < _EHDR64.size or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise InputError(f"{path}: not a little-endian ELF64 file")
    _, e_type, machine, _, _, phoff, _, _, _, phentsize, phnum, *_ = _EHDR64.unpack_from(data)
    if machine != _EM_X86_64 or e_type != _ET_EXEC:
        raise InputError(f"{path}: a PVH kernel is an x86-64 executable ELF (machine {machine}, type {e_type})")
    if phnum == 0 or phnum == 0xFFFF or phentsize < _PHDR64.size or phoff + phnum * phentsize > len(data):
        raise InputError(f"{path}: malformed or truncated ELF program headers")
    out = []
    for i in range(phnum):
        p_type, _, offset, _, paddr, filesz, memsz, _ = _PHDR64.unpack_from(data, phoff + i * phentsize)
        if p_type in (_PT_LOAD, _PT_NOTE) and offset + filesz > len(data):
            raise InputError(f"{path}: segment at {paddr:#x} runs past the end of the file (truncated ELF)")
        if p_type == _PT_LOAD and filesz > memsz:
            raise InputError(f"{path}: segment at {paddr:#x} has more file bytes ({filesz}) than memory ({memsz})")
        out.append((p_type, offset, paddr, filesz, memsz))
    return out


def _is_x86_64_executable(data: bytes) -> bool:
    if len(data) < _EHDR64.size or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    _, e_type, machine, *_ = _EHDR64.unpack_from(data)
    return bool(e_type == _ET_EXEC and machine == _EM_X86_64)


def pvh_entry(path: str, data: bytes) -> int | None:
    """The 32-bit physical entry of an x86-64 ELF kernel's ``XEN_ELFNOTE_PHYS32_ENTRY`` note;
    None for any other file (so it can tell a PVH vmlinux from other images). InputError for
    an x86-64 ELF whose program headers or note are malformed."""
    if not _is_x86_64_executable(data):
        return None
    for p_type, offset, _, filesz, _ in _elf64(path, data):
        if p_type != _PT_NOTE:
            continue
        for name, ntype, desc in _notes(data[offset : offset + filesz]):
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                if len(desc) not in (4, 8):
                    raise InputError(f"{path}: XEN_ELFNOTE_PHYS32_ENTRY note of {len(desc)} bytes (4 or 8 expected)")
                entry = int.from_bytes(desc, "little")
                if entry >= FOUR_GIB:
                    raise InputError(f"{path}: PVH entry {entry:#x} is above 4 GiB")
                return entry
    return None


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
    _elf64(path, data)  # the ELF's own errors first
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
    for p_type, offset, paddr, filesz, memsz in _elf64(path, data):
        if p_type != _PT_LOAD or memsz == 0:
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
