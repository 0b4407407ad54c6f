"""Multiboot v1 images (the GNU Multiboot Specification 0.6.96), planned like QEMU's ``-kernel``.

The header (magic 0x1BADB002, flags, checksum) is looked for at 32-bit aligned offsets in
the first 8192 bytes. Header flags 0-15 are requirements: 0 (page-aligned modules) and 1
(memory information) are met, 2 (a video mode) is refused (no framebuffer), any other is
refused by number. With flag 16 the header's address fields say where the image goes (the
"a.out kludge", format ``multiboot-aout``, also for ELF files, as GRUB and QEMU do);
without it the image must be an ELF32 for i386, loaded by ``PT_LOAD`` program headers at
``p_paddr`` (format ``multiboot-elf``; the entry is ``e_entry`` translated to physical
through the segment holding it, as GRUB does).

Where things go (guest-physical, below 4 GiB, usable RAM of :func:`~vmm.platform.memmap.pc_ram_map`
only; low memory belongs to the image):

* the image where it asks;
* modules page-aligned (always: that meets flag 0 and is what GRUB and QEMU do), at the
  lowest free address above the image, else the lowest free one from 1 MiB, else from 0;
* the VMM's own block (the info block, the flat GDT, the memory map, the module list, the
  strings) page-aligned at the lowest free address in conventional memory from
  ``INFO_LOW`` (0x1000: page 0 keeps the real-mode IVT and BDA) below the EBDA (0x9fc00),
  where QEMU puts its own (0x9000); if the image holds that, above the image and modules.

Entry: protected mode, EAX = 0x2BADB002, EBX = the info block, ``pc=True`` (only vCPU 0
starts), ``gdt`` = the GDT in the block (selectors as :func:`vmm.cpu.state.gdt_table`).
The command line is QEMU's, ``"<image path> <append>"``. Limits: ``MAX_CMDLINE`` bytes of
``--append`` and of each module's string, ``MAX_MODULES`` modules.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from types import MappingProxyType

from vmm.cpu.layout import BootLayout, CpuMode
from vmm.cpu.state import gdt_table
from vmm.errors import InputError
from vmm.loader import ImagePlan, Segment
from vmm.memory import describe_ranges
from vmm.platform.memmap import (
    EBDA_START,
    FOUR_GIB,
    HIGH_START,
    RamAllocator,
    RamMapEntry,
    in_usable,
    lower_upper_kib,
    multiboot_mmap,
    pc_ram_map,
    usable_ranges,
)

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002  # EAX at entry
SEARCH_LIMIT = 8192  # the header lies wholly within the first 8192 bytes
BEYOND_HITS = 1024  # magic numbers examined past SEARCH_LIMIT (for the error message only)
_MAGIC_BYTES = struct.pack("<I", HEADER_MAGIC)

FLAG_PAGE_ALIGN = 1 << 0
FLAG_MEMORY_INFO = 1 << 1
FLAG_VIDEO_MODE = 1 << 2
FLAG_ADDRESS = 1 << 16
_REQUIRED = 0xFFFF
_KNOWN_REQUIRED = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE

MAX_CMDLINE = 4096  # bytes of --append (and of each module string), without the NUL
MAX_MODULES = 64
MODULE_ALIGN = 0x1000
INFO_LOW = 0x1000  # lowest address of the VMM's own block (page 0: IVT and BDA)
INFO_ALIGN = 0x1000

# Info block flags (what is present) and layout.
INFO_MEMORY = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MODS = 1 << 3
INFO_MMAP = 1 << 6
INFO_LOADER_NAME = 1 << 9
MBI_SIZE = 116  # the whole 0.6.96 structure, framebuffer fields included (left zero)
MOD_ENTRY = struct.Struct("<IIII")  # mod_start, mod_end, string, reserved

_ELF_MAGIC = b"\x7fELF"
_EHDR = struct.Struct("<16sHHIIIIIHHHHHH")  # Elf32_Ehdr, 52 bytes
_PHDR = struct.Struct("<8I")  # Elf32_Phdr: type, offset, vaddr, paddr, filesz, memsz, flags, align
_EM_386, _ET_EXEC, _PT_LOAD = 3, 2, 1


@dataclass(frozen=True)
class MultibootHeader:
    """A Multiboot header found at ``offset`` in the file. The address fields are read
    only when ``flags`` has bit 16 (else zero); the video fields only with bit 2."""

    offset: int
    flags: int
    checksum: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0
    mode_type: int = 0
    width: int = 0
    height: int = 0
    depth: int = 0

    @property
    def has_address(self) -> bool:
        """Whether the address fields (flag 16) say where the image goes."""
        return bool(self.flags & FLAG_ADDRESS)


def _magic_offsets(data: bytes, start: int, stop: int, limit: int) -> list[int]:
    """32-bit aligned offsets of the header magic in data[start:stop], at most ``limit`` hits looked at."""
    found, pos, hits = [], data.find(_MAGIC_BYTES, start, stop), 0
    while pos >= 0 and hits < limit:
        hits += 1
        if pos % 4 == 0:
            found.append(pos)
        pos = data.find(_MAGIC_BYTES, pos + 1, stop)
    return found


def _checksum_ok(data: bytes, off: int) -> bool:
    if off + 12 > len(data):
        return False
    magic, flags, checksum = struct.unpack_from("<III", data, off)
    return (magic + flags + checksum) & 0xFFFFFFFF == 0


def find_header(data: bytes, *, path: str | None = None) -> MultibootHeader | None:
    """The Multiboot header in the first 8192 bytes, or None if there is none. InputError
    for a header there whose checksum is wrong (and no good one), for one whose fields run
    past those 8192 bytes or the file, and for a good header found only further on (the
    whole file is searched for that message, at most ``BEYOND_HITS`` magic numbers)."""
    where = f"{path}: " if path else ""
    window = min(len(data), SEARCH_LIMIT)
    offsets = [off for off in _magic_offsets(data, 0, window, SEARCH_LIMIT) if off + 12 <= window]
    good = next((off for off in offsets if _checksum_ok(data, off)), None)
    if good is None:
        if offsets:
            raise InputError(f"{where}multiboot header at offset {offsets[0]:#x} has a bad checksum")
        beyond = _magic_offsets(data, max(window - 11, 0), len(data), BEYOND_HITS)
        late = next((off for off in beyond if off + 12 > window and _checksum_ok(data, off)), None)
        if late is not None:
            raise InputError(
                f"{where}multiboot header at offset {late:#x} is beyond the first {SEARCH_LIMIT} bytes, "
                "where the Multiboot specification requires it"
            )
        return None
    flags, checksum = struct.unpack_from("<II", data, good + 4)
    size = 48 if flags & FLAG_VIDEO_MODE else 32 if flags & FLAG_ADDRESS else 12
    if good + size > window:
        limit = "the end of the file" if window == len(data) else f"the first {SEARCH_LIMIT} bytes"
        raise InputError(f"{where}multiboot header at offset {good:#x} ({size} bytes with its flags) runs past {limit}")
    words = struct.unpack_from(f"<{(size - 12) // 4}I", data, good + 12)
    address = words[:5] if flags & FLAG_ADDRESS else (0,) * 5  # present but not valid without flag 16
    video = words[5:9] or (0,) * 4
    return MultibootHeader(good, flags, checksum, *address, *video)


def _check_flags(path: str, flags: int) -> None:
    required = flags & _REQUIRED
    if required & FLAG_VIDEO_MODE:
        raise InputError(
            f"{path}: the image asks for a video mode (Multiboot header flag 2); this VMM has no framebuffer"
        )
    unknown = required & ~_KNOWN_REQUIRED
    if unknown:
        bit = (unknown & -unknown).bit_length() - 1
        raise InputError(f"{path}: the image requires Multiboot header flag {bit}, which this loader does not know")


def _elf32(path: str, data: bytes) -> tuple[list[Segment], int]:
    """PT_LOAD segments at p_paddr and the physical entry point, every number checked."""
    if len(data) < _EHDR.size:
        raise InputError(f"{path}: truncated ELF header ({len(data)} bytes)")
    ident, e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum, *_ = _EHDR.unpack_from(data)
    if ident[4] != 1:
        kind = "a 64-bit ELF" if ident[4] == 2 else f"an ELF of class {ident[4]}"
        raise InputError(f"{path}: Multiboot v1 needs a 32-bit ELF; this is {kind}")
    if ident[5] != 1:
        raise InputError(f"{path}: Multiboot v1 needs a 32-bit ELF; this one is not little-endian")
    if e_machine != _EM_386:
        raise InputError(
            f"{path}: Multiboot v1 needs a 32-bit ELF for i386 (EM_386); this one is for machine {e_machine}"
        )
    if e_type != _ET_EXEC:
        raise InputError(f"{path}: ELF type {e_type}, expected an executable (ET_EXEC)")
    if e_phnum == 0 or e_phnum == 0xFFFF or e_phentsize < _PHDR.size:
        raise InputError(f"{path}: ELF has no usable program headers (e_phnum {e_phnum}, e_phentsize {e_phentsize})")
    if e_phoff + e_phnum * e_phentsize > len(data):
        raise InputError(f"{path}: program headers run past the end of the file (truncated ELF)")
    loads = []  # (paddr, vaddr, offset, filesz, memsz)
    for i in range(e_phnum):
        p_type, offset, vaddr, paddr, filesz, memsz, _, _ = _PHDR.unpack_from(data, e_phoff + i * e_phentsize)
        if p_type != _PT_LOAD or memsz == 0:
            continue
        if filesz > memsz:
            raise InputError(f"{path}: segment at {paddr:#x} has more file bytes ({filesz}) than memory ({memsz})")
        if offset + filesz > len(data):
            raise InputError(f"{path}: segment at {paddr:#x} runs past the end of the file (truncated ELF)")
        if paddr + memsz > FOUR_GIB:
            raise InputError(f"{path}: segment at {paddr:#x} ({memsz} bytes) ends above 4 GiB")
        loads.append((paddr, vaddr, offset, filesz, memsz))
    if not loads:
        raise InputError(f"{path}: ELF has no loadable segments")
    loads.sort()
    for (a, _, _, _, a_size), (b, *_) in pairwise(loads):
        if a + a_size > b:
            raise InputError(f"{path}: segments at {a:#x} and {b:#x} overlap")
    entry = next((e_entry - v + p for p, v, _, f, _ in loads if v <= e_entry < v + f), None)
    if entry is None:
        raise InputError(f"{path}: entry point {e_entry:#x} is not inside a loaded segment")
    return [Segment(p, data[o : o + f], m) for p, _, o, f, m in loads], entry


def _aout(path: str, data: bytes, h: MultibootHeader) -> tuple[list[Segment], int]:
    """The image by the header's address fields (the spec's arithmetic, checked)."""
    if h.load_addr > h.header_addr:
        raise InputError(f"{path}: multiboot load_addr {h.load_addr:#x} is above header_addr {h.header_addr:#x}")
    start = h.offset - (h.header_addr - h.load_addr)
    if start < 0:
        raise InputError(
            f"{path}: multiboot header_addr - load_addr ({h.header_addr - h.load_addr:#x}) is more than "
            f"the header's offset in the file ({h.offset:#x})"
        )
    if h.load_end_addr:
        if h.load_end_addr < h.load_addr:
            raise InputError(
                f"{path}: multiboot load_end_addr {h.load_end_addr:#x} is below load_addr {h.load_addr:#x}"
            )
        load_size = h.load_end_addr - h.load_addr
        if start + load_size > len(data):
            raise InputError(
                f"{path}: multiboot load_end_addr asks for {load_size} bytes from file offset {start:#x}; "
                f"the file has {len(data)} (truncated?)"
            )
    else:
        load_size = len(data) - start
    memsz = load_size
    if h.bss_end_addr:
        if h.bss_end_addr < h.load_addr + load_size:
            raise InputError(
                f"{path}: multiboot bss_end_addr {h.bss_end_addr:#x} is below the end of the loaded "
                f"image {h.load_addr + load_size:#x}"
            )
        memsz = h.bss_end_addr - h.load_addr
    if h.load_addr + memsz > FOUR_GIB:
        raise InputError(f"{path}: the image at {h.load_addr:#x} ({memsz} bytes) ends above 4 GiB")
    if not h.load_addr <= h.entry_addr < h.load_addr + load_size:
        raise InputError(
            f"{path}: multiboot entry_addr {h.entry_addr:#x} is not inside the loaded image "
            f"{h.load_addr:#x}-{h.load_addr + load_size - 1:#x}"
        )
    return [Segment(h.load_addr, data[start : start + load_size], memsz)], h.entry_addr


def _c_string(what: str, text: str) -> bytes:
    raw = os.fsencode(text)
    if len(raw) > MAX_CMDLINE:
        raise InputError(f"{what} is {len(raw)} bytes; at most {MAX_CMDLINE}")
    if b"\0" in raw:
        raise InputError(f"{what} contains a NUL byte")
    return raw + b"\0"


def _usable_text(entries: Sequence[RamMapEntry]) -> str:
    return describe_ranges(usable_ranges(entries, FOUR_GIB))


class _Block:
    """The VMM's own block: info block, GDT, mmap, module list, strings, laid out by offset."""

    def __init__(self, mmap: bytes, n_mods: int, strings: Sequence[bytes]) -> None:
        self.gdt = (MBI_SIZE + 15) & ~15
        self.mmap = self.gdt + BootLayout.GDT_LIMIT + 1
        self.mods = (self.mmap + len(mmap) + 15) & ~15
        self.strings = []
        pos = self.mods + n_mods * MOD_ENTRY.size
        for s in strings:
            self.strings.append(pos)
            pos += len(s)
        self.size = pos


