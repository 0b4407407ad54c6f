"""Rebuild ``kvm.ko`` and ``kvm-amd.ko`` with ``CONFIG_KVM_SW_PROTECTED_VM=y`` (``--private``).

Debian's stock modules lack that option, so ``KVM_CAP_VM_TYPES`` is 0x1 and guest_memfd
cannot back private memory.  This rebuilds only ``arch/x86/kvm`` from Debian's
``linux-source-<series>`` of the very same version as the lab's kernel:

* Debian's kernel config plus the option, ``make olddefconfig`` with ``KERNELRELEASE`` set
  to the lab kernel's release so the modules' vermagic matches;
* the same compiler (gcc-12), and ``pahole`` on the PATH: without it Kconfig silently
  drops ``CONFIG_DEBUG_INFO_BTF_MODULES``, ``struct module`` changes and the stock kernel
  rejects the modules ("invalid module format");
* ``Module.symvers`` from the matching ``linux-headers-<release>`` package, then
  ``make modules_prepare`` and ``make M=arch/x86/kvm modules``.

The two modules are stripped of debug info and cached in ``.cache/lab/private/<release>/``;
the source tree is thrown away.  About 2-4 minutes on 2 cores, once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from labapt import CACHE, Apt, LabError, deb_field, log, run, unpack_deb
from labbuild import modinfo
from labkernel import Kernel

#: Host packages the kernel build needs.
BUILD_PACKAGES = ("gcc-12", "make", "bc", "flex", "bison", "libelf-dev", "libssl-dev", "pahole", "xz-utils")
COMPILER = "x86_64-linux-gnu-gcc-12"
OPTION = "CONFIG_KVM_SW_PROTECTED_VM"
#: Options that must survive ``olddefconfig`` or the modules will not load / not help.
REQUIRED = (f"{OPTION}=y", "CONFIG_DEBUG_INFO_BTF_MODULES=y", "CONFIG_KVM_AMD=m")
MODULES = {"kvm": "kvm.ko", "kvm_amd": "kvm-amd.ko"}
BUILD_TIMEOUT = 3600


def missing_packages(packages: tuple[str, ...]) -> list[str]:
    """The packages that dpkg does not report as installed."""
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n", *packages],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    installed = {line.split()[0] for line in proc.stdout.splitlines() if line.endswith(" installed")}
    return [package for package in packages if package not in installed]


def make(tree: Path, args: list[str], *, what: str, release: str) -> None:
    """Run ``make`` in the kernel tree with the lab's compiler and release string."""
    cmd = [
        "make",
        "-C",
        str(tree),
        f"-j{os.cpu_count() or 1}",
        f"CC={COMPILER}",
        f"HOSTCC={COMPILER}",
        f"KERNELRELEASE={release}",
        *args,
    ]
    run(cmd, what=what, timeout=BUILD_TIMEOUT)


def configure(tree: Path, kernel: Kernel) -> None:
    """Debian's config plus the option, then ``olddefconfig``; check what survived."""
    config = kernel.config.read_text() + f"\n{OPTION}=y\n"
    (tree / ".config").write_text(config)
    make(tree, ["olddefconfig"], what="make olddefconfig failed", release=kernel.release)
    lines = set((tree / ".config").read_text().splitlines())
    lost = [option for option in REQUIRED if option not in lines]
    if lost:
        raise LabError(f"the kernel config lost {', '.join(lost)} (is pahole installed?)")


def unpack_source(apt: Apt, kernel: Kernel, version: str, workdir: Path) -> Path:
    """Unpack Debian's kernel source tarball of ``version`` into ``workdir``; return the tree."""
    series = ".".join(kernel.release.split(".")[:2])
    package = f"linux-source-{series}"
    source_root = unpack_deb(apt.download(package, version), workdir / "deb")
    tarballs = sorted((source_root / "usr" / "src").glob(f"{package}.tar.*"))
    if not tarballs:
        raise LabError(f"{package} holds no source tarball")
    log(f"unpacking {tarballs[0].name}")
    run(["tar", "-xf", str(tarballs[0]), "-C", str(workdir)], what="could not unpack the source", timeout=1200)
    shutil.rmtree(source_root)
    tree = workdir / package
    if not (tree / "Makefile").is_file():
        raise LabError(f"{package}: no {tree.name}/Makefile in the tarball")
    return tree


def copy_symvers(apt: Apt, kernel: Kernel, version: str, tree: Path, workdir: Path) -> None:
    """Put the stock kernel's ``Module.symvers`` (from linux-headers) into the tree."""
    package = f"linux-headers-{kernel.release}"
    headers = unpack_deb(apt.download(package, version), workdir / "headers")
    symvers = headers / "usr" / "src" / package / "Module.symvers"
    if not symvers.is_file():
        raise LabError(f"{package} has no Module.symvers")
    shutil.copyfile(symvers, tree / "Module.symvers")


def check_module(path: Path, release: str) -> None:
    """Refuse a module whose vermagic does not name the lab's kernel release."""
    vermagic = modinfo(path.read_bytes()).get("vermagic", "")
    if not vermagic.startswith(release + " "):
        raise LabError(f"{path.name} was built for {vermagic.split(' ')[0]!r}, not {release!r}")


def build_modules(apt: Apt, kernel: Kernel, dest: Path) -> None:
    """Build the two modules from source into ``dest`` (a new directory)."""
    version = deb_field(kernel.deb, "Version")
    (CACHE / "private").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE / "private", prefix=".build-") as tmp:
        workdir = Path(tmp)
        tree = unpack_source(apt, kernel, version, workdir)
        copy_symvers(apt, kernel, version, tree, workdir)
        log(f"building kvm.ko and kvm-amd.ko with {OPTION}=y (a few minutes)")
        configure(tree, kernel)
        make(tree, ["modules_prepare"], what="make modules_prepare failed", release=kernel.release)
        make(tree, ["M=arch/x86/kvm", "modules"], what="building arch/x86/kvm failed", release=kernel.release)
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for filename in MODULES.values():
            built = tree / "arch" / "x86" / "kvm" / filename
            run(
                ["objcopy", "--strip-debug", str(built), str(partial / filename)],
                what=f"could not strip {filename}",
                timeout=300,
            )
            check_module(partial / filename, kernel.release)
        os.replace(partial, dest)


def ensure_private_modules(apt: Apt, kernel: Kernel) -> dict[str, Path]:
    """The rebuilt modules by module name, building them once per kernel release."""
    dest = CACHE / "private" / kernel.release
    modules = {name: dest / filename for name, filename in MODULES.items()}
    if all(path.is_file() for path in modules.values()):
        return modules
    missing = missing_packages(BUILD_PACKAGES)
    if missing:
        apt.install(missing)
    build_modules(apt, kernel, dest)
    return modules
