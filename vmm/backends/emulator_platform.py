"""What the vCPUs of one emulated machine share: their local APICs, the IPIs between
them, INIT/SIPI, the APIC timers' thread, and each vCPU's run state, under one lock.

Run states (:class:`Slot`): ``idle`` (created), ``ready`` (given a boot state, loop not
entered), ``parked`` (an application processor that has not received INIT),
``wait-sipi`` (INIT received), ``running``, ``halted`` (HLT with IF=1, waiting for an
interrupt) and ``gone`` (its loop returned). ``ready``, ``running`` and ``halted`` vCPUs
are *live*: they can still send an IPI. A vCPU waiting for SIPI gives up (its loop
returns "never started") once no other vCPU is live, so an AP nobody starts does not
keep a machine whose other vCPUs have all halted from ending.

INIT to a running vCPU makes its loop reset it to the wait-for-SIPI state (APIC reset
too, its ID kept) at its next precise point; STARTUP starts a vCPU in ``wait-sipi`` in
real mode at CS = vector << 8, IP = 0, and is ignored otherwise (the second SIPI of the
usual INIT, SIPI, SIPI sequence). INIT to the bootstrap processor (a CPU reset) is not
modelled.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

from vmm.backends.base import StopFlag
from vmm.backends.emulator_apic import ESR_SEND_ILLEGAL, LocalApic, Unmodelled
from vmm.backends.emulator_timer import TimerThread

IDLE, READY, PARKED, WAIT_SIPI, RUNNING, HALTED, GONE = (
    "idle",
    "ready",
    "parked",
    "wait-sipi",
    "running",
    "halted",
    "gone",
)
LIVE = frozenset({READY, RUNNING, HALTED})
WAIT_SLICE_SECONDS = 0.25  # waits re-check their conditions at least this often

FIXED, LOWEST, SMI, NMI, INIT, STARTUP, EXTINT = 0, 1, 2, 4, 5, 6, 7
_MODES = {SMI: "SMI", NMI: "NMI", EXTINT: "ExtINT", 3: "reserved delivery mode 3"}


def _logical_match(apic: LocalApic, dest: int) -> bool:
    """A logical destination: the flat model (DFR 0xf...) matches any common LDR bit,
    the cluster model the cluster (high nibble) and a common bit in the low one."""
    ldr = apic.ldr >> 24
    if apic.dfr >> 28 == 0xF:
        return bool(ldr & dest)
    return ldr >> 4 == dest >> 4 and bool(ldr & dest & 0xF)


class Waker(Protocol):
    """How the platform gets a vCPU's attention (its block gate's flags)."""

    def interrupt_window(self) -> None:
        """Stop at the next block that can take an interrupt (IF=1, no shadow)."""

    def attention(self) -> None:
        """Stop at the next block."""


@dataclass(eq=False)
class Slot:
    """One vCPU's shared state."""

    index: int
    apic: LocalApic
    waker: Waker
    state: str = IDLE
    init_pending: bool = False
    sipi_vector: int | None = None
    started: bool = field(default=False)


