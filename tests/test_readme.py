"""The README's Python API example runs as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.kvm
def test_readme_python_example_runs(monkeypatch, tmp_path):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README lost its Python example"
    example = blocks[0]
    # The example checks itself: its asserts are what this test runs (an AssertionError or
    # any other exception from exec fails the test). Without them it would prove nothing.
    checks = [line for line in example.splitlines() if line.lstrip().startswith("assert ")]
    assert len(checks) >= 2, "the README's Python example lost its asserts"
    monkeypatch.chdir(tmp_path)  # outside the repository: the example finds its guest by vmm.guests
    names: dict[str, Any] = {}
    exec(compile(example, "README.md", "exec"), names)
    # And what it left behind is what guests/README.md documents for hello64.elf.
    result = names["result"]
    assert (result.status, result.console) == (1, b"hello from long mode\n")


def test_readme_starts_with_the_two_commands():
    first_block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands[:2] == ["make run", "make test"]
