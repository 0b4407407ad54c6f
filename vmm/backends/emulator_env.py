"""QEMU's CPU state (``CPUX86State``) of one unicorn engine, read and written in place.

unicorn's register API cannot do what the emulator needs (measured on unicorn 2.1.4):

* In a UC_MODE_64 engine a write to CS, DS, ES or SS sets the selector and nothing
  else; no call loads a descriptor cache or changes the CPL, which exception delivery
  (a ring-3 to ring-0 switch, a real-mode IVT jump) and INIT/SIPI must do.
* unicorn calls UC_HOOK_INTR in place of QEMU's ``do_interrupt``, so QEMU's
  nested-exception bookkeeping (``old_exception``) is never reset: the second
  contributory exception of a run arrives as #DF with error code 0, the third ends
  emulation silently as if by HLT (measured: three ``div`` by zero in a row).
* The error code of an exception (``error_code``) and whether it came from ``int n``
  (``exception_is_int``) are not exposed.

So each engine's CPUX86State is located (:meth:`NativeCode.capture_env`) and these
fields are used at the offsets below (x86_64 target, unicorn 2.1.4's QEMU 5). They are
checked against the register API for every engine, and once per process against three
probe exceptions (:func:`probe`); a mismatch is Unavailable, never a wrong guess.

=========================  ===========  ===============================================
field                      byte offset  notes
=========================  ===========  ===============================================
regs[16]                   0            RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8-R15
eip, eflags                128, 136     eflags is complete while the engine is stopped
hflags                     176          CPL (bits 0-1), INHIBIT_IRQ (3), CS32, SS32, ...
segs[6]                    184          ES CS SS DS FS GS: {u32 selector, u64 base,
                                        u32 limit, u32 flags}, 24 bytes each
ldt, tr, gdt, idt          328 ... 400  same layout
cr[5]                      424
efer                       592
error_code, exception_is_int  5384, 5388
old_exception              5496         -1 when no exception is being delivered
=========================  ===========  ===============================================

Segment ``flags`` are the descriptor's high dword (type << 8, S, DPL, P, L, D/B, G), as
QEMU keeps them; :meth:`Env.load_seg` updates ``hflags`` as QEMU's
``cpu_x86_load_seg_cache`` does (CPL from SS.DPL, 16/32/64-bit code and stack).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn import x86_const as X

from vmm.backends.emulator_stubs import MAGIC, native_code
from vmm.cpu.bits import CR0_PE, EFER_LMA, RFLAGS_VM
from vmm.errors import Unavailable

ES, CS, SS, DS, FS, GS = range(6)
SEG_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")
_SIZE = 5504

_EIP, _EFLAGS, _HFLAGS, _SEGS = 128, 136, 176, 184
_LDT, _TR, _GDT, _IDT, _CR, _EFER = 328, 352, 376, 400, 424, 592
_ERROR_CODE, _IS_INT, _OLD_EXCEPTION = 5384, 5388, 5496

HF_CPL = 3
HF_INHIBIT_IRQ = 1 << 3
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_LMA = 1 << 14
HF_CS64 = 1 << 15

DESC_B = 1 << 22
DESC_L = 1 << 21
DESC_P = 1 << 15
DESC_S = 1 << 12
DESC_CODE = 1 << 11


@dataclass(frozen=True, slots=True)
class SegCache:
    """A segment register's hidden state as QEMU holds it."""

    selector: int
    base: int
    limit: int
    flags: int

    @property
    def dpl(self) -> int:
        return (self.flags >> 13) & 3


