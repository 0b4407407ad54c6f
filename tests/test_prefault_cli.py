"""``vmm prefault`` and ``vmm run --prefault`` as a user meets them (subprocesses)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from vmm_cli import vmm

from vmm.cli.prefault import Row, format_table, pass_seconds

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {"strategy_requested", "backing", "seconds", "gib_per_s", "first_pass_seconds", "second_pass_seconds"}


def kernel_has_prefault() -> bool:
    from kvm_abi import Cap
    from vmm.kvm import Kvm

    with Kvm() as kvm:
        return bool(kvm.check_extension(Cap.PRE_FAULT_MEMORY))


@pytest.mark.kvm
def test_prefault_command_prints_one_json_row_per_strategy():
    proc = vmm("prefault", "--mem", "64M", "--strategy", "none", "--strategy", "host,auto", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    assert [r["strategy_requested"] for r in rows] == ["none", "host", "auto"]
    for row in rows:
        assert row.keys() >= ROW_KEYS
        assert row["backing"] == "thp"  # the default backing
        assert row["first_pass_seconds"] > 0 and row["second_pass_seconds"] > 0
    none, host, auto = rows
    assert none["seconds"] == 0 and none["gib_per_s"] is None
    assert host["seconds"] > 0 and host["gib_per_s"] > 0
    assert host["resident_bytes"] == auto["resident_bytes"] == 64 << 20
    assert proc.stderr == ""  # silent: no bar with --json or without a terminal


@pytest.mark.kvm
def test_prefault_command_prints_the_table():
    proc = vmm("prefault", "--mem", "32M", "--memory", "anon", "--strategy", "none,emulated")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "anon backing" in lines[0]
    assert lines[1].split()[:6] == ["strategy", "used", "populate", "GiB/s", "1st", "pass"]
    assert lines[2].split()[:2] == ["none", "none"] and lines[3].split()[:2] == ["emulated", "emulated"]


@pytest.mark.kvm
def test_explicit_kernel_strategy_is_a_one_line_error_naming_the_capability():
    if kernel_has_prefault():
        pytest.skip("KVM_CAP_PRE_FAULT_MEMORY is set here")
    for args in (
        ("prefault", "--mem", "16M", "--strategy", "kernel"),
        ("run", "guests/memtouch64.elf", "--mem", "16M", "--prefault", "kernel"),
    ):
        proc = vmm(*args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vmm: ") and "KVM_CAP_PRE_FAULT_MEMORY" in lines[0]
        assert "Traceback" not in proc.stderr


def test_unknown_strategy_is_a_one_line_error():
    proc = vmm("prefault", "--mem", "16M", "--strategy", "fast")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "vmm: unknown prefault strategy 'fast' (choose from auto, kernel, map-memory, emulated, host, none)"
    )


@pytest.mark.kvm
def test_run_json_has_the_prefault_object():
    proc = vmm("run", "guests/memtouch64.elf", "--mem", "64M", "--prefault", "auto", "--arg", "passes=2", "--json")
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    pf = out["prefault"]
    assert {"strategy_used", "reason", "bytes_done", "seconds", "resident_bytes"} <= pf.keys()
    assert pf["bytes_done"] == pf["resident_bytes"] == 64 << 20
    assert pf["strategy_requested"] == "auto" and pf["reason"]
    assert len(pass_seconds([(m["ns"], m["vcpu"], m["value"]) for m in out["marks"]])) == 2


@pytest.mark.kvm
def test_run_prints_the_prefault_summary_on_stderr():
    proc = vmm("run", "guests/memtouch64.elf", "--mem", "32M", "--prefault", "host")
    assert proc.returncode == 1, proc.stderr
    line = next(x for x in proc.stderr.splitlines() if x.startswith("vmm: prefault: "))
    assert "host (asked for host population only" in line and "32.0 MiB resident" in line


def test_pass_times_come_from_the_marks():
    marks = [(1_000, 0, 0x1000), (5_000, 0, 0x2000), (6_000, 0, 0x1001), (6_500, 0, 0x2001), (7_000, 0, 0x1002)]
    assert pass_seconds(marks) == {0: 4e-6, 1: 5e-7}  # pass 2 never ended: not reported


def test_table_relates_each_strategy_to_no_prefault():
    rows = [
        Row("none", "none", "thp", 0.0, None, 2.0, 0.01, 0, ""),
        Row("auto", "emulated", "thp", 0.1, 10.0, 0.02, 0.01, 1 << 30, ""),
    ]
    text = format_table(rows, 1 << 30)
    assert "1.00 GiB guest RAM, thp backing" in text
    auto = next(line for line in text.splitlines() if line.startswith("auto"))
    assert auto.split()[-2:] == ["2.0x", "16.7x"]  # 1st/2nd, and 2.0 s / (0.1 + 0.02) s


def shell(command: str) -> subprocess.CompletedProcess[str]:
    """``command`` in bash from the repository root, ``vmm`` being this interpreter's."""
    script = f'vmm() {{ {shlex.quote(sys.executable)} -m vmm "$@"; }}; {command}'
    return subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_the_table_to_a_closed_pipe_is_the_shells_141_quietly():
    proc = shell("vmm prefault --mem 16M --strategy none | true; echo status=${PIPESTATUS[0]}")
    assert "status=141" in proc.stdout, proc.stderr
    assert proc.stderr == ""


def test_the_table_to_a_full_disk_is_one_line_not_an_internal_error():
    proc = shell("vmm prefault --mem 16M --strategy none --json >/dev/full; echo status=$?")
    assert "status=0" in proc.stdout, proc.stderr  # measured; only the printing failed, and it says so
    assert proc.stderr == "vmm: cannot write to stdout: No space left on device\n"
