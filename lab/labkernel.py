"""Which Debian kernel the lab boots: the series it offers, choosing, fetching, PVH.

Two series, each the newest package of its kind in its apt suite:

``7`` (the default)
    ``trixie-backports`` (7.3.4 when this was written), reached through a private apt
    configuration (:func:`labapt.suite_apt`). From 7.x Debian splits the kernel:
    ``linux-binary-<release>`` holds ``vmlinuz``, ``linux-modules-<release>`` the modules,
    ``linux-base-<release>`` the config and ``modules.builtin``, all under
    ``usr/lib/modules/<release>/`` (``linux-image-<release>`` is an empty stub that depends
    on them). The ``cloud-amd64`` flavour has no 9p: the lab uses ``amd64``.
``6.12``
    The system's own sources (bookworm-security carries Debian's 6.12 built for bookworm):
    ``linux-image-6.12.*+deb12-amd64-unsigned``, everything in one package
    under ``boot/`` and ``lib/modules/``.

The choice is recorded per series in ``.cache/lab/lab.json``, so later builds ask apt
nothing; ``--refresh`` chooses again. Each series unpacks into its own
``.cache/lab/kernel/<package>/``, so both stay cached side by side.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from labapt import CACHE, UNPACK_TIMEOUT, Apt, LabError, log, suite_apt, unpack_debs


@dataclass(frozen=True)
class Series:
    """A kernel series the lab can boot and where its packages come from."""

    name: str
    #: The apt suite, or None for the system's own sources.
    suite: str | None
    #: ``apt-cache search --names-only`` pattern of the main package.
    search: str
    #: Full main package name -> version numbers (named groups v1..v3).
    pattern: re.Pattern[str]
    #: 7.x packaging: linux-binary + linux-modules + linux-base of the same release.
    split: bool


SERIES = {
    "7": Series(
        name="7",
        suite="trixie-backports",
        search=r"^linux-binary-7\.[0-9]+\.[0-9]+\+deb[0-9]+-amd64$",
        pattern=re.compile(r"^linux-binary-(?P<v1>7)\.(?P<v2>\d+)\.(?P<v3>\d+)\+deb\d+-amd64$"),
        split=True,
    ),
    "6.12": Series(
        name="6.12",
        suite=None,
        search=r"^linux-image-6\.12\.[0-9]+\+deb[0-9]+-amd64-unsigned$",
        pattern=re.compile(r"^linux-image-(?P<v1>6)\.(?P<v2>12)\.(?P<v3>\d+)\+deb\d+-amd64-unsigned$"),
        split=False,
    ),
}
DEFAULT_SERIES = "7"
#: Series whose ``--private`` rebuild (labprivate.py) was verified: it needs the very
#: compiler Debian built the kernel with, and bookworm has gcc-12 only.
PRIVATE_SERIES = ("6.12",)


def series(name: str | None) -> Series:
    """The series called ``name`` (None: the default); LabError listing the choices."""
    chosen = SERIES.get(name or DEFAULT_SERIES)
    if chosen is None:
        raise LabError(f"unknown kernel series {name!r} (choose from {', '.join(SERIES)})")
    return chosen


def apt_for(chosen: Series, system: Apt) -> Apt:
    """The apt that reaches the series' suite."""
    return system if chosen.suite is None else suite_apt(chosen.suite)


def newest_package(chosen: Series, apt: Apt) -> str | None:
    """The newest main package of the series that the lists offer."""
    out = apt.query(["search", "--names-only", chosen.search], what="apt-cache search failed")
    keyed = []
    for line in out.splitlines():
        name = line.split(" - ", 1)[0].strip()
        if match := chosen.pattern.match(name):
            keyed.append(((int(match["v1"]), int(match["v2"]), int(match["v3"])), name))
    return max(keyed)[1] if keyed else None


def choose_package(chosen: Series, apt: Apt) -> str:
    """Pick the series' package, refreshing stale lists once if none is found."""
    name = newest_package(chosen, apt)
    if name is None:
        apt.update()
        name = newest_package(chosen, apt)
    if name is None:
        where = chosen.suite or "the system's apt sources"
        raise LabError(f"no kernel of series {chosen.name} in {where} (pattern {chosen.search})")
    return name


