"""VM lifecycles per second in one process, against a C floor, and the VMM's memory.

A lifecycle is ``Machine(config).run()`` of ``guests/pio-loop64.elf`` with ``count=1``
(one POST write, then 0 to the exit port): open /dev/kvm, create the VM (and, in the
default machine, the in-kernel irqchip and PIT), map and register 64 MiB of guest RAM,
plan and load the image, write the boot structures, attach the devices, create the
vCPU and set its state, run it in its thread, and release everything::

    python bench/lifecycle.py [--json] [--lifecycles N] [--repeats R]

Side by side in one run, each configuration ``--repeats`` times (interleaved, after a
warm-up), ``--lifecycles`` lifecycles each; medians reported:

- the Python VMM on KVM, the default machine (irqchip and PIT) and ``irqchip=False``;
- the C floor, ``bench/build/cvmm --lifecycles N`` (bench/cvmm.c): the same lifecycle in C
  (open, build, load, run, check, release), with ``--irqchip`` (irqchip and PIT, as the
  Python default), ``--irqchip --no-pit``, and without; the ratio Python / C for the two
  machines the Python VMM builds;
- the in-process emulator (``backend="emulator"``), for reference.

Where the time goes: the Python lifecycle split by the machine's own hooks (build: until
``before_boot``; run: until ``after_run``; teardown: the rest), and the C floor's phases
(setup, run, release), so a kernel floor shows as the same cost in both.

Memory: a fresh interpreter runs one tiny guest (``hello64.elf``, 64 MiB of RAM) on each
backend and, in ``after_run`` (everything still mapped), reads its RSS with psutil and
the guest RAM actually resident (``mincore`` over guest RAM): RSS beyond guest RAM is the
VMM's own memory (interpreter, modules, buffers). psutil is imported only then, so its own
pages count against the VMM: the figure errs high. Every run is checked (status 1, the
guest's exits); a wrong result is an error, never a number.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from _common import REPO, BenchError, environment, median

IMAGE = REPO / "guests" / "pio-loop64.elf"
CVMM = REPO / "bench" / "build" / "cvmm"
DEFAULT_LIFECYCLES = 200
DEFAULT_REPEATS = 5
RSS_TARGET = 20 << 20
TARGET_PER_S = 1000.0

RSS_PROBE = """
import json, sys
from vmm import Machine, MachineConfig
seen = {}
def after_run(machine):
    import psutil
    seen["rss"] = psutil.Process().memory_info().rss
    seen["guest_resident"] = machine.backend.memory.resident_bytes()
    seen["guest_ram"] = machine.config.mem_bytes
