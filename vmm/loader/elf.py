"""ELF32/ELF64 x86 executables, loaded by program header (pyelftools).

PT_LOAD segments go to their physical address (``p_paddr``; the VMM identity-maps,
so it is also the virtual one); the part of ``p_memsz`` beyond ``p_filesz`` is
zeroed. The ELF class picks the mode (32 -> protected, 64 -> long) unless the image
carries a ``VMM`` note (type 1, descriptor = a mode name such as ``user``) or the
user overrides it.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from vmm.cpu.layout import CpuMode
from vmm.errors import InputError
from vmm.loader import ImagePlan, Segment, check_placement

ELF_MAGIC = b"\x7fELF"
NOTE_NAME = "VMM"
NOTE_TYPE_MODE = 1
_MACHINES = {"EM_386": 32, "EM_X86_64": 64}


def _open(path: str, data: bytes) -> ELFFile:
    try:
        elf = ELFFile(io.BytesIO(data))
    except (ELFError, ValueError, OSError, IndexError) as e:
        raise InputError(f"{path}: malformed or truncated ELF ({e})") from None
    machine = elf["e_machine"]
    if machine not in _MACHINES:
        raise InputError(f"{path}: ELF for {machine}, not x86")
    if elf["e_type"] != "ET_EXEC":
        raise InputError(f"{path}: ELF type {elf['e_type']}, expected an executable (ET_EXEC)")
    return elf


def _raw_notes(data: bytes) -> list[tuple[str, int, bytes]]:
    """(name, type, descriptor) of each note in a PT_NOTE segment's bytes. Parsed by hand:
    pyelftools renames note types by the GNU table, which would turn ours into
    NT_GNU_ABI_TAG."""
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


def _note_mode(path: str, elf: ELFFile) -> CpuMode | None:
    for segment in elf.iter_segments():
        if segment["p_type"] != "PT_NOTE":
            continue
        for name, ntype, desc in _raw_notes(segment.data()):
            if name == NOTE_NAME and ntype == NOTE_TYPE_MODE:
                text = desc.rstrip(b"\0").decode(errors="replace")
                try:
                    return CpuMode(text)
                except ValueError:
                    raise InputError(f"{path}: VMM note asks for unknown mode {text!r}") from None
    return None


def elf_mode(path: str, data: bytes) -> CpuMode:
    """The mode the ELF asks for: its VMM note, else its class."""
    try:
        elf = _open(path, data)
        return _note_mode(path, elf) or (CpuMode.LONG if elf.elfclass == 64 else CpuMode.PROTECTED)
    except (ELFError, ValueError, OSError, IndexError, KeyError) as e:
        raise InputError(f"{path}: malformed or truncated ELF ({e})") from None


def plan_elf(
    path: str,
    data: bytes,
    ram: Sequence[tuple[int, int]],
    *,
    mode: CpuMode | None = None,
    entry: int | None = None,
) -> ImagePlan:
    """Every PT_LOAD segment, checked; InputError on anything that does not fit or parse."""
    try:
        elf = _open(path, data)
        mode = mode or _note_mode(path, elf) or (CpuMode.LONG if elf.elfclass == 64 else CpuMode.PROTECTED)
        segments = []
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
                continue
            offset, filesz, memsz, paddr = seg["p_offset"], seg["p_filesz"], seg["p_memsz"], seg["p_paddr"]
            if filesz > memsz or offset + filesz > len(data):
                raise InputError(f"{path}: segment at {paddr:#x} runs past the end of the file (truncated ELF)")
            check_placement(path, ram, mode, paddr, memsz)
            segments.append(Segment(paddr, data[offset : offset + filesz], memsz))
        start = elf["e_entry"] if entry is None else entry
        fmt = f"elf{elf.elfclass}"
    except (ELFError, ValueError, OSError, IndexError, KeyError) as e:
        raise InputError(f"{path}: malformed or truncated ELF ({e})") from None
    if not segments:
        raise InputError(f"{path}: ELF has no loadable segments")
    return ImagePlan(path, fmt, start, mode, tuple(segments))
