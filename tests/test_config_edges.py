"""Every number a user gives is checked at the edge: finite, ASCII, in range (issue 9)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from vmm_cli import vmm

from vmm.config import MachineConfig, parse_count, parse_number, parse_size, parse_timeout
from vmm.cpu.layout import CpuMode
from vmm.errors import InputError
from vmm.machine import Machine
from vmm.memory import Backing


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "1e400", "1e10", "9223372037", "-1", "\u0663", "", "1s"])
def test_impossible_timeouts_are_refused(text):
    with pytest.raises(InputError, match="timeout"):
        parse_timeout(text)


@pytest.mark.parametrize(("text", "seconds"), [("0", 0.0), ("2.5", 2.5), ("60", 60.0), (" 1 ", 1.0)])
def test_sane_timeouts_are_taken(text, seconds):
    assert parse_timeout(text) == seconds


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e400, -1.0])
def test_machine_run_refuses_an_impossible_timeout_before_building(guest, value):
    machine = Machine(MachineConfig.parse(image=guest("hello64.elf"), backend="emulator"))
    with pytest.raises(InputError, match="timeout"):
        machine.run(timeout=value)
    assert machine.backend is None  # refused before any fd or mapping existed


@pytest.mark.parametrize("text", ["\u0666\u0664M", "\uff16\uff14M", "64\u0664M"])
def test_sizes_take_ascii_digits_only(text):
    with pytest.raises(InputError, match="bad size"):
        parse_size(text)


def test_counts_take_ascii_digits_only():
    with pytest.raises(InputError, match="--vcpus"):
        parse_count("\u0662", "--vcpus", 1, 64)
    with pytest.raises(InputError, match="between 1 and 64"):
        parse_count("65", "--vcpus", 1, 64)
    assert parse_count("2", "--vcpus", 1, 64) == 2


@pytest.mark.parametrize("text", [hex(1 << 64), str(1 << 70), "\u0660x10"])
def test_addresses_above_64_bits_or_not_ascii_are_refused(text):
    with pytest.raises(InputError, match="entry"):
        parse_number(text, "entry address")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--timeout", "inf"),
        ("--timeout", "nan"),
        ("--mem", "\u0666\u0664M"),
        ("--vcpus", "\u0662"),
        ("--entry", hex(1 << 64)),
    ],
)
def test_cli_refuses_with_one_line_and_status_2(guest, option, value):
    proc = vmm("run", guest("hello64.elf"), option, value)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmm: "), proc.stderr
    assert "Traceback" not in proc.stderr


def test_teardown_waits_for_running_vcpus_whatever_raised(guest, vmm_backend, monkeypatch):
    """An error while vCPU threads run (here: in the wait for the end) must stop and join them
    before guest RAM and kvm_run are unmapped: the process survives and the error surfaces."""
    import threading

    def broken_wait(self, threads, started, timeout):
        assert any(t.is_alive() for t in threads)  # the guest (a spin loop) is running
        raise RuntimeError("failure while the guest runs")

    monkeypatch.setattr(Machine, "_wait", broken_wait)
    machine = Machine(MachineConfig.parse(image=guest("spin64.elf"), mem="16M", backend=vmm_backend))
    with pytest.raises(RuntimeError, match="while the guest runs"):
        machine.run(timeout=30)
    assert not [t for t in threading.enumerate() if t.name.startswith("vcpu-")]
    assert machine.backend is not None and machine.stop.requested


def test_the_dataclass_takes_exact_types_and_parse_takes_what_users_type(guest):
    with pytest.raises(InputError, match=r"MachineConfig.mem = '64M' is not of its type .*parse"):
        MachineConfig(image=guest("hello64.elf"), mem="64M")  # type: ignore[arg-type]
    config = MachineConfig.parse(guest("hello64.elf"), mem="16M", vcpus="2", mode="long", entry="0x100000")
    assert (config.mem, config.vcpus, config.entry) == (16 << 20, 2, 0x100000)
    assert config.mode is CpuMode.LONG and config.memory is Backing.THP
    assert MachineConfig(image=config.image, mem=16 << 20, vcpus=2, mode=CpuMode.LONG) == replace(config, entry=None)
