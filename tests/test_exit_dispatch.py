"""``vmm.exits.dispatch`` with synthetic exits, without KVM or the emulator (as Firecracker
tests ``handle_kvm_exit``): the devices on a real bus see what each exit asks, and every
other exit ends the run with the outcome both backends report."""

from __future__ import annotations

import pytest

from kvm_abi import InternalError as Suberror
from kvm_abi import SystemEvent as SysEvent
from vmm import exits as ex
from vmm.backends.base import ExitCounts
from vmm.devices import Bus, ExitPort, Marker, Serial16550
from vmm.devices.exit_port import EXIT_PORT
from vmm.devices.marker import MARK_PORT
from vmm.errors import UnhandledAccess

COM1 = 0x3F8
MMIO_BASE = 0xD000_0000


class Register:
    """An MMIO device with one byte-wide register at offset 0 (fills only the first byte of
    a wider read) that remembers what was stored into it."""

    name = "register"

    def __init__(self) -> None:
        self.value = 0x5A
        self.stores: list[tuple[int, bytes]] = []

    def read(self, offset: int, data: memoryview) -> None:
        if offset == 0:
            data[0] = self.value

    def write(self, offset: int, data: memoryview) -> None:
        self.stores.append((offset, bytes(data)))


@pytest.fixture
def machine_bus() -> tuple[Bus, dict[str, object]]:
    out = bytearray()
    exits: list[int] = []
    bus = Bus()
    marker = Marker()
    register = Register()
    bus.register_pio(COM1, 8, Serial16550(out.extend))
    bus.register_pio(EXIT_PORT, 4, ExitPort(exits.append))
    bus.register_pio(MARK_PORT, 4, marker)
    bus.register_mmio(MMIO_BASE, 0x1000, register)
    return bus, {"console": out, "exits": exits, "marker": marker, "register": register}


def view(data: bytes) -> memoryview:
    return memoryview(bytearray(data))


def test_port_writes_reach_their_devices(machine_bus):
    bus, dev = machine_bus
    assert ex.dispatch(bus, ex.IoOut(COM1, 1, 1, view(b"h"))) is ex.Next.RUN
    assert ex.dispatch(bus, ex.IoOut(COM1, 1, 2, view(b"i\n"))) is ex.Next.RUN  # rep outsb
    assert ex.dispatch(bus, ex.IoOut(EXIT_PORT, 1, 1, view(b"\x07"))) is ex.Next.RUN
    assert ex.dispatch(bus, ex.IoOut(MARK_PORT, 4, 1, view((0x1234).to_bytes(4, "little")))) is ex.Next.RUN
    assert bytes(dev["console"]) == b"hi\n"
    assert dev["exits"] == [7]
    assert [value for _, _, value in dev["marker"].marks] == [0x1234]


def test_port_reads_fill_the_exit_data(machine_bus):
    bus, _ = machine_bus
    ex.dispatch(bus, ex.IoOut(MARK_PORT, 4, 1, view(b"\x01\x00\x00\x00")))
    data = view(b"\xee" * 4)
    assert ex.dispatch(bus, ex.IoIn(MARK_PORT, 4, 1, data)) is ex.Next.RUN
    assert bytes(data) == (1).to_bytes(4, "little")  # the marker reads its count
    lsr = view(b"\x00")
    ex.dispatch(bus, ex.IoIn(COM1 + 5, 1, 1, lsr))
    assert lsr[0] & 0x20  # THR empty: the 16550 answered, not the all-ones of no device


def test_unclaimed_ports_read_all_ones_and_are_counted(machine_bus):
    bus, _ = machine_bus
    data = view(b"\x00\x00")
    ex.dispatch(bus, ex.IoIn(0x1234, 2, 1, data))
    ex.dispatch(bus, ex.IoOut(0x1234, 1, 1, view(b"x")))
    assert bytes(data) == b"\xff\xff"
    assert bus.unhandled == 2


def test_strict_bus_raises_for_an_unclaimed_access():
    with pytest.raises(UnhandledAccess, match="0x1234"):
        ex.dispatch(Bus(strict=True), ex.IoOut(0x1234, 1, 1, view(b"x")))


