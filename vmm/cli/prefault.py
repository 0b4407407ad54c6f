"""``vmm prefault``: which pre-population strategy should my VMs start with?

For each strategy it builds a fresh machine with ``--mem`` of RAM (fresh memory each
time), pre-populates it, runs the ring-3 ``memtouch`` guest for two passes over RAM, and
times both passes from the guest's marks on port 0x500. The table answers the question:
how long population takes, and how much faster the guest's first touch gets for it.

The measuring (:func:`measure`, :func:`compare`) is the command's own: it runs whole
machines, so it sits above :mod:`vmm.machine`, here in the CLI, not in :mod:`vmm.prefault`.
``bench/prefault.py`` reuses it for the side-by-side benchmark.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Any

from vmm.cli import streams
from vmm.cli.logs import add_log_level
from vmm.config import BACKENDS, MachineConfig, parse_size
from vmm.errors import InputError, VmmError
from vmm.memory import DEFAULT_BACKING, Backing
from vmm.result import STATUS_INTERRUPTED
from vmm.strategies import STRATEGIES, parse_strategy

MARK_PASS_START = 0x1000
MARK_PASS_END = 0x2000
PASSES = 2
DEFAULT_TIMEOUT = 600.0
DEFAULT_STRATEGIES = ("none", "host", "emulated", "auto")


def default_image() -> str:
    """The bundled memtouch64.elf (:mod:`vmm.guests`), wherever vmm is installed."""
    from vmm import guests

    return str(guests.path("memtouch64.elf"))


@dataclass(frozen=True)
class Row:
    """One strategy's measurements (medians when repeated)."""

    strategy: str
    used: str
    backing: str
    populate_seconds: float
    gib_per_s: float | None
    first_pass_seconds: float
    second_pass_seconds: float
    resident_bytes: int
    reason: str

    @property
    def ratio(self) -> float:
        """First pass over second pass: 1.0 means the first touch costs nothing extra."""
        return self.first_pass_seconds / self.second_pass_seconds if self.second_pass_seconds > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        """One row of ``vmm prefault --json`` (the same names as ``vmm run --json``'s
        ``prefault``: ``seconds`` is the population's)."""
        ratio = self.ratio
        return {
            "strategy_requested": self.strategy,
            "strategy_used": self.used,
            "backing": self.backing,
            "seconds": round(self.populate_seconds, 6),
            "gib_per_s": None if self.gib_per_s is None else round(self.gib_per_s, 3),
            "first_pass_seconds": round(self.first_pass_seconds, 6),
            "second_pass_seconds": round(self.second_pass_seconds, 6),
            # JSON has no infinity: a second pass too short to measure gives null
            "first_second_ratio": round(ratio, 3) if math.isfinite(ratio) else None,
            "resident_bytes": self.resident_bytes,
            "reason": self.reason,
        }


def pass_seconds(marks: list[tuple[int, int, int]]) -> dict[int, float]:
    """memtouch's marks -> {pass: seconds}, from ``0x1000|pass`` to ``0x2000|pass``."""
    starts = {value & 0xFFF: ns for ns, _cpu, value in marks if value & ~0xFFF == MARK_PASS_START}
    ends = {value & 0xFFF: ns for ns, _cpu, value in marks if value & ~0xFFF == MARK_PASS_END}
    return {p: (ends[p] - starts[p]) / 1e9 for p in starts if p in ends}


