"""Devices and the bus, driven directly (no KVM)."""

from __future__ import annotations

import pytest

from vmm.devices import Bus, ExitPort, Marker, PostCode, Serial16550
from vmm.devices.serial import LCR, LSR, LSR_TEMT, LSR_THRE, MSR
from vmm.errors import BusError, UnhandledAccess


def mv(data: bytes) -> memoryview:
    return memoryview(bytearray(data))


@pytest.fixture
def console():
    out = bytearray()
    bus = Bus()
    bus.register_pio(0x3F8, 8, Serial16550(out.extend))
    return bus, out


def test_serial_transmits_and_reports_transmitter_empty(console):
    bus, out = console
    bus.pio_write(0x3F8, 1, mv(b"A"))
    lsr = mv(b"\0")
    bus.pio_read(0x3F8 + LSR, 1, lsr)
    assert out == b"A"
    assert lsr[0] & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT


def test_serial_string_io_is_split_into_bytes(console):
    bus, out = console
    bus.pio_write(0x3F8, 1, mv(b"hello\n"))  # rep outsb: count 6, size 1
    assert out == b"hello\n"


def test_serial_divisor_latch_does_not_transmit(console):
    bus, out = console
    bus.pio_write(0x3F8 + LCR, 1, mv(b"\x80"))  # DLAB on
    bus.pio_write(0x3F8, 1, mv(b"\x01"))  # divisor low byte
    bus.pio_write(0x3F8 + 1, 1, mv(b"\x00"))
    bus.pio_write(0x3F8 + LCR, 1, mv(b"\x03"))  # 8N1, DLAB off
    bus.pio_write(0x3F8, 1, mv(b"x"))
    assert out == b"x"
    msr = mv(b"\0")
    bus.pio_read(0x3F8 + MSR, 1, msr)
    assert msr[0] & 0x10  # CTS


def test_exit_port_reports_the_value():
    values: list[int] = []
    dev = ExitPort(values.append)
    dev.write(0, mv(b"\x2a"))
    dev.write(0, mv((0x1234).to_bytes(2, "little")))
    assert values == [42, 0x1234]


def test_post_code_and_marker():
    post = PostCode()
    post.write(0, mv(b"\x55"))
    data = mv(b"\0\0")
    post.read(0, data)
    assert (post.last, post.writes, bytes(data)) == (0x55, 1, b"\x55\0")
    marker = Marker()
    marker.bind_vcpu(3)
    marker.write(0, mv((0x1001).to_bytes(4, "little")))
    ((ns, vcpu, value),) = marker.marks
    assert vcpu == 3 and value == 0x1001 and isinstance(ns, int)  # when: a timestamp, not checked


def test_unclaimed_ports_and_mmio_read_all_ones_and_are_counted():
    bus = Bus()
    data = mv(b"\0\0")
    bus.pio_read(0x1234, 2, data)
    assert bytes(data) == b"\xff\xff"
    bus.pio_write(0x1234, 1, mv(b"\0"))
    mmio = mv(b"\0" * 4)
    bus.mmio_read(0xD0000000, mmio)
    assert bytes(mmio) == b"\xff" * 4
    assert bus.unhandled == 3


def test_strict_mode_makes_unclaimed_access_fatal():
    bus = Bus(strict=True)
    with pytest.raises(UnhandledAccess, match="port 0x1234"):
        bus.pio_write(0x1234, 1, mv(b"\0"))
    with pytest.raises(UnhandledAccess, match="MMIO read at 0xd0000000"):
        bus.mmio_read(0xD0000000, mv(b"\0"))


def test_registration_rejects_overlap_zero_length_and_wrap():
    bus = Bus()
    bus.register_pio(0x3F8, 8, PostCode())
    with pytest.raises(BusError, match="overlaps post-code"):
        bus.register_pio(0x3FC, 1, PostCode())
    with pytest.raises(BusError):
        bus.register_pio(0x10, 0, PostCode())
    with pytest.raises(BusError):
        bus.register_pio(0xFFFF, 2, PostCode())
    bus.register_mmio(0x1000, 0x100, PostCode())
    with pytest.raises(BusError):
        bus.register_mmio(0x10FF, 1, PostCode())


def test_mmio_dispatch_gives_offsets():
    bus = Bus()
    seen: list[tuple[int, bytes]] = []

    class Recorder:
        name = "recorder"

        def read(self, offset: int, data: memoryview) -> None:
            data[:] = bytes([offset]) * len(data)

        def write(self, offset: int, data: memoryview) -> None:
            seen.append((offset, bytes(data)))

    bus.register_mmio(0xFEE00000, 0x1000, Recorder())
    bus.mmio_write(0xFEE00010, mv(b"\x01\x02"))
    out = mv(b"\0")
    bus.mmio_read(0xFEE00020, out)
    assert seen == [(0x10, b"\x01\x02")] and out[0] == 0x20


def test_serial_transmit_empty_interrupt_follows_qemus_rules():
    levels: list[int] = []
    uart = Serial16550(lambda b: None, irq=levels.append)
    iir = memoryview(bytearray(1))

    def write(offset: int, value: int) -> None:
        uart.write(offset, memoryview(bytes([value])))

    def read_iir() -> int:
        uart.read(2, iir)
        return iir[0]

    write(0, ord("a"))  # THR empties at once, but the interrupt is not enabled
    assert levels == [] and read_iir() == 0x01
    write(1, 0x02)  # enabling it with THR empty raises it
    assert levels == [1]
    assert read_iir() == 0x02 and levels == [1, 0]  # the IIR read that reports it clears it
    assert read_iir() == 0x01
    write(0, ord("b"))  # every transmitted byte raises it again
    assert levels == [1, 0, 1]
    write(1, 0x00)  # disabling it lowers the line
    assert levels == [1, 0, 1, 0]