class Platform:
    """The machine-wide state of the emulator's vCPUs."""

    def __init__(self) -> None:
        self.lock = threading.Condition(threading.RLock())
        self.timers = TimerThread()
        self.slots: dict[int, Slot] = {}

    def add(self, index: int, waker: Waker) -> Slot:
        with self.lock:
            apic = LocalApic(index, self.lock, self.timers, self._notify, self._send_ipi)
            slot = self.slots[index] = Slot(index, apic, waker)
            return slot

    def close(self) -> None:
        self.timers.close()

    def set_state(self, slot: Slot, state: str) -> None:
        with self.lock:
            slot.state = state
            self.lock.notify_all()

    def wake(self) -> None:
        """Make every waiting vCPU re-check its flags (a kick)."""
        with self.lock:
            self.lock.notify_all()

    def others_live(self, slot: Slot) -> bool:
        return any(s.state in LIVE for s in self.slots.values() if s is not slot)

    # --- waiting ---------------------------------------------------------------------------
    def wait_for_sipi(self, slot: Slot, stop: StopFlag, gate: StopFlag) -> int | str:
        """Until STARTUP: its vector, or "stopped", or "never" (nobody left to send it)."""
        with self.lock:
            slot.init_pending = False  # this is the wait an INIT asks for
            while True:
                if stop.requested or gate.requested:
                    return "stopped"
                if slot.state == WAIT_SIPI and slot.sipi_vector is not None:
                    vector, slot.sipi_vector = slot.sipi_vector, None
                    slot.state, slot.started = RUNNING, True
                    self.lock.notify_all()
                    return vector
                if not self.others_live(slot):
                    return "never"
                self.lock.wait(WAIT_SLICE_SECONDS)

    def wait_for_interrupt(self, slot: Slot, stop: StopFlag, gate: StopFlag) -> bool:
        """HLT with IF=1: until an interrupt is deliverable or INIT arrives (True), or the
        vCPU is stopped (False)."""
        with self.lock:
            slot.state = HALTED
            self.lock.notify_all()
            try:
                while not (stop.requested or gate.requested):
                    if slot.init_pending or slot.apic.deliverable() is not None:
                        return True
                    self.lock.wait(WAIT_SLICE_SECONDS)
                return False
            finally:
                if slot.state == HALTED:  # not if an INIT came
                    slot.state = RUNNING
                self.lock.notify_all()

    # --- interrupts ------------------------------------------------------------------------
    def _notify(self, apic: LocalApic) -> None:
        if apic.deliverable() is not None:
            self.slots[apic.index].waker.interrupt_window()
            self.lock.notify_all()

    def _targets(self, src: LocalApic, low: int, high: int) -> list[Slot]:
        everyone = sorted(self.slots.values(), key=lambda s: s.index)
        shorthand = (low >> 18) & 3
        if shorthand == 1:
            return [self.slots[src.index]]
        if shorthand == 2:
            return everyone
        if shorthand == 3:
            return [s for s in everyone if s.apic is not src]
        dest = high >> 24
        if not low & (1 << 11):  # physical
            return everyone if dest == 0xFF else [s for s in everyone if s.apic.apic_id == dest]
        return [s for s in everyone if _logical_match(s.apic, dest)]

    def _send_ipi(self, src: LocalApic, low: int, high: int) -> None:
        vector, mode = low & 0xFF, (low >> 8) & 7
        if mode in _MODES:
            raise Unmodelled(f"{_MODES[mode]} IPIs (ICR {low:#010x}) are not modelled by the emulator")
        targets = self._targets(src, low, high)
        if mode in (FIXED, LOWEST):
            if vector < 16:
                src.record_error(ESR_SEND_ILLEGAL)
                return
            if mode == LOWEST:
                targets = [s for s in targets if s.apic.software_enabled][:1]
            for s in targets:
                s.apic.accept(vector, level=bool(low & (1 << 15)))
        elif mode == INIT:
            if low & (1 << 15) and not low & (1 << 14):
                return  # INIT level de-assert: nothing happens on modern CPUs
            for s in targets:
                self._init(s)
        else:  # STARTUP
            for s in targets:
                if s.state == WAIT_SIPI and s.sipi_vector is None:
                    s.sipi_vector = vector
        self.lock.notify_all()

    def _init(self, slot: Slot) -> None:
        if slot.apic.base & (1 << 8):
            raise Unmodelled("INIT to the bootstrap processor (a CPU reset) is not modelled by the emulator")
        if slot.state == GONE:
            return  # its loop has returned: nothing runs it any more
        slot.apic.reset()
        if slot.state not in (PARKED, WAIT_SIPI):
            # Running, halted or not yet started: its loop resets the CPU at its next
            # precise point. It waits for SIPI from now on, so a STARTUP sent right
            # after this INIT is not lost.
            slot.init_pending = True
            slot.waker.attention()
        slot.state, slot.sipi_vector = WAIT_SIPI, None
