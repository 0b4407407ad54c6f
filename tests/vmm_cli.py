"""Run the `vmm` command as a user would: a subprocess of this interpreter, in the repo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def vmm(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m vmm ARGS...`` from the repository root, with ``env`` added to ours; stdin
    is ``input`` through a pipe, else /dev/null (never the terminal pytest runs on: vmm
    would feed it to the guest)."""
    return subprocess.run(
        [sys.executable, "-m", "vmm", *args],
        input=input,
        stdin=subprocess.DEVNULL if input is None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )
