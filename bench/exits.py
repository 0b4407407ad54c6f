"""Exit throughput: the Python VMM against the C floor (bench/cvmm.c), side by side.

Both VMMs run ``guests/pio-loop64.elf`` (``count`` times ``out %al, $0x80``, then a write
to the exit port) with the same boot state, at ring 0 (KVM emulates the guest) and at
ring 3 (it runs natively). Each run reports its exits and the seconds of its run loop
only; runs alternate between the VMMs (after a warm-up of each) so drift hits both, and
the medians over the repeats are compared::

    python bench/exits.py [--json] [--count N] [--repeats R] [--abi] [--variant ring0]

The Python VMM is measured in this process through ``vmm.Machine`` (``RunResult.seconds``
is the wall time of the run phase); the C VMM in a subprocess (``bench/build/cvmm``, built
by ``make -C bench``); ``--abi`` adds the Python VMM with cffi in ABI mode
(``VMM_CFFI=abi``), which needs a fresh interpreter, so it runs in a subprocess too.
Every run is checked (status 1, exactly ``count + 1`` exits); a failed run is an error.

The like-for-like Python runs turn coalescing off (``coalesce=()``: every ``out`` exits, as
in cvmm). A third runner, ``coalesced``, is the Python VMM as it runs by default, with the
POST port coalesced where KVM has KVM_CAP_COALESCED_PIO (its writes wait in KVM's ring and
are replayed at the next exit): it reports guest port writes per second ("exits/s
equivalent", count + 1 over the run loop's seconds) against the C VMM's real exits; that
ratio may exceed 1 and says how much exiting the guest was spared, not a faster loop.
Its runs are checked too: status 1, every write counted by the POST latch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import REPO, BenchError, environment, median

IMAGE = REPO / "guests" / "pio-loop64.elf"
CVMM = REPO / "bench" / "build" / "cvmm"
VARIANTS = {"ring0": "long", "ring3": "user"}
"""Benchmark variant -> the CPU mode both VMMs boot the guest in."""
DEFAULT_COUNT = 50_000
DEFAULT_REPEATS = 11
BUSY_LOAD = 0.25  # per CPU, beyond the one CPU this benchmark keeps busy: other work disturbs the figures
EXPECTED_STATUS = 1  # the guest writes 0 to the exit port: status (0 << 1) | 1


@dataclass(frozen=True)
class Sample:
    """One run: how many exits its run loop handled and how long the loop took."""

    exits: int
    seconds: float

    @property
    def rate(self) -> float:
        """Exits per second."""
        return self.exits / self.seconds


Runner = Callable[[str, int], Sample]


def _check(who: str, mode: str, count: int, status: int, exits: int, io: int, seconds: float, detail: str) -> Sample:
    """The Sample of a run that did what the guest should: status 1, count + 1 port exits."""
    expected = count + 1
    if status != EXPECTED_STATUS:
        raise BenchError(f"{who} ({mode}, count={count}): status {status}, expected {EXPECTED_STATUS}: {detail}")
    if exits != expected or io != expected:
        raise BenchError(f"{who} ({mode}, count={count}): {exits} exits ({io} I/O), expected {expected} I/O exits")
    if not seconds > 0:
        raise BenchError(f"{who} ({mode}, count={count}): run took {seconds} s")
    return Sample(exits, seconds)


def _timeout(count: int) -> float:
    """A generous bound for one run (the slowest case here is ~60 us per exit)."""
    return 60.0 + count * 1e-3


def run_python(mode: str, count: int) -> Sample:
    """One run of the Python VMM on KVM, in this process, every write an exit (like cvmm)."""
    from vmm import Machine, MachineConfig, VmmError

    try:
        config = MachineConfig.parse(
            image=str(IMAGE), args={"count": str(count)}, mode=mode, backend="kvm", coalesce=()
        )
        result = Machine(config).run(timeout=_timeout(count))
    except VmmError as e:
        raise BenchError(f"Python VMM ({mode}, count={count}): {e}") from None
    if len(result.exits) != 1:
        raise BenchError(f"Python VMM: {len(result.exits)} vCPUs, expected 1")
    return _check(
        "Python VMM",
        mode,
        count,
        result.status,
        result.total_exits,
        result.exits[0]["io"],
        result.seconds,
        result.reason,
    )


def run_python_coalesced(mode: str, count: int) -> Sample:
    """One run of the Python VMM with the POST port coalesced: a Sample of the guest's
    ``count + 1`` port writes (not exits) over the run loop's seconds."""
    from vmm import Machine, MachineConfig, VmmError

    writes: list[int] = []

    def after_run(machine: Any) -> None:
        writes.extend(d.writes for _, _, d in machine.bus._pio if d.name == "post-code")

    try:
        config = MachineConfig.parse(
            image=str(IMAGE), args={"count": str(count)}, mode=mode, backend="kvm", coalesce=("post-code",)
        )
        result = Machine(config, after_run=after_run).run(timeout=_timeout(count))
    except VmmError as e:
        raise BenchError(f"Python VMM, coalesced ({mode}, count={count}): {e}") from None
    if result.status != EXPECTED_STATUS or writes != [count]:
        raise BenchError(
            f"Python VMM, coalesced ({mode}, count={count}): status {result.status}, POST writes {writes}: "
            f"{result.reason}"
        )
    return Sample(count + 1, result.seconds)


