"""ELF32 (i386) and ELF64 (x86-64) executables, loaded by program header.

PT_LOAD segments go to their physical address (``p_paddr``; the VMM identity-maps,
so it is also the virtual one); the part of ``p_memsz`` beyond ``p_filesz`` is
zeroed. The ELF class picks the mode (32 -> protected, 64 -> long) unless the image
carries a ``VMM`` note (type 1, descriptor = a mode name such as ``user``) or the
user overrides it.

The headers are parsed here with :mod:`struct`, every number checked against the file
before it is used (a general ELF library seeks to whatever offset a header names, and a
hostile one names 2^63). Refused, each with one InputError line: a class or byte order
other than little-endian ELF32 for EM_386 or ELF64 for EM_X86_64 (x32 and big-endian
images included), anything but ET_EXEC, program headers or segments outside the file,
PT_LOAD segments that overlap, and an entry point (the image's own or ``--entry``)
outside the file-backed bytes of every PT_LOAD segment. QEMU checks none of the last
two; they would only start the guest on bytes that are not its code.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from itertools import pairwise

from vmm.cpu.layout import CpuMode
from vmm.errors import InputError
from vmm.loader import ImagePlan, Segment, check_placement

ELF_MAGIC = b"\x7fELF"
NOTE_NAME = "VMM"
NOTE_TYPE_MODE = 1

_CLASS_BITS = {1: 32, 2: 64}
_MACHINE_FOR_BITS = {32: 3, 64: 62}  # EM_386, EM_X86_64
_MACHINE_NAMES = {3: "EM_386", 62: "EM_X86_64"}
_TYPE_NAMES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}
_ET_EXEC = 2
_PT_LOAD = 1
_PT_NOTE = 4
_PN_XNUM = 0xFFFF
# e_type .. e_shstrndx after the 16-byte e_ident; program headers reordered to one shape below.
_EHDR = {32: struct.Struct("<HHIIIIIHHHHHH"), 64: struct.Struct("<HHIQQQIHHHHHH")}
_PHDR = {32: struct.Struct("<IIIIIIII"), 64: struct.Struct("<IIQQQQQQ")}


class _Phdr:
    __slots__ = ("type", "offset", "paddr", "filesz", "memsz")

    def __init__(self, bits: int, raw: tuple[int, ...]) -> None:
        if bits == 32:
            self.type, self.offset, _vaddr, self.paddr, self.filesz, self.memsz, _flags, _align = raw
        else:
            self.type, _flags, self.offset, _vaddr, self.paddr, self.filesz, self.memsz, _align = raw


class _Elf:
    """The checked ELF header and program headers of an x86 executable."""

    __slots__ = ("bits", "entry", "phdrs")

    def __init__(self, path: str, data: bytes) -> None:
        if len(data) < 16 or data[:4] != ELF_MAGIC:
            raise InputError(f"{path}: malformed or truncated ELF (no ELF header)")
        bits = _CLASS_BITS.get(data[4])
        if bits is None:
            raise InputError(f"{path}: malformed ELF (unknown class {data[4]})")
        if data[5] != 1:
            order = "big-endian" if data[5] == 2 else f"of unknown byte order {data[5]}"
            raise InputError(f"{path}: ELF is {order}; x86 images are little-endian")
        ehdr = _EHDR[bits]
        if len(data) < 16 + ehdr.size:
            raise InputError(f"{path}: malformed or truncated ELF ({len(data)} bytes, shorter than its header)")
        e_type, machine, _, entry, phoff, _, _, _, phentsize, phnum, *_ = ehdr.unpack_from(data, 16)
        if machine not in _MACHINE_NAMES:
            raise InputError(f"{path}: ELF for machine {machine}, not x86 (EM_386 or EM_X86_64)")
        if machine != _MACHINE_FOR_BITS[bits]:
            raise InputError(
                f"{path}: ELF{bits} for {_MACHINE_NAMES[machine]}; x86 executables are ELF32 for EM_386 "
                "or ELF64 for EM_X86_64"
            )
        if e_type != _ET_EXEC:
            raise InputError(f"{path}: ELF type {_TYPE_NAMES.get(e_type, e_type)}, expected an executable (ET_EXEC)")
        phdr = _PHDR[bits]
        if phnum == _PN_XNUM or (phnum and phentsize < phdr.size):
            raise InputError(f"{path}: malformed ELF (e_phnum {phnum}, e_phentsize {phentsize})")
        if phoff + phnum * phentsize > len(data):
            raise InputError(f"{path}: program headers run past the end of the file (truncated ELF)")
        self.bits = bits
        self.entry = entry
        self.phdrs = [_Phdr(bits, phdr.unpack_from(data, phoff + i * phentsize)) for i in range(phnum)]
        for ph in self.phdrs:
            if ph.type in (_PT_LOAD, _PT_NOTE) and ph.offset + ph.filesz > len(data):
                what = "segment" if ph.type == _PT_LOAD else "note segment"
                raise InputError(f"{path}: {what} at {ph.paddr:#x} runs past the end of the file (truncated ELF)")

    @property
    def class_mode(self) -> CpuMode:
        return CpuMode.LONG if self.bits == 64 else CpuMode.PROTECTED


def _raw_notes(data: bytes) -> list[tuple[str, int, bytes]]:
    """(name, type, descriptor) of each note in a PT_NOTE segment's bytes."""
    notes, pos = [], 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        name_start = pos + 12
        desc_start = name_start + (namesz + 3) // 4 * 4
        end = desc_start + (descsz + 3) // 4 * 4
        if desc_start + descsz > len(data):
            break
        name = data[name_start : name_start + namesz].rstrip(b"\0").decode(errors="replace")
        notes.append((name, ntype, data[desc_start : desc_start + descsz]))
        pos = end
    return notes


