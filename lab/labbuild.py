"""Build the nested real-kernel lab, idempotently, into ``.cache/lab/``.

The lab is a Debian kernel (series 7 by default, or 6.12: see ``labkernel.py``) booted by
QEMU in TCG mode with an emulated AMD CPU that has SVM and nested paging, so the KVM inside
it has two-dimensional paging (and with it ``KVM_PRE_FAULT_MEMORY``), unlike this machine's
own KVM.  See ``lab/README.md``.

What this module produces (everything is cached; a second run does no download and no
repack unless an input changed):

* ``qemu-system-x86`` installed on the host with apt-get, if missing;
* the kernel of the chosen series, downloaded with ``apt-get download`` and unpacked with
  ``dpkg-deb -x`` (:mod:`labkernel`);
* a busybox initramfs (cpio newc, gzip) per kernel release, holding busybox, ``lab/init.sh``
  as ``/init`` and the KVM, 9p and overlay modules with their dependencies (from each
  module's ``.modinfo`` ``depends=``), decompressed and listed in load order;
* with ``private=True`` (series 6.12): ``kvm.ko`` and ``kvm-amd.ko`` rebuilt from Debian's
  kernel source with ``CONFIG_KVM_SW_PROTECTED_VM=y`` (see ``labprivate.py``), used
  instead of the stock ones.

``lab/build`` is the command-line front end; ``lab/run`` calls :func:`ensure_lab`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shutil
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from labapt import CACHE, LAB_DIR, Apt, LabError, deb_field, last_line, log, run, unpack_deb
from labkernel import DEFAULT_SERIES, PRIVATE_SERIES, SERIES, Kernel, ensure_kernel, pvh_kernel, series

# Re-exported for labrun and labprivate.
__all__ = ["CACHE", "Apt", "Kernel", "Lab", "LabError", "deb_field", "ensure_lab", "last_line", "log", "run"]

INIT_SCRIPT = LAB_DIR / "init.sh"

#: Modules the lab needs; their dependencies are found from ``.modinfo``.
ROOT_MODULES = ("kvm_amd", "9pnet_virtio", "9p", "overlay")
#: Host programs and the Debian packages that provide them.
HOST_PROGRAMS = {"qemu-system-x86_64": "qemu-system-x86", "zstd": "zstd"}
BUSYBOX_PACKAGE = "busybox-static"


@dataclass(frozen=True)
class Lab:
    """A built lab: what QEMU needs to boot it."""

    kernel: Path
    initrd: Path
    release: str
    private: bool
    series: str


# --- host packages -------------------------------------------------------------------------


def ensure_host_programs(apt: Apt) -> None:
    """Install the Debian packages of any missing host program."""
    missing = sorted({pkg for prog, pkg in HOST_PROGRAMS.items() if not shutil.which(prog)})
    if missing:
        apt.install(missing)
    for prog in HOST_PROGRAMS:
        if not shutil.which(prog):
            raise LabError(f"{prog} is still missing after installing {HOST_PROGRAMS[prog]}")


# --- modules -------------------------------------------------------------------------------


def canonical(name: str) -> str:
    """Module names use ``_``; file names may use ``-``."""
    return name.replace("-", "_")


def module_index(moddir: Path) -> dict[str, Path]:
    """Every loadable module of a kernel, by canonical name."""
    index: dict[str, Path] = {}
    for path in (moddir / "kernel").rglob("*.ko*"):
        index[canonical(path.name.split(".ko", 1)[0])] = path
    return index


def builtin_modules(moddir: Path) -> set[str]:
    """Names of the modules built into the kernel image."""
    try:
        lines = (moddir / "modules.builtin").read_text().split()
    except OSError:
        return set()
    return {canonical(Path(line).name.split(".ko", 1)[0]) for line in lines}


def module_bytes(path: Path) -> bytes:
    """A module's ELF bytes, decompressed if need be."""
    if path.name.endswith(".ko"):
        return path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    raise LabError(f"unsupported module compression: {path.name}")


