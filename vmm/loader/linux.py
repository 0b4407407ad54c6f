"""Linux bzImage kernels by the x86 boot protocol's 32- and 64-bit entries
(Documentation/arch/x86/boot.rst), planned like Firecracker's and Cloud Hypervisor's direct
boot: no BIOS and no real-mode setup code runs.

The setup header (:func:`vmm.platform.zeropage.parse_setup_header`) must say protocol 2.12 or
later. The protected-mode kernel, the file from ``(setup_sects + 1) * 512`` on, goes:

* relocatable (``relocatable_kernel``): at the lowest ``kernel_alignment``-aligned address at
  or above ``pref_address`` where ``max(init_size, kernel size)`` bytes of usable RAM below
  4 GiB are free. Lower would gain nothing: a relocatable kernel loaded below
  ``pref_address`` moves itself up to it (boot.rst's runtime_start), so that window must
  exist anyway. Loaded at its runtime start, the kernel decompresses in place.
* not relocatable: at 0x100000 (boot.rst's bzImage address), and its runtime window
  ``[pref_address, +init_size)``, where it moves itself, must be usable RAM too.

The initrd goes page-aligned as high as possible below ``initrd_addr_max`` (the highest byte
it may occupy) and 4 GiB, above 1 MiB, clear of the kernel's windows (what QEMU and kvmtool
do: the kernel's early allocations and KASLR work from the bottom and around it).
Everything stays below 4 GiB even when ``XLF_CAN_BE_LOADED_ABOVE_4G`` would allow more (the
ext_ fields are written, and zero), and ``min_alignment`` is not used: starting at
``pref_address`` never needs less than ``kernel_alignment``.

The VMM's own structures sit at fixed places in conventional memory, where no kernel goes:

============  ==========================================================================
0x2000        GDT: null, 0x08 64-bit code, __BOOT_CS 0x10 (64- or 32-bit code, by entry),
              __BOOT_DS 0x18 flat data: the selectors boot.rst names. The same address and
              page tables as :mod:`vmm.cpu.layout`'s, so :func:`vmm.cpu.state.pc_boot_state`
              also starts the 64-bit entry (with its own selector values)
0x7000        the zero page, ``boot_params`` (:func:`vmm.platform.zeropage.zero_page`); for a
              PVH kernel (:mod:`vmm.loader.pvh`), its ``hvm_start_info``
0x10000       64-bit entry only: identity page tables for [0, 4 GiB), 2 MiB pages (PML4,
              PDPT, four PDs; 24 KiB), covering the kernel's windows, the zero page, the
              command line and the initrd, which all lie below 4 GiB
0x20000       the command line, NUL-terminated (at most ``cmdline_size`` bytes, and 64 KiB)
0xf0000       the MP table (:func:`vmm.platform.mptable.mp_table`), in the BIOS area
============  ==========================================================================

The e820 map is :func:`vmm.platform.memmap.pc_ram_map`'s, unchanged: the zero page, command
line, GDT and page tables are reported as usable RAM, not reserved. Linux needs them only
until it has copied them: the decompressor loads its own GDT and builds its own page tables
first thing, KASLR's ``mem_avoid`` keeps the zero page and command line clear, the kernel's
``copy_bootdata`` copies both before memblock exists, and all of them lie below 1 MiB, which
neither the decompressor's output (at or above ``pref_address``) nor the initrd uses.
Firecracker reports its equivalents as RAM too. The MP table needs to live longer (Linux
parses it in ``setup_arch``), so it sits in the BIOS area, which the map reserves.

Entry (:func:`linux_boot_state` builds the vCPU state): with ``XLF_KERNEL_64``, 64-bit long
mode at load address + 0x200, paging on with the tables above; else 32-bit protected mode,
paging off, at the load address. Both: CS = 0x10, DS = ES = SS = 0x18, interrupts off,
RSI/ESI = the zero page, every other register zero. Only vCPU 0 starts (``pc``); the others
wait for INIT/SIPI, which Linux sends after reading the MP table.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType

from vmm.cpu.bits import (
    CR0_ET,
    CR0_MP,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    PTE_P,
    PTE_RW,
    RFLAGS_FIXED,
)
from vmm.cpu.layout import (
    BootLayout,
    CpuMode,
    GiB,
)
from vmm.cpu.state import CODE32, CODE64, DATA, TSS_NONE, CpuState, pc_boot_state
from vmm.cpu.state import identity_page_tables as _identity_page_tables
from vmm.errors import InputError
from vmm.loader import ImagePlan, Segment
from vmm.memory import describe_ranges
from vmm.platform.memmap import (
    E820_RAM,
    FOUR_GIB,
    HIGH_START,
    RamAllocator,
    RamMapEntry,
    in_usable,
    pc_ram_map,
    usable_ranges,
)
from vmm.platform.mptable import MP_TABLE_ADDR, mp_table
from vmm.platform.zeropage import ZERO_PAGE_SIZE, SetupHeader, parse_setup_header, zero_page

GDT_ADDR = BootLayout.GDT
ZERO_PAGE_ADDR = 0x7000
PAGE_TABLES_ADDR = BootLayout.PAGE_TABLES
CMDLINE_ADDR = 0x20000
CMDLINE_SPACE = 0x10000  # [0x20000, 0x30000): the command line and its NUL
IDENTITY_MAPPED = 4 * GiB
PAGE_TABLES_SIZE = (2 + IDENTITY_MAPPED // GiB) * 0x1000  # PML4, PDPT, one PD per GiB
BOOT_CS, BOOT_DS = 0x10, 0x18  # __BOOT_CS, __BOOT_DS
GDT_SIZE = 4 * 8
ENTRY_64 = 0x200  # the 64-bit entry's offset from the load address
PAGE = 0x1000


@dataclass(frozen=True)
class LinuxPlan(ImagePlan):
    """An :class:`ImagePlan` for a Linux kernel, with where things went (for the machine,
    which starts vCPU 0 with :func:`linux_boot_state`, and for the run summary)."""

    header: SetupHeader | None = None
    load_addr: int = 0
    kernel_window: tuple[int, int] = (0, 0)  # (runtime start, bytes) the kernel uses while it boots
    zero_page: int = ZERO_PAGE_ADDR
    cmdline_addr: int = CMDLINE_ADDR
    initrd: tuple[int, int] | None = None  # (address, bytes)
    cr3: int | None = None  # the identity page tables (64-bit entry)
    mp_table: int = MP_TABLE_ADDR


def identity_page_tables(base: int, size: int = IDENTITY_MAPPED) -> bytes:
    """Page tables at ``base`` identity-mapping [0, ``size``) (whole GiB, at most 510) with
    2 MiB pages, present and writable, supervisor only: the PML4 (one entry), the PDPT, one
    PD per GiB, in that order, each 4 KiB. CR3 = ``base``. (Precomputed bytes, memoized:
    :func:`vmm.cpu.state.identity_page_tables`.)"""
    return _identity_page_tables(base, size, PTE_P | PTE_RW)


def linux_gdt(*, long_mode: bool) -> bytes:
    """The boot GDT (``GDT_SIZE`` bytes): null, 64-bit code at 0x08, __BOOT_CS at 0x10 (64-bit
    code for the 64-bit entry, 32-bit code for the 32-bit one), __BOOT_DS at 0x18, all flat."""
    boot_cs = CODE64 if long_mode else CODE32
    return struct.pack("<4Q", 0, CODE64.descriptor(), boot_cs.descriptor(), DATA.descriptor())


def linux_boot_state(plan: LinuxPlan) -> CpuState:
    """vCPU 0's state at the plan's entry. A bzImage's, as boot.rst's 32- and 64-bit
    protocols ask: CS = __BOOT_CS, DS = ES = SS (and FS, GS) = __BOOT_DS from the plan's
    GDT, interrupts off, the plan's registers (RSI = the zero page), every other register
    zero; long mode with the plan's page tables, or protected mode with paging off. A PVH
    plan's (:mod:`vmm.loader.pvh`): :func:`vmm.cpu.state.pc_boot_state`."""
    if plan.format == "pvh":
        return pc_boot_state(plan)  # the PVH ABI's flat protected mode, EBX = the start info
    if plan.gdt is None:
        raise ValueError("a Linux plan always has a GDT")
    regs = {"rflags": RFLAGS_FIXED, **plan.regs, "rip": plan.entry}
    data = replace(DATA, selector=BOOT_DS)
    flat = (data, data, data, data, data)  # ds, es, fs, gs, ss
    gdt = (plan.gdt, GDT_SIZE - 1)
    if plan.mode is CpuMode.LONG:
        if plan.cr3 is None:
            raise ValueError("a 64-bit Linux plan always has page tables")
        return CpuState(
            plan.mode,
            regs,
            replace(CODE64, selector=BOOT_CS),
            *flat,
            TSS_NONE,
            gdt=gdt,
            cr0=CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
            cr3=plan.cr3,
            cr4=CR4_PAE,
            efer=EFER_LME | EFER_LMA,
        )
    return CpuState(
        plan.mode, regs, replace(CODE32, selector=BOOT_CS), *flat, TSS_NONE, gdt=gdt, cr0=CR0_PE | CR0_ET | CR0_NE
    )