def _note_mode(path: str, elf: _Elf, data: bytes) -> CpuMode | None:
    for ph in elf.phdrs:
        if ph.type != _PT_NOTE:
            continue
        for name, ntype, desc in _raw_notes(data[ph.offset : ph.offset + ph.filesz]):
            if name == NOTE_NAME and ntype == NOTE_TYPE_MODE:
                text = desc.rstrip(b"\0").decode(errors="replace")
                try:
                    return CpuMode(text)
                except ValueError:
                    raise InputError(f"{path}: VMM note asks for unknown mode {text!r}") from None
    return None


def elf_mode(path: str, data: bytes) -> CpuMode:
    """The mode the ELF asks for: its VMM note, else its class."""
    elf = _Elf(path, data)
    return _note_mode(path, elf, data) or elf.class_mode


def plan_elf(
    path: str,
    data: bytes,
    ram: Sequence[tuple[int, int]],
    *,
    mode: CpuMode | None = None,
    entry: int | None = None,
) -> ImagePlan:
    """Every PT_LOAD segment, checked; InputError on anything that does not fit or parse.
    ``entry`` (``--entry``) replaces the image's entry point and is checked the same way."""
    elf = _Elf(path, data)
    mode = mode or _note_mode(path, elf, data) or elf.class_mode
    segments = []
    for ph in elf.phdrs:
        if ph.type != _PT_LOAD or ph.memsz == 0:
            continue
        if ph.filesz > ph.memsz:
            raise InputError(
                f"{path}: segment at {ph.paddr:#x} has more file bytes ({ph.filesz}) than memory ({ph.memsz})"
            )
        check_placement(path, ram, mode, ph.paddr, ph.memsz)
        segments.append(Segment(ph.paddr, data[ph.offset : ph.offset + ph.filesz], ph.memsz))
    if not segments:
        raise InputError(f"{path}: ELF has no loadable segments")
    for a, b in pairwise(sorted(segments, key=lambda s: s.gpa)):
        if a.gpa + a.memsz > b.gpa:
            raise InputError(f"{path}: PT_LOAD segments at {a.gpa:#x} and {b.gpa:#x} overlap")
    start = elf.entry if entry is None else entry
    if not any(s.gpa <= start < s.gpa + len(s.data) for s in segments):
        what = "--entry" if entry is not None else "entry point"
        raise InputError(f"{path}: {what} {start:#x} is not inside the file bytes of a loaded segment")
    return ImagePlan(path, f"elf{elf.bits}", start, mode, tuple(segments))