def measure(
    strategy: str,
    *,
    mem: int,
    memory: str,
    threads: int | None = None,
    backend: str = "auto",
    image: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = False,
) -> Row:
    """Run memtouch (two passes) on a fresh machine pre-populated with ``strategy``."""
    from vmm.machine import Machine

    config = MachineConfig.parse(
        image=image or default_image(),
        mem=mem,
        memory=memory,
        backend=backend,
        prefault=None if strategy == "none" else strategy,
        prefault_threads=threads,
        args={"passes": str(PASSES)},
        timeout=timeout,
    )
    result = Machine(config, progress=progress).run()
    if result.status == STATUS_INTERRUPTED:
        # Ctrl-C ended the run: the command's own status (130), not a failed measurement.
        raise KeyboardInterrupt
    if result.exit_value != 0:
        raise VmmError(f"memtouch did not finish under --prefault {strategy}: {result.reason}")
    passes = pass_seconds(result.marks)
    if len(passes) < PASSES:
        raise VmmError(f"memtouch reported {len(passes)} of {PASSES} passes under --prefault {strategy}")
    report = result.prefault
    return Row(
        strategy=strategy,
        used=report.strategy if report is not None else "none",
        backing=str(config.memory),
        populate_seconds=report.seconds if report is not None else 0.0,
        gib_per_s=report.gib_per_s if report is not None else None,
        first_pass_seconds=passes[0],
        second_pass_seconds=passes[1],
        resident_bytes=report.resident_bytes if report is not None else 0,
        reason=report.reason if report is not None else "no pre-population",
    )


def median_row(rows: list[Row]) -> Row:
    """The per-field median of repeated runs of one strategy."""
    import statistics  # here, not at import: `vmm run` builds this parser too

    first = rows[0]
    rates = [r.gib_per_s for r in rows if r.gib_per_s is not None]
    return Row(
        strategy=first.strategy,
        used=first.used,
        backing=first.backing,
        populate_seconds=statistics.median(r.populate_seconds for r in rows),
        gib_per_s=statistics.median(rates) if rates else None,
        first_pass_seconds=statistics.median(r.first_pass_seconds for r in rows),
        second_pass_seconds=statistics.median(r.second_pass_seconds for r in rows),
        resident_bytes=min(r.resident_bytes for r in rows),
        reason=first.reason,
    )


def compare(
    strategies: list[str],
    *,
    mem: int,
    memory: str,
    threads: int | None = None,
    backend: str = "auto",
    image: str | None = None,
    repeat: int = 1,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = False,
) -> list[Row]:
    """Measure every strategy ``repeat`` times, interleaved (so slow drift in the host's
    free memory hits all of them alike), and return the medians in the given order."""
    runs: dict[str, list[Row]] = {s: [] for s in strategies}
    for _ in range(repeat):
        for s in strategies:
            runs[s].append(
                measure(
                    s,
                    mem=mem,
                    memory=memory,
                    threads=threads,
                    backend=backend,
                    image=image,
                    timeout=timeout,
                    progress=progress,
                )
            )
    return [median_row(runs[s]) for s in strategies]


def to_json(rows: list[Row], *, mem: int, backing: str, repeat: int) -> dict[str, Any]:
    """The ``vmm prefault --json`` object (schema ``vmm/schema/prefault.json``)."""
    from vmm.schema import SCHEMA_VERSION

    return {
        "schema_version": SCHEMA_VERSION,
        "mem_bytes": mem,
        "backing": backing,
        "passes": PASSES,
        "repeat": repeat,
        "rows": [r.to_json() for r in rows],
    }


def format_table(rows: list[Row], mem: int) -> str:
    """The human-readable table, with prefault + first pass relative to ``none``."""
    cold = next((r.first_pass_seconds for r in rows if r.strategy == "none"), None)
    head = (
        f"{'strategy':<11}{'used':<16}{'populate':>10}{'GiB/s':>8}{'1st pass':>11}{'2nd pass':>11}"
        f"{'1st/2nd':>9}{'vs none':>9}"
    )
    lines = [
        f"vmm prefault: {mem / (1 << 30):.2f} GiB guest RAM, {rows[0].backing if rows else '?'} backing, "
        f"memtouch (ring 3), {PASSES} passes",
        head,
    ]
    for r in rows:
        rate = f"{r.gib_per_s:.2f}" if r.gib_per_s is not None else "-"
        total = r.populate_seconds + r.first_pass_seconds
        speedup = f"{cold / total:.1f}x" if cold and total > 0 else "-"
        lines.append(
            f"{r.strategy:<11}{r.used:<16}{r.populate_seconds * 1e3:>8.1f}ms{rate:>8}"
            f"{r.first_pass_seconds * 1e3:>9.1f}ms{r.second_pass_seconds * 1e3:>9.1f}ms"
            f"{r.ratio:>8.1f}x{speedup:>9}"
        )
    lines.append("vs none = (none's first pass) / (populate + first pass): how much sooner the guest is through RAM")
    return "\n".join(lines)


