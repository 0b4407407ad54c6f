"""Two details of the KVM run loop that no other test reaches (issue 9, "One exit path"):
each test here fails when its detail is removed from vmm/backends/kvm.py.

- ``run.immediate_exit = 0`` after KVM_RUN returns EINTR: a kick that is not a stop (one
  that lands before the vCPU enters KVM_RUN, as the idle watch's probes can) must cost one
  EINTR, not leave every later KVM_RUN returning EINTR at once, forever.
- The zero-fill of an MMIO read's data before the bus sees it: KVM leaves the previous
  exit's bytes in ``kvm_run.mmio.data``, and a device that fills only part of a read (a
  byte-wide register read with a wider access) must not hand those bytes to the guest.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vmm.devices.marker import MARK_PORT

HELLO = b"hello from long mode\n"  # guests/README.md: hello64.elf's console, exit value 0


@pytest.mark.kvm
def test_a_kick_that_is_not_a_stop_costs_one_eintr_and_the_guest_runs_on(machine_factory, guest):
    def kick_before_the_first_run(machine) -> None:
        for runner in machine.vcpus:
            runner.kick()  # immediate_exit = 1; no stop requested

    result = machine_factory(
        guest("hello64.elf"), mem="16M", backend="kvm", timeout=20, before_boot=kick_before_the_first_run
    )
    # The kick reached KVM_RUN (else this test would prove nothing) ...
    assert result.exits[0]["interrupted"] >= 1, result.exits
    # ... and the guest then ran to its own end; a loop that never cleared immediate_exit
    # spins on EINTR until the timeout ends it (status 124).
    assert (result.status, result.console) == (1, HELLO), result.reason


MMIO_BASE = 0xD000_0000  # in the 3-4 GiB hole: never RAM (guests/README.md, memory layout)
STALE = 0xA5A5_A5A5  # what the guest stores first: the bytes KVM leaves in kvm_run.mmio.data


def mmio_image(tmp_path: Path) -> str:
    """Long mode, flat at 0x100000: store STALE to MMIO_BASE, load 4 bytes back from it, write
    the loaded value to the marker port, exit with value 0."""
    code = (
        b"\xbb" + struct.pack("<I", MMIO_BASE)  # mov ebx, MMIO_BASE
        + b"\xc7\x03" + struct.pack("<I", STALE)  # mov dword [rbx], STALE   (MMIO write exit)
        + b"\x8b\x03"  # mov eax, [rbx]   (MMIO read exit, 4 bytes)
        + b"\xba" + struct.pack("<I", MARK_PORT)  # mov edx, 0x500
        + b"\xef"  # out dx, eax   (the loaded value becomes a mark)
        + b"\xb0\x00\xe6\xf4"  # mov al, 0; out 0xf4, al
        + b"\xf4"  # hlt
    )  # fmt: skip
    path = tmp_path / "mmio-stale.bin"
    path.write_bytes(code)
    return str(path)


class ByteRegister:
    """A device with one byte-wide register: a read fills ``fill`` (the bytes it knows, from
    the first); writes are ignored."""

    name = "byte-register"

    def __init__(self, fill: bytes) -> None:
        self.fill = fill

    def read(self, offset: int, data: memoryview) -> None:
        data[: len(self.fill)] = self.fill

    def write(self, offset: int, data: memoryview) -> None:
        pass


@pytest.mark.parametrize(("fill", "loaded"), [(b"\x11", 0x11), (b"", 0)], ids=["one-byte", "nothing"])
def test_an_mmio_read_the_device_fills_in_part_reads_zeros_in_the_rest(
    machine_factory, vmm_backend, tmp_path, fill, loaded
):
    def attach(machine) -> None:
        machine.bus.register_mmio(MMIO_BASE, 0x1000, ByteRegister(fill))

    result = machine_factory(mmio_image(tmp_path), mem="16M", mode="long", timeout=30, before_boot=attach)
    assert result.status == 1, result.reason
    assert result.exits[0]["mmio"] >= 2, result.exits  # the store and the load reached the bus
    values = [value for _, _, value in result.marks]
    assert values == [loaded], f"the guest loaded {[hex(v) for v in values]}; stale bytes were {STALE:#x}"
