"""Build the nested real-kernel lab, idempotently, into ``.cache/lab/``.

The lab is a Debian 6.12 kernel booted by QEMU in TCG mode with an emulated AMD CPU that
has SVM and nested paging, so the KVM inside it has two-dimensional paging (and with it
``KVM_PRE_FAULT_MEMORY``), unlike this machine's own KVM.  See ``lab/README.md``.

What this module produces (everything is cached; a second run does no download and no
repack unless an input changed):

* ``qemu-system-x86`` installed on the host with apt-get, if missing;
* the newest ``linux-image-6.1x...-amd64-unsigned`` the configured apt sources offer,
  downloaded with ``apt-get download`` and unpacked with ``dpkg-deb -x``;
* a busybox initramfs (cpio newc, gzip) holding busybox, ``lab/init.sh`` as ``/init`` and
  the KVM, 9p and overlay modules with their dependencies (from each module's
  ``.modinfo`` ``depends=``), decompressed and listed in load order;
* with ``private=True``: ``kvm.ko`` and ``kvm-amd.ko`` rebuilt from Debian's kernel source
  with ``CONFIG_KVM_SW_PROTECTED_VM=y`` (see ``labprivate.py``), used instead of the stock
  ones.

``lab/build`` is the command-line front end; ``lab/run`` calls :func:`ensure_lab`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

LAB_DIR = Path(__file__).resolve().parent
REPO = LAB_DIR.parent
CACHE = REPO / ".cache" / "lab"
INIT_SCRIPT = LAB_DIR / "init.sh"

#: Modules the lab needs; their dependencies are found from ``.modinfo``.
ROOT_MODULES = ("kvm_amd", "9pnet_virtio", "9p", "overlay")
#: Host programs and the Debian packages that provide them.
HOST_PROGRAMS = {"qemu-system-x86_64": "qemu-system-x86", "zstd": "zstd"}
BUSYBOX_PACKAGE = "busybox-static"
#: ``linux-image-6.12.117+deb12-amd64-unsigned``, ``linux-image-6.1.0-56-amd64-unsigned``.
KERNEL_RE = re.compile(
    r"^linux-image-(?P<major>6)\.(?P<minor>1\d?)\.(?P<patch>\d+)(?:-(?P<abi>\d+))?"
    r"(?:\+deb\d+)?-amd64-unsigned$"
)
KERNEL_SEARCH = r"^linux-image-6\.1[0-9]*\..*-amd64-unsigned$"
#: The first series whose KVM has KVM_PRE_FAULT_MEMORY and was verified in the lab.
PREFERRED_MINOR = 12

APT_TIMEOUT = 1800
QUERY_TIMEOUT = 120
UNPACK_TIMEOUT = 600


class LabError(Exception):
    """An expected failure, reported to the user as one ``lab: ...`` line."""


@dataclass(frozen=True)
class Lab:
    """A built lab: what QEMU needs to boot it."""

    kernel: Path
    initrd: Path
    release: str
    private: bool


def log(message: str) -> None:
    """Print a progress or error line on stderr."""
    print(f"lab: {message}", file=sys.stderr, flush=True)


def last_line(text: str) -> str:
    """The most telling line of a tool's output: its first ``E:`` line, else its last."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    return (errors or lines or [""])[0 if errors else -1]


