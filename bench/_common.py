"""Helpers shared by the benchmark scripts in ``bench/``: paths, the host environment that
every result records (style.md P20), and small statistics."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
"""The repository root (bench/ is one level below it)."""


class BenchError(Exception):
    """A benchmark run that failed or produced a wrong result: an error, never a number."""


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" if it has none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def kvm_module() -> str:
    """Which KVM backend module is loaded (kvm_pvm, kvm_intel, kvm_amd), with tdp_mmu if known."""
    loaded = [name for name in ("kvm_pvm", "kvm_intel", "kvm_amd") if os.path.isdir(f"/sys/module/{name}")]
    text = "+".join(loaded) or "none"
    try:
        with open("/sys/module/kvm/parameters/tdp_mmu", encoding="ascii") as f:
            text += f" (tdp_mmu={f.read().strip()})"
    except OSError:
        pass
    return text


def environment() -> dict[str, Any]:
    """Kernel, CPU, Python, cffi and kvm_abi facts to store next to every result."""
    import cffi

    import kvm_abi

    return {
        "kernel": platform.release(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "kvm": kvm_module(),
        "python": platform.python_version(),
        "cffi": cffi.__version__,
        "kvm_abi_compiled": bool(kvm_abi.COMPILED),
    }


def median(values: Sequence[float]) -> float:
    """The median; BenchError for no values."""
    if not values:
        raise BenchError("no samples")
    return float(statistics.median(values))
