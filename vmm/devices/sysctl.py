"""The PC's system control ports: port 0x92 ("system control port A", the fast A20 gate
and fast reset) and port 0x61 ("system control port B": speaker gate, refresh toggle).

Port 0x92, as QEMU's port92 device: every bit written reads back. Bit 1 is the A20 gate
(:attr:`SystemControlA.a20`; state only, A20 is never masked). Bit 0 going from 0 to 1
pulses the fast reset: the injected ``reset()`` is called; :meth:`SystemControlA.reset`
(the machine's reset) clears bit 0 again, so the next 0 -> 1 resets again.

Port 0x61, as QEMU's pcspk device: bits 0 (PIT channel 2 gate) and 1 (speaker data
enable) read back what was written; bit 4 (memory refresh) toggles on every read, so a
delay loop that waits for it to change ends; bit 5 is PIT channel 2's OUT from the
injected ``pit_out2()``, or, with no PIT model (the default), the gate itself: a guest
that opens the gate and waits for OUT to rise continues at once instead of spinning
forever (its measurement is then meaningless, but it does not hang). Bits 2-3 and 6-7
(parity and I/O-check enables and flags) read 0. Writes of the other bits are dropped.

On KVM with the in-kernel PIT (KVM_CREATE_PIT2 with KVM_PIT_SPEAKER_DUMMY, as
vmm.backends.kvm creates it), the kernel's arch/x86/kvm/i8254.c registers a speaker
device over ports 0x61-0x64 that handles every access to 0x61 itself (any width; its
refresh bit follows host time in 16 us steps, its OUT bit the kernel PIT) and returns
EOPNOTSUPP for 0x62-0x64, which therefore exit to userspace. So on KVM this port-B model
is never reached; it serves the emulator backend, which has no PIT. Port 0x92 always
reaches userspace.

Not emulated: the speaker's sound, NMI sources (parity, I/O check), port 0x92's other
chipset bits (they are only stored), the watchdog and A20 masking.
"""

from __future__ import annotations

from collections.abc import Callable

PORT_A = 0x92
PORT_B = 0x61

A_FAST_RESET = 0x01
A_A20 = 0x02

B_GATE2 = 0x01
B_SPEAKER = 0x02
B_REFRESH = 0x10
B_OUT2 = 0x20
B_WRITABLE = B_GATE2 | B_SPEAKER


class SystemControlA:
    """Port 0x92; ``reset()`` is called when the guest sets bit 0."""

    __slots__ = ("_reset", "value")
    name = "port92"
    WIDTH = 1

    def __init__(self, reset: Callable[[], None]) -> None:
        self._reset = reset
        self.value = 0

    def reset(self) -> None:
        """As QEMU's port92_reset: bit 0 clears, the rest (A20 included) stays."""
        self.value &= ~A_FAST_RESET

    @property
    def a20(self) -> bool:
        """The fast A20 gate (bit 1) as last written."""
        return bool(self.value & A_A20)

    def read(self, offset: int, data: memoryview) -> None:
        data[0] = self.value
        if len(data) > 1:
            data[1:] = b"\xff" * (len(data) - 1)

    def write(self, offset: int, data: memoryview) -> None:
        old, self.value = self.value, data[0]
        if self.value & A_FAST_RESET and not old & A_FAST_RESET:
            self._reset()


class SystemControlB:
    """Port 0x61; ``pit_out2()``, if given, is PIT channel 2's OUT line."""

    __slots__ = ("_pit_out2", "value", "_refresh")
    name = "port61"
    WIDTH = 1

    def __init__(self, pit_out2: Callable[[], bool] | None = None) -> None:
        self._pit_out2 = pit_out2
        self.reset()

    def reset(self) -> None:
        """Gate and speaker off, refresh bit 0."""
        self.value = 0
        self._refresh = 0

    def read(self, offset: int, data: memoryview) -> None:
        self._refresh ^= B_REFRESH
        gate = self.value & B_GATE2
        out = self._pit_out2() if self._pit_out2 is not None else gate
        data[0] = self.value | self._refresh | (B_OUT2 if out else 0)
        if len(data) > 1:
            data[1:] = b"\xff" * (len(data) - 1)

    def write(self, offset: int, data: memoryview) -> None:
        self.value = data[0] & B_WRITABLE
