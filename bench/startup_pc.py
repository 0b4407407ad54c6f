"""Start-up time of a PC-convention guest, whole process: ``vmm run`` against QEMU.

``vmm run -q guests/pc/mbinfo.elf`` (the venv's ``vmm``) side by side in one run with QEMU
booting the same Multiboot image on its smallest machine with KVM (``-M microvm,...
-accel kvm``, the command line of host-kvm.md), and ``python -c pass`` (the venv's
interpreter) as the floor every Python process pays::

    python bench/startup_pc.py [--json] [--repeats N] [--image PATH] [--backend auto|kvm|emulator]

Each command gets a warm-up run; then ``--repeats`` rounds run every command once, the
order rotated each round so that drift hits all of them. Reported: the median and the
minimum wall time from spawn to exit of each, the ratio vmm / QEMU, and vmm's time above
the Python floor against QEMU's. Every run is checked (vmm and QEMU: status 1, the guest
wrote 0 to the exit port, and its last line "PASS mbinfo"; python: status 0); a wrong
result is an error, never a number. A missing qemu-system-x86_64 is installed with
apt-get (said so on stderr); if it still is not there, or KVM is not usable, QEMU is
left out with a message and vmm is compared with the floor alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from _common import REPO, BenchError, environment, median

DEFAULT_IMAGE = REPO / "guests" / "pc" / "mbinfo.elf"
DEFAULT_REPEATS = 11
RUN_TIMEOUT = 120.0
QEMU_MACHINE = "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=off"
QEMU_PACKAGE = "qemu-system-x86"
GUEST_STATUS = 1  # the guest wrote 0 to the exit port: (0 << 1) | 1
GUEST_LAST_LINE = b"PASS mbinfo"


def note(text: str) -> None:
    print(f"bench/startup_pc.py: {text}", file=sys.stderr)


@dataclass(frozen=True)
class Command:
    """One process to time, and what a correct run of it looks like."""

    label: str
    argv: tuple[str, ...]
    status: int
    last_line: bytes | None = None

    def run(self) -> float:
        """Wall seconds from spawn to exit of one checked run."""
        started = time.perf_counter()
        try:
            proc = subprocess.run(self.argv, capture_output=True, timeout=RUN_TIMEOUT, check=False, cwd=REPO)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BenchError(f"{self.label}: {e}") from None
        seconds = time.perf_counter() - started
        lines = proc.stdout.splitlines()
        if proc.returncode != self.status or (self.last_line is not None and lines[-1:] != [self.last_line]):
            detail = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise BenchError(
                f"{self.label}: status {proc.returncode}, expected {self.status}"
                f"{' and a last line ' + repr(self.last_line.decode()) if self.last_line else ''}: {detail[0]}"
            )
        return seconds


def find_qemu() -> str | None:
    """qemu-system-x86_64, installed with apt-get if missing (None, with a message, if that fails)."""
    found = shutil.which("qemu-system-x86_64")
    if found:
        return found
    apt = shutil.which("apt-get")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"] if shutil.which("sudo") else None
    if apt is None or sudo is None:
        note("qemu-system-x86_64 is missing and cannot be installed here (needs apt-get and root): QEMU left out")
        return None
    note(f"qemu-system-x86_64 is missing: installing {QEMU_PACKAGE} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*sudo, apt, "install", "-y", "-qq", QEMU_PACKAGE]
    for step in (install, [*sudo, apt, "update", "-qq"], install):  # the package lists may be stale
        done = subprocess.run(step, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, check=False)
        if step is install and done.returncode == 0:
            break
    found = shutil.which("qemu-system-x86_64")
    if not found:
        why = done.stderr.decode(errors="replace").strip()[-200:] or f"apt-get status {done.returncode}"
        note(f"installing {QEMU_PACKAGE} did not give qemu-system-x86_64 ({why}): QEMU left out")
    return found


def commands(image: str, backend: str, qemu: str | None) -> list[Command]:
    venv = REPO / ".venv" / "bin"
    for tool in ("python", "vmm"):
        if not (venv / tool).exists():
            raise BenchError(f"no {venv / tool}: `make test` (or `make run`) creates the venv")
    out = [
        Command("python -c pass", (str(venv / "python"), "-c", "pass"), 0),
        Command(
            f"vmm run -q ({backend})",
            (str(venv / "vmm"), "run", "-q", "--backend", backend, image),
            GUEST_STATUS,
            GUEST_LAST_LINE,
        ),
    ]
    if qemu is not None:
        argv = (qemu, "-M", QEMU_MACHINE, "-accel", "kvm", "-m", "64", "-nodefaults", "-nographic", "-serial", "stdio")
        argv += ("-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", image)
        out.append(Command("qemu microvm -accel kvm", argv, GUEST_STATUS, GUEST_LAST_LINE))
    return out


def measure(cmds: list[Command], repeats: int) -> dict[str, list[float]]:
    """A warm-up of each, then ``repeats`` rounds of all, the order rotated every round."""
    for cmd in cmds:
        cmd.run()
    samples: dict[str, list[float]] = {cmd.label: [] for cmd in cmds}
    for r in range(repeats):
        for cmd in cmds[r % len(cmds) :] + cmds[: r % len(cmds)]:
            samples[cmd.label].append(cmd.run())
    return samples


def summarize(samples: dict[str, list[float]]) -> dict[str, Any]:
    medians = {label: median(values) for label, values in samples.items()}
    labels = list(samples)
    floor, ours = medians[labels[0]], medians[labels[1]]
    theirs = medians[labels[2]] if len(labels) > 2 else None
    return {
        "commands": [
            {"command": label, "median_s": medians[label], "min_s": min(values), "samples_s": values}
            for label, values in samples.items()
        ],
        "vmm_over_qemu": None if theirs is None else ours / theirs,
        "vmm_above_floor_over_qemu": None if theirs is None else (ours - floor) / theirs,
    }


def report(out: dict[str, Any]) -> str:
    floor = out["commands"][0]["median_s"]
    lines = [
        f"start-up of {out['image']}, whole process, median of {out['repeats']} after a warm-up:",
        f"  {'command':28} {'median':>10} {'min':>10} {'above floor':>12}",
    ]
    for c in out["commands"]:
        above = "-" if c is out["commands"][0] else f"{(c['median_s'] - floor) * 1e3:9.1f} ms"
        lines.append(f"  {c['command']:28} {c['median_s'] * 1e3:7.1f} ms {c['min_s'] * 1e3:7.1f} ms {above:>12}")
    if out["vmm_over_qemu"] is None:
        lines.append(f"vmm / QEMU: - ({out['qemu_missing']})")
    else:
        lines.append(
            f"vmm / QEMU: {out['vmm_over_qemu']:.2f}x "
            f"(vmm above the Python floor / QEMU: {out['vmm_above_floor_over_qemu']:.2f}x)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help=f"rounds (default {DEFAULT_REPEATS})")
    parser.add_argument(
        "--image", default=str(DEFAULT_IMAGE), help="the Multiboot image (default guests/pc/mbinfo.elf)"
    )
    parser.add_argument("--backend", choices=("auto", "kvm", "emulator"), default="auto", help="vmm's --backend")
    ns = parser.parse_args(argv)
    if ns.repeats < 1:
        parser.error("--repeats must be positive")
    sys.path.insert(0, str(REPO))
    from vmm.backends import kvm_usable

    usable, why = kvm_usable()
    qemu, missing = find_qemu(), ""
    if qemu is None:
        missing = "qemu-system-x86_64 not installed"
    elif not usable:
        note(f"QEMU's -accel kvm needs a usable /dev/kvm ({why}): QEMU left out")
        qemu, missing = None, f"no usable KVM: {why}"
    try:
        samples = measure(commands(ns.image, ns.backend, qemu), ns.repeats)
    except BenchError as e:
        note(str(e))
        return 1
    shown = os.path.relpath(ns.image, REPO) if os.path.abspath(ns.image).startswith(f"{REPO}/") else ns.image
    out = {"environment": environment(), "image": shown, "repeats": ns.repeats, "qemu": qemu}
    out.update(summarize(samples), qemu_missing=missing)
    print(json.dumps(out, indent=2) if ns.json else report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
