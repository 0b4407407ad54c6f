"""A small xAPIC per emulated vCPU, at guest-physical 0xfee00000-0xfee00fff (each
vCPU sees its own: the run loop intercepts the page before the bus).

Modelled: ID (vCPU index << 24, writable), version 0x50014 (as KVM reports: six LVT
entries, no directed EOI), TPR and PPR, EOI, LDR and DFR (flat and cluster logical
destinations), SVR (bit 8 software-enables the APIC; disabled, every LVT is masked and
fixed interrupts are not accepted), ISR/IRR/TMR, ESR (illegal vectors sent or received;
written, it latches the errors seen since), ICR (fixed and lowest-priority IPIs, INIT,
STARTUP; physical and logical destinations and the self / all / all-but-self
shorthands; delivery completes at once), the LVT timer, LINT0, LINT1, error, thermal,
performance and CMCI registers, and the timer: one-shot, periodic and TSC-deadline
(IA32_TSC_DEADLINE), with initial count, current count and divide configuration.

Time: the APIC bus runs at 1 GHz (KVM's APIC_BUS_CYCLE_NS): a count lasts ``divisor``
ns of host CLOCK_MONOTONIC, and the current count is the time left to the next expiry
divided by that, so it decreases steadily from the initial count. Periodic timers are
at least 200 us apart (KVM's ``min_timer_period_us``). Interrupts raised while one is
pending in IRR merge with it, as on hardware.

Not modelled (:class:`Unmodelled` ends the run naming it): NMI, SMI and ExtINT IPIs,
x2APIC mode, moving the APIC base. LINT0/LINT1 have nothing connected (no 8259 PIC),
level-triggered EOI reaches no IOAPIC, and no spurious interrupt is ever generated.

Every method runs under the machine's platform lock (``lock``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from vmm.backends.emulator_timer import TimerThread, tsc_to_monotonic_ns

APIC_BASE = 0xFEE00000
APIC_SIZE = 0x1000
APIC_VERSION = 0x50014
BASE_BSP = 1 << 8
BASE_EXTD = 1 << 10
BASE_ENABLE = 1 << 11
BUS_NS = 1
MIN_PERIOD_NS = 200_000

ID, VERSION, TPR, APR, PPR, EOI, RRD, LDR, DFR, SVR = 0x20, 0x30, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0
ISR, TMR, IRR, ESR = 0x100, 0x180, 0x200, 0x280
ICR_LOW, ICR_HIGH = 0x300, 0x310
LVT_CMCI, LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR = (
    0x2F0,
    0x320,
    0x330,
    0x340,
    0x350,
    0x360,
    0x370,
)
TIMER_INITIAL, TIMER_CURRENT, TIMER_DIVIDE = 0x380, 0x390, 0x3E0
# Writable bits of each LVT register (vector, delivery mode, polarity, trigger, mask, timer mode).
LVT_BITS = {
    LVT_TIMER: 0x700FF,
    LVT_THERMAL: 0x107FF,
    LVT_PERF: 0x107FF,
    LVT_CMCI: 0x107FF,
    LVT_LINT0: 0x1A7FF,
    LVT_LINT1: 0x1A7FF,
    LVT_ERROR: 0x100FF,
}
LVT_MASK = 1 << 16
SVR_ENABLE = 1 << 8
ESR_SEND_ILLEGAL = 1 << 5
ESR_RECEIVE_ILLEGAL = 1 << 6
ONE_SHOT, PERIODIC, TSC_DEADLINE = 0, 1, 2


class Unmodelled(Exception):
    """The guest used a part of the APIC the emulator does not model (message: which)."""


def _highest(bits: int) -> int:
    return bits.bit_length() - 1


class LocalApic:
    """One vCPU's local APIC. ``notify(apic)`` is called whenever an interrupt may have
    become deliverable; ``send_ipi(apic, icr_low, icr_high)`` routes an ICR write."""

    def __init__(
        self,
        index: int,
        lock: threading.Condition,
        timers: TimerThread,
        notify: Callable[[LocalApic], None],
        send_ipi: Callable[[LocalApic, int, int], None],
    ) -> None:
        self.index = index
        self.lock = lock
        self._timers = timers
        self._notify = notify
        self._send_ipi = send_ipi
        self.base = APIC_BASE | BASE_ENABLE | (BASE_BSP if index == 0 else 0)
        self.id = index << 24
        self._timer = 0  # TimerThread id of the armed expiry
        self._generation = 0
        self.reset()

    def reset(self) -> None:
        """Power-on / INIT state (the ID and the base MSR survive INIT)."""
        self.tpr = self.ldr = self.icr_low = self.icr_high = 0
        self.dfr = 0xFFFFFFFF
        self.svr = 0xFF
        self.lvt = dict.fromkeys(LVT_BITS, LVT_MASK)
        self.esr = self.esr_pending = 0
        self.irr = self.isr = self.tmr = 0
        self.initial = self.divide = 0
        self.tsc_deadline = 0
        self._expiry = self._period = 0
        self._stop_timer()

    # --- state ---------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """Hardware-enabled (IA32_APIC_BASE bit 11): the MMIO page and interrupts work."""
        return bool(self.base & BASE_ENABLE)

    @property
    def software_enabled(self) -> bool:
        return bool(self.svr & SVR_ENABLE)

    @property
    def apic_id(self) -> int:
        return self.id >> 24

    def ppr(self) -> int:
        isrv = max(_highest(self.isr), 0)
        return self.tpr & 0xFF if self.tpr >> 4 >= isrv >> 4 else isrv & 0xF0

    def deliverable(self) -> int | None:
        """The vector the CPU would take now (IF permitting), or None."""
        if not self.irr:
            return None
        vector = _highest(self.irr)
        return vector if vector >> 4 > self.ppr() >> 4 else None

    def acknowledge(self, vector: int) -> None:
        """The CPU takes ``vector``: IRR -> ISR."""
        self.irr &= ~(1 << vector)
        self.isr |= 1 << vector

    def accept(self, vector: int, level: bool = False) -> None:
        """A fixed interrupt arrives (an IPI, the timer, an LVT)."""
        if not self.enabled or not self.software_enabled:
            return
        if vector < 16:
            self.record_error(ESR_RECEIVE_ILLEGAL)
            return
        self.irr |= 1 << vector
        self.tmr = self.tmr | 1 << vector if level else self.tmr & ~(1 << vector)
        self._notify(self)

    def record_error(self, bits: int) -> None:
        self.esr_pending |= bits
        lvt = self.lvt[LVT_ERROR]
        if not lvt & LVT_MASK and self.software_enabled and lvt & 0xFF >= 16:
            self.irr |= 1 << (lvt & 0xFF)
            self._notify(self)

    # --- MMIO ----------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        """A read of ``size`` bytes at ``offset`` in the page: registers are 32 bits wide,
        16-byte aligned; other bytes read as zero."""
        shift = offset & 0xF
        if shift + size > 4:
            return 0
        return (self._register(offset & ~0xF) >> (8 * shift)) & ((1 << (8 * size)) - 1)

    def _register(self, reg: int) -> int:
        if reg in self.lvt:
            return self.lvt[reg]
        if ISR <= reg < ISR + 0x80:
            return (self.isr >> (32 * ((reg - ISR) >> 4))) & 0xFFFFFFFF
        if TMR <= reg < TMR + 0x80:
            return (self.tmr >> (32 * ((reg - TMR) >> 4))) & 0xFFFFFFFF
        if IRR <= reg < IRR + 0x80:
            return (self.irr >> (32 * ((reg - IRR) >> 4))) & 0xFFFFFFFF
        simple = {
            ID: self.id,
            VERSION: APIC_VERSION,
            TPR: self.tpr,
            PPR: self.ppr(),
            LDR: self.ldr,
            DFR: self.dfr,
            SVR: self.svr,
            ESR: self.esr,
            ICR_LOW: self.icr_low,
            ICR_HIGH: self.icr_high,
            TIMER_INITIAL: self.initial,
            TIMER_DIVIDE: self.divide,
        }
        if reg == TIMER_CURRENT:
            return self.current_count()
        return simple.get(reg, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        """A write: only aligned 32-bit writes reach a register (as on KVM)."""
        if size != 4 or offset & 0xF:
            return
        reg = offset
        if reg in self.lvt:
            self._write_lvt(reg, value)
        elif reg == ID:
            self.id = value & 0xFF000000
        elif reg == TPR:
            self.tpr = value & 0xFF
            self._notify(self)
        elif reg == EOI:
            if self.isr:
                self.isr &= ~(1 << _highest(self.isr))
                self._notify(self)
        elif reg == LDR:
            self.ldr = value & 0xFF000000
        elif reg == DFR:
            self.dfr = value | 0x0FFFFFFF
        elif reg == SVR:
            self.svr = value & 0x3FF
            if not self.software_enabled:
                for lvt in self.lvt:
                    self.lvt[lvt] |= LVT_MASK
        elif reg == ESR:
            self.esr, self.esr_pending = self.esr_pending, 0
        elif reg == ICR_HIGH:
            self.icr_high = value & 0xFF000000
        elif reg == ICR_LOW:
            self.icr_low = value & ~(1 << 12)  # delivery status: always idle
            self._send_ipi(self, self.icr_low, self.icr_high)
        elif reg == TIMER_INITIAL:
            if self.timer_mode != TSC_DEADLINE:
                self.initial = value
                self._stop_timer()
                if value:
                    self._start_timer(time.monotonic_ns())
        elif reg == TIMER_DIVIDE:
            self.divide = value & 0xB

    def _write_lvt(self, reg: int, value: int) -> None:
        value &= LVT_BITS[reg]
        if not self.software_enabled:
            value |= LVT_MASK
        if reg == LVT_TIMER:
            old = self.timer_mode
            self.lvt[reg] = value
            if (old == TSC_DEADLINE) != (self.timer_mode == TSC_DEADLINE):
                self._stop_timer()
                self.initial = self.tsc_deadline = 0
            return
        self.lvt[reg] = value

    # --- the timer -----------------------------------------------------------------------
    @property
    def timer_mode(self) -> int:
        mode = (self.lvt[LVT_TIMER] >> 17) & 3
        return ONE_SHOT if mode == 3 else mode

    @property
    def divisor(self) -> int:
        bits = ((self.divide & 8) >> 1) | (self.divide & 3)
        return 1 << ((bits + 1) & 7)

    def current_count(self) -> int:
        if not self._timer or self.timer_mode == TSC_DEADLINE:
            return 0
        left = max(0, self._expiry - time.monotonic_ns())
        return min(self.initial, left // (self.divisor * BUS_NS))

    def _start_timer(self, now: int) -> None:
        duration = self.initial * self.divisor * BUS_NS
        if self.timer_mode == PERIODIC:
            duration = max(duration, MIN_PERIOD_NS)
        self._period = duration
        self._arm(now + duration)

    def _arm(self, when: int) -> None:
        self._generation += 1
        generation = self._generation
        self._expiry = when
        self._timer = self._timers.arm(when, lambda: self._expired(generation))

    def _stop_timer(self) -> None:
        self._timers.cancel(self._timer)
        self._timer = 0
        self._generation += 1

    def _expired(self, generation: int) -> None:
        with self.lock:
            if generation != self._generation:
                return
            self._timer = 0
            self._fire()
            if self.timer_mode == PERIODIC and self._period:
                now = time.monotonic_ns()
                missed = max(0, (now - self._expiry) // self._period)
                self._arm(self._expiry + (missed + 1) * self._period)
            elif self.timer_mode == TSC_DEADLINE:
                self.tsc_deadline = 0

    def _fire(self) -> None:
        lvt = self.lvt[LVT_TIMER]
        if not lvt & LVT_MASK:
            self.accept(lvt & 0xFF)

    def read_tsc_deadline(self) -> int:
        return self.tsc_deadline if self.timer_mode == TSC_DEADLINE else 0

    def write_tsc_deadline(self, value: int) -> None:
        """IA32_TSC_DEADLINE: arms (0 disarms) the timer in TSC-deadline mode only."""
        if self.timer_mode != TSC_DEADLINE:
            return
        self._stop_timer()
        self.tsc_deadline = value
        if not value:
            return
        when, now = tsc_to_monotonic_ns(value), time.monotonic_ns()
        if when <= now:
            self._fire()
            self.tsc_deadline = 0
        else:
            self._arm(when)

    def write_base(self, value: int) -> bool:
        """IA32_APIC_BASE; False for reserved bits (the caller raises #GP)."""
        if value & ~(0x000F_FFFF_FFFF_F000 | BASE_BSP | BASE_EXTD | BASE_ENABLE):
            return False
        if value & BASE_EXTD:
            raise Unmodelled("x2APIC mode (IA32_APIC_BASE bit 10) is not modelled by the emulator: only the xAPIC")
        if value & ~0xFFF != APIC_BASE:
            raise Unmodelled(f"moving the local APIC to {value & ~0xFFF:#x} is not modelled by the emulator")
        self.base = (value & ~BASE_BSP) | (self.base & BASE_BSP)
        return True