class Env:
    """Typed access to one engine's CPUX86State at ``addr`` (valid while the engine lives)."""

    __slots__ = ("addr", "_q", "_d", "_i")

    def __init__(self, addr: int) -> None:
        self.addr = addr
        self._q = (ctypes.c_uint64 * (_SIZE // 8)).from_address(addr)
        self._d = (ctypes.c_uint32 * (_SIZE // 4)).from_address(addr)
        self._i = (ctypes.c_int32 * (_SIZE // 4)).from_address(addr)

    # --- plain fields --------------------------------------------------------------------
    def reg(self, index: int) -> int:
        return self._q[index]

    def set_reg(self, index: int, value: int) -> None:
        self._q[index] = value & (1 << 64) - 1

    @property
    def eip(self) -> int:
        return self._q[_EIP // 8]

    @property
    def eflags(self) -> int:
        return self._q[_EFLAGS // 8]

    @property
    def hflags(self) -> int:
        return self._d[_HFLAGS // 4]

    @hflags.setter
    def hflags(self, value: int) -> None:
        self._d[_HFLAGS // 4] = value

    @property
    def cpl(self) -> int:
        return self.hflags & HF_CPL

    @property
    def long_mode(self) -> bool:
        return bool(self.hflags & HF_LMA)

    def cr(self, n: int) -> int:
        return self._q[_CR // 8 + n]

    def set_cr2(self, value: int) -> None:
        self._q[_CR // 8 + 2] = value

    @property
    def efer(self) -> int:
        return self._q[_EFER // 8]

    def set_efer(self, value: int) -> None:
        """EFER as a whole (LMA included, which WRMSR cannot set) and hflags.LMA with it."""
        self._q[_EFER // 8] = value
        self.hflags = (self.hflags & ~HF_LMA) | (HF_LMA if value & EFER_LMA else 0)

    @property
    def error_code(self) -> int:
        return self._d[_ERROR_CODE // 4]

    @property
    def exception_is_int(self) -> bool:
        return bool(self._d[_IS_INT // 4])

    def clear_old_exception(self) -> None:
        """Tell QEMU no exception is being delivered (its do_interrupt would)."""
        self._i[_OLD_EXCEPTION // 4] = -1

    @property
    def old_exception(self) -> int:
        return self._i[_OLD_EXCEPTION // 4]

    # --- segments and tables -------------------------------------------------------------
    def _cache(self, offset: int) -> SegCache:
        return SegCache(
            self._d[offset // 4], self._q[offset // 8 + 1], self._d[offset // 4 + 4], self._d[offset // 4 + 5]
        )

    def seg(self, index: int) -> SegCache:
        return self._cache(_SEGS + 24 * index)

    @property
    def tr(self) -> SegCache:
        return self._cache(_TR)

    @property
    def ldt(self) -> SegCache:
        return self._cache(_LDT)

    @property
    def gdt(self) -> tuple[int, int]:
        """(base, limit)."""
        c = self._cache(_GDT)
        return c.base, c.limit

    @property
    def idt(self) -> tuple[int, int]:
        c = self._cache(_IDT)
        return c.base, c.limit

    def load_seg(self, index: int, selector: int, base: int, limit: int, flags: int) -> None:
        """Load a segment register's cache and update hflags as QEMU's
        ``cpu_x86_load_seg_cache`` does."""
        offset = _SEGS + 24 * index
        self._d[offset // 4] = selector
        self._q[offset // 8 + 1] = base
        self._d[offset // 4 + 4] = limit
        self._d[offset // 4 + 5] = flags
        h = self.hflags
        if index == CS:
            if h & HF_LMA and flags & DESC_L:
                h |= HF_CS32 | HF_SS32 | HF_CS64
            else:
                h = (h & ~(HF_CS32 | HF_CS64)) | (HF_CS32 if flags & DESC_B else 0)
        if index == SS:
            h = (h & ~HF_CPL) | (flags >> 13) & 3
        new = HF_SS32 if self.seg(SS).flags & DESC_B else 0
        if h & HF_CS64:
            pass  # DS, ES and SS have base 0 in 64-bit code
        elif (
            not self.cr(0) & CR0_PE
            or self.eflags & RFLAGS_VM
            or not h & HF_CS32
            or self.seg(DS).base | self.seg(ES).base | self.seg(SS).base
        ):
            new |= HF_ADDSEG
        self.hflags = (h & ~(HF_SS32 | HF_ADDSEG)) | new


def check_layout(uc: Uc, env: Env) -> None:
    """The offsets above agree with what the register API reports for ``uc``."""
    probes = [(X.UC_X86_REG_RAX + 0, 0), (X.UC_X86_REG_RDI, 7), (X.UC_X86_REG_R15, 15)]
    saved = {reg: uc.reg_read(reg) for reg, _ in probes}
    try:
        for n, (reg, index) in enumerate(probes):
            value = 0x0123_4567_89AB_0000 | n
            uc.reg_write(reg, value)
            if env.reg(index) != value:
                raise Unavailable(f"unicorn's CPU state layout is not the one the emulator knows (register {index})")
    finally:
        for reg, value in saved.items():
            uc.reg_write(reg, value)
    checks = {
        "eip": (env.eip, uc.reg_read(X.UC_X86_REG_RIP)),
        "eflags": (env.eflags, uc.reg_read(X.UC_X86_REG_RFLAGS)),
        "cr3": (env.cr(3), uc.reg_read(X.UC_X86_REG_CR3)),
        "gdt": (env.gdt[0], uc.reg_read(X.UC_X86_REG_GDTR)[1]),
        "tr": (env.tr.selector, uc.reg_read(X.UC_X86_REG_TR)[0]),
        "cs": (env.seg(CS).selector, uc.reg_read(X.UC_X86_REG_CS)),
    }
    for name, (found, expected) in checks.items():
        if found != expected:
            raise Unavailable(f"unicorn's CPU state layout is not the one the emulator knows ({name})")


# xor %ecx,%ecx; div %ecx; int $0x21; mov $0x5b,%ax; mov %ax,%ds; mov $0xdead,%ecx;
# rdmsr; wrmsr; hlt
_PROBE_CODE = bytes.fromhex("31c9f7f1cd2166b85b008ed8b9adde00000f320f30f4")
_PROBE_EXPECT = [
    (0, 0, False, 0, 0x1002),  # #DE: vector, error code, from int n, old_exception, RIP
    (0x21, 0, True, -1, 0x1006),  # int $0x21: RIP after it; old_exception untouched
    (13, 0x58, False, 13, 0x100A),  # #GP(selector 0x58)
    (13, MAGIC, False, 13, 0x1011),  # the MSR trap: RDMSR
    (13, MAGIC | 1, False, 13, 0x1013),  # WRMSR
]
_probed = False
_probe_lock = threading.Lock()


def probe() -> None:
    """Once per process: a scratch engine raises five exceptions and the fields at the
    offsets above must say what QEMU did (Unavailable otherwise)."""
    global _probed
    with _probe_lock:
        if _probed:
            return
        native = native_code()
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map(0, 0x10000, UC_PROT_ALL)
        uc.mem_write(0x1000, _PROBE_CODE)
        uc.reg_write(X.UC_X86_REG_GDTR, (0, 0, 7, 0))
        env = Env(native.capture_env(uc))
        check_layout(uc, env)
        native.register(env.addr)
        seen: list[tuple[int, int, bool, int, int]] = []

        def on_exception(engine: Uc, vector: int, _user: object) -> None:
            rip = engine.reg_read(X.UC_X86_REG_RIP)
            seen.append((vector, env.error_code, env.exception_is_int, env.old_exception, rip))
            env.clear_old_exception()
            if vector != 0x21:
                engine.reg_write(X.UC_X86_REG_RIP, rip + 2)
            if len(seen) >= len(_PROBE_EXPECT):
                engine.emu_stop()

        try:
            uc.hook_add(UC_HOOK_INTR, on_exception)
            uc.emu_start(0x1000, 0x1000 + len(_PROBE_CODE), timeout=2_000_000)
        finally:
            native.unregister(env.addr)
        if seen != _PROBE_EXPECT:
            raise Unavailable(f"unicorn's exceptions are not what the emulator expects (saw {seen})")
        _probed = True
