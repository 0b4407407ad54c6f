"""vmm.guests finds the bundled images wherever vmm is installed; `vmm run NAME` and the
plugin take a bundled guest's name. (From a wheel outside the checkout: .ci/wheel-check.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmm import guests
from vmm.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["pytester"]


def _images_in_repo() -> list[str]:
    found = [*(ROOT / "guests").glob("*.elf"), *(ROOT / "guests").glob("*.bin"), *(ROOT / "guests/pc").glob("*.elf")]
    return sorted(str(p.relative_to(ROOT / "guests")) for p in found)


def test_names_are_every_image_in_guests_dir():
    assert guests.names() == _images_in_repo()
    assert "hello64.elf" in guests.names() and "pc/mbinfo.elf" in guests.names()
    assert guests.short_names()[: len(guests.names())] == [n.rsplit(".", 1)[0] for n in guests.names()]


@pytest.mark.parametrize("name", ["hello64", "hello64.elf", "hello16", "pc/mbinfo", "pc/mbinfo.elf"])
def test_path_takes_the_name_with_or_without_suffix(name):
    found = guests.path(name)
    expected = ROOT / "guests" / (name if "." in name else name + (".bin" if name == "hello16" else ".elf"))
    assert found.read_bytes() == expected.read_bytes()


def test_unknown_name_is_an_input_error_naming_the_bundled_ones():
    with pytest.raises(InputError, match=r"no bundled guest 'hello65' \(bundled: hello16, .*hello64"):
        guests.path("hello65")
    assert guests.find("hello65") is None
    assert guests.find("../guests/hello64") is None  # names, never paths out of the package


def test_resolve_prefers_an_existing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hello64").write_bytes(b"\xf4")  # a user's own file of the same name wins
    assert guests.resolve("hello64") == "hello64"
    assert guests.resolve("user64") == str(guests.path("user64"))
    with pytest.raises(InputError, match=r"^build/x\.elf: no such file$"):
        guests.resolve("build/x.elf")  # a path: no list of guest names


def _vmm(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmm", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **env},
        timeout=120,
        check=False,
    )


def test_vmm_run_names_a_bundled_guest_from_any_directory(tmp_path):
    done = _vmm(tmp_path, "run", "-q", "hello64")
    assert (done.returncode, done.stdout) == (1, "hello from long mode\n"), done.stderr


def test_vmm_run_unknown_name_is_one_line_and_status_2(tmp_path):
    done = _vmm(tmp_path, "run", "hello65")
    assert done.returncode == 2
    assert done.stderr.startswith("vmm: hello65: no such file, nor a bundled guest (bundled: hello16")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_prefault_finds_memtouch_from_any_directory(tmp_path):
    done = _vmm(tmp_path, "prefault", "--mem", "16M", "--strategy", "host", "--json")
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)["rows"]
    assert row["strategy_used"] == "host" and row["resident_bytes"] == 16 << 20


def test_plugin_offers_bundled_guests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_by_fixture(vmm_guest):
            assert vmm_guest("hello64").name == "hello64.elf"
            assert vmm_guest("pc/mbinfo").read_bytes()[:4] == b"\\x7fELF"

        def test_by_name(machine_factory):
            result = machine_factory("hello64", mem="16M")
            assert (result.status, result.console) == (1, b"hello from long mode\\n")
        """
    )
    result = pytester.runpytest_subprocess("--vmm-backend", "auto")
    result.assert_outcomes(passed=2)
