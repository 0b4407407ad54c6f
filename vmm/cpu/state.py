"""Register state for each CPU mode, and the descriptor and page tables behind it."""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from vmm.cpu.bits import (
    CR0_ET,
    CR0_MP,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_OSFXSR,
    CR4_OSXMMEXCPT,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_US,
    RFLAGS_FIXED,
    RFLAGS_IOPL3,
)
from vmm.cpu.layout import (
    SEL_CODE32,
    SEL_CODE64,
    SEL_DATA,
    SEL_TSS,
    SEL_USER_CODE64,
    SEL_USER_DATA,
    BootLayout,
    CpuMode,
    GiB,
)
from vmm.errors import InputError
from vmm.memory import GuestMemory

REG_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "rflags",
)  # fmt: skip
"""The general registers every backend reports, in ``struct kvm_regs`` order."""


@dataclass(frozen=True, slots=True)
class Segment:
    """A segment register's hidden state (what KVM calls ``struct kvm_segment``)."""

    selector: int
    base: int = 0
    limit: int = 0xFFFF
    type: int = 0x3  # data, read/write, accessed
    s: int = 1  # code/data (not system)
    dpl: int = 0
    present: int = 1
    db: int = 0
    l: int = 0  # noqa: E741  (the SDM's name for the 64-bit code flag)
    g: int = 0
    unusable: int = 0

    def descriptor(self) -> int:
        """The 8-byte GDT descriptor for a code/data segment with these attributes."""
        limit = self.limit >> 12 if self.g else self.limit
        access = self.type | (self.s << 4) | (self.dpl << 5) | (self.present << 7)
        flags = (self.l << 1) | (self.db << 2) | (self.g << 3)
        return (
            (limit & 0xFFFF)
            | ((self.base & 0xFFFFFF) << 16)
            | (access << 40)
            | (((limit >> 16) & 0xF) << 48)
            | (flags << 52)
            | (((self.base >> 24) & 0xFF) << 56)
        )


def _flat(selector: int, *, code: bool, dpl: int = 0, long: bool = False) -> Segment:
    return Segment(
        selector=selector,
        limit=0xFFFFFFFF,
        type=0xB if code else 0x3,
        dpl=dpl,
        db=0 if long else 1,
        l=1 if long else 0,
        g=1,
    )


CODE64 = _flat(SEL_CODE64, code=True, long=True)
DATA = _flat(SEL_DATA, code=False)
CODE32 = _flat(SEL_CODE32, code=True)
USER_DATA = _flat(SEL_USER_DATA, code=False, dpl=3)
USER_CODE64 = _flat(SEL_USER_CODE64, code=True, dpl=3, long=True)
TSS = Segment(selector=SEL_TSS, base=BootLayout.TSS, limit=BootLayout.TSS_LIMIT, type=0xB, s=0)
LDT_NONE = Segment(selector=0, limit=0xFFFF, type=0x2, s=0, present=0, unusable=1)


