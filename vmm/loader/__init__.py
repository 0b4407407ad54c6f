"""Image loaders: detect the format, plan where every byte goes, then write guest RAM.

ELF (32- or 64-bit x86, by program headers) is recognised by its magic; anything
else is a flat binary. Planning is pure: :func:`plan_image` reads and checks the
image against the planned RAM layout before any fd or mapping exists (so bad
input fails first, kvmtool's ``kvm_run_validate_cfg``), and :meth:`ImagePlan.load`
writes it. Loaders touch no vCPU: the plan says where to start and in which mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmm.cpu.layout import BootLayout, CpuMode
from vmm.errors import InputError
from vmm.memory import GuestMemory, describe_ranges


@dataclass(frozen=True)
class Segment:
    """``data`` goes to ``gpa``; the rest of ``memsz`` is zeroed."""

    gpa: int
    data: bytes
    memsz: int


@dataclass(frozen=True)
class ImagePlan:
    """Where the image goes and how it wants to start."""

    path: str
    format: str  # "elf32", "elf64", "flat"
    entry: int
    mode: CpuMode
    segments: tuple[Segment, ...]

    @property
    def start(self) -> int:
        """Lowest guest-physical byte the image occupies."""
        return min(s.gpa for s in self.segments)

    @property
    def end(self) -> int:
        """One past the highest."""
        return max(s.gpa + s.memsz for s in self.segments)

    def load(self, mem: GuestMemory) -> ImagePlan:
        """Write every segment into guest RAM (bounds-checked by ``mem``)."""
        for seg in self.segments:
            mem.write(seg.gpa, seg.data)
            if seg.memsz > len(seg.data):
                mem.fill(seg.gpa + len(seg.data), seg.memsz - len(seg.data), 0)
        return self


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


def check_placement(path: str, ram: Sequence[tuple[int, int]], mode: CpuMode, gpa: int, size: int) -> None:
    """InputError unless [gpa, gpa+size) is inside one RAM range and clear of the VMM's
    boot structures (guests/README.md)."""
    if size and not any(base <= gpa and gpa + size <= base + length for base, length in ram):
        raise InputError(
            f"{path}: {size} bytes at {gpa:#x} do not fit in guest RAM ({describe_ranges(ram)}); "
            "give more --mem or another load address"
        )
    reserved_end = BootLayout.REAL_SYSTEM_END if mode is CpuMode.REAL else BootLayout.SYSTEM_END
    if gpa < reserved_end and gpa + size > BootLayout.BOOT_INFO:
        raise InputError(
            f"{path}: {gpa:#x}-{gpa + size - 1:#x} overlaps the VMM's boot structures at "
            f"{BootLayout.BOOT_INFO:#x}-{reserved_end - 1:#x} (guests/README.md); load it elsewhere"
        )


def plan_image(
    path: str | Path,
    ram: Sequence[tuple[int, int]],
    *,
    mode: CpuMode | None = None,
    load_addr: int | None = None,
    entry: int | None = None,
) -> ImagePlan:
    """Read and check ``path`` for guest RAM ``ram`` ((base, size) ranges). ``mode``
    overrides the image's own choice (ELF class, or a ``VMM`` note); ``load_addr``
    applies to flat binaries; ``entry`` overrides the entry point."""
    from vmm.loader.elf import ELF_MAGIC, plan_elf
    from vmm.loader.flat import plan_flat

    data = read_image(path)
    if data[:4] == ELF_MAGIC:
        if load_addr is not None:
            raise InputError(f"{path}: --load-addr is for flat binaries; an ELF image places itself")
        return plan_elf(str(path), data, ram, mode=mode, entry=entry)
    return plan_flat(str(path), data, ram, mode=mode, load_addr=load_addr, entry=entry)


def load_image(
    path: str | Path,
    mem: GuestMemory,
    *,
    mode: CpuMode | None = None,
    load_addr: int | None = None,
    entry: int | None = None,
) -> ImagePlan:
    """Plan ``path`` against ``mem``'s regions and load it."""
    ram = [(r.gpa, r.size) for r in mem]
    return plan_image(path, ram, mode=mode, load_addr=load_addr, entry=entry).load(mem)


def peek_mode(path: str | Path) -> CpuMode:
    """The mode an image asks for, without loading it."""
    from vmm.loader.elf import ELF_MAGIC, elf_mode

    data = read_image(path)
    if data[:4] == ELF_MAGIC:
        return elf_mode(str(path), data)
    return CpuMode.REAL
