"""Image loaders: detect the format, write the image into guest RAM, return where to start.

ELF (32- or 64-bit x86, by program headers) is recognised by its magic; anything
else loads as a flat binary. Loaders touch no vCPU: they return a
:class:`LoadedImage` and the machine turns it into register state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmm.cpu.layout import BootLayout, CpuMode
from vmm.errors import InputError
from vmm.memory import GuestMemory


@dataclass(frozen=True)
class LoadedImage:
    """Where the image went and how it wants to start."""

    path: str
    format: str  # "elf32", "elf64", "flat"
    entry: int
    mode: CpuMode
    start: int  # lowest guest-physical byte written
    end: int  # one past the highest


def read_image(path: str | Path) -> bytes:
    """The image's bytes; InputError for a missing, unreadable, or empty file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{p}: is a directory, not an image") from None
    except PermissionError:
        raise InputError(f"{p}: permission denied") from None
    except OSError as e:
        raise InputError(f"{p}: cannot read: {e.strerror}") from None
    if not data:
        raise InputError(f"{p}: empty image")
    return data


def check_placement(path: str, mem: GuestMemory, mode: CpuMode, gpa: int, size: int) -> None:
    """InputError unless [gpa, gpa+size) is inside RAM and clear of the VMM's structures."""
    if size and not mem.contains(gpa, size):
        raise InputError(
            f"{path}: {size} bytes at {gpa:#x} do not fit in guest RAM ({mem.describe()}); "
            "give more --mem or another load address"
        )
    reserved_end = BootLayout.REAL_SYSTEM_END if mode is CpuMode.REAL else BootLayout.SYSTEM_END
    if gpa < reserved_end and gpa + size > BootLayout.BOOT_INFO:
        raise InputError(
            f"{path}: {gpa:#x}-{gpa + size - 1:#x} overlaps the VMM's boot structures at "
            f"{BootLayout.BOOT_INFO:#x}-{reserved_end - 1:#x} (guests/README.md); load it elsewhere"
        )


def load_image(
    path: str | Path,
    mem: GuestMemory,
    *,
    mode: CpuMode | None = None,
    load_addr: int | None = None,
    entry: int | None = None,
) -> LoadedImage:
    """Load ``path`` into ``mem``. ``mode`` overrides the image's own choice (ELF class,
    or a ``VMM`` note); ``load_addr`` applies to flat binaries; ``entry`` overrides."""
    from vmm.loader.elf import ELF_MAGIC, load_elf
    from vmm.loader.flat import load_flat

    data = read_image(path)
    if data[:4] == ELF_MAGIC:
        if load_addr is not None:
            raise InputError(f"{path}: --load-addr is for flat binaries; an ELF image places itself")
        return load_elf(str(path), data, mem, mode=mode, entry=entry)
    return load_flat(str(path), data, mem, mode=mode, load_addr=load_addr, entry=entry)


def peek_mode(path: str | Path) -> CpuMode:
    """The mode an image asks for, without loading it (the machine builds tables first)."""
    from vmm.loader.elf import ELF_MAGIC, elf_mode

    data = read_image(path)
    if data[:4] == ELF_MAGIC:
        return elf_mode(str(path), data)
    return CpuMode.REAL
