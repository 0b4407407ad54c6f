"""Native code the emulator runs inside unicorn: three small x86-64 functions on one
executable page, and one patched slot in libunicorn's procedure linkage table.

Why native code (measured on unicorn 2.1.4, this host):

* **The block gate.** Interrupts and yields need a precise stopping point: the start of
  a translation block, where RIP is exact (see :mod:`vmm.backends.emulator`). A
  UC_HOOK_BLOCK callback written in Python costs ~120 ns per block (a 5 M iteration
  ``dec; jnz`` loop: 1.7 ns per iteration without a hook, 123 ns with a ctypes one),
  and a hook added while a guest runs never reaches blocks translated before it
  (unicorn compiles the hook call into each block). So every engine gets, from the
  start, a native block hook that costs ~0.3 ns per block (2.0 ns per iteration) and
  calls ``uc_emu_stop`` only when a flag asks: ``req_now`` (stop at the next block), or
  ``req_irq`` (stop at the next block that starts with RFLAGS.IF set and no STI/MOV SS
  interrupt shadow: QEMU's own "interrupt window"). It sets ``fired`` when it stops, so
  the run loop can tell such a stop from HLT. Any thread may raise the flags.
* **The MSR trap.** unicorn 2.1.4 has no RDMSR/WRMSR hooks (``uc_hook_add`` answers
  UC_ERR_HOOK for UC_X86_INS_RDMSR/WRMSR) and executes both itself: an unknown MSR
  reads 0 and swallows writes, IA32_APIC_BASE reads 0. QEMU's ``helper_rdmsr`` and
  ``helper_wrmsr`` first call ``cpu_svm_check_intercept_param(env, SVM_EXIT_MSR,
  is_write, retaddr)``, through libunicorn's PLT. Pointing that PLT slot at the trap
  makes every RDMSR/WRMSR of a registered engine raise #GP with a magic error code
  (``MAGIC | is_write``) from inside the helper, before it touches EAX/EDX: QEMU
  restores RIP to the instruction and unicorn's UC_HOOK_INTR sees vector 13 there, a
  precise stop from which the run loop emulates the MSR (or delivers a real #GP). Every
  other intercept check (exceptions, HLT, CPUID, ...) goes on to the original function,
  which does nothing outside SVM guest mode. The trap also tells the run loop where
  QEMU's CPU state (``CPUX86State``) of each engine lives: an RDMSR issued with
  ``capture`` set stores the ``env`` argument (see :mod:`vmm.backends.emulator_env`).
* **The host TSC**, read with ``rdtsc``: unicorn's RDTSC returns it (measured: 2.6 GHz
  here, the same in every engine), and TSC-deadline timers compare against it.

The page is written once, then made read+execute. Everything here is specific to an
x86-64 host and this unicorn build (``unicorn>=2.1.1,<2.2``); :func:`native_code`
raises Unavailable, naming what is missing, where that does not hold.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import struct
import threading
from typing import Any

from unicorn import UC_HOOK_BLOCK, Uc
from unicorn.unicorn_py3.unicorn import uclib
from unicorn.x86_const import UC_X86_REG_RAX

from vmm.errors import Unavailable

MAGIC = 0x7EAD0000  # error code of a trapped MSR access (| 1 for WRMSR): no #GP has it
SVM_EXIT_MSR = 0x7C
MAX_ENGINES = 256
_PLACEHOLDER = struct.pack("<Q", 0x1122334455667788)
_R_X86_64_JUMP_SLOT = 7
_TRAPPED_FUNCTION = "cpu_svm_check_intercept_param_x86_64"
_RAISE_FUNCTION = "raise_exception_err_ra_x86_64"

# Block gate: void gate(uc_engine *uc, u64 address, u32 size, GateState *state).
# (Offsets 0x88 and 0xb0 are env->eflags and env->hflags; emulator_env checks them.)
BLOCK_GATE = bytes.fromhex(
    "803900"  # cmpb $0, (%rcx)              req_now?
    "7522"  # jne stop
    "80790100"  # cmpb $0, 1(%rcx)              req_irq?
    "742c"  # je out
    "488b4108"  # mov 8(%rcx), %rax            env
    "f78088000000"
    "00020000"  # testl $0x200, 0x88(%rax)     RFLAGS.IF
    "741c"  # je out
    "f780b0000000"
    "08000000"  # testl $0x8, 0xb0(%rax)       HF_INHIBIT_IRQ
    "7510"  # jne out
    "c6410201"  # stop: movb $1, 2(%rcx)        fired
    "48b8"
    + _PLACEHOLDER.hex()  # movabs $uc_emu_stop, %rax
    + "ffe0"  # jmp *%rax                    (tail call: %rdi is still uc)
    "c3"  # out: ret
)
# MSR trap, in place of cpu_svm_check_intercept_param(env, type, param, retaddr).
MSR_TRAP = bytes.fromhex(
    "83fe7c"  # cmp $SVM_EXIT_MSR, %esi
    "754c"  # jne pass
    "48b8"
    + _PLACEHOLDER.hex()  # movabs $control, %rax
    + "48833800"  # cmpq $0, (%rax)               capture?
    "7531"  # jne capture
    "4c8d4840"  # lea 64(%rax), %r9             table
    "448b5010"  # mov 16(%rax), %r10d           entries
    "4585d2"  # 1: test %r10d, %r10d
    "742f"  # je pass
    "493939"  # cmp %rdi, (%r9)               this engine's env?
    "7516"  # jne 2f
    "4983790800"  # cmpq $0, 8(%r9)               intercepting?
    "7423"  # je pass
    "be0d000000"  # mov $13, %esi                 #GP ...
    "448b4028"  # mov 40(%rax), %r8d
    "4409c2"  # or %r8d, %edx                 ... error code MAGIC | is_write
    "ff6018"  # jmp *24(%rax)                 raise_exception_err_ra(env, 13, code, retaddr)
    "4983c110"  # 2: add $16, %r9
    "41ffca"  # dec %r10d
    "ebd7"  # jmp 1b
    "48897808"  # capture: mov %rdi, 8(%rax)
    "48c70000000000"  # movq $0, (%rax)
    "48b8"
    + _PLACEHOLDER.hex()  # pass: movabs $control, %rax
    + "ff6020"  # jmp *32(%rax)                 the original function
)
READ_TSC = bytes.fromhex(
    "0f31"  # rdtsc
    "48c1e220"  # shl $32, %rdx
    "4809d0"  # or %rdx, %rax
    "c3"  # ret
)


class GateState(ctypes.Structure):
    """One engine's block-gate flags (the gate's fourth argument)."""

    _fields_ = [
        ("req_now", ctypes.c_uint8),
        ("req_irq", ctypes.c_uint8),
        ("fired", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 5),
        ("env", ctypes.c_uint64),
    ]


class _TrapEntry(ctypes.Structure):
    _fields_ = [("env", ctypes.c_uint64), ("intercept", ctypes.c_uint64)]


class _TrapControl(ctypes.Structure):
    _fields_ = [
        ("capture", ctypes.c_uint64),
        ("captured", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("_pad0", ctypes.c_uint32),
        ("raise_fn", ctypes.c_uint64),
        ("original", ctypes.c_uint64),
        ("magic", ctypes.c_uint32),
        ("_pad1", ctypes.c_uint32),
        ("_pad2", ctypes.c_uint64 * 2),
        ("table", _TrapEntry * MAX_ENGINES),
    ]


def _address(fn: Any) -> int:
    return int(ctypes.cast(fn, ctypes.c_void_p).value or 0)


def _plt_slot(path: str, symbol: str) -> tuple[int, int]:
    """(GOT slot offset, symbol value) of ``symbol``'s JUMP_SLOT relocation in the ELF
    shared object at ``path``, from its section headers (.rela.plt, .dynsym, .dynstr)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise Unavailable(f"{path} is not a 64-bit ELF shared object")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]

    def cstr(offset: int) -> str:
        return data[offset : data.index(b"\0", offset)].decode()

    names = {cstr(sections[shstrndx][4] + s[0]): s for s in sections}
    try:
        dynsym, dynstr, rela = names[".dynsym"], names[".dynstr"], names[".rela.plt"]
    except KeyError as e:
        raise Unavailable(f"{path} has no {e.args[0]} section") from e
    for i in range(rela[5] // 24):
        r_offset, r_info = struct.unpack_from("<QQ", data, rela[4] + i * 24)
        if r_info & 0xFFFFFFFF != _R_X86_64_JUMP_SLOT:
            continue
        sym = dynsym[4] + (r_info >> 32) * 24
        if cstr(dynstr[4] + struct.unpack_from("<I", data, sym)[0]) == symbol:
            return r_offset, struct.unpack_from("<Q", data, sym + 8)[0]
    raise Unavailable(f"{path} calls {symbol} without a PLT slot")


def _page_protection(address: int) -> str:
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= address < end:
                return perms
    raise Unavailable(f"address {address:#x} of libunicorn's PLT is not mapped")


class NativeCode:
    """The executable page and the MSR trap (one per process; see :func:`native_code`)."""

    def __init__(self) -> None:
        if platform.machine() not in ("x86_64", "AMD64"):
            raise Unavailable(f"the emulator's unicorn hooks are x86-64 code; this host is {platform.machine()}")
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        self.control = _TrapControl()
        self.control.magic = MAGIC
        self.control.raise_fn = _address(getattr(uclib, _RAISE_FUNCTION))
        self.control.original = _address(getattr(uclib, _TRAPPED_FUNCTION))
        control = struct.pack("<Q", ctypes.addressof(self.control))
        emu_stop = struct.pack("<Q", _address(uclib.uc_emu_stop))
        gate = BLOCK_GATE.replace(_PLACEHOLDER, emu_stop)
        trap = MSR_TRAP.replace(_PLACEHOLDER, control)
        try:
            self._page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        except OSError as e:
            raise Unavailable(f"the emulator needs executable memory for its unicorn hooks: {e}") from e
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        self.block_gate, self.msr_trap, tsc = base, base + 0x80, base + 0x100
        self._page[0 : len(gate)] = gate
        self._page[0x80 : 0x80 + len(trap)] = trap
        self._page[0x100 : 0x100 + len(READ_TSC)] = READ_TSC
        self._protect(base, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC)
        self.read_tsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(tsc)
        self._lock = threading.Lock()
        self._patch_plt()

    def _protect(self, address: int, size: int, prot: int) -> None:
        if self._libc.mprotect(ctypes.c_void_p(address), size, prot) != 0:
            raise Unavailable(f"mprotect({address:#x}) failed: errno {ctypes.get_errno()}")

    def _patch_plt(self) -> None:
        offset, value = _plt_slot(uclib._name, _TRAPPED_FUNCTION)
        slot = self.control.original - value + offset
        page = slot & ~(mmap.PAGESIZE - 1)
        read_only = "w" not in _page_protection(slot)
        if read_only:
            self._protect(page, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE)
        ctypes.c_uint64.from_address(slot).value = self.msr_trap
        if read_only:
            self._protect(page, mmap.PAGESIZE, mmap.PROT_READ)

    # --- engines -------------------------------------------------------------------------
    def capture_env(self, uc: Uc) -> int:
        """The address of ``uc``'s CPUX86State: an RDMSR of the TSC with ``capture`` set
        (its RAX holds a token meanwhile, so a capture by another engine is noticed)."""
        with self._lock:
            for _ in range(8):
                saved = uc.reg_read(UC_X86_REG_RAX)
                token = 0x5EED0000_0000_0000 | id(uc) & 0xFFFFFFFF
                uc.reg_write(UC_X86_REG_RAX, token)
                self.control.capture = 1
                uc.msr_read(0x10)
                env = int(self.control.captured)
                found = bool(env) and ctypes.c_uint64.from_address(env).value == token
                uc.reg_write(UC_X86_REG_RAX, saved)
                if found:
                    return env
            raise Unavailable("could not locate the emulator engine's CPU state")

    def register(self, env: int) -> None:
        """Trap the MSR accesses of the engine whose state is at ``env``."""
        with self._lock:
            table = self.control.table
            for i in range(self.control.count):
                if table[i].env in (0, env):
                    table[i].env, table[i].intercept = env, 1
                    return
            if self.control.count >= MAX_ENGINES:
                raise Unavailable(f"more than {MAX_ENGINES} emulator engines at once")
            entry = table[self.control.count]
            entry.env, entry.intercept = env, 1
            self.control.count += 1

    def unregister(self, env: int) -> None:
        with self._lock:
            for i in range(self.control.count):
                if self.control.table[i].env == env:
                    self.control.table[i].intercept = 0
                    self.control.table[i].env = 0

    def set_intercept(self, env: int, on: bool) -> None:
        """Let (False) or stop (True) unicorn's own MSR code run for this engine: the run
        loop performs the MSRs QEMU models through ``uc.msr_read``/``msr_write``."""
        for i in range(self.control.count):
            if self.control.table[i].env == env:
                self.control.table[i].intercept = int(on)

    def add_gate(self, uc: Uc, state: GateState) -> int:
        """Install the block gate on ``uc`` (before any code runs); returns the hook."""
        handle = ctypes.c_size_t()
        status = uclib.uc_hook_add(
            uc._uch,
            ctypes.byref(handle),
            UC_HOOK_BLOCK,
            ctypes.c_void_p(self.block_gate),
            ctypes.c_void_p(ctypes.addressof(state)),
            ctypes.c_uint64(1),
            ctypes.c_uint64(0),
        )
        if status != 0:
            raise Unavailable(f"could not install the emulator's block gate (unicorn error {status})")
        return int(handle.value)


_native: NativeCode | None = None
_native_lock = threading.Lock()


def native_code() -> NativeCode:
    """The process's native code, built (and libunicorn patched) on first use."""
    global _native
    with _native_lock:
        if _native is None:
            _native = NativeCode()
        return _native
