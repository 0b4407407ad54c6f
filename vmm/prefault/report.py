"""What a pre-population did: :class:`PrefaultReport` (``vmm run --json``'s ``prefault``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Step:
    """One phase of a population (``host``, ``kernel``, ``map-memory``, ``emulated``)."""

    name: str
    bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "bytes_done": self.bytes, "seconds": round(self.seconds, 6)}


@dataclass(frozen=True)
class PrefaultReport:
    """The outcome of one :func:`vmm.prefault.prefault_memory` call.

    ``requested`` is the strategy asked for; ``strategy`` the one that ran (``auto``
    resolves to ``host+kernel``, ``host+map-memory`` or ``emulated``); ``reason`` says
    why in one sentence. ``resident_bytes`` is measured with mincore(2) over the host
    mappings of the requested ranges after the population; ``resident_before`` before it.
    ``limits`` states plainly what the strategy could not do.
    """

    requested: str
    strategy: str
    reason: str
    bytes_requested: int
    bytes_done: int
    seconds: float
    resident_before: int
    resident_bytes: int
    threads: int
    backing: str = ""
    steps: tuple[Step, ...] = ()
    limits: tuple[str, ...] = field(default=())

    @property
    def fell_back(self) -> bool:
        """True when ``auto`` could not use a kernel call and populated in-process."""
        return self.requested == "auto" and "kernel" not in self.strategy and "map-memory" not in self.strategy

    @property
    def gib_per_s(self) -> float | None:
        """Throughput of the whole population (None when nothing was timed)."""
        if self.seconds <= 0 or self.bytes_done <= 0:
            return None
        return self.bytes_done / self.seconds / (1 << 30)

    def to_json(self) -> dict[str, Any]:
        """The ``prefault`` object of ``vmm run --json`` (``prefault_report`` in
        ``vmm/schema/run.json``: ``strategy_requested``/``strategy_used``, ``bytes_*``)."""
        rate = self.gib_per_s
        return {
            "strategy_requested": self.requested,
            "strategy_used": self.strategy,
            "reason": self.reason,
            "bytes_requested": self.bytes_requested,
            "bytes_done": self.bytes_done,
            "seconds": round(self.seconds, 6),
            "gib_per_s": None if rate is None else round(rate, 3),
            "resident_bytes_before": self.resident_before,
            "resident_bytes": self.resident_bytes,
            "threads": self.threads,
            "backing": self.backing,
            "steps": [s.to_json() for s in self.steps],
            "limits": list(self.limits),
        }

    def summary(self) -> str:
        """One line for a terminal, e.g.
        ``auto -> emulated (...): 1.00 GiB in 0.131 s (7.63 GiB/s), 1.00 GiB resident (was 0.0 MiB)``."""
        head = self.strategy if self.requested == self.strategy else f"{self.requested} -> {self.strategy}"
        rate = self.gib_per_s
        speed = f" ({rate:.2f} GiB/s)" if rate is not None else ""
        return (
            f"{head} ({self.reason}): {_gib(self.bytes_done)} in {self.seconds:.3f} s{speed}, "
            f"{_gib(self.resident_bytes)} resident (was {_gib(self.resident_before)})"
        )


def _gib(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.1f} MiB"
