"""KVM against the in-process emulator, side by side in one run.

Every bundled guest runs on both backends through ``vmm.Machine`` with the options its
documented result needs (guests/README.md); each (guest, backend) pair gets a warm-up,
then the runs alternate between the backends so drift hits both, and the medians of the
wall time of ``Machine.run()`` (build, run, teardown) are compared. Then the exit
benchmark, ``pio-loop64.elf``, at ring 0 and at ring 3 (``--mode user``): exits per
second of the run loop on each backend::

    python bench/backends.py [--json] [--repeats R] [--count N]

Every run is checked against the guest's documented status; a wrong result is an error,
never a number. Without a usable /dev/kvm the emulator's figures are reported alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from _common import REPO, BenchError, environment, median

GUESTS = REPO / "guests"
BACKENDS = ("kvm", "emulator")
DEFAULT_REPEATS = 5
DEFAULT_COUNT = 20_000
RING_MODES = {"ring0": "long", "ring3": "user"}


@dataclass(frozen=True)
class Guest:
    """A bundled guest, how it is run, and the exit status guests/README.md documents."""

    image: str
    status: int
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.image


GUEST_RUNS = [
    Guest("hello16.bin", 1),
    Guest("hello32.elf", 1),
    Guest("hello64.elf", 1),
    Guest("user64.elf", 1),
    Guest("memtouch64.elf", 1, {"args": {"passes": "2"}}),
    Guest("readpages64.elf", 1),
    Guest("pio-loop64.elf", 1, {"args": {"count": "1000"}}),
    Guest("smp64.elf", 1, {"vcpus": 2}),
    Guest("spin64.elf", 124, {"timeout": 0.2}),
    Guest("triple-fault.bin", 4),
    Guest("ud64.elf", 4),
    Guest("mmio64.elf", 1),
    Guest("mmio64.elf", 4, {"strict": True}, label="mmio64.elf --strict"),
]


def run_guest(guest: Guest, backend: str) -> float:
    """Wall seconds of one checked ``Machine.run()`` of ``guest`` on ``backend``."""
    from vmm import Machine, MachineConfig, VmmError

    options = {"mem": "16M", "timeout": 60.0, **guest.options}
    try:
        config = MachineConfig.parse(image=str(GUESTS / guest.image), backend=backend, **options)
        started = time.perf_counter()
        result = Machine(config).run()
        seconds = time.perf_counter() - started
    except VmmError as e:
        raise BenchError(f"{guest.name} on {backend}: {e}") from None
    if result.status != guest.status:
        raise BenchError(f"{guest.name} on {backend}: status {result.status}, expected {guest.status}: {result.reason}")
    return seconds


def run_pio_loop(mode: str, count: int, backend: str) -> float:
    """Exits per second of the run loop for one checked pio-loop run."""
    from vmm import Machine, MachineConfig, VmmError

    try:
        config = MachineConfig.parse(
            image=str(GUESTS / "pio-loop64.elf"),
            mode=mode,
            args={"count": str(count)},
            backend=backend,
            timeout=60.0 + count * 1e-3,
            coalesce=(),  # every write an exit: the exit rate, not the coalesced ring
        )
        result = Machine(config).run()
    except VmmError as e:
        raise BenchError(f"pio-loop ({mode}) on {backend}: {e}") from None
    io = result.exits[0]["io"]
    if result.status != 1 or io != count + 1:
        raise BenchError(
            f"pio-loop ({mode}) on {backend}: status {result.status}, {io} port exits, "
            f"expected 1 and {count + 1}: {result.reason}"
        )
    return io / result.seconds


def interleaved(backends: tuple[str, ...], repeats: int, one: Any) -> dict[str, list[float]]:
    """A warm-up of each backend, then ``repeats`` rounds alternating between them."""
    for backend in backends:
        one(backend)
    samples: dict[str, list[float]] = {b: [] for b in backends}
    for _ in range(repeats):
        for backend in backends:
            samples[backend].append(one(backend))
    return samples


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def measure(backends: tuple[str, ...], repeats: int, count: int) -> dict[str, Any]:
    guests = []
    for guest in GUEST_RUNS:
        samples = interleaved(backends, repeats, lambda b, g=guest: run_guest(g, b))
        kvm = median(samples["kvm"]) if "kvm" in samples else None
        emu = median(samples["emulator"])
        guests.append(
            {
                "guest": guest.name,
                "kvm_seconds": kvm,
                "emulator_seconds": emu,
                "ratio": ratio(emu, kvm),
                "samples": samples,
            }
        )
    pio: dict[str, Any] = {"count": count}
    for variant, mode in RING_MODES.items():
        samples = interleaved(backends, repeats, lambda b, m=mode: run_pio_loop(m, count, b))
        kvm = median(samples["kvm"]) if "kvm" in samples else None
        emu = median(samples["emulator"])
        pio[variant] = {
            "kvm_exits_per_second": kvm,
            "emulator_exits_per_second": emu,
            "emulator_over_kvm": ratio(emu, kvm),
            "samples": samples,
        }
    return {"guests": guests, "pio_loop": pio}


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:9.1f} ms"


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e6:.2f} M/s" if value >= 1e6 else f"{value / 1e3:.1f} k/s"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def report(out: dict[str, Any]) -> str:
    missing = "" if out["kvm_usable"] else f" (no KVM: {out['kvm_reason']})"
    lines = [
        f"backends: {', '.join(out['backends'])}{missing}",
        f"wall time of Machine.run(), median of {out['repeats']} after a warm-up:",
        f"  {'guest':24} {'kvm':>12} {'emulator':>12} {'emulator/kvm':>13}",
    ]
    for g in out["guests"]:
        lines.append(
            f"  {g['guest']:24} {_seconds(g['kvm_seconds']):>12} {_seconds(g['emulator_seconds']):>12} "
            f"{_times(g['ratio']):>13}"
        )
    pio = out["pio_loop"]
    lines.append(f"pio-loop exits/s (count={pio['count']}, median of {out['repeats']}):")
    lines.append(f"  {'variant':24} {'kvm':>12} {'emulator':>12} {'emulator/kvm':>13}")
    for variant in RING_MODES:
        v = pio[variant]
        lines.append(
            f"  {variant:24} {_rate(v['kvm_exits_per_second']):>12} "
            f"{_rate(v['emulator_exits_per_second']):>12} {_times(v['emulator_over_kvm']):>13}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    parser.add_argument(
        "--repeats", type=int, default=DEFAULT_REPEATS, help=f"runs per figure (default {DEFAULT_REPEATS})"
    )
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help=f"pio-loop exits (default {DEFAULT_COUNT})")
    ns = parser.parse_args(argv)
    if ns.repeats < 1 or ns.count < 1:
        parser.error("--repeats and --count must be positive")
    sys.path.insert(0, str(REPO))
    from vmm.backends import kvm_usable

    usable, reason = kvm_usable()
    backends = BACKENDS if usable else ("emulator",)
    try:
        out = {
            "environment": environment(),
            "backends": list(backends),
            "kvm_usable": usable,
            "kvm_reason": reason,
            "repeats": ns.repeats,
            **measure(backends, ns.repeats, ns.count),
        }
    except BenchError as e:
        print(f"bench/backends.py: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2) if ns.json else report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
