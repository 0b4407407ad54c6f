"""A 16550A-compatible UART, transmit side (COM1 at 0x3f8 by default).

Emulated: THR writes go to ``out``; the divisor latch (DLAB), IER, LCR, MCR and
scratch registers hold what is written; LSR always reports the transmitter empty
(THRE|TEMT) so polling guests never wait; IIR reports no interrupt pending (with
the FIFO bits once FCR enabled them); MSR reports a connected line (DCD|DSR|CTS).
Not emulated: receive (RBR reads 0, DR is never set), interrupts, loopback,
baud-rate timing.
"""

from __future__ import annotations

from collections.abc import Callable

COM1 = 0x3F8

# register offsets (DLAB = 0 unless noted)
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

LCR_DLAB = 0x80
LSR_THRE = 0x20  # transmit holding register empty
LSR_TEMT = 0x40  # transmitter empty
IIR_NO_INTERRUPT = 0x01
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE_FIFO = 0x01
MSR_CONNECTED = 0x80 | 0x20 | 0x10  # DCD | DSR | CTS


class Serial16550:
    """The UART. ``out(byte_string)`` receives every transmitted byte."""

    __slots__ = ("_out", "ier", "lcr", "mcr", "scr", "fcr", "dll", "dlm")
    name = "serial"
    WIDTH = 8

    def __init__(self, out: Callable[[bytes], None]) -> None:
        self._out = out
        self.reset()

    def reset(self) -> None:
        """Power-on state: 115200 8N1-ish divisor, everything else zero."""
        self.ier = self.lcr = self.mcr = self.scr = self.fcr = 0
        self.dll, self.dlm = 1, 0

    def write(self, offset: int, data: memoryview) -> None:
        value = data[0]
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                self.dll = value
            else:
                self._out(bytes(data[:1]))
        elif offset == IER_DLM:
            if dlab:
                self.dlm = value
            else:
                self.ier = value & 0x0F
        elif offset == IIR_FCR:
            self.fcr = value
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
        elif offset == SCR:
            self.scr = value
        # LSR and MSR are read-only; writes are ignored as on real hardware.

    def read(self, offset: int, data: memoryview) -> None:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            value = self.dll if dlab else 0
        elif offset == IER_DLM:
            value = self.dlm if dlab else self.ier
        elif offset == IIR_FCR:
            value = IIR_NO_INTERRUPT | (IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE_FIFO else 0)
        elif offset == LCR:
            value = self.lcr
        elif offset == MCR:
            value = self.mcr
        elif offset == LSR:
            value = LSR_THRE | LSR_TEMT
        elif offset == MSR:
            value = MSR_CONNECTED
        else:
            value = self.scr
        data[0] = value
        if len(data) > 1:
            data[1:] = bytes(len(data) - 1)
