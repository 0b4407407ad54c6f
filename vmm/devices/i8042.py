"""The i8042 keyboard controller, just enough for a guest to probe it and reset the
machine through it (Firecracker's i8042 is the model; command semantics follow QEMU's
hw/input/pckbd.c where the two differ). Two 1-port bus devices: the :class:`I8042` itself
at 0x64 (status/command) and its :attr:`I8042.data_port` at 0x60 (data).

Status (read 0x64): input buffer always empty (the controller takes every byte at once),
the system flag (bit 2) mirroring command-byte bit 2, bit 3 set when the last write was to
0x64, bit 4 "keyboard not inhibited", and the output-buffer-full bit 0 while a response
byte waits at 0x60. Reading 0x60 takes the byte; with none waiting it reads the last one
again (as QEMU and real controllers do).

Commands (write 0x64):

====== ===============================================================================
0x20   read the command byte (power-on 0x05: keyboard interrupt enable, system flag)
0x60   write the command byte: the next byte written to 0x60
0xA7/8 disable/enable the auxiliary port (command-byte bit 5)
0xAA   controller self-test: responds 0x55
0xAB   keyboard interface test: responds 0x00
0xAD/E disable/enable the keyboard (command-byte bit 4)
0xD0   read the output port (power-on 0xCF as QEMU: reset high, A20 on, unused bits 1)
0xD1   write the output port: the next byte at 0x60; bit 0 clear pulses reset
0xF0-FF pulse the output-port bits 3-0 that are clear in the command; only bit 0, the
       CPU reset line, has an effect: 0xFE (and 0xF0, 0xF2, ... 0xFC, as QEMU) resets
====== ===============================================================================

Every reset pulse calls the injected ``reset()``. A byte written to 0x60 with no command
waiting for it is a command to the keyboard: acknowledged with 0xFA (Firecracker's
"dumb keyboard"). Other controller commands are accepted and do nothing.

Not emulated: a keyboard or mouse (no scancodes, no keyboard identification, no
auxiliary-port traffic), IRQ 1 and IRQ 12, A20 masking (the output port's bit 1 is state
only), the input port, the keyboard's own command set, timeouts and parity errors.
"""

from __future__ import annotations

from collections.abc import Callable

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64

# status register
SB_OUT_FULL = 0x01
SB_SYSTEM = 0x04
SB_CMD = 0x08  # the last write was to the command port
SB_UNLOCKED = 0x10

# command byte
CB_KBD_INT = 0x01
CB_SYSTEM = 0x04
CB_KBD_DISABLE = 0x10
CB_AUX_DISABLE = 0x20
CB_DEFAULT = CB_KBD_INT | CB_SYSTEM

# output port
OUTP_RESET = 0x01  # 0 holds the CPU in reset
OUTP_A20 = 0x02
OUTP_DEFAULT = 0xCF  # QEMU: KBD_OUT_RESET | KBD_OUT_A20 | KBD_OUT_ONES

# controller commands
CMD_READ_CB = 0x20
CMD_WRITE_CB = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTP = 0xD0
CMD_WRITE_OUTP = 0xD1
CMD_PULSE = 0xF0  # 0xF0-0xFF: pulse output-port bits 3-0
CMD_RESET_CPU = 0xFE

SELF_TEST_OK = 0x55
KBD_TEST_OK = 0x00
KBD_ACK = 0xFA


class I8042:
    """The controller, as the bus device of its status/command port 0x64 (offset 0);
    :attr:`data_port` is the bus device of port 0x60. ``reset()`` is called whenever the
    guest pulses the reset line."""

    __slots__ = ("_reset", "command_byte", "output_port", "_out", "_last", "_pending", "_last_cmd", "data_port")
    name = "i8042"
    WIDTH = 1

    def __init__(self, reset: Callable[[], None]) -> None:
        self._reset = reset
        self.data_port = I8042Data(self)
        self.reset()

    def reset(self) -> None:
        """Power-on state: the default command byte and output port, nothing buffered."""
        self.command_byte = CB_DEFAULT
        self.output_port = OUTP_DEFAULT
        self._out: int | None = None
        self._last = 0
        self._pending = 0  # the command whose data byte the next 0x60 write is
        self._last_cmd = False

    @property
    def status(self) -> int:
        """The status register as a read of 0x64 returns it."""
        value = SB_UNLOCKED | (self.command_byte & CB_SYSTEM)
        if self._last_cmd:
            value |= SB_CMD
        if self._out is not None:
            value |= SB_OUT_FULL
        return value

    # --- port 0x64 -----------------------------------------------------------------------
    def read(self, offset: int, data: memoryview) -> None:
        _fill(data, self.status)

    def write(self, offset: int, data: memoryview) -> None:
        self._last_cmd = True
        self._pending = 0
        cmd = data[0]
        if cmd == CMD_READ_CB:
            self._out = self.command_byte
        elif cmd in (CMD_WRITE_CB, CMD_WRITE_OUTP):
            self._pending = cmd
        elif cmd == CMD_SELF_TEST:
            self._out = SELF_TEST_OK
        elif cmd == CMD_KBD_TEST:
            self._out = KBD_TEST_OK
        elif cmd == CMD_READ_OUTP:
            self._out = self.output_port
        elif cmd == CMD_KBD_DISABLE:
            self.command_byte |= CB_KBD_DISABLE
        elif cmd == CMD_KBD_ENABLE:
            self.command_byte &= ~CB_KBD_DISABLE
        elif cmd == CMD_AUX_DISABLE:
            self.command_byte |= CB_AUX_DISABLE
        elif cmd == CMD_AUX_ENABLE:
            self.command_byte &= ~CB_AUX_DISABLE
        elif cmd & 0xF0 == CMD_PULSE and not cmd & OUTP_RESET:
            self._reset()  # a pulse of output-port bit 0: the CPU reset line

    # --- port 0x60 (through data_port) ---------------------------------------------------
    def read_data(self) -> int:
        """A read of 0x60: the waiting byte, else the last one again."""
        if self._out is not None:
            self._last, self._out = self._out, None
        return self._last

    def write_data(self, value: int) -> None:
        """A write of 0x60: a pending command's data byte, else a keyboard command."""
        self._last_cmd = False
        pending, self._pending = self._pending, 0
        if pending == CMD_WRITE_CB:
            self.command_byte = value
        elif pending == CMD_WRITE_OUTP:
            self.output_port = value
            if not value & OUTP_RESET:
                self._reset()
        else:
            self._out = KBD_ACK


class I8042Data:
    """Port 0x60 of an :class:`I8042` (its own bus device: the bus gives offsets from a
    registration's base, and 0x61-0x63 belong to others)."""

    __slots__ = ("_i8042",)
    name = "i8042-data"
    WIDTH = 1

    def __init__(self, i8042: I8042) -> None:
        self._i8042 = i8042

    def read(self, offset: int, data: memoryview) -> None:
        _fill(data, self._i8042.read_data())

    def write(self, offset: int, data: memoryview) -> None:
        self._i8042.write_data(data[0])


def _fill(data: memoryview, value: int) -> None:
    data[0] = value
    if len(data) > 1:
        data[1:] = b"\xff" * (len(data) - 1)  # the ports after ours are not ours