def run(
    cmd: Sequence[str],
    *,
    what: str,
    timeout: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; raise :class:`LabError` ("<what>: <reason>") on failure."""
    try:
        proc = subprocess.run(
            list(cmd),
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise LabError(f"{what}: {cmd[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{what}: timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        reason = last_line(proc.stderr) or last_line(proc.stdout)
        raise LabError(f"{what}: {reason or f'exit status {proc.returncode}'}")
    return proc


class Apt:
    """apt-get and apt-cache, refreshing the package lists at most once per process."""

    def __init__(self) -> None:
        """Start with the package lists as they are."""
        self.updated = False
        self.env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def update(self) -> None:
        """Run ``apt-get update`` (once)."""
        if not self.updated:
            log("refreshing the apt package lists")
            run(
                ["apt-get", "update"],
                what="apt-get update failed",
                timeout=APT_TIMEOUT,
                env=self.env,
            )
            self.updated = True

    def get(self, args: Sequence[str], *, what: str, cwd: Path | None = None) -> None:
        """Run ``apt-get ARGS``; if it fails, refresh the lists once and try again."""
        cmd = ["apt-get", *args]
        try:
            run(cmd, what=what, timeout=APT_TIMEOUT, cwd=cwd, env=self.env)
        except LabError:
            if self.updated:
                raise
            self.update()
            run(cmd, what=what, timeout=APT_TIMEOUT, cwd=cwd, env=self.env)

    def query(self, args: Sequence[str], *, what: str) -> str:
        """Run ``apt-cache ARGS`` and return its output."""
        return run(["apt-cache", *args], what=what, timeout=QUERY_TIMEOUT, env=self.env).stdout

    def install(self, packages: Sequence[str]) -> None:
        """Install Debian packages on the host."""
        log(f"installing {' '.join(packages)}")
        self.get(
            ["install", "-y", "--no-install-recommends", *packages],
            what=f"could not install {' '.join(packages)}",
        )

    def download(self, package: str, version: str | None = None) -> Path:
        """``apt-get download`` a package into the cache (once); return the .deb."""
        spec = package if version is None else f"{package}={version}"
        debs = CACHE / "debs"
        dest = debs / (f"{package}_{version}.deb" if version else f"{package}.deb")
        if dest.is_file():
            return dest
        debs.mkdir(parents=True, exist_ok=True)
        log(f"downloading {spec}")
        with tempfile.TemporaryDirectory(dir=debs, prefix=".download-") as tmp:
            self.get(["download", spec], what=f"could not download {spec}", cwd=Path(tmp))
            found = sorted(Path(tmp).glob("*.deb"))
            if len(found) != 1:
                raise LabError(f"could not download {spec}: apt-get left {len(found)} .deb files")
            found[0].chmod(0o644)
            os.replace(found[0], dest)
        return dest


def deb_field(deb: Path, field: str) -> str:
    """One control field of a .deb (``Version``, ``Package``...)."""
    return run(
        ["dpkg-deb", "-f", str(deb), field],
        what=f"cannot read {deb.name}",
        timeout=QUERY_TIMEOUT,
    ).stdout.strip()


def unpack_deb(deb: Path, dest: Path) -> Path:
    """``dpkg-deb -x`` a package into ``dest`` (once, atomically); return ``dest``."""
    if dest.is_dir():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    run(
        ["dpkg-deb", "-x", str(deb), str(partial)],
        what=f"could not unpack {deb.name}",
        timeout=UNPACK_TIMEOUT,
    )
    os.replace(partial, dest)
    return dest


# --- host packages -------------------------------------------------------------------------


def ensure_host_programs(apt: Apt) -> None:
    """Install the Debian packages of any missing host program."""
    missing = sorted({pkg for prog, pkg in HOST_PROGRAMS.items() if not shutil.which(prog)})
    if missing:
        apt.install(missing)
    for prog in HOST_PROGRAMS:
        if not shutil.which(prog):
            raise LabError(f"{prog} is still missing after installing {HOST_PROGRAMS[prog]}")


# --- the kernel ----------------------------------------------------------------------------


def kernel_key(name: str) -> tuple[int, int, int, int] | None:
    """Sort key of a kernel package name, or None if it is not an amd64 6.1x image."""
    match = KERNEL_RE.match(name)
    if not match:
        return None
    return (
        int(match["major"]),
        int(match["minor"]),
        int(match["patch"]),
        int(match["abi"] or 0),
    )


def newest_kernel(apt: Apt) -> str | None:
    """The newest amd64 6.1x kernel image package that the apt lists offer."""
    out = apt.query(["search", "--names-only", KERNEL_SEARCH], what="apt-cache search failed")
    names = [line.split(" - ", 1)[0].strip() for line in out.splitlines()]
    keyed = [(key, name) for name in names if (key := kernel_key(name))]
    return max(keyed)[1] if keyed else None


def choose_kernel(apt: Apt) -> str:
    """Pick the kernel package, refreshing stale package lists once if needed."""
    name = newest_kernel(apt)
    key = kernel_key(name) if name else None
    if key is None or key[1] < PREFERRED_MINOR:
        apt.update()
        name = newest_kernel(apt)
        key = kernel_key(name) if name else None
    if name is None or key is None:
        raise LabError("no linux-image-6.1x...-amd64-unsigned package in the apt sources")
    if key[1] < PREFERRED_MINOR:
        log(f"warning: only {name} is available; its KVM lacks KVM_PRE_FAULT_MEMORY")
    return name


def read_manifest() -> dict[str, str]:
    """The cached build choices (which kernel package), or {}."""
    try:
        data = json.loads((CACHE / "lab.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_manifest(data: dict[str, str]) -> None:
    """Record the build choices atomically."""
    tmp = CACHE / "lab.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, CACHE / "lab.json")


@dataclass(frozen=True)
class Kernel:
    """An unpacked kernel package."""

    package: str
    deb: Path
    root: Path
    release: str

    @property
    def vmlinuz(self) -> Path:
        """The bootable kernel image."""
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def config(self) -> Path:
        """The kernel's build configuration."""
        return self.root / "boot" / f"config-{self.release}"

    @property
    def moddir(self) -> Path:
        """``lib/modules/<release>``."""
        return self.root / "lib" / "modules" / self.release


def fetch_kernel(apt: Apt, package: str) -> Kernel:
    """Download and unpack a kernel image package (cached)."""
    deb = apt.download(package)
    root = unpack_deb(deb, CACHE / "kernel" / package)
    releases = sorted(p.name for p in (root / "lib" / "modules").glob("*") if p.is_dir())
    if len(releases) != 1:
        raise LabError(f"{package}: expected one lib/modules/<release>, found {releases}")
    kernel = Kernel(package=package, deb=deb, root=root, release=releases[0])
    if not kernel.vmlinuz.is_file():
        raise LabError(f"{package}: no boot/vmlinuz-{kernel.release}")
    return kernel


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


def ensure_lab(*, private: bool = False, refresh: bool = False) -> Lab:
    """Build whatever part of the lab is missing or stale and return it."""
    with cache_lock():
        apt = Apt()
        ensure_host_programs(apt)
        manifest = read_manifest()
        package = manifest.get("kernel_package")
        if refresh or not package:
            package = choose_kernel(apt)
            write_manifest({**manifest, "kernel_package": package})
        kernel = fetch_kernel(apt, package)
        busybox_deb = apt.download(BUSYBOX_PACKAGE)
        overrides: dict[str, Path] = {}
        if private:
            from labprivate import ensure_private_modules

            overrides = ensure_private_modules(apt, kernel)
        initrd = ensure_initramfs(kernel, busybox_deb, overrides)
        return Lab(kernel=pvh_kernel(kernel), initrd=initrd, release=kernel.release, private=private)


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
        "--refresh",
        action="store_true",
        help="pick the newest kernel package again instead of the cached choice",
    )
    args = parser.parse_args(argv)
    try:
        lab = ensure_lab(private=args.private, refresh=args.refresh)
    except LabError as exc:
        log(str(exc))
        return 125
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    print(f"kernel {lab.kernel}\ninitrd {lab.initrd}\nrelease {lab.release}")
    return 0
