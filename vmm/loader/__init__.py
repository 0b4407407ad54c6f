"""Image loaders: detect the format, plan where every byte goes, then write guest RAM.

ELF (32- or 64-bit x86, by program headers) is recognised by its magic; anything
else is a flat binary. Planning is pure: :func:`plan_image` reads and checks the
image against the planned RAM layout before any fd or mapping exists (so bad
input fails first, kvmtool's ``kvm_run_validate_cfg``), and :meth:`ImagePlan.load`
writes it. Loaders touch no vCPU: the plan says where to start and in which mode.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

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
    """Where the image goes and how it wants to start.

    ``pc`` marks an image that follows PC conventions (Multiboot, Linux): only vCPU 0
    starts at ``entry`` and the others wait for INIT/SIPI; the plan's ``segments`` hold
    everything the VMM writes (image, modules, boot information, a GDT at ``gdt``), so the
    VMM's fixed layout and boot info block are not used. ``regs`` are entry registers on
    top of the mode's defaults (Multiboot: EAX, EBX).
    """

    path: str
    format: str  # "elf32", "elf64", "flat", "multiboot-elf", "multiboot-aout"
    entry: int
    mode: CpuMode
    segments: tuple[Segment, ...]
    pc: bool = False
    regs: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    gdt: int | None = None

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


def read_image(path: str | Path, *, max_size: int = BootLayout.MAX_RAM) -> bytes:
    """The image's bytes, never more than ``max_size`` (callers pass the guest RAM the
    image goes into; the default is the most RAM this VMM gives a guest).

    One-line InputError for a missing, unreadable, empty or too large file, and for
    anything that is not a regular file (:func:`vmm.files.read_regular_file`).
    """
    from vmm.files import read_regular_file

    data = read_regular_file(
        path,
        max_size=max_size,
        what="an image",
        too_big=lambda size: f"{size:,} bytes do not fit in guest RAM ({max_size:,} bytes); give more --mem",
    )
    if not data:
        raise InputError(f"{path}: empty image")
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
    cmdline: str = "",
    modules: Sequence[tuple[str, str | None]] = (),
    initrd: str | None = None,
    nr_vcpus: int = 1,
) -> ImagePlan:
    """Read and check ``path`` for guest RAM ``ram`` ((base, size) ranges).

    A Linux bzImage (the "HdrS" setup header) or an uncompressed vmlinux with a PVH entry
    note boots by the Linux boot protocol: ``cmdline`` after :data:`LINUX_CMDLINE`, ``initrd``
    (or a single module, as QEMU's ``-initrd``) as its initramfs. A Multiboot header in the
    first 8 KiB makes it a Multiboot kernel (``cmdline`` and ``modules`` ((path, string or
    None for the path)) go to its info block). Both follow PC conventions. Otherwise
    ``mode`` overrides the image's own choice (ELF class, or a ``VMM`` note), ``load_addr``
    applies to flat binaries, ``entry`` overrides the entry point.

    The plan of an unchanged image with the same arguments is reused (:func:`_plan_key`):
    planning is pure, and a suite running one image a thousand times plans it once."""
    other_files = bool(modules) or initrd is not None
    key = _plan_key(path, other_files, (tuple(ram), mode, load_addr, entry, cmdline, nr_vcpus))
    cached = _PLANS.get(key) if key is not None else None
    if cached is not None:
        return cached
    plan = _plan_image(path, ram, mode, load_addr, entry, cmdline, modules, initrd, nr_vcpus)
    if key is not None and sum(len(s.data) for s in plan.segments) <= PLAN_CACHE_BYTES:
        with _PLANS_LOCK:  # machines are built from several threads in some test suites
            while len(_PLANS) >= PLAN_CACHE_ENTRIES:
                del _PLANS[next(iter(_PLANS))]  # the oldest
            _PLANS[key] = plan
    return plan


PLAN_CACHE_ENTRIES = 8
PLAN_CACHE_BYTES = 16 << 20
"""Plans of at most this many bytes of segments are kept (PLAN_CACHE_ENTRIES of them)."""
_PLANS: dict[tuple[object, ...], ImagePlan] = {}
_PLANS_LOCK = threading.Lock()


def _plan_key(path: str | Path, other_files: bool, arguments: tuple[object, ...]) -> tuple[object, ...] | None:
    """What a plan depends on, or None where it is not worth keeping: the image file by
    device, inode, size, modification and change time (a file rewritten in place, even
    within the same second, changes ``st_ctime_ns``), and every argument. Plans are pure
    and frozen (ImagePlan's segments are bytes), so a later run of an unchanged image
    reuses the plan and its checks. Images with modules or an initrd (``other_files``) are
    planned afresh; anything but a regular file too, so ``read_image`` refuses it."""
    import os
    import stat

    if other_files:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None  # read_image says why
    if not stat.S_ISREG(st.st_mode):
        return None
    file_id = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return (*file_id, *arguments)


def _plan_image(
    path: str | Path,
    ram: Sequence[tuple[int, int]],
    mode: CpuMode | None,
    load_addr: int | None,
    entry: int | None,
    cmdline: str,
    modules: Sequence[tuple[str, str | None]],
    initrd: str | None,
    nr_vcpus: int,
) -> ImagePlan:
    from vmm.loader.elf import ELF_MAGIC, plan_elf
    from vmm.loader.flat import plan_flat
    from vmm.loader.multiboot import find_header, plan_multiboot

    name = str(path)
    limit = sum(size for _, size in ram)
    data = read_image(path, max_size=limit)
    linux = _plan_linux(name, data, ram, mode, load_addr, cmdline, modules, initrd, nr_vcpus, limit)
    if linux is not None:
        return linux if entry is None else replace(linux, entry=entry)
    if initrd is not None:
        raise InputError(f"{name}: --initrd is for Linux kernels; this is not a bzImage or a PVH vmlinux")
    header = find_header(data, path=name)
    if header is not None:
        for option, value in (("--mode", mode), ("--load-addr", load_addr)):
            if value is not None:
                raise InputError(f"{name}: {option} does not apply to a Multiboot kernel, which places itself")
        loaded = [
            (mpath, read_image(mpath, max_size=limit), mpath if text is None else text) for mpath, text in modules
        ]
        plan = plan_multiboot(name, data, header, ram, cmdline=cmdline, modules=loaded)
        return plan if entry is None else replace(plan, entry=entry)
    for option, given in (("--append", bool(cmdline)), ("--module", bool(modules))):
        if given:
            raise InputError(f"{name}: {option} is for Multiboot kernels, and this image has no Multiboot header")
    if data[:4] == ELF_MAGIC:
        if load_addr is not None:
            raise InputError(f"{path}: --load-addr is for flat binaries; an ELF image places itself")
        return plan_elf(name, data, ram, mode=mode, entry=entry)
    return plan_flat(name, data, ram, mode=mode, load_addr=load_addr, entry=entry)


LINUX_CMDLINE = "console=ttyS0 reboot=k panic=-1"
"""What a Linux guest's command line starts with (``--append`` follows): the console on
the 16550, and a reboot or a panic as an i8042 reset, which ends the run."""


def _plan_linux(
    name: str,
    data: bytes,
    ram: Sequence[tuple[int, int]],
    mode: CpuMode | None,
    load_addr: int | None,
    cmdline: str,
    modules: Sequence[tuple[str, str | None]],
    initrd: str | None,
    nr_vcpus: int,
    limit: int,
) -> ImagePlan | None:
    """The Linux boot plan if ``data`` is a bzImage or a PVH vmlinux, else None."""
    from vmm.loader.pvh_note import pvh_entry
    from vmm.platform.zeropage import is_bzimage

    bzimage = is_bzimage(data)
    if not bzimage and (data[:4] != b"\x7fELF" or pvh_entry(name, data) is None):
        return None
    for option, value in (("--mode", mode), ("--load-addr", load_addr)):
        if value is not None:
            raise InputError(f"{name}: {option} does not apply to a Linux kernel, which places itself")
    if initrd is not None and modules:
        raise InputError(f"{name}: give the initramfs once: --initrd or a single --module")
    if len(modules) > 1:
        raise InputError(f"{name}: a Linux kernel takes one initramfs, not {len(modules)} modules")
    source = initrd if initrd is not None else (modules[0][0] if modules else None)
    ramdisk = None if source is None else (source, read_image(source, max_size=limit))
    line = f"{LINUX_CMDLINE} {cmdline}".strip()
    if bzimage:
        from vmm.loader.linux import plan_linux

        return plan_linux(name, data, ram, cmdline=line, initrd=ramdisk, nr_vcpus=nr_vcpus)
    from vmm.loader.pvh import plan_pvh

    return plan_pvh(name, data, ram, cmdline=line, initrd=ramdisk, nr_vcpus=nr_vcpus)


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
