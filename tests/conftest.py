"""Shared test helpers. Markers and fixtures come from the project's own pytest plugin
(vmm.pytest_plugin, installed through the pytest11 entry point)."""

from __future__ import annotations

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