def read_manifest() -> dict[str, object]:
    """The cached build choices, or {}."""
    try:
        data = json.loads((CACHE / "lab.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def recorded_package(name: str) -> str | None:
    """The package recorded for series ``name`` (a lab.json of one kernel counts as 6.12)."""
    data = read_manifest()
    kernels = data.get("kernels")
    if isinstance(kernels, dict) and isinstance(kernels.get(name), str):
        return str(kernels[name])
    old = data.get("kernel_package")
    if isinstance(old, str) and SERIES[name].pattern.match(old):
        return old
    return None


def record_package(name: str, package: str) -> None:
    """Record the series' package atomically (the caller holds the cache lock)."""
    data = read_manifest()
    kernels = data.get("kernels")
    kernels = dict(kernels) if isinstance(kernels, dict) else {}
    kernels[name] = package
    previous = data.pop("kernel_package", None)  # the one-kernel lab.json of before
    for other, known in SERIES.items():
        if isinstance(previous, str) and known.pattern.match(previous):
            kernels.setdefault(other, previous)
    data["kernels"] = kernels
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / "lab.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, CACHE / "lab.json")


@dataclass(frozen=True)
class Kernel:
    """An unpacked kernel (one package, or the three of the 7.x packaging)."""

    package: str
    deb: Path
    root: Path
    release: str

    @property
    def moddir(self) -> Path:
        """``lib/modules/<release>`` or, from 7.x, ``usr/lib/modules/<release>``."""
        for base in (self.root / "lib" / "modules", self.root / "usr" / "lib" / "modules"):
            if (base / self.release).is_dir():
                return base / self.release
        return self.root / "lib" / "modules" / self.release

    @property
    def vmlinuz(self) -> Path:
        """The bootable kernel image."""
        old = self.root / "boot" / f"vmlinuz-{self.release}"
        return old if old.is_file() else self.moddir / "vmlinuz"

    @property
    def config(self) -> Path:
        """The kernel's build configuration."""
        old = self.root / "boot" / f"config-{self.release}"
        return old if old.is_file() else self.moddir / "config"


def split_packages(package: str) -> list[str]:
    """``linux-binary-<release>`` -> it, ``linux-modules-<release>``, ``linux-base-<release>``."""
    release = package.removeprefix("linux-binary-")
    return [package, f"linux-modules-{release}", f"linux-base-{release}"]


def fetch_kernel(chosen: Series, get_apt: Callable[[], Apt], package: str) -> Kernel:
    """Download (unless cached) and unpack the series' package(s); apt is asked only for
    what is missing."""
    names = split_packages(package) if chosen.split else [package]
    debs = [
        cached if (cached := CACHE / "debs" / f"{name}.deb").is_file() else get_apt().download(name) for name in names
    ]
    root = unpack_debs(debs, CACHE / "kernel" / package)
    found: set[str] = set()
    for base in (root / "lib" / "modules", root / "usr" / "lib" / "modules"):
        found |= {p.name for p in base.glob("*") if p.is_dir()}
    if len(found) != 1:
        raise LabError(f"{package}: expected one lib/modules/<release>, found {sorted(found)}")
    kernel = Kernel(package=package, deb=debs[0], root=root, release=found.pop())
    for path in (kernel.vmlinuz, kernel.moddir / "kernel"):
        if not path.exists():
            raise LabError(f"{package}: no {path.relative_to(root)}")
    return kernel


def ensure_kernel(name: str | None, system: Apt, *, refresh: bool = False) -> Kernel:
    """The series' kernel, choosing its package once (or again with ``refresh``)."""
    chosen = series(name)
    apts: list[Apt] = []

    def get_apt() -> Apt:
        if not apts:
            apts.append(apt_for(chosen, system))
        return apts[0]

    package = None if refresh else recorded_package(chosen.name)
    if package is None:
        package = choose_package(chosen, get_apt())
        record_package(chosen.name, package)
        log(f"kernel {chosen.name}: {package}")
    return fetch_kernel(chosen, get_apt, package)


def pvh_kernel(kernel: Kernel) -> Path:
    """The uncompressed ELF ``vmlinux`` for QEMU's PVH boot, else the bzImage.

    QEMU boots a PVH-capable ELF kernel directly, which skips the firmware's real-mode
    loader and the in-guest decompression (about 0.5-1 s under TCG).
    """
    dest = kernel.root / "boot" / f"vmlinux-{kernel.release}"
    if dest.is_file():
        return dest
    image = kernel.vmlinuz.read_bytes()
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)  # payload_offset, payload_length
    start = (setup_sects + 1) * 512 + offset
    payload = image[start : start + length - 4]  # the last 4 bytes are the unpacked size
    if payload[:4] != b"\x28\xb5\x2f\xfd":  # not zstd: keep the bzImage
        return kernel.vmlinuz
    try:
        proc = subprocess.run(
            ["zstd", "-d", "-c", "-q"],
            input=payload,
            capture_output=True,
            timeout=UNPACK_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return kernel.vmlinuz
    if proc.returncode != 0 or not has_pvh_note(proc.stdout):
        return kernel.vmlinuz
    dest.parent.mkdir(parents=True, exist_ok=True)  # 7.x packages have no boot/
    tmp = dest.with_name(dest.name + ".partial")
    tmp.write_bytes(proc.stdout)
    os.replace(tmp, dest)
    return dest


def has_pvh_note(elf: bytes) -> bool:
    """Whether an ELF kernel has the Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for index in range(phnum):
        ptype, _flags, offset, _vaddr, _paddr, size = struct.unpack_from("<IIQQQQ", elf, phoff + index * phentsize)
        if ptype != 4:  # PT_NOTE
            continue
        pos, end = offset, offset + size
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False
