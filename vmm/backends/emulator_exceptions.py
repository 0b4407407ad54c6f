"""Exception and interrupt delivery through the guest's own IVT or IDT, as the CPU does
it, for an engine stopped at a precise point (unicorn delivers nothing itself: see
:mod:`vmm.backends.emulator`).

* Real mode: the IVT entry (IP, CS) at IDTR.base + 4 * vector; FLAGS, CS, IP pushed on
  SS:SP (16-bit, wrapping); IF, TF, AC and RF cleared. No error codes.
* 32-bit protected mode: 8-byte interrupt and trap gates (16- and 32-bit); the gate's
  DPL checked for ``int n``; a target code segment of a more privileged ring switches
  to SS:ESP of that ring from the TSS (SS, ESP pushed first); EFLAGS, CS, EIP and the
  error code pushed; TF, NT, RF, VM cleared, and IF for interrupt gates.
* Long mode: 16-byte gates; RSP from the 64-bit TSS (RSPn, or ISTn when the gate names
  one, even without a privilege change); the stack aligned down to 16 bytes; SS, RSP,
  RFLAGS, CS, RIP and the error code pushed; SS loaded with a null selector on a
  privilege change.

Error codes (exceptions 8, 10-14, 17, 21): the selector, or ``vector * 8 + 2`` for an
IDT entry, with EXT set unless the event was ``int n``. A fault while delivering an
event escalates as in the SDM's table 6-5: contributory + contributory, or #PF +
(contributory or #PF), becomes #DF (error code 0); any fault while delivering #DF is a
triple fault (:class:`TripleFault`). Not modelled (:class:`NotModelled`): task gates,
virtual-8086 mode, segment limit checks on the stack, the accessed bit of the
descriptors read.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from unicorn import Uc
from unicorn import x86_const as X

from vmm.backends.emulator_env import (
    CS,
    DESC_B,
    DESC_CODE,
    DESC_L,
    DESC_P,
    DESC_S,
    HF_INHIBIT_IRQ,
    RFLAGS_VM,
    SS,
    Env,
)
from vmm.backends.emulator_paging import LinearMemory, PageFault
from vmm.cpu.bits import RFLAGS_AC, RFLAGS_IF, RFLAGS_NT, RFLAGS_RF, RFLAGS_TF
from vmm.memory import GuestMemory

DE, DB, NMI, BP, OF, BR, UD, NM, DF = range(9)
TS, NP, SSF, GP, PF = 10, 11, 12, 13, 14
AC, CP = 17, 21
WITH_ERROR_CODE = frozenset({DF, TS, NP, SSF, GP, PF, AC, CP})
CONTRIBUTORY = frozenset({DE, TS, NP, SSF, GP})

DESC_C = 1 << 10  # conforming code
DESC_W = 1 << 9  # writable data
RSP = 4  # env.regs index


class Kind(enum.Enum):
    FAULT = "exception"  # raised by the CPU (faults, traps, aborts)
    SOFTWARE = "int n"  # int n, int3, into: the gate's DPL is checked, no error code
    EXTERNAL = "interrupt"  # from the local APIC: no error code


@dataclass(frozen=True, slots=True)
class Event:
    """What to deliver. ``error_code`` is pushed for the vectors that have one."""

    vector: int
    kind: Kind
    error_code: int = 0


class TripleFault(Exception):
    """A fault while delivering #DF: the CPU shuts down."""


class NotModelled(Exception):
    """Delivery needs something the emulator does not model (the message says what)."""


class _Fault(Exception):
    def __init__(self, vector: int, code: int = 0, cr2: int | None = None) -> None:
        super().__init__(vector)
        self.vector, self.code, self.cr2 = vector, code, cr2


def _escalates(first: int, second: int) -> bool:
    if first in CONTRIBUTORY and second in CONTRIBUTORY:
        return True
    return first == PF and (second in CONTRIBUTORY or second == PF)


def _base(e1: int, e2: int) -> int:
    return (e1 >> 16) | ((e2 & 0xFF) << 16) | (e2 & 0xFF000000)


def _limit(e1: int, e2: int) -> int:
    limit = (e1 & 0xFFFF) | (e2 & 0xF0000)
    return (limit << 12) | 0xFFF if e2 & (1 << 23) else limit


