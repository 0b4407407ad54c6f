"""The PC's CMOS RTC (MC146818) and its 128 bytes of CMOS RAM, ports 0x70-0x71.

Port 0x70 selects the CMOS index (bits 6-0); bit 7 is the NMI mask, kept in
:attr:`Cmos.nmi_masked` (there is no NMI source to mask). Reading 0x70 gives 0xff, as
QEMU. Port 0x71 reads and writes the selected byte. Accesses are byte-wide; a 16-bit
access at 0x70 is two byte accesses (index, then data), as QEMU's 1-byte implementation
splits it, and bytes beyond 0x71 read as unassigned ports (0xff).

Emulated, following QEMU's hw/rtc/mc146818rtc.c: the time registers (seconds, minutes,
hours, day of week 1-7 with Sunday 1, day of month, month, two-digit year, century at
0x32; index 0x37, the IBM PS/2 century byte, is rewritten to 0x32) follow an injected
clock (default: the host's UTC time), rendered in BCD or binary and 12- or 24-hour format
as register B says at the moment of the read. Writes to them set the clock (the guest's
time becomes an offset from the injected clock); with register B's SET bit, or the divider
held in reset (register A bits 6-5 = 11), the time registers freeze and take writes, and
the clock restarts from them when SET clears. Power-on values: register A 0x26 (32.768 kHz
divider, 1024 Hz rate), B 0x02 (24-hour, BCD), C 0x00, D 0x80 (valid RAM and time). UIP
(register A bit 7) reads 1 during the last 244 us of each second, as QEMU's
update_in_progress(). Register C reads and clears (it never has flags set here); C and D
ignore writes. Every other index is plain RAM.

CMOS RAM holds what QEMU's pc_cmos_init() and x86_rtc_set_cpus_count() write
(:func:`pc_cmos_memory`; RAM beyond 3 GiB continues at 4 GiB, see :func:`split_ram`):
base memory 0x15-0x16 (KiB below 1 MiB, at most 640), extended memory 0x17-0x18 and
0x30-0x31 (KiB above 1 MiB, at most 65535), 0x34-0x35 (64 KiB units of RAM between 16 MiB
and 4 GiB, at most 65535), 0x5b-0x5d (64 KiB units above 4 GiB), 0x5f (CPUs - 1; 0 above
255 CPUs), and the equipment byte 0x14 = 0x02 (FPU present; QEMU also sets 0x04, a PS/2
mouse, which this machine does not have).

Not emulated: interrupts (IRQ 8: periodic, alarm and update-ended; register C never sets
its flags, the alarm registers are plain RAM), the square-wave output, the upper CMOS bank
(ports 0x72-0x73), disk/floppy/boot-order bytes and the CMOS checksum.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from vmm.cpu.layout import BootLayout

CMOS_PORT = 0x70
CMOS_WIDTH = 2

# CMOS indexes
SECONDS = 0x00
SECONDS_ALARM = 0x01
MINUTES = 0x02
MINUTES_ALARM = 0x03
HOURS = 0x04
HOURS_ALARM = 0x05
DAY_OF_WEEK = 0x06
DAY_OF_MONTH = 0x07
MONTH = 0x08
YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
EQUIPMENT = 0x14
BASE_MEM_LO, BASE_MEM_HI = 0x15, 0x16
EXT_MEM_LO, EXT_MEM_HI = 0x17, 0x18
EXT_MEM2_LO, EXT_MEM2_HI = 0x30, 0x31
CENTURY = 0x32
MEM_16M_LO, MEM_16M_HI = 0x34, 0x35
IBM_PS2_CENTURY = 0x37
MEM_4G = 0x5B  # three bytes, 0x5b-0x5d
CPU_COUNT = 0x5F
CMOS_SIZE = 128
INDEX_MASK = 0x7F
NMI_MASK = 0x80

TIME_REGS = frozenset({SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY})

REG_A_UIP = 0x80
REG_A_DEFAULT = 0x26
REG_A_DIVIDER = 0x70
REG_A_DIVIDER_RESET = 0x60
REG_B_SET = 0x80
REG_B_PIE = 0x40
REG_B_AIE = 0x20
REG_B_UIE = 0x10
REG_B_SQWE = 0x08
REG_B_DM = 0x04  # 1: binary, 0: BCD
REG_B_24H = 0x02
REG_B_DEFAULT = REG_B_24H
REG_D_VRT = 0x80
EQUIPMENT_FPU = 0x02

UIP_HOLD = 244e-6  # seconds before each second's end during which UIP reads 1
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def pc_cmos_memory(below_4g: int, above_4g: int = 0, nb_cpus: int = 1) -> dict[int, int]:
    """CMOS bytes (index -> value) for ``below_4g`` bytes of RAM under 4 GiB, ``above_4g``
    above it and ``nb_cpus`` boot CPUs, as QEMU's pc_cmos_init() computes them."""
    base = min(below_4g // KiB, 640)
    ext = min(max(below_4g - MiB, 0) // KiB, 0xFFFF)
    mem16 = min(max(below_4g - 16 * MiB, 0) // (64 * KiB), 0xFFFF)
    high = above_4g // (64 * KiB)
    return {
        EQUIPMENT: EQUIPMENT_FPU,
        BASE_MEM_LO: base & 0xFF,
        BASE_MEM_HI: base >> 8,
        EXT_MEM_LO: ext & 0xFF,
        EXT_MEM_HI: ext >> 8,
        EXT_MEM2_LO: ext & 0xFF,
        EXT_MEM2_HI: ext >> 8,
        MEM_16M_LO: mem16 & 0xFF,
        MEM_16M_HI: mem16 >> 8,
        MEM_4G: high & 0xFF,
        MEM_4G + 1: (high >> 8) & 0xFF,
        MEM_4G + 2: (high >> 16) & 0xFF,
        CPU_COUNT: nb_cpus - 1 if 1 <= nb_cpus <= 0xFF else 0,
    }


def _days_from_civil_qemu(y: int, m: int, d: int) -> int:
    # QEMU's mktimegm() formula, kept as is so that odd register values map the same way.
    if m < 3:
        m += 12
        y -= 1
    return d + (153 * m - 457) // 5 + 365 * y + y // 4 - y // 100 + y // 400 - 719469


def _civil_from_days(z: int) -> tuple[int, int, int]:
    # H. Hinnant's days -> (year, month, day); exact for every integer, never raises.
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (m <= 2), m, d


def split_ram(ram_size: int) -> tuple[int, int]:
    """(bytes below 4 GiB, bytes above) of ``ram_size`` bytes of RAM laid out as
    :meth:`vmm.cpu.layout.BootLayout.ram_ranges` lays it out (the hole is never RAM)."""
    below = sum(size for gpa, size in BootLayout.ram_ranges(ram_size) if gpa < 4 * GiB)
    return below, ram_size - below


class Cmos:
    """The RTC and CMOS RAM for a machine with ``ram_size`` bytes of RAM and ``nr_vcpus``
    CPUs. ``clock()`` gives the current UTC time in seconds since the epoch (float)."""

    __slots__ = ("_clock", "_ram", "_index", "_offset", "_phase", "nmi_masked")
    name = "cmos-rtc"
    WIDTH = CMOS_WIDTH

    def __init__(self, ram_size: int, nr_vcpus: int = 1, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._ram = bytearray(CMOS_SIZE)
        below, above = split_ram(ram_size)
        for index, value in pc_cmos_memory(below, above, nr_vcpus).items():
            self._ram[index] = value
        self._ram[REG_A] = REG_A_DEFAULT
        self._ram[REG_B] = REG_B_DEFAULT
        self._ram[REG_D] = REG_D_VRT
        self._index = 0
        self._offset = 0.0  # guest time = clock() + offset
        self._phase = 0.0  # where in its second the guest clock stands when it is set
        self.nmi_masked = False
        self._render(self._clock())

    def reset(self) -> None:
        """As QEMU's rtc_reset: interrupt enables and flags clear; time and RAM survive."""
        self._ram[REG_B] &= ~(REG_B_PIE | REG_B_AIE | REG_B_SQWE)
        self._ram[REG_C] = 0

    # --- the clock -----------------------------------------------------------------------
    def _running(self) -> bool:
        ram = self._ram
        return not ram[REG_B] & REG_B_SET and (ram[REG_A] & REG_A_DIVIDER) <= 0x20

    def _guest_time(self) -> float:
        return self._clock() + self._offset

    def _to_reg(self, value: int) -> int:
        if self._ram[REG_B] & REG_B_DM:
            return value & 0xFF
        return ((value // 10) << 4 | value % 10) & 0xFF

    def _from_reg(self, value: int) -> int:
        if value & 0xC0 == 0xC0:  # "don't care" in QEMU's rtc_from_bcd
            return -1
        if self._ram[REG_B] & REG_B_DM:
            return value
        return (value >> 4) * 10 + (value & 0x0F)

    def _render(self, now: float) -> None:
        """Write the time ``now`` (guest seconds) into the time registers."""
        secs = int(now // 1)
        days, rest = divmod(secs, 86400)
        hour, rest = divmod(rest, 3600)
        minute, second = divmod(rest, 60)
        year, month, day = _civil_from_days(days)
        ram, reg = self._ram, self._to_reg
        ram[SECONDS] = reg(second)
        ram[MINUTES] = reg(minute)
        if ram[REG_B] & REG_B_24H:
            ram[HOURS] = reg(hour)
        else:
            ram[HOURS] = reg(hour % 12 or 12) | (0x80 if hour >= 12 else 0)
        ram[DAY_OF_WEEK] = reg((days + 4) % 7 + 1)  # 1970-01-01 was a Thursday; Sunday is 1
        ram[DAY_OF_MONTH] = reg(day)
        ram[MONTH] = reg(month)
        ram[YEAR] = reg(year % 100)
        ram[CENTURY] = reg(year // 100)

    def _update_time(self) -> None:
        if not self._ram[REG_B] & REG_B_SET:
            self._render(self._guest_time())

    def _set_time(self) -> None:
        """The guest's time becomes what the time registers say (QEMU's rtc_set_time)."""
        ram, val = self._ram, self._from_reg
        hour = val(ram[HOURS] & 0x7F)
        if not ram[REG_B] & REG_B_24H:
            hour = hour % 12 + (12 if ram[HOURS] & 0x80 else 0)
        year = val(ram[YEAR]) + val(ram[CENTURY]) * 100
        days = _days_from_civil_qemu(year, val(ram[MONTH]), val(ram[DAY_OF_MONTH]))
        secs = days * 86400 + hour * 3600 + val(ram[MINUTES]) * 60 + val(ram[SECONDS])
        self._offset = secs + self._phase - self._clock()

    def _update_in_progress(self) -> bool:
        return self._running() and self._guest_time() % 1.0 >= 1.0 - UIP_HOLD

    # --- ports ---------------------------------------------------------------------------
    def read(self, offset: int, data: memoryview) -> None:
        for i in range(len(data)):
            data[i] = self._read_port(offset + i)

    def write(self, offset: int, data: memoryview) -> None:
        for i in range(len(data)):
            self._write_port(offset + i, data[i])

    def _read_port(self, port: int) -> int:
        if port != 1:
            return 0xFF  # the index port is write-only; beyond 0x71 nothing answers
        index = self._index
        if index == IBM_PS2_CENTURY:
            index = self._index = CENTURY
        ram = self._ram
        if index in TIME_REGS:
            if self._running():
                self._update_time()
            return ram[index]
        if index == REG_A:
            return ram[REG_A] | (REG_A_UIP if self._update_in_progress() else 0)
        if index == REG_C:
            value, ram[REG_C] = ram[REG_C], 0
            return value
        return ram[index]

    def _write_port(self, port: int, value: int) -> None:
        if port == 0:
            self._index = value & INDEX_MASK
            self.nmi_masked = bool(value & NMI_MASK)
            return
        if port != 1:
            return
        index = self._index
        if index == IBM_PS2_CENTURY:
            index = self._index = CENTURY
        ram = self._ram
        if index in TIME_REGS:
            ram[index] = value
            if self._running():
                self._set_time()
        elif index == REG_A:
            if value & REG_A_DIVIDER_RESET == REG_A_DIVIDER_RESET:
                if self._running():
                    self._update_time()  # the clock stops: freeze what it shows now
            elif (
                ram[REG_A] & REG_A_DIVIDER_RESET == REG_A_DIVIDER_RESET
                and value & REG_A_DIVIDER <= 0x20
                and not ram[REG_B] & REG_B_SET
            ):
                self._phase = 0.5  # leaving divider reset: the first update is half a second later
                self._set_time()
            ram[REG_A] = value & ~REG_A_UIP
        elif index == REG_B:
            if value & REG_B_SET:
                if self._running():
                    self._update_time()
                value &= ~REG_B_UIE
            elif ram[REG_B] & REG_B_SET and ram[REG_A] & REG_A_DIVIDER <= 0x20:
                # As QEMU, the registers are decoded in the format that held while SET was on.
                self._phase = self._guest_time() % 1.0
                self._set_time()
            ram[REG_B] = value
        elif index in (REG_C, REG_D):
            pass  # read-only
        else:
            ram[index] = value