def test_mmio_read_zero_fills_what_the_device_leaves(machine_bus):
    """KVM leaves the previous exit's bytes in kvm_run.mmio.data: a device filling one byte
    of a 4-byte read must hand the guest zeros in the other three."""
    bus, _ = machine_bus
    stale = view(b"\xa5\xa5\xa5\xa5")
    assert ex.dispatch(bus, ex.MmioRead(MMIO_BASE, stale)) is ex.Next.RUN
    assert bytes(stale) == b"\x5a\x00\x00\x00"


def test_mmio_write_reaches_the_device_at_its_offset(machine_bus):
    bus, dev = machine_bus
    assert ex.dispatch(bus, ex.MmioWrite(MMIO_BASE + 8, view(b"\x01\x02"))) is ex.Next.RUN
    assert dev["register"].stores == [(8, b"\x01\x02")]
    unclaimed = view(b"\x00" * 4)
    ex.dispatch(bus, ex.MmioRead(MMIO_BASE + 0x2000, unclaimed))
    assert bytes(unclaimed) == b"\xff" * 4


@pytest.mark.parametrize(
    ("exit_", "kind", "detail"),
    [
        (ex.HLT, ex.Ending.HALTED, "halted"),
        (ex.SHUTDOWN, ex.Ending.CRASHED, "triple fault (shutdown)"),
        (ex.FailEntry(0x21, 3), ex.Ending.CRASHED, "VM entry failed (hardware reason 0x21 on host cpu 3)"),
        (
            ex.InternalError(int(Suberror.EMULATION), (1, 2), b"\x0f\x0b"),
            ex.Ending.CRASHED,
            "KVM internal error: instruction emulation failed (suberror 1), instruction bytes 0f 0b",
        ),
        (ex.SystemEvent(int(SysEvent.CRASH), ()), ex.Ending.CRASHED, "system event: crash"),
        (ex.SystemEvent(int(SysEvent.SHUTDOWN), ()), ex.Ending.HALTED, "system event: shutdown"),
        (
            ex.MemoryFault(8, 0x1000, 0x1000),
            ex.Ending.CRASHED,
            "memory fault at gpa 0x1000 size 0x1000 flags 0x8",
        ),
        (ex.RunFailed(14, "KVM_RUN: Bad address"), ex.Ending.CRASHED, "KVM_RUN: Bad address"),
        (ex.Unsupported(9999), ex.Ending.CRASHED, "unhandled exit reason 9999 (unknown)"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else None,
)
def test_other_exits_end_the_run(machine_bus, exit_, kind, detail):
    bus, dev = machine_bus
    outcome = ex.dispatch(bus, exit_)
    assert isinstance(outcome, ex.VcpuOutcome)
    assert (outcome.kind, outcome.detail, outcome.rip) == (kind, detail, None)
    assert outcome.triple_fault is (exit_ is ex.SHUTDOWN)
    assert bytes(dev["console"]) == b"" and bus.unhandled == 0  # no device was touched


def test_an_interrupted_run_asks_the_loop_to_look_at_its_stop_flag(machine_bus):
    bus, _ = machine_bus
    assert ex.dispatch(bus, ex.INTERRUPTED) is ex.Next.CHECK_STOP


def test_an_outcome_is_located_by_the_backend():
    located = ex.TRIPLE_FAULT.at(0x7C00)
    assert (located.kind, located.rip, located.triple_fault) == (ex.Ending.CRASHED, 0x7C00, True)
    assert ex.TRIPLE_FAULT.rip is None  # the shared constant is unchanged


def test_exits_are_counted_by_kind():
    counts = ExitCounts()
    for exit_ in (
        ex.IoOut(1, 1, 1, view(b"a")),
        ex.IoIn(1, 1, 1, view(b"a")),
        ex.MmioRead(0, view(b"a")),
        ex.HLT,
        ex.INTERRUPTED,
        ex.SHUTDOWN,
        ex.Unsupported(1),
    ):
        counts.record(exit_)
    assert counts.as_dict() == {"io": 2, "mmio": 1, "hlt": 1, "interrupted": 1, "other": 2}
    assert counts.total == 7


def test_endings_print_as_their_names():
    assert str(ex.Ending.CRASHED) == "crashed"
    assert ex.Ending.HALTED == "halted"
