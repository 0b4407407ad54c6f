"""The PC's legacy devices: CMOS RTC, i8042, ports 0x92 and 0x61. Driven directly by
offset (Firecracker's style) and through a Bus; the RTC runs on an injected clock."""

from __future__ import annotations

import calendar

import pytest

from vmm.devices import I8042, Bus, Cmos, SystemControlA, SystemControlB
from vmm.devices.cmos import CMOS_PORT, pc_cmos_memory, split_ram
from vmm.devices.i8042 import I8042_COMMAND_PORT, I8042_DATA_PORT
from vmm.devices.sysctl import PORT_A, PORT_B
from vmm.errors import UnhandledAccess

MiB, GiB = 1 << 20, 1 << 30
# Thursday 29 February 2024, 13:45:56 UTC
T0 = float(calendar.timegm((2024, 2, 29, 13, 45, 56)))


def mv(data: bytes) -> memoryview:
    return memoryview(bytearray(data))


class Clock:
    """A settable clock for the RTC (seconds since the epoch)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def rtc():
    """(bus, device, clock): 64 MiB, 2 CPUs, the clock at T0."""
    clock = Clock(T0)
    device = Cmos(64 * MiB, 2, clock=clock)
    bus = Bus(strict=True)
    bus.register_pio(CMOS_PORT, Cmos.WIDTH, device)
    return bus, device, clock


def cmos_read(bus: Bus, index: int) -> int:
    bus.pio_write(CMOS_PORT, 1, mv(bytes([index])))
    data = mv(b"\0")
    bus.pio_read(CMOS_PORT + 1, 1, data)
    return data[0]


def cmos_write(bus: Bus, index: int, value: int) -> None:
    bus.pio_write(CMOS_PORT, 1, mv(bytes([index])))
    bus.pio_write(CMOS_PORT + 1, 1, mv(bytes([value])))


def time_regs(bus: Bus) -> list[int]:
    """seconds, minutes, hours, day of week, day, month, year, century."""
    return [cmos_read(bus, i) for i in (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32)]


# --- CMOS RTC -----------------------------------------------------------------------------
def test_rtc_power_on_registers(rtc):
    bus, _, _ = rtc
    assert [cmos_read(bus, i) for i in (0x0A, 0x0B, 0x0C, 0x0D)] == [0x26, 0x02, 0x00, 0x80]


def test_rtc_time_in_bcd_then_binary_then_12_hour(rtc):
    bus, _, _ = rtc
    assert time_regs(bus) == [0x56, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]  # Thursday = 5
    cmos_write(bus, 0x0B, 0x06)  # binary, 24-hour
    assert time_regs(bus) == [56, 45, 13, 5, 29, 2, 24, 20]
    cmos_write(bus, 0x0B, 0x00)  # BCD, 12-hour: 1 PM
    assert cmos_read(bus, 0x04) == 0x81


def test_rtc_follows_the_clock(rtc):
    bus, _, clock = rtc
    clock.now += 4 + 14 * 60 + 10 * 3600  # to 00:00:00 on 1 March
    assert time_regs(bus) == [0x00, 0x00, 0x00, 0x06, 0x01, 0x03, 0x24, 0x20]


def test_rtc_index_keeps_the_nmi_mask_bit_and_the_index_port_reads_ff(rtc):
    bus, device, _ = rtc
    assert cmos_read(bus, 0x80 | 0x0A) == 0x26 and device.nmi_masked
    assert cmos_read(bus, 0x0B) == 0x02 and not device.nmi_masked
    data = mv(b"\0")
    bus.pio_read(CMOS_PORT, 1, data)
    assert data[0] == 0xFF


def test_rtc_uip_in_the_last_244_us_of_a_second(rtc):
    bus, _, clock = rtc
    clock.now = T0 + 0.9999
    assert cmos_read(bus, 0x0A) == 0xA6
    clock.now = T0 + 0.5
    assert cmos_read(bus, 0x0A) == 0x26


def test_rtc_writes_set_the_time(rtc):
    bus, _, clock = rtc
    cmos_write(bus, 0x00, 0x00)  # running: seconds take effect at once
    clock.now += 5
    assert cmos_read(bus, 0x00) == 0x05
    cmos_write(bus, 0x0B, 0x82)  # SET: the clock stops taking updates
    for index, value in ((0x04, 0x08), (0x02, 0x30), (0x00, 0x00), (0x07, 0x31), (0x08, 0x12), (0x09, 0x99)):
        cmos_write(bus, index, value)
    clock.now += 100
    assert cmos_read(bus, 0x04) == 0x08 and cmos_read(bus, 0x00) == 0x00  # frozen while SET
    cmos_write(bus, 0x0B, 0x02)  # SET clears: the clock runs from what was written
    clock.now += 61
    assert time_regs(bus) == [0x01, 0x31, 0x08, 0x05, 0x31, 0x12, 0x99, 0x20]  # Thursday 31 Dec 2099


def test_rtc_divider_reset_freezes_the_clock(rtc):
    bus, _, clock = rtc
    cmos_write(bus, 0x0A, 0x66)  # divider held in reset
    clock.now += 30
    assert cmos_read(bus, 0x00) == 0x56
    cmos_write(bus, 0x0A, 0x26)
    clock.now += 1
    assert cmos_read(bus, 0x00) == 0x57


def test_rtc_century_alias_read_only_registers_and_plain_ram(rtc):
    bus, _, _ = rtc
    assert cmos_read(bus, 0x37) == 0x20  # IBM PS/2 century byte
    cmos_write(bus, 0x0C, 0xFF)
    cmos_write(bus, 0x0D, 0x00)
    assert cmos_read(bus, 0x0C) == 0x00 and cmos_read(bus, 0x0D) == 0x80
    cmos_write(bus, 0x40, 0xA5)
    assert cmos_read(bus, 0x40) == 0xA5


def test_rtc_16_bit_write_is_index_then_data(rtc):
    bus, device, _ = rtc
    bus.pio_write(CMOS_PORT, 2, mv(bytes([0x41, 0x5A])))
    data = mv(b"\0")
    device.read(1, data)
    assert data[0] == 0x5A


@pytest.mark.parametrize(
    ("ram", "base", "ext", "mem16", "high"),
    [
        (512 * 1024, 512, 0, 0, 0),
        (64 * MiB, 640, 63 * 1024, 48 * 16, 0),
        (128 * MiB, 640, 0xFFFF, 112 * 16, 0),
        (5 * GiB, 640, 0xFFFF, (3 * GiB - 16 * MiB) // (64 * 1024), 2 * GiB // (64 * 1024)),
    ],
)
def test_rtc_memory_bytes(ram, base, ext, mem16, high):
    device = Cmos(ram, 4, clock=Clock(T0))
    bus = Bus()
    bus.register_pio(CMOS_PORT, Cmos.WIDTH, device)

    def word(lo: int) -> int:
        return cmos_read(bus, lo) | cmos_read(bus, lo + 1) << 8

    assert (word(0x15), word(0x17), word(0x30), word(0x34)) == (base, ext, ext, mem16)
    assert word(0x5B) | cmos_read(bus, 0x5D) << 16 == high
    assert cmos_read(bus, 0x5F) == 3  # CPUs - 1
    assert cmos_read(bus, 0x14) == 0x02  # FPU


def test_cmos_memory_helpers():
    assert split_ram(5 * GiB) == (3 * GiB, 2 * GiB) and split_ram(64 * MiB) == (64 * MiB, 0)
    assert pc_cmos_memory(64 * MiB, 0, 300)[0x5F] == 0  # too many CPUs for the byte


# --- i8042 --------------------------------------------------------------------------------
@pytest.fixture
def kbd():
    resets: list[int] = []
    device = I8042(lambda: resets.append(1))
    bus = Bus(strict=True)
    bus.register_pio(I8042_DATA_PORT, 1, device.data_port)
    bus.register_pio(I8042_COMMAND_PORT, 1, device)
    return bus, device, resets


def kbd_command(bus: Bus, cmd: int) -> None:
    bus.pio_write(I8042_COMMAND_PORT, 1, mv(bytes([cmd])))


def kbd_status(bus: Bus) -> int:
    data = mv(b"\0")
    bus.pio_read(I8042_COMMAND_PORT, 1, data)
    return data[0]


def kbd_data(bus: Bus) -> int:
    data = mv(b"\0")
    bus.pio_read(I8042_DATA_PORT, 1, data)
    return data[0]


def test_i8042_status_input_empty_system_flag_output_full_only_with_a_byte(kbd):
    bus, _, _ = kbd
    assert kbd_status(bus) == 0x14  # not inhibited, system flag; both buffers empty
    kbd_command(bus, 0xAA)
    assert kbd_status(bus) == 0x1D  # output full, last write was a command
    assert kbd_data(bus) == 0x55
    assert kbd_status(bus) & 0x03 == 0


def test_i8042_commands(kbd):
    bus, _, resets = kbd
    kbd_command(bus, 0x20)
    assert kbd_data(bus) == 0x05
    kbd_command(bus, 0x60)
    bus.pio_write(I8042_DATA_PORT, 1, mv(b"\x41"))
    kbd_command(bus, 0x20)
    assert kbd_data(bus) == 0x41
    assert kbd_status(bus) & 0x04 == 0  # the system flag follows command-byte bit 2
    kbd_command(bus, 0xAB)
    assert kbd_data(bus) == 0x00
    kbd_command(bus, 0xD0)
    assert kbd_data(bus) == 0xCF
    kbd_command(bus, 0xD1)
    bus.pio_write(I8042_DATA_PORT, 1, mv(b"\x03"))  # reset line high: nothing happens
    kbd_command(bus, 0xD0)
    assert kbd_data(bus) == 0x03 and resets == []
    bus.pio_write(I8042_DATA_PORT, 1, mv(b"\xf4"))  # a keyboard command: acknowledged
    assert kbd_data(bus) == 0xFA
    assert kbd_data(bus) == 0xFA  # nothing new: the last byte again


def test_i8042_reset_pulses(kbd):
    bus, device, resets = kbd
    kbd_command(bus, 0xFE)
    assert resets == [1]
    kbd_command(bus, 0xFF)  # pulses no bit
    assert resets == [1]
    device.write(0, mv(b"\xfc"))  # driven directly: bit 0 pulsed too
    assert resets == [1, 1]
    kbd_command(bus, 0xD1)
    bus.pio_write(I8042_DATA_PORT, 1, mv(b"\x02"))  # output port bit 0 clear: reset
    assert resets == [1, 1, 1]


def test_i8042_claims_only_its_two_ports(kbd):
    bus, _, _ = kbd
    for port in (0x61, 0x62, 0x63, 0x65):
        data = mv(b"\0")
        with pytest.raises(UnhandledAccess, match="no device claims"):
            bus.pio_read(port, 1, data)


# --- ports 0x92 and 0x61 ------------------------------------------------------------------
def test_port_92_a20_reads_back_and_bit_0_resets_on_its_rising_edge():
    resets: list[int] = []
    device = SystemControlA(lambda: resets.append(1))
    bus = Bus(strict=True)
    bus.register_pio(PORT_A, SystemControlA.WIDTH, device)
    bus.pio_write(PORT_A, 1, mv(b"\x02"))
    data = mv(b"\0")
    bus.pio_read(PORT_A, 1, data)
    assert data[0] == 0x02 and device.a20 and resets == []
    bus.pio_write(PORT_A, 1, mv(b"\x03"))
    bus.pio_write(PORT_A, 1, mv(b"\x03"))  # already set: no new edge
    assert resets == [1]
    device.reset()  # the machine's reset clears bit 0 (A20 stays)
    device.read(0, data)
    assert data[0] == 0x02
    device.write(0, mv(b"\x01"))
    assert resets == [1, 1] and not device.a20


def test_port_61_refresh_toggles_and_gate_bits_read_back():
    device = SystemControlB()
    bus = Bus(strict=True)
    bus.register_pio(PORT_B, SystemControlB.WIDTH, device)
    first, second = mv(b"\0"), mv(b"\0")
    bus.pio_read(PORT_B, 1, first)
    bus.pio_read(PORT_B, 1, second)
    assert (first[0] ^ second[0]) == 0x10  # only the refresh bit changed
    bus.pio_write(PORT_B, 1, mv(b"\xff"))
    bus.pio_read(PORT_B, 1, first)
    assert first[0] & ~0x10 == 0x23  # gate, speaker, and OUT (no PIT: OUT follows the gate)
    bus.pio_write(PORT_B, 1, mv(b"\x02"))
    bus.pio_read(PORT_B, 1, first)
    assert first[0] & ~0x10 == 0x02


def test_port_61_out_from_an_injected_pit():
    out = [False]
    device = SystemControlB(pit_out2=lambda: out[0])
    device.write(0, mv(b"\x01"))
    data = mv(b"\0")
    device.read(0, data)
    assert data[0] & 0x20 == 0
    out[0] = True
    device.read(0, data)
    assert data[0] & 0x21 == 0x21
