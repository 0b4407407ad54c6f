"""Time to init of a Linux boot: ``vmm run --kernel`` against QEMU on the same kernel and
initramfs, and ``vmm`` with ``--prefault none`` against ``auto`` (with ``--count-faults``).

Meant for the lab (``make lab-bench-linux`` runs it inside, where KVM has nested paging
and QEMU is the host's, visible through the shared root); on a host with hardware KVM it
runs as it is. The kernel is the lab's bzImage of the running release and the initramfs
lab/linuxguest.py's busybox one: its /init writes the marker port, prints
``VMM-LINUX-INIT cpus=N`` and writes N to the exit port, which ends both VMMs (QEMU
through ``-device isa-debug-exit,iobase=0xf4,iosize=4``).

Every configuration runs ``--repeat`` times, alternating; each run is timed from the
command's start (wall clock, so both VMMs' start-up counts): ``init`` when the marker line
appears on its console (stdout, a pipe), ``run`` when the process exits. For vmm,
``first_mark`` is its own report (seconds from the vCPUs' start to /init's marker write)
and ``faults`` the page faults each vCPU took over the whole run (KVM's tracepoints,
``--count-faults``). Prints one JSON object:
medians per configuration, the ratio vmm/QEMU of the median time to init, every run, and
where it ran::

    python bench/lab_linux.py [--repeat 3] [--vcpus 1] [--mem 256M] [--qemu-machine microvm,pc]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, BenchError, environment

sys.path.insert(0, str(REPO / "lab"))
import linuxguest  # lab/ is not a package: its modules import each other by name

CMDLINE = "console=ttyS0 reboot=k panic=-1"
RUN_TIMEOUT = 150.0


def timed(cmd: list[str], marker: bytes) -> tuple[float | None, float, int, bytes, bytes]:
    """Run ``cmd``; (seconds to ``marker`` on its stdout or None, seconds to its exit,
    status, stdout, stderr)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = b"", b""
    init: float | None = None
    streams = [proc.stdout, proc.stderr]
    try:
        while streams:
            left = RUN_TIMEOUT - (time.monotonic() - start)
            if left <= 0:
                raise BenchError(f"{cmd[0]} ran longer than {RUN_TIMEOUT:g} s")
            ready, _, _ = select.select(streams, [], [], left)
            for stream in ready:
                chunk = os.read(stream.fileno(), 65536)
                if not chunk:
                    streams.remove(stream)
                elif stream is proc.stdout:
                    out += chunk
                    if init is None and marker in out:
                        init = time.monotonic() - start
                else:
                    err += chunk
        proc.wait(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return init, time.monotonic() - start, proc.returncode, out, err


FIRST_MARK_RE = re.compile(rb"first mark after ([0-9.]+) s")
FAULTS_RE = re.compile(rb"KVM page faults per vCPU: ([0-9, ]+)")


def vmm_run(kernel: Path, initrd: Path, args: argparse.Namespace, prefault: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "vmm", "run", "--kernel", str(kernel), "--initrd", str(initrd)]
    cmd += ["--mem", args.mem, "--vcpus", str(args.vcpus), "--backend", "kvm", "--count-faults"]
    cmd += ["--prefault", prefault, "--timeout", str(int(RUN_TIMEOUT))]
    init, run, status, out, err = timed(cmd, linuxguest.MARKER.encode())
    first, faults = FIRST_MARK_RE.search(err), FAULTS_RE.search(err)
    if init is None or status != (args.vcpus << 1) | 1 or first is None or faults is None:
        raise BenchError(f"vmm run: status {status}; stderr {err[-400:]!r}; console ends {out[-300:]!r}")
    return {
        "init": round(init, 3),
        "first_mark": float(first[1]),
        "run": round(run, 3),
        "faults": [int(n) for n in faults[1].split(b",")],
    }


def qemu_run(kernel: Path, initrd: Path, args: argparse.Namespace, machine: str) -> dict[str, Any]:
    # -xsave: as vmm hides it where KVM does not see XSETBV (the lab), else Linux oopses.
    cpu = "host,-xsave" if args.no_xsave else "host"
    cmd = [args.qemu, "-M", machine, "-accel", "kvm", "-cpu", cpu, "-m", args.mem.rstrip("M"), "-smp"]
    cmd += [str(args.vcpus), "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot"]
    cmd += ["-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", str(kernel), "-initrd", str(initrd)]
    cmd += ["-append", CMDLINE]
    init, run, status, out, _err = timed(cmd, linuxguest.MARKER.encode())
    if init is None or status != (args.vcpus << 1) | 1:
        raise BenchError(f"QEMU -M {machine}: status {status}, no marker; console ends {out[-300:]!r}")
    return {"init": round(init, 3), "run": round(run, 3)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument("--mem", default="256M")
    parser.add_argument("--qemu-machine", default="microvm,pc", help="comma-separated QEMU machine types")
    parser.add_argument(
        "--qemu-xsave",
        dest="no_xsave",
        action="store_false",
        help="give QEMU's guest XSAVE (-cpu host); by default -cpu host,-xsave, as vmm where KVM misses XSETBV",
    )
    parser.add_argument("--qemu", default=shutil.which("qemu-system-x86_64") or "qemu-system-x86_64")
    args = parser.parse_args(argv)
    kernel, busybox = linuxguest.find_kernel(), linuxguest.find_busybox()
    if kernel is None or busybox is None:
        print("lab_linux: no cached kernel or busybox under .cache/lab (run lab/build)", file=sys.stderr)
        return 2
    configs: dict[str, Any] = {f"vmm prefault={p}": (vmm_run, p) for p in ("none", "auto")}
    configs.update({f"qemu -M {m}": (qemu_run, m) for m in args.qemu_machine.split(",") if m})
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        initrd = Path(tmp) / "init.cpio.gz"
        initrd.write_bytes(linuxguest.pack(busybox.read_bytes()))
        try:
            for _ in range(args.repeat):
                for name, (fn, option) in configs.items():
                    runs[name].append(fn(kernel, initrd, args, option))
                    # One line per run as it ends: what was measured survives a wedged lab.
                    print(f"lab_linux: {name}: {json.dumps(runs[name][-1])}", file=sys.stderr, flush=True)
        except BenchError as e:
            print(f"lab_linux: {e}", file=sys.stderr)
            return 1
    medians = {
        name: {key: statistics.median(r[key] for r in rs) for key in ("init", "run")} for name, rs in runs.items()
    }
    qemu_inits = [m["init"] for name, m in medians.items() if name.startswith("qemu")]
    ratio = {
        f"{name} / {qname}": round(medians[name]["init"] / medians[qname]["init"], 2)
        for name in medians
        if name.startswith("vmm")
        for qname in medians
        if qname.startswith("qemu")
    }
    print(
        json.dumps(
            {
                "kernel": str(kernel.relative_to(REPO)) if kernel.is_relative_to(REPO) else str(kernel),
                "vcpus": args.vcpus,
                "mem": args.mem,
                "repeat": args.repeat,
                "median_seconds": medians,
                "init_ratio": ratio if qemu_inits else {},
                "runs": runs,
                "host": environment(),
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
