"""Coalesced port writes (KVM_CAP_COALESCED_PIO): devices declare the registers, the bus
checks every replayed write, the KVM backend drains the VM's ring at the next exit."""

from __future__ import annotations

import struct

import pytest

import kvm_abi as abi
from kvm_abi import Cap, ffi
from vmm import Machine, MachineConfig
from vmm.backends.kvm_coalesced import CoalescedRing
from vmm.devices import Bus, Marker, PostCode
from vmm.devices.marker import MARK_PORT
from vmm.devices.post import POST_PORT
from vmm.errors import InputError

MARKS = 1000  # more than the ring holds (170): the ring fills and a write exits


def marker_guest(n: int) -> bytes:
    """64-bit flat image: writes 1..n to the marker port, then 0 to the exit port."""
    return (
        b"\xb9" + struct.pack("<I", n)  # mov ecx, n
        + b"\x31\xc0"  # xor eax, eax
        + b"\x66\xba\x00\x05"  # mov dx, 0x500 (the marker port)
        + b"\xff\xc0"  # loop: inc eax
        + b"\xef"  # out dx, eax
        + b"\xff\xc9"  # dec ecx
        + b"\x75\xf9"  # jnz loop
        + b"\x31\xc0"  # xor eax, eax
        + b"\xe6\xf4"  # out 0xf4, al (exit value 0: status 1)
        + b"\xf4"  # hlt
    )  # fmt: skip


def kvm_coalesces_ports() -> bool:
    from vmm.kvm import Kvm

    with Kvm() as kvm, kvm.create_vm() as vm:
        return bool(vm.check_extension(Cap.COALESCED_MMIO) and vm.check_extension(Cap.COALESCED_PIO))


def test_the_ring_holds_what_the_kernel_macro_says():
    ring, entry = ffi.sizeof("struct kvm_coalesced_mmio_ring"), ffi.sizeof("struct kvm_coalesced_mmio")
    assert abi.KVM_COALESCED_MMIO_MAX == (abi.PAGE_SIZE - ring) // entry == 170


def _bus() -> tuple[Bus, PostCode, Marker]:
    bus, post, marker = Bus(), PostCode(), Marker()
    bus.register_pio(POST_PORT, PostCode.WIDTH, post)
    bus.register_pio(MARK_PORT, Marker.WIDTH, marker)
    return bus, post, marker


def test_devices_declare_their_coalescible_registers():
    bus, _, _ = _bus()
    assert bus.coalesce_ports(["post-code"]) == [(POST_PORT, 1)]
    bus, _, _ = _bus()
    assert bus.coalesce_ports(["post-code", "marker"]) == [(POST_PORT, 1), (MARK_PORT, 4)]
    assert Bus().coalesce_ports(["marker"]) == []


def test_replayed_writes_are_checked():
    bus, post, marker = _bus()
    bus.coalesce_ports(["post-code", "marker"])
    bus.coalesced_write(POST_PORT, memoryview(b"\x42"))
    bus.coalesced_write(MARK_PORT, memoryview(struct.pack("<I", 7)))
    assert (post.last, post.writes) == (0x42, 1)
    assert [(vcpu, value) for _, vcpu, value in marker.marks] == [(-1, 7)]
    assert bus.coalesced_writes == 2
    refused = [
        (0x3F8, b"A"),  # a port nobody coalesces
        (POST_PORT, b""),  # no bytes
        (MARK_PORT, b"\0" * 9),  # more than 8
        (POST_PORT, b"\0\0"),  # runs past the POST register
        (MARK_PORT + 2, b"\0\0\0\0"),  # runs past the marker
    ]
    for port, data in refused:
        bus.coalesced_write(port, memoryview(data))
    assert bus.coalesced_refused == len(refused)
    assert post.writes == 1 and len(marker.marks) == 1


def _ring(entries: list[tuple[int, int, int, bytes]], first: int = 0) -> tuple[object, CoalescedRing]:
    page = ffi.new("char[]", abi.PAGE_SIZE)
    ring = ffi.cast("struct kvm_coalesced_mmio_ring *", page)
    i = first
    for pio, addr, length, data in entries:
        e = ring.coalesced_mmio[i]
        e.pio, e.phys_addr, e.len = pio, addr, length
        ffi.memmove(e.data, data.ljust(8, b"\0"), 8)
        i = (i + 1) % abi.KVM_COALESCED_MMIO_MAX
    ring.first, ring.last = first, i
    return page, CoalescedRing(ring)