def _usable_text(entries: Sequence[RamMapEntry]) -> str:
    return describe_ranges(usable_ranges(entries, FOUR_GIB))


def _align_down(value: int, align: int) -> int:
    return value // align * align


def alloc_high(space: RamAllocator, size: int, *, align: int, lowest: int, below: int) -> int | None:
    """Take ``size`` bytes at the highest ``align``-aligned address in usable RAM at or above
    ``lowest``, ending at or below ``below``, clear of everything taken; None if none fits."""
    for entry in sorted(space.entries, key=lambda e: e.end, reverse=True):
        if entry.type != E820_RAM:
            continue
        floor = max(entry.base, lowest)
        addr = _align_down(min(entry.end, below, space.below) - size, align)
        while addr >= floor:
            clash = [b for b, s in space.taken if s > 0 and b < addr + size and addr < b + s]
            if not clash:
                space.reserve(addr, size)
                return addr
            addr = _align_down(min(clash) - size, align)
    return None


def _place_kernel(path: str, h: SetupHeader, size: int, space: RamAllocator) -> tuple[int, tuple[int, int]]:
    """(load address, (runtime start, window bytes)) of a ``size``-byte protected-mode kernel."""
    window = max(h.init_size, size)
    entries = space.entries
    if h.relocatable:
        align = h.kernel_alignment
        if align <= 0 or align & (align - 1):
            raise InputError(f"{path}: kernel_alignment {align:#x} is not a power of two")
        lowest = max(h.pref_address, HIGH_START)
        load = space.alloc(window, align=max(align, PAGE), lowest=lowest) if lowest < FOUR_GIB else None
        if load is None:
            raise InputError(
                f"{path}: the kernel needs {window:,} bytes (init_size) of usable RAM, {align:#x}-aligned, from "
                f"{lowest:#x} (pref_address) and below 4 GiB; guest RAM has {_usable_text(entries)}; give more --mem"
            )
        return load, (load, window)
    load = HIGH_START
    runtime = h.pref_address or load
    for base, length, what in ((load, size, "load address"), (runtime, window, "run address (pref_address)")):
        if not in_usable(entries, base, length):
            raise InputError(
                f"{path}: this kernel is not relocatable and needs {length:,} bytes of usable RAM at its "
                f"{what} {base:#x}; guest RAM has {_usable_text(entries)}; give more --mem"
            )
        if space.overlaps(base, length):
            raise InputError(
                f"{path}: this kernel is not relocatable, and its {what} {base:#x}-{base + length - 1:#x} "
                "overlaps the VMM's boot tables below 1 MiB"
            )
    space.reserve(load, size)
    space.reserve(runtime, window)
    return load, (runtime, window)


