"""Start-up time, whole process: ``vmm run`` against QEMU microvm and the Python floor.

Side by side in one run, each command from spawn to exit:

- ``python -c pass`` (the venv's interpreter): the floor every Python process pays;
- ``vmm run -q guests/pc/mbinfo.elf`` (a tiny Multiboot image; the default machine: the
  in-kernel irqchip and PIT), and the same with ``--irqchip off`` (a bare machine);
- ``vmm run -q guests/hello64.elf`` (the project's own 64-bit contract);
- ``qemu-system-x86_64 -M microvm,... -accel kvm -kernel guests/pc/mbinfo.elf`` (the
  command line of host-kvm.md: no PIT, no 8259), the closest QEMU has to both images;
- the same QEMU with ``pit=on,pic=on``: the interrupt hardware of vmm's default machine
  (KVM's PIT costs every VM the same teardown, ~15 ms of SRCU grace periods on this
  host), so ``/ like`` compares each ``vmm run`` with the QEMU that builds the same
  in-kernel devices (``--irqchip off`` with the PIT-less QEMU, its closest).

::

    python bench/startup.py [--json] [--repeats N] [--image PATH] [--backend auto|kvm|emulator]

Each command gets a warm-up run; then ``--repeats`` rounds run every command once, the
order rotated each round so that drift hits all of them. Reported: the median and the
minimum wall time of each, its peak RSS (one more run under GNU time), the ratio of each ``vmm run`` to QEMU
and to the floor, and the import time of ``vmm run`` (``python -X importtime``, one run:
the total, and the modules that cost most). The project's modules are byte-compiled first
(``compileall``), as an installed package is: with ``PYTHONDONTWRITEBYTECODE`` set, as in
some CI shells, every run would otherwise compile them again. Every run is checked (vmm and
QEMU: status 1, the guest wrote 0 to the exit port, and the last line the guest's own;
python: status 0); a wrong result is an error, never a number. A missing
qemu-system-x86_64 is installed with apt-get (said so on stderr); if it still is not there,
or KVM is not usable, the QEMU column is missing, which the output says.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from _common import REPO, BenchError, environment, median

DEFAULT_IMAGE = REPO / "guests" / "pc" / "mbinfo.elf"
HELLO64 = REPO / "guests" / "hello64.elf"
DEFAULT_REPEATS = 11
RUN_TIMEOUT = 120.0
QEMU_MACHINE = "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=off"
QEMU_PC_MACHINE = "microvm,x-option-roms=off,pit=on,pic=on,isa-serial=on,rtc=off"
QEMU_PACKAGE = "qemu-system-x86"
GUEST_STATUS = 1  # the guest wrote 0 to the exit port: (0 << 1) | 1
FLOOR, VMM, QEMU = "python -c pass", "vmm run -q", "qemu microvm -accel kvm"
QEMU_PC = "  ... pit=on,pic=on"
TOP_IMPORTS = 12


def note(text: str) -> None:
    print(f"bench/startup.py: {text}", file=sys.stderr)


@dataclass(frozen=True)
class Command:
    """One process to time, and what a correct run of it looks like."""

    label: str
    argv: tuple[str, ...]
    status: int
    last_line: bytes | None = None
    kind: str = VMM  # FLOOR, VMM or QEMU
    like: str = QEMU_PC  # the QEMU command with the same in-kernel interrupt hardware

    def run(self, argv: tuple[str, ...] | None = None) -> float:
        """Wall seconds from spawn to exit of one checked run (of ``argv``: this command
        behind a wrapper, for :meth:`peak_rss`)."""
        started = time.perf_counter()
        try:
            proc = subprocess.run(argv or self.argv, capture_output=True, timeout=RUN_TIMEOUT, check=False, cwd=REPO)
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

    def peak_rss(self) -> int | None:
        """Peak RSS in bytes of one run, from GNU time (a small parent: a child forked from
        this benchmark would report the benchmark's own RSS as its peak); None without it."""
        gnu_time = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
        if gnu_time is None:
            return None
        with tempfile.NamedTemporaryFile("r") as out:
            self.run((gnu_time, "-f", "%M", "-o", out.name, *self.argv))
            text = out.read().strip().splitlines()
        return int(text[-1]) * 1024 if text and text[-1].isdigit() else None


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
    install = [*sudo, apt, "install", "-y", "-qq", "--no-install-recommends", QEMU_PACKAGE]
    for step in (install, [*sudo, apt, "update", "-qq"], install):  # the package lists may be stale
        done = subprocess.run(step, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, check=False)
        if step is install and done.returncode == 0:
            break
    found = shutil.which("qemu-system-x86_64")
    if not found:
        why = done.stderr.decode(errors="replace").strip()[-200:] or f"apt-get status {done.returncode}"
        note(f"installing {QEMU_PACKAGE} did not give qemu-system-x86_64 ({why}): QEMU left out")
    return found


def last_line_of(image: str) -> bytes:
    """What a bundled image prints last (b"" for other images: not checked)."""
    name = os.path.basename(image)
    return {"mbinfo.elf": b"PASS mbinfo", "hello64.elf": b"hello from long mode"}.get(name, b"")


def commands(image: str, backend: str, qemu: str | None) -> list[Command]:
    venv = REPO / ".venv" / "bin"
    for tool in ("python", "vmm"):
        if not (venv / tool).exists():
            raise BenchError(f"no {venv / tool}: `make test` (or `make run`) creates the venv")
    vmm = (str(venv / "vmm"), "run", "-q", "--backend", backend)
    pc_line = last_line_of(image) or None
    out = [
        Command(FLOOR, (str(venv / "python"), "-c", "pass"), 0, kind=FLOOR),
        Command(f"vmm run -q {os.path.basename(image)}", (*vmm, image), GUEST_STATUS, pc_line),
        Command("  ... --irqchip off", (*vmm, "--irqchip", "off", image), GUEST_STATUS, pc_line, like=QEMU),
        Command("vmm run -q hello64.elf", (*vmm, str(HELLO64)), GUEST_STATUS, last_line_of(str(HELLO64))),
    ]
    if qemu is not None:
        for label, machine in ((QEMU, QEMU_MACHINE), (QEMU_PC, QEMU_PC_MACHINE)):
            argv = (qemu, "-M", machine, "-accel", "kvm", "-m", "64", "-nodefaults", "-nographic", "-serial", "stdio")
            argv += ("-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", image)
            out.append(Command(label, argv, GUEST_STATUS, pc_line, kind=QEMU))
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


def _importtime(argv: list[str]) -> tuple[int, list[tuple[str, int, int, int]]]:
    """(status, [(module, level, self us, cumulative us)]) of one ``-X importtime`` run."""
    proc = subprocess.run(argv, capture_output=True, timeout=RUN_TIMEOUT, check=False, cwd=REPO)
    rows = []
    for line in proc.stderr.decode(errors="replace").splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, raw = line[len("import time:") :].split("|", 2)
        name = raw[1:]
        rows.append((name.strip(), (len(name) - len(name.lstrip())) // 2, int(self_us), int(cumulative_us)))
    return proc.returncode, rows


def import_profile(image: str, backend: str) -> dict[str, Any]:
    """One ``python -X importtime -m vmm run`` of the image: the total import time (the
    top-level imports, the interpreter's own start-up imports included), and the modules
    beyond those ``python -c pass`` imports: how many, their self time, the costliest."""
    python = str(REPO / ".venv" / "bin" / "python")
    status, rows = _importtime([python, "-X", "importtime", "-m", "vmm", "run", "-q", "--backend", backend, image])
    _, floor_rows = _importtime([python, "-X", "importtime", "-c", "pass"])
    floor = {name for name, *_ in floor_rows}
    ours = sorted(((name, self_us) for name, _, self_us, _ in rows if name not in floor), key=lambda r: -r[1])
    return {
        "status": status,
        "modules": len(rows),
        "modules_beyond_floor": len(ours),
        "total_ms": sum(cum for _, level, _, cum in rows if level == 0) / 1e3,
        "beyond_floor_ms": sum(self_us for _, self_us in ours) / 1e3,
        "top": [{"module": name, "self_ms": self_us / 1e3} for name, self_us in ours[:TOP_IMPORTS]],
    }


def summarize(cmds: list[Command], samples: dict[str, list[float]]) -> dict[str, Any]:
    medians = {label: median(values) for label, values in samples.items()}
    floor = next(c.label for c in cmds if c.kind == FLOOR)
    qemu = next((c.label for c in cmds if c.kind == QEMU), None)
    qemus = {c.label for c in cmds if c.kind == QEMU}
    rows = []
    for cmd in cmds:
        values = samples[cmd.label]
        m = medians[cmd.label]
        rows.append(
            {
                "command": cmd.label,
                "argv": list(cmd.argv),
                "median_s": m,
                "min_s": min(values),
                "peak_rss_bytes": cmd.peak_rss(),
                "samples_s": values,
                "over_floor": m / medians[floor],
                "over_qemu": None if qemu is None or cmd.kind != VMM else m / medians[qemu],
                "over_qemu_like": None if cmd.kind != VMM or cmd.like not in qemus else m / medians[cmd.like],
                "above_floor_over_qemu": None
                if qemu is None or cmd.kind != VMM
                else (m - medians[floor]) / medians[qemu],
            }
        )
    return {"commands": rows}


def report(out: dict[str, Any]) -> str:
    lines = [
        f"start-up, whole process, median of {out['repeats']} after a warm-up ({out['image']}):",
        f"  {'command':28} {'median':>9} {'min':>9} {'peak RSS':>9} {'/ floor':>8} {'/ QEMU':>8} {'(-floor)/QEMU':>14}"
        f" {'/ like':>7}",
    ]
    for c in out["commands"]:
        q = "-" if c["over_qemu"] is None else f"{c['over_qemu']:.2f}x"
        qf = "-" if c["above_floor_over_qemu"] is None else f"{c['above_floor_over_qemu']:.2f}x"
        ql = "-" if c["over_qemu_like"] is None else f"{c['over_qemu_like']:.2f}x"
        rss = "-" if c["peak_rss_bytes"] is None else f"{c['peak_rss_bytes'] / 2**20:.1f} MiB"
        lines.append(
            f"  {c['command']:28} {c['median_s'] * 1e3:6.1f} ms {c['min_s'] * 1e3:6.1f} ms "
            f"{rss:>9} {c['over_floor']:7.2f}x {q:>8} {qf:>14} {ql:>7}"
        )
    if out["qemu_missing"]:
        lines.append(f"  the QEMU column is missing: {out['qemu_missing']}")
    imp = out["imports"]
    lines.append(
        f"imports of `vmm run` (python -X importtime, one run): {imp['modules']} modules, {imp['total_ms']:.1f} ms "
        f"in all; beyond `python -c pass`'s own: {imp['modules_beyond_floor']} modules, {imp['beyond_floor_ms']:.1f} ms"
    )
    lines.append("  largest: " + ", ".join(f"{t['module']} {t['self_ms']:.1f}" for t in imp["top"]) + " (ms, self)")
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

    for package in ("vmm", "kvm_abi"):  # as an installed package is (see the docstring)
        compileall.compile_dir(str(REPO / package), quiet=1)
    usable, why = kvm_usable()
    qemu, missing = find_qemu(), ""
    if qemu is None:
        missing = "qemu-system-x86_64 is not installed"
    elif not usable:
        note(f"QEMU's -accel kvm needs a usable /dev/kvm ({why}): QEMU left out")
        qemu, missing = None, f"no usable KVM: {why}"
    try:
        cmds = commands(ns.image, ns.backend, qemu)
        samples = measure(cmds, ns.repeats)
    except BenchError as e:
        note(str(e))
        return 1
    shown = os.path.relpath(ns.image, REPO) if os.path.abspath(ns.image).startswith(f"{REPO}/") else ns.image
    out = {"environment": environment(), "image": shown, "repeats": ns.repeats, "qemu": qemu}
    out.update(summarize(cmds, samples), qemu_missing=missing, imports=import_profile(ns.image, ns.backend))
    print(json.dumps(out, indent=2) if ns.json else report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
