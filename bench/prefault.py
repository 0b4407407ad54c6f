"""Guest-memory pre-population, side by side: is the guest's first touch of RAM cheap?

One run compares, on ``--mem`` (1 GiB) of guest RAM and the ring-3 ``memtouch`` guest
(two passes, one qword per 4 KiB page, timed from its marks on port 0x500):

* no prefault on THP (the default backing) and on plain anonymous memory (the cold
  reference of host-kvm.md: 6,027 ms measured by hand),
* every strategy on THP: host, emulated, auto (and kernel where KVM offers it),

then host population alone with 1 thread against 2 threads on fresh memory. Each guest
configuration runs ``--repeats`` times, interleaved so that slow drift of the host (its
parent's free-page reporting makes the first touch of freed memory 3-20x slower) hits all
of them alike, after a warm-up; medians are shown with every ratio the issue sets a target
for, and whether it was met::

    python bench/prefault.py [--mem 1G] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from _common import REPO, BenchError, environment, median

from kvm_abi import Cap
from vmm.cli.prefault import Row, measure
from vmm.config import parse_size
from vmm.kvm import Kvm
from vmm.memory import GuestMemory, GuestRegion, HostMemory
from vmm.prefault import host as host_population
from vmm.prefault.progress import Progress

IMAGE = str(REPO / "guests" / "memtouch64.elf")
TARGET_FIRST_OVER_SECOND = 3.0  # with auto: first pass at most 3x the second
TARGET_SPEEDUP = 30.0  # auto's populate + first pass vs a cold first pass
TARGET_THREAD_SCALING = 1.7  # host population, 2 threads vs 1


def configurations(kernel: bool) -> list[tuple[str, str, str]]:
    """(label, backing, strategy) of every guest run."""
    runs = [
        ("none (anon)", "anon", "none"),
        ("none (thp)", "thp", "none"),
        ("host", "thp", "host"),
        ("emulated", "thp", "emulated"),
        ("auto", "thp", "auto"),
    ]
    if kernel:
        runs.append(("kernel", "thp", "kernel"))
    return runs


def guest_runs(mem: int, repeats: int, threads: int | None, kernel: bool) -> dict[str, list[Row]]:
    """Every configuration ``repeats`` times, interleaved, after one warm-up each."""
    configs = configurations(kernel)
    samples: dict[str, list[Row]] = {label: [] for label, _, _ in configs}
    for round_ in range(repeats + 1):
        for label, backing, strategy in configs:
            row = measure(strategy, mem=mem, memory=backing, threads=threads, backend="kvm", image=IMAGE)
            if round_:  # round 0 is the warm-up
                samples[label].append(row)
            print(
                f"  {'warm-up' if not round_ else f'run {round_}':<8} {label:<12} populate "
                f"{row.populate_seconds * 1e3:8.1f} ms  pass 1 {row.first_pass_seconds * 1e3:8.1f} ms  "
                f"pass 2 {row.second_pass_seconds * 1e3:6.1f} ms",
                file=sys.stderr,
                flush=True,
            )
    return samples


def populate_seconds(mem: int, threads: int, backing: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) to populate ``mem`` bytes of fresh
    ``backing`` memory with ``threads``. CPU over wall is the parallelism achieved: 2 threads
    on idle CPUs give about 2; less means the threads waited for a CPU."""
    memory = GuestMemory()
    host = HostMemory.allocate(mem, backing)
    try:
        memory.add(GuestRegion(0, mem, host))
        cpu0, started = os.times(), time.perf_counter()
        done = host_population.populate(memory, [(0, mem)], threads, Progress(mem))
        seconds, cpu1 = time.perf_counter() - started, os.times()
        if done != mem or host.resident_bytes() != mem:
            raise BenchError(f"populated {done} of {mem} bytes")
        return seconds, (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    finally:
        host.close()


def thread_scaling(mem: int, repeats: int, backing: str) -> dict[int, list[tuple[float, float]]]:
    """1 vs 2 threads, alternating, after a warm-up of each: (wall, CPU) per run."""
    times: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for round_ in range(repeats + 1):
        for threads in (1, 2):
            sample = populate_seconds(mem, threads, backing)
            if round_:
                times[threads].append(sample)
    return times


def at_most(value: float, limit: float) -> tuple[float, str, bool]:
    return value, f"<= {limit:g}x", value <= limit


def at_least(value: float, limit: float) -> tuple[float, str, bool]:
    return value, f">= {limit:g}x", value >= limit


def summarize(
    samples: dict[str, list[Row]], scaling: dict[str, dict[int, list[tuple[float, float]]]], mem: int
) -> dict[str, Any]:
    """Medians per configuration, the three target ratios, and whether each was met."""
    rows = {}
    for label, runs in samples.items():
        rows[label] = {
            "populate_ms": median([r.populate_seconds for r in runs]) * 1e3,
            "first_ms": median([r.first_pass_seconds for r in runs]) * 1e3,
            "second_ms": median([r.second_pass_seconds for r in runs]) * 1e3,
            "used": runs[0].used,
        }
        rows[label]["first_over_second"] = rows[label]["first_ms"] / rows[label]["second_ms"]
    auto = rows["auto"]
    auto_total = auto["populate_ms"] + auto["first_ms"]
    scale = {}
    for backing, t in scaling.items():
        one, two = median([w for w, _ in t[1]]), median([w for w, _ in t[2]])
        scale[backing] = {
            "one_thread_ms": one * 1e3,
            "two_threads_ms": two * 1e3,
            "speedup": one / two,
            "two_threads_parallelism": median([c / w for w, c in t[2]]),
        }
    cold_anon, cold_thp = rows["none (anon)"]["first_ms"], rows["none (thp)"]["first_ms"]
    targets = {
        "auto first/second pass": at_most(auto["first_over_second"], TARGET_FIRST_OVER_SECOND),
        "cold anon first / (auto populate + first)": at_least(cold_anon / auto_total, TARGET_SPEEDUP),
        "cold thp first / (auto populate + first)": at_least(cold_thp / auto_total, TARGET_SPEEDUP),
    }
    for backing, s in scale.items():
        targets[f"host populate {backing}: 2 threads vs 1"] = at_least(s["speedup"], TARGET_THREAD_SCALING)
    return {"mem": mem, "rows": rows, "scaling": scale, "targets": targets}


def print_report(result: dict[str, Any], env: dict[str, Any], repeats: int) -> None:
    mem = result["mem"]
    print(f"prefault bench: {mem >> 20} MiB guest RAM, memtouch (ring 3), 2 passes, median of {repeats} runs")
    print(
        f"host: {env['kernel']}, {env['cpus']} CPUs ({env['cpu']}), {env['kvm']}, python {env['python']}, "
        f"KVM_CAP_PRE_FAULT_MEMORY={env['pre_fault_memory']}, load {env['loadavg']}"
    )
    print(
        f"{'configuration':<14}{'used':<11}{'populate':>11}{'pass 1':>11}{'pass 2':>10}{'1st/2nd':>9}"
        f"{'populate+1st':>14}{'vs cold anon':>14}"
    )
    cold = result["rows"]["none (anon)"]["first_ms"]
    for label, r in result["rows"].items():
        total = r["populate_ms"] + r["first_ms"]
        print(
            f"{label:<14}{r['used']:<11}{r['populate_ms']:>9.1f}ms{r['first_ms']:>9.1f}ms{r['second_ms']:>8.1f}ms"
            f"{r['first_over_second']:>8.1f}x{total:>12.1f}ms{cold / total:>13.1f}x"
        )
    print("host population of fresh memory, 1 vs 2 threads:")
    for backing, s in result["scaling"].items():
        print(
            f"  {backing:<5} 1 thread {s['one_thread_ms']:8.1f} ms   2 threads {s['two_threads_ms']:8.1f} ms   "
            f"{s['speedup']:.2f}x   (2 threads kept {s['two_threads_parallelism']:.2f} CPUs busy)"
        )
    print("targets:")
    for name, (value, target, met) in result["targets"].items():
        print(f"  {name:<44} {value:8.2f}x  (target {target}) {'met' if met else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mem", default="1G", help="guest RAM (default 1G)")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per configuration (default 3)")
    parser.add_argument("--threads", type=int, help="population threads for the guest runs (default: one per CPU)")
    parser.add_argument("--json", action="store_true", help="print the medians and targets as JSON")
    ns = parser.parse_args(argv)
    mem = parse_size(ns.mem)
    with Kvm() as kvm:
        kernel = bool(kvm.check_extension(Cap.PRE_FAULT_MEMORY))
    env = environment()
    env["pre_fault_memory"] = int(kernel)
    with open("/proc/loadavg", encoding="ascii") as f:
        env["loadavg"] = " ".join(f.read().split()[:3])
    print("guest runs (warm-up first):", file=sys.stderr)
    samples = guest_runs(mem, ns.repeats, ns.threads, kernel)
    print("host population, 1 vs 2 threads:", file=sys.stderr)
    scaling = {backing: thread_scaling(mem, ns.repeats, backing) for backing in ("thp", "anon")}
    result = summarize(samples, scaling, mem)
    if ns.json:
        print(json.dumps({"environment": env, **result}))
    else:
        print_report(result, env, ns.repeats)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        sys.exit(1)
