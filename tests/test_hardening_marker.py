"""The marker port is bounded (issue 9, defect 5): a guest that writes it in a loop cannot
grow host memory; what was not kept is counted and reported."""

from __future__ import annotations

import struct
import threading

import pytest

from vmm import Machine, MachineConfig
from vmm.devices.marker import MARK_PORT, MAX_MARKS, Marker


def mark(marker: Marker, value: int) -> None:
    marker.write(0, memoryview(bytearray(struct.pack("<I", value))))


def count(marker: Marker) -> int:
    data = bytearray(4)
    marker.read(0, memoryview(data))
    return struct.unpack("<I", data)[0]


def test_marks_beyond_the_limit_are_counted_not_kept():
    marker = Marker(limit=3)
    for value in range(10):
        mark(marker, value)
    assert [m[2] for m in marker.marks] == [0, 1, 2]  # the first ones are kept
    assert marker.dropped == 7
    assert count(marker) == 3  # the guest sees the count stop growing


def test_the_bound_holds_under_concurrent_vcpus():
    marker = Marker(limit=1000)

    def writer(index: int) -> None:
        marker.bind_vcpu(index)
        for value in range(500):
            mark(marker, value)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(marker.marks) == 1000 and marker.dropped == 8 * 500 - 1000


def test_the_default_limit_is_documented_and_modest():
    assert 0 < Marker().limit <= 1 << 20  # README: "the marker port at most 1 M marks"


FLOOD = MAX_MARKS + 1234


def flood_image() -> bytes:
    """Long-mode code: FLOOD writes to the marker port, then exit value 0."""
    return (
        b"\xb9" + struct.pack("<I", FLOOD)  # mov ecx, FLOOD
        + b"\xba" + struct.pack("<I", MARK_PORT)  # mov edx, 0x500
        + b"\xef"  # 1: out dx, eax
        + b"\xff\xc9"  # dec ecx
        + b"\x75\xfb"  # jnz 1b
        + b"\xb0\x00\xe6\xf4"  # mov al, 0; out 0xf4, al
        + b"\xf4"  # hlt
    )  # fmt: skip


@pytest.mark.parametrize(
    "backend", [pytest.param("kvm", marks=pytest.mark.kvm), pytest.param("emulator", marks=pytest.mark.emulator)]
)
def test_a_guest_flooding_the_marker_port_is_bounded_and_reported(tmp_path, backend):
    image = tmp_path / "flood.bin"
    image.write_bytes(flood_image())
    config = MachineConfig.parse(image=str(image), mem="16M", mode="long", backend=backend)
    result = Machine(config).run(timeout=300)
    assert result.status == 1, result.reason
    assert len(result.marks) == MAX_MARKS
    assert result.marks_dropped == FLOOD - MAX_MARKS
    assert f"{FLOOD - MAX_MARKS} marks dropped" in result.summary()
    assert result.to_json()["marks_dropped"] == FLOOD - MAX_MARKS
