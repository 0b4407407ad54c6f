"""A 16550A-compatible UART, transmit side (COM1 at 0x3f8 by default).

Emulated: THR writes go to ``out``; the divisor latch (DLAB), IER, LCR, MCR and
scratch registers hold what is written; LSR always reports the transmitter empty
(THRE|TEMT) so polling guests never wait; MSR reports a connected line (DCD|DSR|CTS).
The transmit-empty interrupt, as QEMU's serial.c raises it: pending when the guest
enables it in IER and after every THR write (transmission is instant), cleared by the
IIR read that reports it or by disabling it; ``irq(level)`` drives the line (IRQ 4 on
the PC: KVM_IRQ_LINE into the in-kernel irqchip), so an interrupt-driven console (Linux's
8250 driver once userspace writes) keeps going. IIR carries the FIFO bits once FCR
enabled them. Not emulated: receive (RBR reads 0, DR is never set), line-status and
modem-status interrupts, loopback, baud-rate timing.
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
IIR_THRI = 0x02  # transmit holding register empty
IER_THRI = 0x02
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE_FIFO = 0x01
MSR_CONNECTED = 0x80 | 0x20 | 0x10  # DCD | DSR | CTS


class Serial16550:
    """The UART. ``out(byte_string)`` receives every transmitted byte."""

    __slots__ = ("_out", "_irq", "ier", "lcr", "mcr", "scr", "fcr", "dll", "dlm", "thr_pending", "_line")
    name = "serial"
    WIDTH = 8

    def __init__(self, out: Callable[[bytes], None], irq: Callable[[int], None] | None = None) -> None:
        self._out = out
        self._irq = irq
        self._line = 0
        self.reset()

    def reset(self) -> None:
        """Power-on state: 115200 8N1-ish divisor, everything else zero, no interrupt."""
        self.ier = self.lcr = self.mcr = self.scr = self.fcr = 0
        self.dll, self.dlm = 1, 0
        self.thr_pending = False
        self._update_irq()

    def _update_irq(self) -> None:
        level = 1 if self.ier & IER_THRI and self.thr_pending else 0
        if level != self._line:
            self._line = level
            if self._irq is not None:
                self._irq(level)

    def write(self, offset: int, data: memoryview) -> None:
        value = data[0]
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                self.dll = value
            else:
                self._out(bytes(data[:1]))
                self.thr_pending = True  # sent at once: the holding register is empty again
                self._update_irq()
        elif offset == IER_DLM:
            if dlab:
                self.dlm = value
            else:
                if value & IER_THRI and not self.ier & IER_THRI:
                    self.thr_pending = True  # enabling it with THR empty raises it (QEMU)
                self.ier = value & 0x0F
                self._update_irq()
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
            fifo = IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE_FIFO else 0
            if self._line:
                value = IIR_THRI | fifo
                self.thr_pending = False  # reading the IIR that reports it clears it
                self._update_irq()
            else:
                value = IIR_NO_INTERRUPT | fifo
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
