"""Every bundled guest runs on every backend with the documented console and status."""

from __future__ import annotations

import pytest

HELLO = [
    ("hello16.bin", b"hello from real mode\n", "real"),
    ("hello32.elf", b"hello from protected mode\n", "protected"),
    ("hello64.elf", b"hello from long mode\n", "long"),
    ("user64.elf", b"hello from user mode\n", "user"),
]


@pytest.mark.parametrize(("image", "greeting", "mode"), HELLO)
def test_hello_guests_greet_and_exit_zero(machine_factory, guest, vmm_backend, image, greeting, mode):
    result = machine_factory(guest(image), mem="16M")
    assert result.console == greeting
    assert result.exit_value == 0
    assert result.status == 1, result.reason
    assert result.mode == mode


def test_smp_guest_prints_every_vcpu(machine_factory, guest, vmm_backend):
    result = machine_factory(guest("smp64.elf"), mem="16M", vcpus=3)
    lines = sorted(result.console.decode().splitlines())
    assert lines == ["cpu 0 of 3", "cpu 1 of 3", "cpu 2 of 3"]
    assert result.status == 1, result.reason


def test_spin_guest_is_stopped_by_the_timeout(machine_factory, guest, vmm_backend):
    result = machine_factory(guest("spin64.elf"), mem="16M", timeout=0.5)
    assert result.status == 124
    assert "timeout" in result.reason
    assert result.seconds < 0.5 + 1.0


def test_triple_fault_is_reported_with_vcpu_and_rip(machine_factory, guest, vmm_backend):
    result = machine_factory(guest("triple-fault.bin"), mem="16M")
    assert result.console == b"triple fault next\n"
    assert result.status == 4
    assert result.crash is not None and result.crash.vcpu == 0
    assert result.crash.rip is not None