def modinfo(elf: bytes) -> dict[str, str]:
    """The ``key=value`` pairs of a module's ``.modinfo`` section (last value wins)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise LabError("not a 64-bit little-endian ELF module")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", elf, shoff + index * shentsize)
        return name, offset, size

    _, stroff, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        end = elf.index(b"\0", stroff + name)
        if elf[stroff + name : end] == b".modinfo":
            pairs = elf[offset : offset + size].split(b"\0")
            return dict(pair.decode(errors="replace").split("=", 1) for pair in pairs if b"=" in pair)
    return {}


def resolve_modules(kernel: Kernel, roots: Sequence[str], overrides: dict[str, Path]) -> list[tuple[str, bytes]]:
    """The modules to load, dependencies first, as (name, ELF bytes)."""
    index = {**module_index(kernel.moddir), **overrides}
    builtin = builtin_modules(kernel.moddir)
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen or name in builtin:
            return
        if name in chain:
            raise LabError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        path = index.get(name)
        if path is None:
            raise LabError(f"module {name} is not in {kernel.package}")
        data = module_bytes(path)
        for dep in filter(None, modinfo(data).get("depends", "").split(",")):
            visit(canonical(dep), (*chain, name))
        seen.add(name)
        order.append((name, data))

    for root in roots:
        visit(canonical(root), ())
    return order


# --- the initramfs -------------------------------------------------------------------------


class Cpio:
    """A minimal writer of cpio "newc" archives (the initramfs format)."""

    def __init__(self) -> None:
        """Start an empty archive."""
        self.parts: list[bytes] = []
        self.ino = 0

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        """Append one entry (owner root, mtime 0 so the archive is reproducible)."""
        self.ino += 1
        encoded = name.encode() + b"\0"
        nlink = 2 if mode & 0o170000 == 0o040000 else 1
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % field for field in fields)
        self.parts += [header, encoded, pad4(len(header) + len(encoded)), data, pad4(len(data))]

    def directory(self, name: str) -> None:
        """Append a directory."""
        self.add(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Append a regular file."""
        self.add(name, 0o100000 | mode, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        """Append a character device node."""
        self.add(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        """The archive bytes, with the trailer."""
        self.add("TRAILER!!!", 0)
        return b"".join(self.parts)


def pad4(length: int) -> bytes:
    """Zero bytes that bring ``length`` to a multiple of four."""
    return b"\0" * (-length % 4)


def pack_initramfs(busybox: bytes, modules: Sequence[tuple[str, bytes]]) -> bytes:
    """The gzip-compressed initramfs: busybox, /init and the modules in load order."""
    cpio = Cpio()
    for directory in ("bin", "dev", "etc", "lib", "lib/modules", "mnt", "proc", "sys", "tmp"):
        cpio.directory(directory)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox, 0o755)
    cpio.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    for name, data in modules:
        cpio.file(f"lib/modules/{name}.ko", data)
    cpio.file("etc/lab-modules", "".join(f"{name}\n" for name, _ in modules).encode())
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


def input_digest(kernel: Kernel, busybox_deb: Path, overrides: dict[str, Path]) -> str:
    """A digest of everything that goes into the initramfs (cheap: no decompression)."""
    digest = hashlib.sha256()
    for source in (Path(__file__), INIT_SCRIPT):
        digest.update(source.read_bytes())
    digest.update(f"{kernel.package}\0{kernel.release}\0{busybox_deb.name}\0".encode())
    for name in sorted(overrides):
        digest.update(name.encode() + b"\0" + overrides[name].read_bytes())
    return digest.hexdigest()[:16]


def ensure_initramfs(kernel: Kernel, busybox_deb: Path, overrides: dict[str, Path]) -> Path:
    """Pack the initramfs unless one with the same inputs is cached."""
    tag = "private-" if overrides else ""
    digest = input_digest(kernel, busybox_deb, overrides)
    dest = CACHE / "initramfs" / f"{kernel.release}-{tag}{digest}.cpio.gz"
    if dest.is_file():
        return dest
    log(f"packing {dest.name}")
    busybox_root = unpack_deb(busybox_deb, CACHE / "busybox" / busybox_deb.stem)
    busybox = (busybox_root / "bin" / "busybox").read_bytes()
    modules = resolve_modules(kernel, ROOT_MODULES, overrides)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    tmp.write_bytes(pack_initramfs(busybox, modules))
    os.replace(tmp, dest)
    log(f"initramfs modules: {' '.join(name for name, _ in modules)}")
    stale = re.compile(rf"{re.escape(kernel.release)}-{tag}[0-9a-f]{{16}}\.cpio\.gz")
    for old in dest.parent.iterdir():
        if old != dest and stale.fullmatch(old.name):
            old.unlink(missing_ok=True)
    return dest


# --- the whole build -----------------------------------------------------------------------


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """Serialize builds that share the cache directory."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_lab(*, private: bool = False, refresh: bool = False, kernel: str | None = None) -> Lab:
    """Build whatever part of the lab is missing or stale and return it.

    ``kernel``: the series (``7``, ``6.12``; None = the default, or 6.12 with ``private``)."""
    if private and kernel is None:
        kernel = PRIVATE_SERIES[0]
    chosen = series(kernel)
    if private and chosen.name not in PRIVATE_SERIES:
        raise LabError(f"--private is built and verified for --kernel {' or '.join(PRIVATE_SERIES)} only")
    with cache_lock():
        apt = Apt()
        ensure_host_programs(apt)
        built = ensure_kernel(chosen.name, apt, refresh=refresh)
        busybox_deb = apt.download(BUSYBOX_PACKAGE)
        overrides: dict[str, Path] = {}
        if private:
            from labprivate import ensure_private_modules

            overrides = ensure_private_modules(apt, built)
        initrd = ensure_initramfs(built, busybox_deb, overrides)
        return Lab(kernel=pvh_kernel(built), initrd=initrd, release=built.release, private=private, series=chosen.name)


def main(argv: Sequence[str]) -> int:
    """``lab/build [--private] [--refresh]``: build the lab and print where it is."""
    parser = argparse.ArgumentParser(
        prog="lab/build",
        description="Build the nested real-kernel lab into .cache/lab/ (idempotent).",
    )
    parser.add_argument(
        "--private",
        action="store_true",
        help="also rebuild kvm.ko/kvm-amd.ko with CONFIG_KVM_SW_PROTECTED_VM=y",
    )
    parser.add_argument(
        "--kernel",
        choices=sorted(SERIES),
        default=None,
        help=f"kernel series (default {DEFAULT_SERIES}; 6.12 with --private)",
    )
    parser.add_argument(
        "--refresh",
        action="store_true",
        help="pick the newest kernel package again instead of the cached choice",
    )
    args = parser.parse_args(argv)
    try:
        lab = ensure_lab(private=args.private, refresh=args.refresh, kernel=args.kernel)
    except LabError as exc:
        log(str(exc))
        return 125
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    print(f"kernel {lab.kernel}\ninitrd {lab.initrd}\nrelease {lab.release}\nseries {lab.series}")
    return 0