def _run_json(who: str, argv: list[str], count: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a subprocess that prints one JSON object; BenchError with its stderr if it fails."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=_timeout(count) + 30, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{who}: no result after {_timeout(count) + 30:.0f} s") from None
    except OSError as e:
        raise BenchError(f"{who}: cannot run {argv[0]}: {e}") from None
    if proc.returncode != 0:
        raise BenchError(f"{who} failed (exit status {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise BenchError(f"{who} printed no JSON: {proc.stdout.strip()[-500:]!r}") from None
    if not isinstance(out, dict):
        raise BenchError(f"{who} printed {type(out).__name__}, expected a JSON object")
    return out


def run_c(mode: str, count: int) -> Sample:
    """One run of the C VMM (bench/build/cvmm)."""
    argv = [str(CVMM), "--count", str(count), *(["--user"] if mode == "user" else []), str(IMAGE)]
    out = _run_json("C VMM", argv, count)
    try:
        status, exits, io, seconds = int(out["status"]), int(out["exits"]), int(out["io"]), float(out["seconds"])
    except (KeyError, TypeError, ValueError) as e:
        raise BenchError(f"C VMM: malformed result {out!r} ({e!r})") from None
    return _check("C VMM", mode, count, status, exits, io, seconds, str(out.get("crash")))


def run_python_abi(mode: str, count: int) -> Sample:
    """One run of the Python VMM with cffi in ABI mode, in a fresh interpreter."""
    env = dict(os.environ, VMM_CFFI="abi")
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--count", str(count)]
    out = _run_json("Python VMM (ABI mode)", argv, count, env)
    if out.get("kvm_abi_compiled") is not False:
        raise BenchError("Python VMM (ABI mode): kvm_abi still used its compiled module under VMM_CFFI=abi")
    try:
        return Sample(int(out["exits"]), float(out["seconds"]))
    except (KeyError, TypeError, ValueError) as e:
        raise BenchError(f"Python VMM (ABI mode): malformed result {out!r} ({e!r})") from None


def c_vmm_compiler() -> str:
    """What cvmm reports it was built with (one tiny run)."""
    out = _run_json("C VMM", [str(CVMM), "--count", "1", str(IMAGE)], 1)
    return str(out.get("compiler", "unknown"))


def measure(mode: str, count: int, repeats: int, runners: dict[str, Runner]) -> dict[str, list[Sample]]:
    """A warm-up run of each runner, then ``repeats`` rounds, alternating the order each round."""
    names = list(runners)
    for name in names:
        runners[name](mode, count)
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            samples[name].append(runners[name](mode, count))
    return samples


def summarize(samples: dict[str, list[Sample]], count: int, repeats: int, env: dict[str, Any]) -> dict[str, Any]:
    """The result object of one variant: medians, the ratio, the raw samples, the environment."""
    py = median([s.rate for s in samples["python"]])
    c = median([s.rate for s in samples["c"]])
    pairs = list(zip(samples["python"], samples["c"], strict=True))
    out: dict[str, Any] = {
        "python_exits_per_s": round(py, 1),
        "c_exits_per_s": round(c, 1),
        "ratio": round(py / c, 4),
        # each round's Python/C ratio (the two ran back to back), then the median: steadier on a busy host
        "ratio_paired_median": round(median([p.rate / q.rate for p, q in pairs]), 4),
        "python_ns_per_exit": round(1e9 / py, 1),
        "c_ns_per_exit": round(1e9 / c, 1),
        "python_overhead_ns_per_exit": round(1e9 / py - 1e9 / c, 1),
        "python_seconds_median": round(median([s.seconds for s in samples["python"]]), 6),
        "c_seconds_median": round(median([s.seconds for s in samples["c"]]), 6),
        "count": count,
        "exits_per_run": count + 1,
        "repeats": repeats,
        "python_samples": [round(s.rate, 1) for s in samples["python"]],
        "c_samples": [round(s.rate, 1) for s in samples["c"]],
    }
    if "coalesced" in samples:
        co = median([s.rate for s in samples["coalesced"]])
        out["python_coalesced_writes_per_s"] = round(co, 1)
        out["coalesced_ratio"] = round(co / c, 4)
        out["python_coalesced_samples"] = [round(s.rate, 1) for s in samples["coalesced"]]
    if "abi" in samples:
        abi = median([s.rate for s in samples["abi"]])
        out["python_abi_exits_per_s"] = round(abi, 1)
        out["abi_ratio"] = round(abi / c, 4)
        out["python_abi_samples"] = [round(s.rate, 1) for s in samples["abi"]]
    out["env"] = env
    return out


def _k(rate: float) -> str:
    """Exits/s in thousands, right-aligned."""
    return f"{rate / 1000:8.1f} k"


def print_table(results: dict[str, dict[str, Any]], env: dict[str, Any]) -> None:
    """The human-readable report."""
    first = next(iter(results.values()))
    has_abi = "python_abi_exits_per_s" in first
    print(
        f"pio-loop64 exit benchmark: count={first['count']}, medians of {first['repeats']} runs "
        "after a warm-up, run loop only"
    )
    head = f"{'variant':8} {'Python exits/s':>15} {'C exits/s':>12} {'ratio':>6} {'paired':>7} {'Py-C ns/exit':>13}"
    has_co = "python_coalesced_writes_per_s" in first
    if has_co:
        head += f" {'coalesced writes/s':>19} {'/ C':>6}"
    if has_abi:
        head += f" {'Python ABI exits/s':>19} {'ratio':>6}"
    print(head)
    for name, r in results.items():
        line = (
            f"{name:8} {_k(r['python_exits_per_s']):>15} {_k(r['c_exits_per_s']):>12} {r['ratio']:6.3f}"
            f" {r['ratio_paired_median']:7.3f}"
            f" {r['python_overhead_ns_per_exit']:13.0f}"
        )
        if has_co:
            line += f" {_k(r['python_coalesced_writes_per_s']):>19} {r['coalesced_ratio']:6.2f}"
        if has_abi:
            line += f" {_k(r['python_abi_exits_per_s']):>19} {r['abi_ratio']:6.3f}"
        print(line)
    loads = [r["env"][k] for r in results.values() for k in ("loadavg_1min_before", "loadavg_1min_after")]
    busy = max(loads) - 1 > BUSY_LOAD * (env["cpus"] or 1)
    note = ": other work on the host, figures are noisy" if busy else " (this benchmark itself keeps one CPU busy)"
    print(f"host load (1-min average) {min(loads):.2f}-{max(loads):.2f}{note}")
    print(
        f"kernel {env['kernel']}, {env['kvm']}, CPU {env['cpu']} x{env['cpus']}, Python {env['python']}, "
        f"cffi {env['cffi']}, kvm_abi compiled: {env['kvm_abi_compiled']}, cvmm: {env['cvmm_compiler']}"
    )


def worker(mode: str, count: int) -> int:
    """``--worker``: one Python VMM run, as JSON (for --abi, in a fresh interpreter)."""
    import kvm_abi

    sample = run_python(mode, count)
    json.dump(
        {"exits": sample.exits, "seconds": sample.seconds, "kvm_abi_compiled": bool(kvm_abi.COMPILED)}, sys.stdout
    )
    print()
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the process exit status (1 after a failed run)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help=f"loop iterations (default {DEFAULT_COUNT})")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="measured runs per VMM and variant")
    parser.add_argument("--abi", action="store_true", help="also measure the Python VMM with cffi in ABI mode")
    parser.add_argument("--variant", choices=list(VARIANTS), action="append", help="only this variant (repeatable)")
    parser.add_argument(
        "--cpu",
        type=int,
        default=max(os.sched_getaffinity(0)),
        help="host CPU both VMMs run on (default: the highest; -1: no pinning). Pinning both the same "
        "way keeps the comparison fair and removes migrations from the noise",
    )
    parser.add_argument("--worker", choices=list(VARIANTS.values()), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})  # inherited by the C VMM and worker subprocesses
    if args.count < 1 or args.repeats < 1:
        parser.error("--count and --repeats must be at least 1")
    try:
        if args.worker:
            return worker(args.worker, args.count)
        if not os.access(CVMM, os.X_OK):
            raise BenchError(f"{CVMM.relative_to(REPO)} is not built: run `make -C bench` first")
        env = environment()
        env["cvmm_compiler"] = c_vmm_compiler()
        env["pinned_cpu"] = args.cpu if args.cpu >= 0 else None
        runners: dict[str, Runner] = {"python": run_python, "c": run_c, "coalesced": run_python_coalesced}
        if args.abi:
            runners["abi"] = run_python_abi
        results: dict[str, dict[str, Any]] = {}
        for variant in args.variant or list(VARIANTS):
            load_before = os.getloadavg()[0]
            samples = measure(VARIANTS[variant], args.count, args.repeats, runners)
            load = {"loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0]}
            results[variant] = summarize(samples, args.count, args.repeats, {**env, **load})
    except BenchError as e:
        print(f"exits.py: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    else:
        print_table(results, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
