"""A busybox initramfs that proves a Linux kernel booted under ``vmm run --kernel``.

Its ``/init`` (busybox ash, PID 1) writes the boot-marker port (0x500) first thing, prints
:data:`MARKER` with the number of CPUs the kernel brought up, and writes that number to
the exit port (0xf4) through ``/dev/port`` as root, so the run ends with status
``(cpus << 1) | 1``. Should the exit port be ignored, it reboots (``reboot=k``: an i8042
reset, status 0), so a run never waits for its timeout.

The kernel comes from the lab's cache (``.cache/lab/kernel/``, the running release inside
the lab) and busybox from the lab's unpacked ``busybox-static`` (``lab/build`` downloads it
with ``apt-get download`` and unpacks it with ``dpkg-deb -x``). The archive is written
with the lab's own cpio writer (:class:`labbuild.Cpio`). :data:`SHELL_INIT` instead
gives the console to an interactive shell. Used by tests/test_linux_lab.py
and bench/lab_linux.py; ``python3 lab/linuxguest.py OUT`` writes the initramfs to OUT.
"""

from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

from labapt import CACHE
from labbuild import Cpio

MARKER = "VMM-LINUX-INIT"
#: The byte /init writes to the boot-marker port (0x500) when it starts.
INIT_MARK = 0x11
MARK_PORT = 0x500
EXIT_PORT = 0xF4

INIT = f"""#!/bin/busybox sh
# /init of the vmm Linux-boot check (lab/linuxguest.py). /dev/port writes one byte per port.
/bin/busybox mkdir -p /proc /dev
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox printf '\\{INIT_MARK:03o}' | /bin/busybox dd of=/dev/port bs=1 seek={MARK_PORT} conv=notrunc 2>/dev/null
/bin/busybox mount -t proc proc /proc
cpus=$(/bin/busybox grep -c ^processor /proc/cpuinfo)
echo "{MARKER} cpus=$cpus"
/bin/busybox printf "\\\\$(/bin/busybox printf %03o "$cpus")" | \\
    /bin/busybox dd of=/dev/port bs=1 seek={EXIT_PORT} conv=notrunc 2>/dev/null
echo "{MARKER}: the exit port did not end the run; rebooting"
/bin/busybox reboot -f
"""


SHELL_READY = "VMM-SHELL-READY"
#: A /init that hands the console to an interactive busybox shell: what a user types (the
#: bytes ``vmm run`` reads from its stdin) reaches it through the 16550's receive side.
SHELL_INIT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /dev
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/bin
echo "{SHELL_READY}"
exec sh
"""


def pack(busybox: bytes, init: str = INIT) -> bytes:
    """The gzip-compressed cpio initramfs: ``/bin/busybox``, ``/init``, ``/dev/console``."""
    cpio = Cpio()
    for directory in ("bin", "dev", "proc"):
        cpio.directory(directory)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", busybox, 0o755)
    cpio.file("init", init.encode(), 0o755)
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


def find_busybox() -> Path | None:
    """The lab's unpacked static busybox, if ``lab/build`` has run."""
    found = sorted((CACHE / "busybox").glob("*/bin/busybox"))
    return found[-1] if found else None


def kernel_images() -> dict[str, Path]:
    """Every cached lab kernel's bzImage, by release (6.12: ``boot/vmlinuz-R``; 7.x:
    ``usr/lib/modules/R/vmlinuz``)."""
    images: dict[str, Path] = {}
    for path in sorted((CACHE / "kernel").glob("*/boot/vmlinuz-*")):
        images[path.name.removeprefix("vmlinuz-")] = path
    for path in sorted((CACHE / "kernel").glob("*/usr/lib/modules/*/vmlinuz")):
        images[path.parent.name] = path
    return images


def find_kernel(release: str | None = None) -> Path | None:
    """The bzImage of ``release`` (default: the running kernel's), else any cached one."""
    images = kernel_images()
    wanted = release or os.uname().release
    if wanted in images:
        return images[wanted]
    return next(iter(images.values()), None)


def main(argv: list[str]) -> int:
    """``python3 lab/linuxguest.py OUT``: write the initramfs to OUT."""
    if len(argv) != 1:
        print("usage: lab/linuxguest.py OUT", file=sys.stderr)
        return 2
    busybox = find_busybox()
    if busybox is None:
        print("lab: no unpacked busybox-static under .cache/lab/busybox (run lab/build)", file=sys.stderr)
        return 125
    Path(argv[0]).write_bytes(pack(busybox.read_bytes()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