def _cmdline_bytes(path: str, cmdline: str, h: SetupHeader) -> bytes:
    raw = os.fsencode(cmdline)
    if b"\0" in raw:
        raise InputError("the kernel command line contains a NUL byte")
    limit = min(h.cmdline_size, CMDLINE_SPACE - 1)
    if len(raw) > limit:
        why = "its cmdline_size" if limit == h.cmdline_size else "the VMM's command line area"
        raise InputError(f"the kernel command line is {len(raw)} bytes; {path} takes at most {limit} ({why})")
    return raw + b"\0"


def plan_linux(
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
    """Plan the boot of bzImage ``data`` against guest RAM ``ram`` ((base, size) ranges):
    the kernel, ``initrd`` ((path, contents) or None), the zero page with ``cmdline`` (the
    whole command line, defaults included), the GDT, the page tables and an MP table for
    ``nr_vcpus`` (``cpu_signature``/``cpu_features``: CPUID leaf 1's EAX/EDX for it;
    ``irq0_pin`` as :func:`vmm.platform.mptable.mp_table`). Pure; one-line InputError for
    anything that does not parse or fit."""
    h = parse_setup_header(path, data)
    raw_cmdline = _cmdline_bytes(path, cmdline, h)
    long_mode = h.has_64bit_entry
    entries = pc_ram_map(ram)
    space = RamAllocator(entries, below=FOUR_GIB)
    mp_addr, mp_bytes = mp_table(
        nr_vcpus, address=MP_TABLE_ADDR, cpu_signature=cpu_signature, cpu_features=cpu_features, irq0_pin=irq0_pin
    )

    fixed = [
        (GDT_ADDR, GDT_SIZE, "the GDT"),
        (ZERO_PAGE_ADDR, ZERO_PAGE_SIZE, "the zero page"),
        (CMDLINE_ADDR, len(raw_cmdline), "the command line"),
    ]
    if long_mode:
        fixed.append((PAGE_TABLES_ADDR, PAGE_TABLES_SIZE, "the page tables"))
    for base, size, what in fixed:
        if not in_usable(entries, base, size):
            raise InputError(f"guest RAM ({describe_ranges(ram)}) has no room for {what} at {base:#x}; give more --mem")
        space.reserve(base, size)
    if not any(b <= mp_addr and mp_addr + len(mp_bytes) <= b + s for b, s in ram):
        raise InputError(f"guest RAM ({describe_ranges(ram)}) does not reach the MP table at {mp_addr:#x}")

    kernel = data[h.setup_size :]
    load, window = _place_kernel(path, h, len(kernel), space)

    initrd_at: tuple[int, int] | None = None
    segments = [Segment(load, kernel, len(kernel))]
    if initrd is not None:
        name, blob = initrd
        if not blob:
            raise InputError(f"initrd {name}: empty file")
        below = min(h.initrd_addr_max + 1, FOUR_GIB)
        addr = alloc_high(space, len(blob), align=PAGE, lowest=HIGH_START, below=below)
        if addr is None:
            raise InputError(
                f"initrd {name} ({len(blob):,} bytes) does not fit in usable guest RAM between 1 MiB and "
                f"{below:#x} (initrd_addr_max) beside the kernel ({window[1]:,} bytes at {window[0]:#x}); "
                f"guest RAM has {_usable_text(entries)}; give more --mem"
            )
        initrd_at = (addr, len(blob))
        segments.append(Segment(addr, blob, len(blob)))

    params = zero_page(h, load_addr=load, cmdline_addr=CMDLINE_ADDR, initrd=initrd_at, e820=entries)
    segments += [
        Segment(ZERO_PAGE_ADDR, params, len(params)),
        Segment(CMDLINE_ADDR, raw_cmdline, len(raw_cmdline)),
        Segment(GDT_ADDR, linux_gdt(long_mode=long_mode), GDT_SIZE),
        Segment(mp_addr, mp_bytes, len(mp_bytes)),
    ]
    if long_mode:
        segments.append(Segment(PAGE_TABLES_ADDR, identity_page_tables(PAGE_TABLES_ADDR), PAGE_TABLES_SIZE))
    return LinuxPlan(
        path,
        "bzimage",
        load + ENTRY_64 if long_mode else load,
        CpuMode.LONG if long_mode else CpuMode.PROTECTED,
        tuple(segments),
        pc=True,
        regs=MappingProxyType({"rsi": ZERO_PAGE_ADDR}),
        gdt=GDT_ADDR,
        header=h,
        load_addr=load,
        kernel_window=window,
        initrd=initrd_at,
        cr3=PAGE_TABLES_ADDR if long_mode else None,
        mp_table=mp_addr,
    )
