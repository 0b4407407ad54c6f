"""The names of the pre-population strategies: a leaf module, so that the config and the
CLI can check a name without importing the machinery of :mod:`vmm.prefault`."""

from __future__ import annotations

from vmm.errors import InputError

STRATEGIES = ("auto", "kernel", "map-memory", "emulated", "host", "none")


def parse_strategy(name: str) -> str:
    """The strategy name, or InputError listing the choices."""
    if name not in STRATEGIES:
        raise InputError(f"unknown prefault strategy {name!r} (choose from {', '.join(STRATEGIES)})")
    return name
