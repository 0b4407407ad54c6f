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
    # spin64 never ends by itself: a result at all means every vCPU was stopped and joined
    # (a vCPU thread that ignored the stop would make run() raise instead).
    result = machine_factory(guest("spin64.elf"), mem="16M", vcpus=2, timeout=0.5)
    assert result.status == 124
    assert result.reason == "timeout after 0.5 s"
    assert (result.exit_value, result.crash, result.console) == (None, None, b"")


def test_triple_fault_is_reported_with_vcpu_and_rip(machine_factory, guest, vmm_backend):
    result = machine_factory(guest("triple-fault.bin"), mem="16M")
    assert result.console == b"triple fault next\n"
    assert result.status == 4
    assert result.crash is not None and result.crash.vcpu == 0
    assert result.crash.rip is not None


def test_hooks_see_guest_ram_before_boot_and_after_the_run(machine_factory, guest, vmm_backend):
    seen: dict[str, int] = {}

    def before_boot(machine) -> None:
        seen["magic"] = machine.backend.memory.read_u64(0x1000) & 0xFFFFFFFF

    def after_run(machine) -> None:
        # memtouch's single pass wrote gpa + 0 at the start of every page above the image
        seen["page"] = machine.backend.memory.read_u64(0x200000)

    result = machine_factory(guest("memtouch64.elf"), mem="4M", before_boot=before_boot, after_run=after_run)
    assert result.status == 1, result.reason
    assert seen == {"magic": 0x424D4D56, "page": 0x200000}