def available_strategies() -> list[str]:
    """The default list: none, host, emulated, auto, plus kernel where the capability is set."""
    strategies = list(DEFAULT_STRATEGIES)
    try:
        from kvm_abi import Cap
        from vmm.kvm import Kvm

        with Kvm() as kvm:
            if kvm.check_extension(Cap.PRE_FAULT_MEMORY):
                strategies.append("kernel")
    except (VmmError, OSError):  # no usable KVM (KvmError is an OSError): host-side strategies only
        pass
    return strategies


def _strategies(values: list[str] | None) -> list[str]:
    if not values:
        return available_strategies()
    out: list[str] = []
    for value in values:
        for name in value.split(","):
            name = parse_strategy(name.strip())
            if name not in out:
                out.append(name)
    return out


def cmd_prefault(ns: argparse.Namespace) -> int:
    """The ``vmm prefault`` command."""
    mem = parse_size(ns.mem)
    if ns.repeat < 1:
        raise InputError("--repeat must be at least 1")
    strategies = _strategies(ns.strategy)
    rows = compare(
        strategies,
        mem=mem,
        memory=ns.memory,
        threads=ns.threads,
        backend=ns.backend,
        image=ns.image,
        repeat=ns.repeat,
        timeout=ns.timeout,
        progress=not ns.json and sys.stderr.isatty(),
    )
    # Through streams, as every subcommand: a closed pipe is the shell's 141, a full disk
    # one line on stderr, never "an internal error".
    if ns.json:
        import json  # here, not at import: `vmm run` builds this parser too

        streams.write_text(json.dumps(to_json(rows, mem=mem, backing=ns.memory, repeat=ns.repeat)) + "\n")
    else:
        streams.write_text(format_table(rows, mem) + "\n")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``vmm prefault`` on the ``vmm`` command's subparsers."""
    p = subparsers.add_parser(
        "prefault",
        help="compare guest-memory pre-population strategies",
        description=(
            "For each strategy: a fresh VM with --mem of RAM, pre-populated, then the ring-3 memtouch "
            "guest touches every page twice. Prints populate time, GiB/s, and both pass times."
        ),
    )
    p.add_argument("--mem", "-m", default="1G", metavar="SIZE", help="guest RAM, e.g. 1G (default 1G); -m as QEMU's")
    p.add_argument(
        "--memory",
        choices=[b.value for b in Backing],
        default=DEFAULT_BACKING.value,
        help=f"guest RAM backing (default {DEFAULT_BACKING.value})",
    )
    p.add_argument(
        "--strategy",
        action="append",
        metavar="S",
        help=f"a strategy to measure ({', '.join(STRATEGIES)}); repeatable or comma-separated "
        f"(default: {', '.join(DEFAULT_STRATEGIES)}, plus kernel where KVM offers it)",
    )
    p.add_argument("--threads", type=int, metavar="N", help="population threads (default: one per host CPU)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="where the guest runs (default auto)")
    p.add_argument("--repeat", type=int, default=1, metavar="N", help="runs per strategy; medians are shown")
    p.add_argument("--image", metavar="ELF", help="the memtouch guest (default: the bundled memtouch64.elf)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS", help="per run")
    p.add_argument("--json", action="store_true", help="one JSON object (rows: one per strategy), not the table")
    add_log_level(p)
    p.set_defaults(handler=cmd_prefault)
    return p
