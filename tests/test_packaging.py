"""What packaging promises a user: `vmm --version`, unicorn as the `emulator` extra with a
one-line hint when it is missing, the declared license. (The wheel and sdist themselves are
built and used from outside the checkout by .ci/wheel-check.)"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import vmm

ROOT = Path(__file__).resolve().parent.parent
HINT = "pip install 'vmm[emulator]'"
# The interpreter as a user's without the extra: importing unicorn fails as if not installed.
WITHOUT_UNICORN = "import sys; sys.modules['unicorn'] = None; from vmm.cli import main; sys.exit(main(sys.argv[1:]))"


def _vmm(*args: str, hide_unicorn: bool = False, **env: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", WITHOUT_UNICORN] if hide_unicorn else [sys.executable, "-m", "vmm"]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
        check=False,
    )


def test_version_is_the_installed_distributions():
    done = _vmm("--version")
    assert (done.returncode, done.stdout) == (0, f"vmm {importlib.metadata.version('vmm')}\n")
    assert vmm.__version__ == importlib.metadata.version("vmm")


def test_emulator_asked_for_without_unicorn_is_one_line_and_status_2():
    done = _vmm("run", "--backend", "emulator", "hello64", hide_unicorn=True)
    assert done.returncode == 2
    assert done.stderr == f"vmm: the in-process emulator needs the unicorn package: {HINT}\n"


def test_emulator_needed_without_unicorn_says_both_reasons_in_one_line():
    done = _vmm("run", "hello64", hide_unicorn=True, VMM_KVM_DEVICE="/nonexistent/kvm")
    assert done.returncode == 2
    assert done.stderr.startswith("vmm: /nonexistent/kvm: ")
    assert done.stderr.endswith(f"; the in-process emulator needs the unicorn package: {HINT}\n")
    assert done.stderr.count("\n") == 1


def test_caps_without_kvm_or_unicorn_says_what_is_missing():
    done = _vmm("caps", hide_unicorn=True, VMM_KVM_DEVICE="/nonexistent/kvm")
    assert done.returncode == 0
    assert HINT in done.stdout


@pytest.mark.kvm
def test_kvm_needs_no_unicorn():
    done = _vmm("run", "-q", "hello64", hide_unicorn=True)
    assert (done.returncode, done.stdout, done.stderr) == (1, "hello from long mode\n", "")


def test_unicorn_is_the_emulator_extra_and_the_license_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("unicorn") for d in project["dependencies"])
    assert any(d.startswith("unicorn") for d in project["optional-dependencies"]["emulator"])
    assert "vmm[emulator]" in project["optional-dependencies"]["dev"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
    assert importlib.metadata.metadata("vmm")["License-Expression"] == "MIT"
