"""Shared test helpers. Markers and fixtures come from the project's own pytest plugin
(vmm.pytest_plugin, installed through the pytest11 entry point)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests"


@pytest.fixture
def guest() -> object:
    """guest("hello64.elf") -> absolute path of a bundled guest image."""

    def path(name: str) -> str:
        p = GUESTS / name
        assert p.exists(), f"bundled guest {name} is missing"
        return str(p)

    return path


@pytest.fixture(scope="session")
def rebuilt_guests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """guests/ rebuilt from its sources with the Makefile's rules, in a scratch copy
    (committed images left out): the folder of the fresh images. Built once a session."""
    for tool in ("as", "ld", "make"):
        if shutil.which(tool) is None:
            pytest.skip(f"rebuilding guests needs GNU {tool}")
    work = tmp_path_factory.mktemp("rebuild")
    shutil.copy(ROOT / "Makefile", work / "Makefile")
    shutil.copytree(GUESTS, work / "guests", ignore=shutil.ignore_patterns("build", "*.elf", "*.bin"))
    subprocess.run(["make", "-s", "guests"], cwd=work, check=True, capture_output=True, timeout=120)
    return work / "guests"