def test_drain_replays_in_order_and_wraps():
    bus, _, marker = _bus()
    bus.coalesce_ports(["post-code", "marker"])
    entries = [(1, MARK_PORT, 4, struct.pack("<I", v)) for v in range(1, 6)]
    keep, drained = _ring(entries, first=abi.KVM_COALESCED_MMIO_MAX - 2)  # wraps after two
    drained.drain(bus)
    assert [value for _, _, value in marker.marks] == [1, 2, 3, 4, 5]
    assert drained.ring.first == drained.ring.last == 3
    drained.drain(bus)  # empty: nothing happens
    assert len(marker.marks) == 5 and bus.coalesced_refused == 0
    del keep


def test_drain_refuses_what_the_guest_could_not_have_asked_for():
    bus, post, _ = _bus()
    bus.coalesce_ports(["post-code"])
    entries = [
        (0, POST_PORT, 1, b"\x01"),
        (1, POST_PORT, 0, b""),
        (1, POST_PORT, 200, b"\x02"),
        (1, POST_PORT, 1, b"\x03"),
    ]
    keep, drained = _ring(entries)
    drained.drain(bus)
    assert (post.last, post.writes, bus.coalesced_refused) == (3, 1, 3)
    drained.ring.last = abi.KVM_COALESCED_MMIO_MAX + 5  # a corrupt index: counted, nothing read
    drained.drain(bus)
    assert bus.coalesced_refused == 4 and post.writes == 1
    del keep


def test_only_coalescible_devices_can_be_named():
    with pytest.raises(InputError, match="cannot coalesce 'serial'"):
        MachineConfig(image="guests/hello64.elf", coalesce=("serial",))


def _marker_run(tmp_path, backend: str, coalesce: tuple[str, ...]) -> tuple[list[tuple[int, int, int]], dict[str, int]]:
    image = tmp_path / "marks.bin"
    image.write_bytes(marker_guest(MARKS))
    config = MachineConfig.parse(image=str(image), mode="long", backend=backend, coalesce=coalesce)
    result = Machine(config).run(timeout=30)
    assert result.status == 1, result.reason
    return result.marks, result.exits[0]


@pytest.mark.kvm
@pytest.mark.parametrize("coalesce", [(), ("marker",)], ids=["off", "on"])
def test_marks_arrive_complete_and_in_order_on_kvm(tmp_path, coalesce):
    marks, exits = _marker_run(tmp_path, "kvm", coalesce)
    assert [value for _, _, value in marks] == list(range(1, MARKS + 1))
    if coalesce and kvm_coalesces_ports():
        assert exits["io"] < MARKS // 10, exits  # most writes never exited
        assert any(vcpu == -1 for _, vcpu, _ in marks)  # replayed from the ring
    else:
        assert exits["io"] == MARKS + 1, exits


@pytest.mark.kvm
def test_post_writes_are_all_counted_when_coalesced():
    if not kvm_coalesces_ports():
        pytest.skip("requires KVM_CAP_COALESCED_PIO (not reported by this kernel)")
    seen: dict[str, int] = {}

    def after_run(machine: Machine) -> None:
        post = next(d for _, _, d in machine.bus._pio if d.name == "post-code")
        seen.update(writes=post.writes, replayed=machine.bus.coalesced_writes)

    config = MachineConfig.parse(image="guests/pio-loop64.elf", args={"count": "2000"}, backend="kvm")
    result = Machine(config, after_run=after_run).run(timeout=30)
    assert result.status == 1, result.reason
    assert seen["writes"] == 2000 and seen["replayed"] > 1900
    assert result.exits[0]["io"] < 100


def test_the_emulator_ignores_coalescing(tmp_path):
    marks, _ = _marker_run(tmp_path, "emulator", ("marker",))
    assert [value for _, _, value in marks] == list(range(1, MARKS + 1))


def test_a_config_file_names_the_coalesced_devices(tmp_path):
    from vmm.config_file import load_config_file

    path = tmp_path / "vm.toml"
    path.write_text('image = "guests/hello64.elf"\ncoalesce = ["post-code", "marker"]\n')
    fields = load_config_file(path)
    assert fields["coalesce"] == ("post-code", "marker")
    assert MachineConfig.parse(**fields).coalesce == ("post-code", "marker")
    path.write_text('image = "guests/hello64.elf"\ncoalesce = "marker"\n')
    with pytest.raises(InputError, match="coalesce must be"):
        load_config_file(path)