config = MachineConfig.parse(image=sys.argv[1], backend=sys.argv[2])
result = Machine(config, after_run=after_run).run()
import psutil
peak = psutil.Process().memory_full_info()
status = open("/proc/self/status").read()
seen["peak_rss"] = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) * 1024
seen["status"] = result.status
seen["backend"] = result.backend
print(json.dumps(seen))
"""


def python_lifecycles(n: int, backend: str, irqchip: bool) -> dict[str, float]:
    """``n`` checked lifecycles: lifecycles/s and the mean seconds of build, run, teardown."""
    from vmm import Machine, MachineConfig, VmmError

    # coalesce=(): the POST write exits, as in cvmm (the same two exits in both).
    config = MachineConfig.parse(image=str(IMAGE), args={"count": "1"}, backend=backend, irqchip=irqchip, coalesce=())
    marks: list[float] = []

    def mark(_machine: Any) -> None:
        marks.append(time.perf_counter())

    build = run = teardown = 0.0
    started = time.perf_counter()
    for _ in range(n):
        marks.clear()
        t0 = time.perf_counter()
        try:
            result = Machine(config, before_boot=mark, after_run=mark).run()
        except VmmError as e:
            raise BenchError(f"{backend} lifecycle: {e}") from None
        t3 = time.perf_counter()
        if result.status != 1 or result.backend != backend or result.exits[0].get("io", 0) < 2:
            raise BenchError(f"{backend} lifecycle: status {result.status} ({result.reason}), exits {result.exits}")
        build += marks[0] - t0
        run += marks[1] - marks[0]
        teardown += t3 - marks[1]
    seconds = time.perf_counter() - started
    return {
        "lifecycles_per_s": n / seconds,
        "build_s": build / n,
        "run_s": run / n,
        "teardown_s": teardown / n,
    }


def c_lifecycles(n: int, flags: tuple[str, ...]) -> dict[str, float]:
    """The C floor: ``cvmm --lifecycles n`` with ``flags``, its JSON."""
    if not CVMM.exists():
        raise BenchError(f"no {CVMM}: `make -C bench` builds it")
    argv = [str(CVMM), *flags, "--count", "1", "--lifecycles", str(n), str(IMAGE)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise BenchError(f"cvmm {' '.join(flags)}: status {proc.returncode}: {proc.stderr.strip()[-300:]}")
    out: dict[str, float] = json.loads(proc.stdout)
    return {"lifecycles_per_s": out["lifecycles_per_s"], **{k: out[k] for k in ("setup_s", "run_s", "teardown_s")}}


def rss_probe(backend: str) -> dict[str, Any]:
    """RSS beyond guest RAM of a fresh process that ran one tiny guest."""
    python = str(REPO / ".venv" / "bin" / "python")
    image = str(REPO / "guests" / "hello64.elf")
    proc = subprocess.run(
        [python, "-c", RSS_PROBE, image, backend], capture_output=True, text=True, cwd=REPO, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise BenchError(f"RSS probe on {backend}: {proc.stderr.strip()[-300:]}")
    seen: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if seen["status"] != 1 or seen["backend"] != backend:
        raise BenchError(f"RSS probe on {backend}: status {seen['status']} on {seen['backend']}")
    seen["beyond_guest"] = seen["rss"] - seen["guest_resident"]
    return seen


CONFIGS: dict[str, tuple[str, tuple[Any, ...]]] = {
    # label: (kind, arguments)
    "python kvm (irqchip+PIT)": ("python", ("kvm", True)),
    "python kvm (irqchip off)": ("python", ("kvm", False)),
    "C (irqchip+PIT)": ("c", (("--irqchip",),)),
    "C (irqchip, no PIT)": ("c", (("--irqchip", "--no-pit"),)),
    "C (irqchip off)": ("c", ((),)),
    "python emulator": ("python", ("emulator", True)),
}
RATIOS = (("python kvm (irqchip+PIT)", "C (irqchip+PIT)"), ("python kvm (irqchip off)", "C (irqchip off)"))


def measure(labels: list[str], n: int, repeats: int) -> dict[str, list[dict[str, float]]]:
    def once(label: str, count: int) -> dict[str, float]:
        kind, args = CONFIGS[label]
        return python_lifecycles(count, *args) if kind == "python" else c_lifecycles(count, *args)

    for label in labels:  # warm-up: imports, caches, the kernel's first VM
        once(label, max(1, n // 10))
    samples: dict[str, list[dict[str, float]]] = {label: [] for label in labels}
    for r in range(repeats):
        order = labels if r % 2 == 0 else labels[::-1]
        for label in order:
            samples[label].append(once(label, n))
    return samples


def summarize(samples: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    rows = {}
    for label, runs in samples.items():
        rows[label] = {key: median([run[key] for run in runs]) for key in runs[0]}
        rows[label]["samples_per_s"] = [run["lifecycles_per_s"] for run in runs]
    ratios = {
        f"{ours} / {floor}": rows[ours]["lifecycles_per_s"] / rows[floor]["lifecycles_per_s"]
        for ours, floor in RATIOS
        if ours in rows and floor in rows
    }
    return {"configs": rows, "ratios": ratios}


def report(out: dict[str, Any]) -> str:
    lines = [
        f"lifecycles of pio-loop64.elf count=1 (64 MiB), {out['lifecycles']} per sample, median of {out['repeats']}:",
        f"  {'configuration':26} {'lifecycles/s':>12} {'build/setup':>12} {'run':>9} {'teardown':>9}",
    ]
    for label, row in out["configs"].items():
        first = row.get("build_s", row.get("setup_s", 0.0))
        lines.append(
            f"  {label:26} {row['lifecycles_per_s']:12.0f} {first * 1e3:9.2f} ms {row['run_s'] * 1e3:6.2f} ms "
            f"{row['teardown_s'] * 1e3:6.2f} ms"
        )
    for name, ratio in out["ratios"].items():
        lines.append(f"  ratio {name}: {ratio:.2f}")
    best = max((row["lifecycles_per_s"] for label, row in out["configs"].items() if label.startswith("python kvm")))
    floor = max((row["lifecycles_per_s"] for label, row in out["configs"].items() if label.startswith("C ")), default=0)
    verdict = "met" if best >= TARGET_PER_S else f"not met (the C floor itself reaches {floor:.0f}/s on this host)"
    lines.append(f"  target {TARGET_PER_S:.0f}/s on KVM: {verdict}")
    for backend, seen in out["rss"].items():
        lines.append(
            f"memory ({backend}, hello64.elf, 64 MiB): RSS {seen['rss'] / 2**20:.1f} MiB, guest RAM resident "
            f"{seen['guest_resident'] / 2**20:.1f} MiB, beyond guest RAM {seen['beyond_guest'] / 2**20:.1f} MiB "
            f"(target <= {RSS_TARGET >> 20} MiB: {'met' if seen['beyond_guest'] <= RSS_TARGET else 'not met'}); "
            f"peak RSS {seen['peak_rss'] / 2**20:.1f} MiB"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    parser.add_argument("--lifecycles", type=int, default=DEFAULT_LIFECYCLES, help="lifecycles per sample")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="samples per configuration")
    ns = parser.parse_args(argv)
    if ns.lifecycles < 1 or ns.repeats < 1:
        parser.error("--lifecycles and --repeats must be positive")
    sys.path.insert(0, str(REPO))
    from vmm.backends import kvm_usable

    usable, why = kvm_usable()
    labels = list(CONFIGS) if usable else ["python emulator"]
    if not usable:
        print(f"bench/lifecycle.py: no usable KVM ({why}): the emulator alone", file=sys.stderr)
    try:
        samples = measure(labels, ns.lifecycles, ns.repeats)
        rss = {backend: rss_probe(backend) for backend in (("kvm", "emulator") if usable else ("emulator",))}
    except BenchError as e:
        print(f"bench/lifecycle.py: {e}", file=sys.stderr)
        return 1
    out = {"environment": environment(), "lifecycles": ns.lifecycles, "repeats": ns.repeats}
    out.update(summarize(samples), rss=rss)
    print(json.dumps(out, indent=2) if ns.json else report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