@dataclass(frozen=True, slots=True)
class CpuState:
    """Everything a backend needs to start a vCPU: general registers, segments, tables,
    control registers. Backend-neutral; ``vmm.backends`` applies it."""

    mode: CpuMode
    regs: dict[str, int]
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment = LDT_NONE
    gdt: tuple[int, int] = (0, 0xFFFF)  # (base, limit)
    idt: tuple[int, int] = (0, 0xFFFF)
    cr0: int = 0x60000010
    cr3: int = 0
    cr4: int = 0
    efer: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def segments(self) -> dict[str, Segment]:
        return {n: getattr(self, n) for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")}


def _real_segment(selector: int) -> Segment:
    return Segment(selector=selector, base=selector << 4, limit=0xFFFF, type=0x3)


def boot_state(mode: CpuMode, entry: int, vcpu: int, boot_info: int = BootLayout.BOOT_INFO) -> CpuState:
    """The register state a guest finds at ``entry`` (guests/README.md, "At entry"):
    (R|E)DI = boot info address, (R|E)SI = vCPU index, stack at ``BootLayout.stack_top``."""
    stack = BootLayout.stack_top(vcpu)
    regs = {"rip": entry, "rsp": stack, "rdi": boot_info, "rsi": vcpu, "rflags": RFLAGS_FIXED}
    if mode is CpuMode.REAL:
        if not 0 <= entry < 0x100000:
            raise InputError(f"real-mode entry {entry:#x} is above 1 MiB")
        code_seg = (entry & 0xF0000) >> 4
        ss = (stack - 0x10000) >> 4
        regs.update(rip=entry & 0xFFFF, rsp=stack - (ss << 4))
        cs = Segment(selector=code_seg, base=code_seg << 4, limit=0xFFFF, type=0xB)
        zero = _real_segment(0)
        tr = Segment(selector=0, limit=0xFFFF, type=0xB, s=0)
        return CpuState(mode, regs, cs, zero, zero, zero, zero, _real_segment(ss), tr)
    gdt = (BootLayout.GDT, BootLayout.GDT_LIMIT)
    if mode is CpuMode.PROTECTED:
        if entry >= 1 << 32:
            raise InputError(f"32-bit entry {entry:#x} is above 4 GiB")
        return CpuState(mode, regs, CODE32, DATA, DATA, DATA, DATA, DATA, TSS_32, gdt=gdt, cr0=CR0_PE | CR0_ET | CR0_NE)

    def long_mode(cs: Segment, data: Segment) -> CpuState:
        return CpuState(
            mode,
            regs,
            cs,
            data,
            data,
            data,
            data,
            data,
            TSS,
            gdt=gdt,
            cr0=CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
            cr3=BootLayout.PAGE_TABLES,
            cr4=CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
            efer=EFER_LME | EFER_LMA,
        )

    if mode is CpuMode.LONG:
        return long_mode(CODE64, DATA)
    if mode is CpuMode.USER:
        # IOPL 3 lets ring-3 code use in/out directly; the TSS's I/O bitmap also allows
        # every port, for hosts that reset IOPL on a trip through ring 0.
        regs["rflags"] = RFLAGS_FIXED | RFLAGS_IOPL3
        return long_mode(USER_CODE64, USER_DATA)
    raise InputError(f"unknown CPU mode {mode!r}")


# A 32-bit TSS descriptor (type 0xB: busy 32-bit TSS) for protected mode.
TSS_32 = replace(TSS, type=0xB)
# What a PC-convention image finds in TR: nothing it may rely on, but a busy TSS so VM
# entry accepts it (Multiboot leaves TR undefined for the OS).
TSS_NONE = Segment(selector=0, base=0, limit=0x67, type=0xB, s=0)


class _EntryPlan(Protocol):
    """What :func:`pc_boot_state` reads of a loader's plan (vmm.loader.ImagePlan)."""

    @property
    def mode(self) -> CpuMode: ...
    @property
    def entry(self) -> int: ...
    @property
    def regs(self) -> Mapping[str, int]: ...
    @property
    def gdt(self) -> int | None: ...


def pc_boot_state(plan: _EntryPlan) -> CpuState:
    """The BSP's state at the entry of a PC-convention image (a loader's plan with its own
    ``regs`` and ``gdt``): Multiboot's 32-bit flat protected mode with paging off, the
    plan's registers (EAX, EBX) and everything else zero, the GDT where the plan put one."""
    regs = {"rflags": RFLAGS_FIXED, **plan.regs, "rip": plan.entry}
    if plan.mode is CpuMode.PROTECTED:
        if plan.entry >= 1 << 32:
            raise InputError(f"32-bit entry {plan.entry:#x} is above 4 GiB")
        gdt = (plan.gdt, BootLayout.GDT_LIMIT) if plan.gdt is not None else (0, 0xFFFF)
        flat = (CODE32, DATA, DATA, DATA, DATA, DATA)
        return CpuState(plan.mode, regs, *flat, TSS_NONE, gdt=gdt, cr0=CR0_PE | CR0_ET | CR0_NE)
    state = boot_state(plan.mode, plan.entry, 0)
    return replace(state, regs={**state.regs, **plan.regs, "rip": state.regs["rip"]})


def _tss_descriptor(base: int, limit: int) -> bytes:
    low = Segment(selector=SEL_TSS, base=base, limit=limit, type=0x9, s=0).descriptor()
    return struct.pack("<QQ", low, base >> 32)


def mapped_size(ram_top: int) -> int:
    """Bytes of address space the identity map covers: at least 4 GiB (so MMIO in the
    hole is reachable), and all of RAM, in whole GiB."""
    return max(4 * GiB, (ram_top + GiB - 1) // GiB * GiB)


@functools.lru_cache(maxsize=16)
def gdt_table(tss_base: int = BootLayout.TSS, tss_limit: int = BootLayout.TSS_LIMIT) -> bytes:
    """The VMM's flat GDT (``BootLayout.GDT_LIMIT + 1`` bytes): null, 64-bit code 0x08, data
    0x10, 32-bit code 0x18, ring-3 data 0x23, ring-3 64-bit code 0x2b, and a TSS descriptor
    at 0x30. Loaders that place their own structures (Multiboot) write it where they like.
    Memoized: the same arguments always give the same bytes."""
    gdt = [
        0,
        CODE64.descriptor(),
        DATA.descriptor(),
        CODE32.descriptor(),
        USER_DATA.descriptor(),
        USER_CODE64.descriptor(),
    ]
    return struct.pack("<6Q", *gdt) + _tss_descriptor(tss_base, tss_limit)


@functools.lru_cache(maxsize=1)
def tss_image() -> bytes:
    """The 64-bit TSS the VMM places at ``BootLayout.TSS``: RSP0 (where ring 0 handlers
    would stack) = the top of vCPU 0's stack area; the I/O bitmap at TSS_IOPB_OFFSET, all
    zero bits (every port allowed), then 0xff."""
    tss = bytearray(BootLayout.TSS_LIMIT + 1)
    struct.pack_into("<Q", tss, 4, BootLayout.STACKS_TOP)
    struct.pack_into("<H", tss, 102, BootLayout.TSS_IOPB_OFFSET)
    tss[-1] = 0xFF
    return bytes(tss)


def write_system_tables(mem: GuestMemory, mode: CpuMode) -> None:
    """Write the GDT, the TSS and (64-bit modes) the identity page tables into guest RAM."""
    if mode is CpuMode.REAL:
        return
    mem.write(BootLayout.GDT, gdt_table())
    mem.write(BootLayout.TSS, tss_image())
    if mode in (CpuMode.LONG, CpuMode.USER):
        write_page_tables(mem, mapped_size(mem.top))


_PAGE = 0x1000
_ENTRIES = 512
# 1 in the low bit of each of the 512 qwords of a table, as one integer: multiplying it by
# a value puts that value in every entry (no entry overflows into the next, all < 2**64).
_EVERY_ENTRY = int.from_bytes(struct.pack(f"<{_ENTRIES}Q", *([1] * _ENTRIES)), "little")
_LARGE_STEPS = int.from_bytes(struct.pack(f"<{_ENTRIES}Q", *(j << 21 for j in range(_ENTRIES))), "little")


@functools.lru_cache(maxsize=16)
def identity_page_tables(base: int, size: int, flags: int) -> bytes:
    """Page tables at ``base`` identity-mapping [0, ``size``) (whole GiB, 1 to 510) with
    2 MiB pages and the PTE ``flags``: the PML4 (one entry), the PDPT, one PD per GiB, in
    that order, each 4 KiB; CR3 = ``base``. Built with whole-table integer arithmetic (PD
    number i is the first PD plus i GiB in every entry), and memoized per arguments, so a
    start-up costs a few big-integer operations per GiB, not one per entry."""
    gib = size >> 30
    if size & (GiB - 1) or not 1 <= gib <= _ENTRIES - 2:
        raise ValueError(f"identity map of {size:#x} bytes: whole GiB, 1 to {_ENTRIES - 2}")
    pml4 = ((base + _PAGE) | flags).to_bytes(8, "little").ljust(_PAGE, b"\0")
    pdpt = struct.pack(f"<{gib}Q", *((base + (2 + i) * _PAGE) | flags for i in range(gib))).ljust(_PAGE, b"\0")
    first = _LARGE_STEPS + _EVERY_ENTRY * (flags | PTE_PS)
    pds = b"".join((first + _EVERY_ENTRY * (i << 30)).to_bytes(_PAGE, "little") for i in range(gib))
    return pml4 + pdpt + pds


def write_page_tables(mem: GuestMemory, size: int) -> None:
    """Identity-map [0, size) with 2 MiB pages, user-accessible and writable."""
    if size > BootLayout.MAX_MAPPED:
        raise InputError(f"cannot identity-map {size >> 30} GiB (at most {BootLayout.MAX_MAPPED >> 30} GiB)")
    mem.write(BootLayout.PAGE_TABLES, identity_page_tables(BootLayout.PAGE_TABLES, size, PTE_P | PTE_RW | PTE_US))
