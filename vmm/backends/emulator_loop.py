"""The emulated vCPU's run loop (a mixin of :class:`EmulatorVcpuRunner`): run the engine
to a stop, then act on what stopped it, always at a precise point (see
:mod:`vmm.backends.emulator`).

Stops and what follows: an exception or ``int n`` (UC_HOOK_INTR, or UC_ERR_INSN_INVALID
for #UD) is delivered through the guest's IVT/IDT, or, for the MSR trap's #GP, the MSR
is emulated; the block gate's stop (a yield, an interrupt window, INIT) goes round the
loop, which injects the highest deliverable APIC interrupt when RFLAGS.IF is set and
no interrupt shadow holds; HLT with IF=0 ends the loop as "halted", HLT with IF=1 waits
(blocked) for an interrupt, INIT or a stop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from unicorn import UC_ERR_INSN_INVALID, UC_ERR_OK, Uc, UcError

from vmm.backends.base import HALTED, NEVER_STARTED, STOPPED, TRIPLE_FAULT, Ending, StopFlag, VcpuOutcome
from vmm.backends.emulator_apic import Unmodelled
from vmm.backends.emulator_cpu import Msr, read_msr, write_msr
from vmm.backends.emulator_env import CS, HF_CS64, HF_INHIBIT_IRQ
from vmm.backends.emulator_exceptions import GP, UD, WITH_ERROR_CODE, Delivery, Event, Kind, NotModelled, TripleFault
from vmm.backends.emulator_paging import LinearMemory, PageFault
from vmm.backends.emulator_platform import PARKED, RUNNING, WAIT_SIPI
from vmm.backends.emulator_state import apply_state, read_pc
from vmm.backends.emulator_stubs import MAGIC, native_code
from vmm.cpu.bits import RFLAGS_IF
from vmm.cpu.layout import CpuMode
from vmm.cpu.state import LDT_NONE, CpuState, Segment
from vmm.exits import crashed

if TYPE_CHECKING:
    from vmm.backends.base import ExitCounts
    from vmm.backends.emulator_apic import LocalApic
    from vmm.backends.emulator_env import Env
    from vmm.backends.emulator_platform import Platform, Slot
    from vmm.backends.emulator_stubs import GateState
    from vmm.backends.emulator_turns import Turns
    from vmm.memory import GuestMemory

HALTED_AGAIN = VcpuOutcome(Ending.HALTED, "waiting for SIPI again (after an INIT)")
_PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3})
_SIPI_DATA = Segment(selector=0, base=0, limit=0xFFFF, type=0x3)


def sipi_state(vector: int) -> CpuState:
    """Where STARTUP puts an AP: real mode, CS = vector << 8 (base vector << 12), IP 0,
    the other registers as after INIT (EDX = 0x600, as KVM's reset value)."""
    cs = Segment(selector=vector << 8, base=vector << 12, limit=0xFFFF, type=0xB)
    tr = Segment(selector=0, limit=0xFFFF, type=0xB, s=0)
    d = _SIPI_DATA
    regs = {"rip": 0, "rdx": 0x600, "rflags": 2}
    return CpuState(CpuMode.REAL, regs, cs, d, d, d, d, d, tr, LDT_NONE, cr0=0x60000010)


class Trap:
    """An exception unicorn reported, captured inside its hook."""

    __slots__ = ("vector", "code", "software", "rip")

    def __init__(self, vector: int, code: int, software: bool, rip: int) -> None:
        self.vector, self.code, self.software, self.rip = vector, code, software, rip


class RunLoop:
    """The loop itself; the runner provides the engine, its CPU state and the flags."""

    # Set by EmulatorVcpuRunner.__init__ (and _uc/_env with the engine).
    counts: ExitCounts
    _memory: GuestMemory
    _turns: Turns
    _platform: Platform
    _slot: Slot
    _apic: LocalApic
    _uc: Uc | None
    _env: Env
    _pc: int
    _running: bool
    _fault: VcpuOutcome | None
    _event: Trap | None
    _hook_error: BaseException | None
    _gate: StopFlag
    _gate_state: GateState

    def _engine_error(self, status: int) -> VcpuOutcome:
        raise NotImplementedError

    def preempt(self) -> None:
        raise NotImplementedError

    def _engine(self) -> Uc:
        """The open engine (the loop runs only with one)."""
        assert self._uc is not None
        return self._uc

    def _run(self, uc: Uc, stop: StopFlag) -> VcpuOutcome:
        if self._slot.state in (PARKED, WAIT_SIPI):
            outcome = self._await_sipi(stop)
            if outcome is not None:
                return outcome
        else:
            self._platform.set_state(self._slot, RUNNING)
        return self._loop(uc, stop)

    def _await_sipi(self, stop: StopFlag) -> VcpuOutcome | None:
        """Wait for STARTUP; None once started (the state is loaded), else the outcome."""
        started_before = self._slot.started
        got = self._platform.wait_for_sipi(self._slot, stop, self._gate)
        if got == "stopped":
            return STOPPED
        if got == "never":
            return HALTED_AGAIN if started_before else NEVER_STARTED
        assert isinstance(got, int)
        apply_state(self._engine(), self._env, sipi_state(got))
        self._pc = 0
        return None

    def _loop(self, uc: Uc, stop: StopFlag) -> VcpuOutcome:
        turns, counts, gate, gs, slot = self._turns, self.counts, self._gate, self._gate_state, self._slot
        while True:
            gs.req_now = 0  # before looking at anything a request could be about
            if stop.requested or gate.requested:
                return STOPPED
            if slot.init_pending:  # the platform already reset the APIC and the run state
                outcome = self._await_sipi(stop)
                if outcome is not None:
                    return outcome
                continue
            if self._event is not None:
                outcome = self._handle_event()
                if outcome is not None:
                    return outcome
                continue
            outcome = self._inject()
            if outcome is not None:
                return outcome
            if not turns.acquire(self, stop, gate):
                return STOPPED
            gs.fired = 0
            status = UC_ERR_OK
            # _running goes up before the last look at the gate: a kick either sees it
            # (and repeats uc_emu_stop until the engine returns) or is seen here.
            self._running = True
            try:
                if stop.requested or gate.requested:
                    return STOPPED
                uc.emu_start(self._pc, 0)
            except UcError as e:
                status = e.errno
            finally:
                self._running = False
                self._pc = read_pc(uc)
                turns.release(self)
            error, self._hook_error = self._hook_error, None
            if error is not None:
                raise error  # strict mode's UnhandledAccess, or a device's bug: as on KVM
            if self._fault is not None:
                counts.other += 1
                return self._fault
            if self._event is not None:
                continue
            if status == UC_ERR_INSN_INVALID:
                self._event = Trap(UD, 0, False, self._pc)
                continue
            if status != UC_ERR_OK:
                counts.other += 1
                return self._engine_error(status)
            if stop.requested or gate.requested:
                return STOPPED
            if gs.fired:
                counts.interrupted += 1  # a precise stop: resume at RIP
                continue
            counts.hlt += 1
            if not self._env.eflags & RFLAGS_IF:
                return HALTED
            if not self._platform.wait_for_interrupt(slot, stop, gate):
                return STOPPED

    # --- events ----------------------------------------------------------------------------
    def _handle_event(self) -> VcpuOutcome | None:
        trap, self._event = self._event, None
        assert trap is not None
        self._env.clear_old_exception()  # QEMU's do_interrupt would have (see emulator_env)
        if trap.vector == GP and not trap.software and trap.code & ~1 == MAGIC:
            return self._msr(bool(trap.code & 1), trap.rip)
        if trap.software:
            return self._deliver(Event(trap.vector, Kind.SOFTWARE), trap.rip, self._software_start(trap))
        code = trap.code if trap.vector in WITH_ERROR_CODE else 0
        return self._deliver(Event(trap.vector, Kind.FAULT, code), trap.rip)

    def _software_start(self, trap: Trap) -> int:
        """Where the ``int n``, ``int3`` or ``into`` that raised ``trap`` starts (unicorn
        reports the next instruction; a fault delivering it saves the instruction's own)."""
        before = self._code(trap.rip - 2, 2)
        if before is None:
            return trap.rip
        if (trap.vector, before[1]) in ((3, 0xCC), (4, 0xCE)):
            return trap.rip - 1
        return trap.rip - 2 if before == bytes((0xCD, trap.vector)) else trap.rip

    def _code(self, rip: int, size: int) -> bytes | None:
        """``size`` bytes of code at ``rip`` (CS-relative outside 64-bit code), or None."""
        env = self._env
        linear = rip if env.hflags & HF_CS64 else (env.seg(CS).base + rip) & 0xFFFFFFFF
        try:
            return LinearMemory(self._memory, env.cr(0), env.cr(3), env.cr(4), env.efer).read(linear, size)
        except PageFault:
            return None

    def _deliver(self, event: Event, rip: int, fault_rip: int | None = None) -> VcpuOutcome | None:
        try:
            self._pc = Delivery(self._engine(), self._env, self._memory).deliver(event, rip, fault_rip)
        except TripleFault:
            self.counts.other += 1
            return TRIPLE_FAULT.at(rip)
        except NotModelled as e:
            self.counts.other += 1
            return crashed(str(e), rip)
        return None

    def _inject(self) -> VcpuOutcome | None:
        """Deliver the highest-priority pending APIC interrupt if the CPU can take it now;
        otherwise ask the block gate for the next interrupt window."""
        env, gs = self._env, self._gate_state
        with self._platform.lock:
            vector = self._apic.deliverable()
            if vector is None:
                gs.req_irq = 0
                return None
            if not env.eflags & RFLAGS_IF or env.hflags & HF_INHIBIT_IRQ:
                gs.req_irq = 1
                return None
            self._apic.acknowledge(vector)
            gs.req_irq = 1  # another may be pending: the gate stops when IF allows
        return self._deliver(Event(vector, Kind.EXTERNAL), self._pc)

    def _msr(self, write: bool, rip: int) -> VcpuOutcome | None:
        env, uc = self._env, self._engine()
        msr = env.reg(1) & 0xFFFFFFFF
        value = (env.reg(2) & 0xFFFFFFFF) << 32 | env.reg(0) & 0xFFFFFFFF
        try:
            with self._platform.lock:
                if write:
                    what = write_msr(self._apic, msr, value)
                else:
                    what, value = read_msr(self._apic, msr)
        except Unmodelled as e:
            self.counts.other += 1
            return crashed(str(e), rip)
        if what is Msr.GP:
            return self._deliver(Event(GP, Kind.FAULT, 0), rip)
        if what is Msr.QEMU:
            native = native_code()
            native.set_intercept(env.addr, False)
            try:
                if write:
                    uc.msr_write(msr, value)
                else:
                    value = uc.msr_read(msr)
            finally:
                native.set_intercept(env.addr, True)
        if not write:
            env.set_reg(0, value & 0xFFFFFFFF)
            env.set_reg(2, (value >> 32) & 0xFFFFFFFF)
        self._pc = rip + self._msr_length(rip)
        return None

    def _msr_length(self, rip: int) -> int:
        """RDMSR/WRMSR is 0f 32 / 0f 30 after any legacy and REX prefixes."""
        code = self._code(rip, 15)
        if code is None:
            return 2
        rex = bool(self._env.hflags & HF_CS64)
        n = 0
        while n < 13 and (code[n] in _PREFIXES or (rex and 0x40 <= code[n] <= 0x4F)):
            n += 1
        return n + 2 if code[n] == 0x0F else 2
