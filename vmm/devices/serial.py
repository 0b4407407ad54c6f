"""A 16550A-compatible UART (COM1 at 0x3f8 by default).

Transmit: THR writes go to ``out``; the divisor latch (DLAB), IER, LCR, MCR and scratch
registers hold what is written; LSR always reports the transmitter empty (THRE|TEMT) so
polling guests never wait; MSR reports a connected line (DCD|DSR|CTS).

Receive: a 16-byte FIFO, filled from ``source`` (a host-side bounded queue,
:class:`vmm.console_input.InputQueue`) whenever it has room: when the host calls
:meth:`pull` after input arrived, and after every RBR read. LSR.DR says a byte waits;
RBR reads take it (0 when empty).

Interrupts, with the 16550's priorities in IIR: received data available (IIR 0x04, when
IER.ERBFI and the FIFO holds a byte: the trigger level is one byte, so no
character-timeout interrupt is needed) before transmitter empty (IIR 0x02, as QEMU's
serial.c raises it: pending when the guest enables it in IER and after every THR write,
transmission being instant; cleared by the IIR read that reports it or by disabling it).
``irq(level)`` drives the line (IRQ 4 on the PC: KVM_IRQ_LINE into the in-kernel
irqchip), so an interrupt-driven console (Linux's 8250 driver) keeps going both ways.
IIR carries the FIFO bits once FCR enabled them; FCR's receive-reset bit empties the
FIFO. The receive side is called from the host's input thread and vCPU threads, so the
device state is under one lock. Not emulated: line-status and modem-status interrupts,
overrun (the host queue holds back what does not fit), loopback, baud-rate timing.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Protocol

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
LSR_DR = 0x01  # data ready
LSR_THRE = 0x20  # transmit holding register empty
LSR_TEMT = 0x40  # transmitter empty
IIR_NO_INTERRUPT = 0x01
IIR_THRI = 0x02  # transmit holding register empty
IIR_RDI = 0x04  # received data available
IER_RDI = 0x01
IER_THRI = 0x02
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
RX_FIFO = 16


class ByteSource(Protocol):
    """Where received bytes come from (the host's input queue)."""

    def take(self, limit: int) -> bytes:
        """At most ``limit`` bytes, at once (b"" when none wait)."""
        ...


MSR_CONNECTED = 0x80 | 0x20 | 0x10  # DCD | DSR | CTS


class Serial16550:
    """The UART. ``out(byte_string)`` receives every transmitted byte."""

    __slots__ = (
        "_out", "_irq", "_source", "_lock", "rx", "ier", "lcr", "mcr", "scr", "fcr", "dll", "dlm",
        "thr_pending", "_line",
    )  # fmt: skip
    name = "serial"
    WIDTH = 8

    def __init__(
        self,
        out: Callable[[bytes], None],
        irq: Callable[[int], None] | None = None,
        source: ByteSource | None = None,
    ) -> None:
        self._out = out
        self._irq = irq
        self._source = source
        self._lock = threading.RLock()
        self.rx: deque[int] = deque()
        self._line = 0
        self.reset()

    def reset(self) -> None:
        """Power-on state: 115200 8N1-ish divisor, everything else zero, no interrupt."""
        with self._lock:
            self.ier = self.lcr = self.mcr = self.scr = self.fcr = 0
            self.dll, self.dlm = 1, 0
            self.thr_pending = False
            self.rx.clear()
            self._update_irq()

    def pull(self) -> None:
        """Fill the receive FIFO from the source as far as it has room (the host's input
        thread calls this when bytes arrived)."""
        with self._lock:
            self._refill()
            self._update_irq()

    def _refill(self) -> None:
        room = RX_FIFO - len(self.rx)
        if room > 0 and self._source is not None:
            self.rx.extend(self._source.take(room))

    def _pending(self) -> int:
        """The IIR interrupt id of the highest-priority pending interrupt, else 0."""
        if self.ier & IER_RDI and self.rx:
            return IIR_RDI
        if self.ier & IER_THRI and self.thr_pending:
            return IIR_THRI
        return 0

    def _update_irq(self) -> None:
        level = 1 if self._pending() else 0
        if level != self._line:
            self._line = level
            if self._irq is not None:
                self._irq(level)

    def write(self, offset: int, data: memoryview) -> None:
        with self._lock:
            self._write(offset, data)

    def read(self, offset: int, data: memoryview) -> None:
        with self._lock:
            self._read(offset, data)

    def _write(self, offset: int, data: memoryview) -> None:
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
            if value & FCR_CLEAR_RCVR:
                self.rx.clear()
                self._refill()
                self._update_irq()
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
        elif offset == SCR:
            self.scr = value
        # LSR and MSR are read-only; writes are ignored as on real hardware.

    def _read(self, offset: int, data: memoryview) -> None:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                value = self.dll
            elif self.rx:
                value = self.rx.popleft()
                self._refill()
                self._update_irq()
            else:
                value = 0
        elif offset == IER_DLM:
            value = self.dlm if dlab else self.ier
        elif offset == IIR_FCR:
            fifo = IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE_FIFO else 0
            pending = self._pending()
            if pending == IIR_THRI:
                self.thr_pending = False  # reading the IIR that reports it clears it
                self._update_irq()
            value = (pending or IIR_NO_INTERRUPT) | fifo
        elif offset == LCR:
            value = self.lcr
        elif offset == MCR:
            value = self.mcr
        elif offset == LSR:
            value = LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0)
        elif offset == MSR:
            value = MSR_CONNECTED
        else:
            value = self.scr
        data[0] = value
        if len(data) > 1:
            data[1:] = bytes(len(data) - 1)