class Delivery:
    """Delivers events on one stopped engine; ``deliver`` returns the new RIP."""

    def __init__(self, uc: Uc, env: Env, memory: GuestMemory) -> None:
        self.uc, self.env, self.memory = uc, env, memory

    def deliver(self, event: Event, rip: int, fault_rip: int | None = None) -> int:
        """Deliver ``event`` with ``rip`` as the saved instruction pointer, escalating
        faults raised on the way (those save ``fault_rip``: for ``int n`` the address of
        the instruction itself); TripleFault or NotModelled when it cannot."""
        current = event
        while True:
            try:
                return self._once(current, rip if current is event or fault_rip is None else fault_rip)
            except _Fault as f:
                if current.kind is Kind.FAULT and current.vector == DF:
                    raise TripleFault() from None
                if f.cr2 is not None:
                    self.env.set_cr2(f.cr2)
                if current.kind is Kind.FAULT and _escalates(current.vector, f.vector):
                    current = Event(DF, Kind.FAULT, 0)
                else:
                    current = Event(f.vector, Kind.FAULT, f.code)

    # --- common ----------------------------------------------------------------------------
    def _linear(self) -> LinearMemory:
        env = self.env
        return LinearMemory(self.memory, env.cr(0), env.cr(3), env.cr(4), env.efer)

    def _read(self, linear: int, size: int) -> bytes:
        try:
            return self._mem.read(linear, size)
        except PageFault as f:
            raise _Fault(PF, f.code, f.address) from None

    def _write(self, linear: int, data: bytes, user: bool) -> None:
        try:
            self._mem.write(linear, data, user=user)
        except PageFault as f:
            raise _Fault(PF, f.code, f.address) from None

    def _push(self, slots: list[tuple[int, bytes]], user: bool) -> None:
        """Write a frame: ``slots`` (linear address, bytes) in push order. Every slot is
        checked before anything is written, first pushed first, so a #PF names the
        address the CPU's first failing push would (CR2) and leaves memory unchanged."""
        for linear, data in slots:
            try:
                self._mem.translate(linear, write=True, user=user)
                self._mem.translate(linear + len(data) - 1, write=True, user=user)
            except PageFault as f:
                raise _Fault(PF, f.code, f.address) from None
        for linear, data in slots:
            self._write(linear, data, user)

    def _descriptor(self, selector: int, vector: int, ext: int) -> tuple[int, int]:
        """The 8-byte GDT/LDT descriptor of ``selector``; ``vector`` (with the selector as
        error code) when it is null or beyond the table's limit."""
        env = self.env
        if selector & 0xFFFC == 0:
            raise _Fault(vector, ext)
        if selector & 4:
            ldt = env.ldt
            base, limit = ldt.base, ldt.limit
        else:
            base, limit = env.gdt
        index = selector & ~7
        if index + 7 > limit:
            raise _Fault(vector, (selector & 0xFFFC) | ext)
        e1, e2 = struct.unpack("<II", self._read(base + index, 8))
        return e1, e2

    def _gate(self, event: Event, size: int, ext: int) -> tuple[int, ...]:
        base, limit = self.env.idt
        code = event.vector * 8 + 2 + ext
        if event.vector * size + size - 1 > limit:
            raise _Fault(GP, code)
        words = struct.unpack(f"<{size // 4}I", self._read(base + event.vector * size, size))
        e2 = words[1]
        if event.kind is Kind.SOFTWARE and (e2 >> 13) & 3 < self.env.cpl:
            raise _Fault(GP, event.vector * 8 + 2)
        return words

    def _target_code(self, selector: int, ext: int, long_mode: bool) -> tuple[int, int]:
        e1, e2 = self._descriptor(selector, GP, ext)
        code = (selector & 0xFFFC) | ext
        if e2 & (DESC_S | DESC_CODE) != DESC_S | DESC_CODE or (e2 >> 13) & 3 > self.env.cpl:
            raise _Fault(GP, code)
        if long_mode and (not e2 & DESC_L or e2 & DESC_B):
            raise _Fault(GP, code)
        if not e2 & DESC_P:
            raise _Fault(NP, code)
        return e1, e2

    def _finish(self, cs: int, e1: int, e2: int, cpl: int, trap_gate: bool, rflags: int) -> None:
        env = self.env
        env.load_seg(CS, (cs & 0xFFFC) | cpl, _base(e1, e2), _limit(e1, e2), e2)
        rflags &= ~(RFLAGS_TF | RFLAGS_VM | RFLAGS_RF | RFLAGS_NT)
        if not trap_gate:
            rflags &= ~RFLAGS_IF
        self.uc.reg_write(X.UC_X86_REG_RFLAGS, rflags)
        env.hflags &= ~HF_INHIBIT_IRQ
        env.clear_old_exception()

    def _once(self, event: Event, rip: int) -> int:
        env = self.env
        self._mem = self._linear()
        ext = 0 if event.kind is Kind.SOFTWARE else 1
        if not env.cr(0) & 1:
            return self._real(event, rip)
        if env.eflags & RFLAGS_VM:
            raise NotModelled("virtual-8086 mode is not modelled by the emulator")
        if env.long_mode:
            return self._long(event, rip, ext)
        return self._protected(event, rip, ext)

    # --- real mode -------------------------------------------------------------------------
    def _real(self, event: Event, rip: int) -> int:
        env = self.env
        base, limit = env.idt
        if event.vector * 4 + 3 > limit:
            raise _Fault(GP)
        ip, cs = struct.unpack("<HH", self._read(base + event.vector * 4, 4))
        rflags = self.uc.reg_read(X.UC_X86_REG_RFLAGS)
        ss = env.seg(SS)
        sp = env.reg(RSP)
        for word in (rflags & 0xFFFF, env.seg(CS).selector, rip & 0xFFFF):
            sp = (sp & ~0xFFFF) | ((sp - 2) & 0xFFFF)
            self._write(ss.base + (sp & 0xFFFF), struct.pack("<H", word), False)
        env.set_reg(RSP, sp)
        old = env.seg(CS)
        env.load_seg(CS, cs, cs << 4, old.limit, old.flags)
        self.uc.reg_write(X.UC_X86_REG_RFLAGS, rflags & ~(RFLAGS_IF | RFLAGS_TF | RFLAGS_AC | RFLAGS_RF))
        env.hflags &= ~HF_INHIBIT_IRQ
        env.clear_old_exception()
        return ip

    # --- 32-bit protected mode -------------------------------------------------------------
    def _protected(self, event: Event, rip: int, ext: int) -> int:
        env = self.env
        e1, e2 = self._gate(event, 8, ext)
        kind = (e2 >> 8) & 0x1F
        if kind == 5:
            raise NotModelled(f"vector {event.vector:#x} is a task gate: task switches are not modelled")
        if kind not in (6, 7, 0xE, 0xF):
            raise _Fault(GP, event.vector * 8 + 2 + ext)
        if not e2 & DESC_P:
            raise _Fault(NP, event.vector * 8 + 2 + ext)
        selector, wide = e1 >> 16, kind >= 0xE
        offset = (e2 & 0xFFFF0000) | (e1 & 0xFFFF) if wide else e1 & 0xFFFF
        c1, c2 = self._target_code(selector, ext, False)
        cpl, dpl = env.cpl, (c2 >> 13) & 3
        if offset > _limit(c1, c2):
            raise _Fault(GP, ext)
        rflags = self.uc.reg_read(X.UC_X86_REG_RFLAGS)
        ss, esp = env.seg(SS), env.reg(RSP)
        inner = not c2 & DESC_C and dpl < cpl
        words = []
        if inner:
            new_ss, new_esp, s1, s2 = self._tss_stack32(dpl, ext)
            words += [ss.selector, esp & 0xFFFFFFFF]
            stack_base, stack_flags, sp = _base(s1, s2), s2, new_esp
        else:
            new_ss, s1, s2 = ss.selector, 0, 0
            stack_base, stack_flags, sp = ss.base, ss.flags, esp
        new_cpl = dpl if inner else cpl
        words += [rflags, env.seg(CS).selector, rip]
        if event.kind is Kind.FAULT and event.vector in WITH_ERROR_CODE:
            words.append(event.error_code)
        size = 4 if wide else 2
        mask = 0xFFFFFFFF if stack_flags & DESC_B else 0xFFFF
        slots = []
        for k, word in enumerate(words, 1):
            at = (stack_base + ((sp - k * size) & mask)) & 0xFFFFFFFF
            slots.append((at, (word & (1 << 8 * size) - 1).to_bytes(size, "little")))
        new_sp = (sp - len(words) * size) & mask
        self._push(slots, new_cpl == 3)
        if inner:
            env.load_seg(SS, new_ss, _base(s1, s2), _limit(s1, s2), s2)
        env.set_reg(RSP, (sp & ~mask) | new_sp if not inner else new_sp)
        self._finish(selector, c1, c2, new_cpl, kind & 1 == 1, rflags)
        return offset

    def _tss_stack32(self, dpl: int, ext: int) -> tuple[int, int, int, int]:
        """SS:ESP for ring ``dpl`` from the (16- or 32-bit) TSS, and SS's descriptor."""
        tr = self.env.tr
        kind = (tr.flags >> 8) & 0xF
        if kind not in (1, 3, 9, 0xB):
            raise _Fault(TS, (tr.selector & 0xFFFC) | ext)
        shift = 1 if kind >= 9 else 0
        index = (dpl * 4 + 2) << shift
        if index + (4 << shift) - 1 > tr.limit:
            raise _Fault(TS, (tr.selector & 0xFFFC) | ext)
        raw = self._read(tr.base + index, 4 << shift)
        esp, ss = struct.unpack("<IH2x", raw) if shift else struct.unpack("<HH", raw)
        if ss & 0xFFFC == 0:
            raise _Fault(TS, ext)
        code = (ss & 0xFFFC) | ext
        if ss & 3 != dpl:
            raise _Fault(TS, code)
        s1, s2 = self._descriptor(ss, TS, ext)
        if (s2 >> 13) & 3 != dpl or s2 & (DESC_S | DESC_CODE | DESC_W) != DESC_S | DESC_W:
            raise _Fault(TS, code)
        if not s2 & DESC_P:
            raise _Fault(SSF, code)
        return ss, esp, s1, s2

    # --- long mode -------------------------------------------------------------------------
    def _long(self, event: Event, rip: int, ext: int) -> int:
        env = self.env
        e1, e2, e3, _ = self._gate(event, 16, ext)
        kind = (e2 >> 8) & 0x1F
        if kind not in (0xE, 0xF):
            raise _Fault(GP, event.vector * 8 + 2 + ext)
        if not e2 & DESC_P:
            raise _Fault(NP, event.vector * 8 + 2 + ext)
        selector, ist = e1 >> 16, e2 & 7
        offset = (e1 & 0xFFFF) | (e2 & 0xFFFF0000) | (e3 << 32)
        c1, c2 = self._target_code(selector, ext, True)
        cpl, dpl = env.cpl, (c2 >> 13) & 3
        inner = not c2 & DESC_C and dpl < cpl
        new_cpl = dpl if inner else cpl
        rsp = env.reg(RSP)
        if inner or ist:
            rsp = self._tss_stack64(ist + 3 if ist else dpl, ext)
        rsp &= ~0xF
        rflags = self.uc.reg_read(X.UC_X86_REG_RFLAGS)
        words = [env.seg(SS).selector, env.reg(RSP), rflags, env.seg(CS).selector, rip]
        if event.kind is Kind.FAULT and event.vector in WITH_ERROR_CODE:
            words.append(event.error_code)
        top = rsp
        rsp = (rsp - 8 * len(words)) & (1 << 64) - 1
        slots = [((top - 8 * k) & (1 << 64) - 1, struct.pack("<Q", w & (1 << 64) - 1)) for k, w in enumerate(words, 1)]
        self._push(slots, new_cpl == 3)
        if inner:
            env.load_seg(SS, new_cpl, 0, 0, new_cpl << 13)
        env.set_reg(RSP, rsp)
        self._finish(selector, c1, c2, new_cpl, kind == 0xF, rflags)
        return offset

    def _tss_stack64(self, slot: int, ext: int) -> int:
        """RSP0-2 (``slot`` 0-2) or IST1-7 (``slot`` 4-10) from the 64-bit TSS."""
        tr = self.env.tr
        index = slot * 8 + 4
        if (tr.flags >> 8) & 0xF not in (9, 0xB) or index + 7 > tr.limit:
            raise _Fault(TS, (tr.selector & 0xFFFC) | ext)
        return int.from_bytes(self._read(tr.base + index, 8), "little")
