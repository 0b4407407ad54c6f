"""KVM's page faults on the guest's first touch of RAM, for every pre-population strategy.

The ring-3 ``memtouch`` guest writes then reads one qword per 4 KiB page of ``--mem`` (256
MiB) in each of two passes, marking each pass's start and end on port 0x500.  Every
configuration (backing ``thp`` and ``anon`` x ``--prefault`` none, host, emulated,
kernel, auto) runs once through ``vmm.machine.Machine`` with a
:class:`vmm.faults.FaultCounter` of this process around it and a
:class:`vmm.faults.PassMarker` in place of the marker device, which reads the counter at
each mark while the vCPU waits in userspace: so each pass's count is exactly the faults the
vCPU took between its marks.  What happened before the first pass (pre-population, the
guest's boot) is reported apart.  Counts, not times: they mean the same under QEMU's
software CPU in the lab as on real hardware.

Prints one JSON object (``table``: first and second pass ``faults`` per backing and
strategy; ``runs``: every event per phase; ``host``: where it ran)::

    python bench/lab_faults.py [--mem 256M] [--backings thp,anon] [--strategies none,...] [-v]

``make lab-bench`` runs it inside the lab (lab/bench-faults); run it directly for this host.
A strategy this host lacks (``kernel`` without KVM_PRE_FAULT_MEMORY) is reported with the
reason instead of counts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from _common import REPO, BenchError, environment

from vmm.config import MachineConfig, parse_size
from vmm.errors import VmmError
from vmm.faults import FaultCounter, PassMarker, fault_counting_available
from vmm.machine import Machine

IMAGE = str(REPO / "guests" / "memtouch64.elf")
STRATEGIES = ("none", "host", "emulated", "kernel", "auto")
BACKINGS = ("thp", "anon")
PAGES_RE = re.compile(rb"memtouch: (\d+) pages x (\d+) passes")
TIMEOUT = 1800.0


def thp_mode() -> str:
    """The bracketed choice of /sys/kernel/mm/transparent_hugepage/enabled."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    found = re.search(r"\[(\w+)\]", text)
    return found[1] if found else text.strip()


def measure(mem: int, backing: str, strategy: str) -> dict[str, Any]:
    """One run: the counts before the first pass and in each pass, and what prefault did."""
    config = MachineConfig.parse(
        image=IMAGE, mem=mem, args={"passes": "2"}, memory=backing, prefault=strategy, backend="kvm", timeout=TIMEOUT
    )
    try:
        with FaultCounter(pid=os.getpid()) as counter:
            machine = Machine(config)
            machine.marker = marker = PassMarker(counter)
            result = machine.run()
    except VmmError as e:  # e.g. --prefault kernel on a KVM without KVM_PRE_FAULT_MEMORY
        return {"unavailable": str(e)}
    found = PAGES_RE.search(result.console)
    if result.status != 1 or not found:
        raise BenchError(f"{backing}/{strategy}: {result.reason}; console {result.console[-200:]!r}")
    passes = marker.passes()
    if set(passes) != {0, 1}:
        raise BenchError(f"{backing}/{strategy}: marks for passes {sorted(passes)}, expected 0 and 1")
    first_start = next(counts for value, _tid, counts in marker.readings if value == 0x1000)
    report = result.prefault
    return {
        "pages": int(found[1]),
        "prefault": "none" if report is None else report.strategy,
        "first_pass": passes[0],
        "second_pass": passes[1],
        "before_first_pass": first_start,
        "whole_run": counter.total(),
        "lost_events": counter.lost,
    }


def main(argv: list[str]) -> int:
    """Run every configuration and print the JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--mem", default="256M", help="guest RAM (default 256M)")
    parser.add_argument("--backings", default=",".join(BACKINGS), help="comma-separated (default thp,anon)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated (default all five)")
    parser.add_argument("-v", "--verbose", action="store_true", help="one progress line per run on stderr")
    args = parser.parse_args(argv)
    mem = parse_size(args.mem)
    ok, why = fault_counting_available()
    if not ok:
        print(f"lab_faults: cannot count KVM page faults here: {why}", file=sys.stderr)
        return 2
    runs: dict[str, dict[str, Any]] = {}
    table: dict[str, dict[str, Any]] = {}
    for backing in args.backings.split(","):
        for strategy in args.strategies.split(","):
            row = measure(mem, backing, strategy)
            runs.setdefault(backing, {})[strategy] = row
            if "unavailable" in row:
                table.setdefault(backing, {})[strategy] = row["unavailable"]
            else:
                first, second = row["first_pass"]["faults"], row["second_pass"]["faults"]
                table.setdefault(backing, {})[strategy] = {"first": first, "second": second}
            if args.verbose:
                print(f"lab_faults: {backing:<5} {strategy:<9} {table[backing][strategy]}", file=sys.stderr, flush=True)
    out = {
        "mem": mem,
        "table": table,
        "runs": runs,
        "host": {**environment(), "thp": thp_mode(), "counting": why},
    }
    print(json.dumps(out, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as e:
        print(f"lab_faults: {e}", file=sys.stderr)
        sys.exit(1)