def plan_multiboot(
    path: str,
    data: bytes,
    header: MultibootHeader,
    ram: Sequence[tuple[int, int]],
    *,
    cmdline: str,
    modules: Sequence[tuple[str, bytes, str]],
    loader_name: str = "vmm",
) -> ImagePlan:
    """Plan a Multiboot v1 boot: the image, ``modules`` ((path, contents, string) each),
    and the info block with ``cmdline`` (the ``--append`` text; the guest sees
    ``"<path> <cmdline>"``) against guest RAM ``ram`` ((base, size) ranges). Pure; InputError
    for anything that does not parse, fit, or is asked for and not offered."""
    _check_flags(path, header.flags)
    kernel_cmdline = os.fsencode(path) + b" " + _c_string("--append", cmdline)
    if len(modules) > MAX_MODULES:
        raise InputError(f"{len(modules)} modules; at most {MAX_MODULES}")
    mod_strings = [_c_string(f"the string of module {mpath}", text) for mpath, _, text in modules]
    name = _c_string("the boot loader name", loader_name)

    if header.has_address:
        fmt, (segments, entry) = "multiboot-aout", _aout(path, data, header)
    elif data[:4] == _ELF_MAGIC:
        fmt, (segments, entry) = "multiboot-elf", _elf32(path, data)
    else:
        raise InputError(
            f"{path}: not an ELF file, and its Multiboot header has no address fields (flag 16): "
            "nothing says where to load it"
        )

    entries = pc_ram_map(ram)
    space = RamAllocator(entries, below=FOUR_GIB)
    for seg in segments:
        if not in_usable(entries, seg.gpa, seg.memsz):
            raise InputError(
                f"{path}: {seg.memsz} bytes at {seg.gpa:#x} are not in usable guest RAM below 4 GiB "
                f"({_usable_text(entries)}); give more --mem or link the image elsewhere"
            )
        space.reserve(seg.gpa, seg.memsz)
    image_end = space.top

    mmap = multiboot_mmap(entries)
    layout = _Block(mmap, len(modules), [kernel_cmdline, *mod_strings, name])
    base = space.alloc(layout.size, align=INFO_ALIGN, lowest=INFO_LOW, below=EBDA_START)

    mods = []
    for (mpath, contents, _), string_off in zip(modules, layout.strings[1 : 1 + len(modules)], strict=True):
        size, addr = max(len(contents), 1), None  # an empty module still gets its own address
        # Above the image, else below it from 1 MiB, else in conventional memory (which
        # an OS may want for itself: SMP trampolines, real-mode buffers).
        for lowest in (image_end, HIGH_START, 0):
            addr = space.alloc(size, align=MODULE_ALIGN, lowest=lowest)
            if addr is not None:
                break
        if addr is None:
            raise InputError(
                f"module {mpath} ({len(contents)} bytes) does not fit in usable guest RAM below 4 GiB "
                f"({_usable_text(entries)}) beside the image and the modules before it; give more --mem"
            )
        mods.append((addr, contents, string_off))

    if base is None:
        base = space.alloc(layout.size, align=INFO_ALIGN, lowest=space.top)
        base = space.alloc(layout.size, align=INFO_ALIGN) if base is None else base
        if base is None:
            raise InputError(
                f"{path}: no room for the {layout.size}-byte Multiboot information in usable guest RAM "
                f"below 4 GiB ({_usable_text(entries)}) beside the image and modules; give more --mem"
            )

    block = bytearray(layout.size)
    lower, upper = lower_upper_kib(entries)
    flags = INFO_MEMORY | INFO_CMDLINE | INFO_MMAP | INFO_LOADER_NAME | (INFO_MODS if mods else 0)
    struct.pack_into("<IIII", block, 0, flags, lower, upper, 0)
    struct.pack_into("<III", block, 16, base + layout.strings[0], len(mods), base + layout.mods if mods else 0)
    struct.pack_into("<II", block, 44, len(mmap), base + layout.mmap)
    struct.pack_into("<I", block, 64, base + layout.strings[-1])
    gdt = gdt_table()
    block[layout.gdt : layout.gdt + len(gdt)] = gdt
    block[layout.mmap : layout.mmap + len(mmap)] = mmap
    for i, (addr, contents, string_off) in enumerate(mods):
        MOD_ENTRY.pack_into(block, layout.mods + i * MOD_ENTRY.size, addr, addr + len(contents), base + string_off, 0)
    for off, text in zip(layout.strings, [kernel_cmdline, *mod_strings, name], strict=True):
        block[off : off + len(text)] = text

    module_segments = [Segment(addr, contents, len(contents)) for addr, contents, _ in mods if contents]
    return ImagePlan(
        path,
        fmt,
        entry,
        CpuMode.PROTECTED,
        (*segments, *module_segments, Segment(base, bytes(block), layout.size)),
        pc=True,
        regs=MappingProxyType({"rax": BOOTLOADER_MAGIC, "rbx": base}),
        gdt=base + layout.gdt,
    )
