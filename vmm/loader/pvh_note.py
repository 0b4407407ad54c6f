"""Telling a PVH vmlinux from other ELF images: its ``XEN_ELFNOTE_PHYS32_ENTRY`` note.

Split from :mod:`vmm.loader.pvh` so that checking every ELF image for the note imports
only this (struct and the error type), not the Linux boot protocol and the platform
tables a PVH boot needs.
"""

from __future__ import annotations

import struct

from vmm.errors import InputError

XEN_ELFNOTE_PHYS32_ENTRY = 18
_FOUR_GIB = 1 << 32

_EHDR64 = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR64 = struct.Struct("<IIQQQQQQ")
PT_LOAD, PT_NOTE = 1, 4
_EM_X86_64, _ET_EXEC = 62, 2


def elf_notes(blob: bytes) -> list[tuple[bytes, int, bytes]]:
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


def elf64_headers(path: str, data: bytes) -> list[tuple[int, int, int, int, int]]:
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
        if p_type in (PT_LOAD, PT_NOTE) and offset + filesz > len(data):
            raise InputError(f"{path}: segment at {paddr:#x} runs past the end of the file (truncated ELF)")
        if p_type == PT_LOAD and filesz > memsz:
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
    for p_type, offset, _, filesz, _ in elf64_headers(path, data):
        if p_type != PT_NOTE:
            continue
        for name, ntype, desc in elf_notes(data[offset : offset + filesz]):
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                if len(desc) not in (4, 8):
                    raise InputError(f"{path}: XEN_ELFNOTE_PHYS32_ENTRY note of {len(desc)} bytes (4 or 8 expected)")
                entry = int.from_bytes(desc, "little")
                if entry >= _FOUR_GIB:
                    raise InputError(f"{path}: PVH entry {entry:#x} is above 4 GiB")
                return entry
    return None
