"""Apply a backend-neutral :class:`~vmm.cpu.state.CpuState` to a unicorn x86 engine, and
read the registers back.

Unicorn's register interface depends on the mode the engine was opened in, which is
why the emulator opens one of two kinds (measured on unicorn 2.1.4):

* ``UC_MODE_32`` for real and protected mode. Segment writes there go through
  QEMU's ``cpu_x86_load_seg``: real-mode caches (base = selector << 4) while CR0.PE
  is clear, descriptors from the GDT once it is set. EIP is a full 32-bit register,
  so a guest that leaves real mode (triple-fault.bin) can be resumed at any EIP after
  yielding its turn. (``UC_MODE_16`` would not do: its ``uc_emu_start`` takes CS*16+IP
  and writes back only the low 16 bits of EIP.) Registers read back are the 32-bit ones.
* ``UC_MODE_64`` for long mode. There a write to CS, DS, ES or SS only changes the
  selector; the hidden state stays what unicorn's reset made it (flat, 64-bit code,
  CPL 0). Nothing but an instruction can change the CPL, so ring 3 is entered the
  way an OS does it: a stub loads the data segments and returns to the entry point
  with ``iretq`` (:func:`enter_ring3`).

Unicorn delivers no exceptions and has no interrupt controller; the run loop turns
an exception into a crash (see :mod:`vmm.backends.emulator`).
"""

from __future__ import annotations

import struct

from unicorn import UC_MODE_32, UC_MODE_64, Uc, UcError
from unicorn import x86_const as X

from vmm.cpu.layout import CpuMode
from vmm.cpu.state import REG_NAMES, CpuState, Segment
from vmm.errors import ConfigError

MSR_EFER = 0xC0000080

_REGS64 = {name: getattr(X, f"UC_X86_REG_{name.upper()}") for name in REG_NAMES}
# A UC_MODE_32 engine only knows the 32-bit names; r8-r15 do not exist there.
_REGS32 = {
    name: getattr(X, f"UC_X86_REG_E{name[1:].upper()}")
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "rip")
}
_REGS32["rflags"] = X.UC_X86_REG_EFLAGS

_DATA_SEGMENTS = (
    ("ds", X.UC_X86_REG_DS),
    ("es", X.UC_X86_REG_ES),
    ("fs", X.UC_X86_REG_FS),
    ("gs", X.UC_X86_REG_GS),
    ("ss", X.UC_X86_REG_SS),
)

# The ring-3 entry stub: mov %eax,%ds; mov %ecx,%es; mov %edx,%fs; mov %ebx,%gs; iretq.
RING3_STUB = bytes([0x8E, 0xD8, 0x8E, 0xC1, 0x8E, 0xE2, 0x8E, 0xEB, 0x48, 0xCF])


EXCEPTIONS = {
    0: ("#DE", "divide error"),
    1: ("#DB", "debug exception"),
    2: ("NMI", "non-maskable interrupt"),
    3: ("#BP", "breakpoint"),
    4: ("#OF", "overflow"),
    5: ("#BR", "bound range exceeded"),
    6: ("#UD", "invalid opcode"),
    7: ("#NM", "device not available"),
    8: ("#DF", "double fault"),
    10: ("#TS", "invalid TSS"),
    11: ("#NP", "segment not present"),
    12: ("#SS", "stack-segment fault"),
    13: ("#GP", "general protection fault"),
    14: ("#PF", "page fault"),
    16: ("#MF", "x87 floating-point error"),
    17: ("#AC", "alignment check"),
    18: ("#MC", "machine check"),
    19: ("#XM", "SIMD floating-point exception"),
}
NOT_DELIVERED = "not delivered (the emulator delivers no guest exceptions)"


def describe_exception(vector: int) -> str:
    """``"invalid opcode (#UD)"`` for 6; other vectors by number."""
    if vector in EXCEPTIONS:
        short, name = EXCEPTIONS[vector]
        return f"{name} ({short})"
    return f"interrupt {vector:#x}"


def uc_mode_for(mode: CpuMode) -> int:
    """The unicorn mode an engine for a guest starting in ``mode`` is opened with."""
    return UC_MODE_64 if mode in (CpuMode.LONG, CpuMode.USER) else UC_MODE_32


def segment_flags(seg: Segment) -> int:
    """QEMU's cached descriptor flags (the descriptor's high dword, base and limit bits
    cleared) for a system segment register written as a whole (TR, LDTR)."""
    return (
        (seg.type << 8)
        | (seg.s << 12)
        | (seg.dpl << 13)
        | (seg.present << 15)
        | (seg.l << 21)
        | (seg.db << 22)
        | (seg.g << 23)
    )


def apply_state(uc: Uc, uc_mode: int, state: CpuState) -> None:
    """Load ``state`` into ``uc`` except RIP (``uc_emu_start`` takes it) and, for a ring-3
    state, the final CPL (see :func:`enter_ring3`). Registers not named are zero."""
    uc.reg_write(X.UC_X86_REG_GDTR, (0, state.gdt[0], state.gdt[1], 0))
    uc.reg_write(X.UC_X86_REG_IDTR, (0, state.idt[0], state.idt[1], 0))
    # CR4 (PAE) and EFER (LME) before CR0: QEMU ignores CR0.PG with LME set and PAE clear.
    uc.reg_write(X.UC_X86_REG_CR4, state.cr4)
    uc.reg_write(X.UC_X86_REG_CR3, state.cr3)
    uc.msr_write(MSR_EFER, state.efer)
    uc.reg_write(X.UC_X86_REG_CR0, state.cr0)
    for name, reg in (("tr", X.UC_X86_REG_TR), ("ldt", X.UC_X86_REG_LDTR)):
        seg: Segment = getattr(state, name)
        uc.reg_write(reg, (seg.selector, seg.base, seg.limit, segment_flags(seg)))
    try:
        # CS first: in protected mode its descriptor sets the default operand size.
        uc.reg_write(X.UC_X86_REG_CS, state.cs.selector)
        for name, reg in _DATA_SEGMENTS:
            uc.reg_write(reg, getattr(state, name).selector)
    except UcError as e:
        raise ConfigError(f"the emulator refused the boot segment selectors ({e}); is the GDT in place?") from e
    write_regs(uc, uc_mode, state.regs)


def write_regs(uc: Uc, uc_mode: int, regs: dict[str, int]) -> None:
    """General registers and RFLAGS from ``regs`` (absent ones zero); RIP is left alone."""
    table = _REGS64 if uc_mode == UC_MODE_64 else _REGS32
    mask = (1 << 64) - 1 if uc_mode == UC_MODE_64 else 0xFFFFFFFF
    for name, reg in table.items():
        if name != "rip":
            uc.reg_write(reg, regs.get(name, 0) & mask)


def read_regs(uc: Uc, uc_mode: int) -> dict[str, int]:
    """rax..r15, rip, rflags. A UC_MODE_32 engine reports the 32-bit registers (and
    IP, not CS*16+IP, in real mode, as KVM does); r8-r15 read as zero there."""
    table = _REGS64 if uc_mode == UC_MODE_64 else _REGS32
    return {name: int(uc.reg_read(table[name])) if name in table else 0 for name in REG_NAMES}


def read_pc(uc: Uc, uc_mode: int) -> int:
    """RIP (EIP in a UC_MODE_32 engine): what ``uc_emu_start`` resumes from."""
    return int(uc.reg_read(X.UC_X86_REG_RIP if uc_mode == UC_MODE_64 else X.UC_X86_REG_EIP))


def needs_ring3_entry(state: CpuState) -> bool:
    """True for a long-mode state whose code segment is not ring 0."""
    return state.mode in (CpuMode.LONG, CpuMode.USER) and (state.cs.selector & 3) != 0


def enter_ring3(uc: Uc, state: CpuState, stub_page: int) -> None:
    """Drop a ring-0 UC_MODE_64 engine (after :func:`apply_state`) to the ring-3 state
    ``state``: run :data:`RING3_STUB` from ``stub_page`` (a scratch page the caller has
    mapped there, identity-mapped by the guest's page tables) with an ``iretq`` frame
    for the entry point. ``iretq`` loads CS and SS from the GDT and sets CPL 3, as on
    hardware. General registers are written afterwards by the caller."""
    rip = state.regs.get("rip", 0)
    frame = struct.pack(
        "<5Q", rip, state.cs.selector, state.regs.get("rflags", 2), state.regs.get("rsp", 0), state.ss.selector
    )
    stack = stub_page + 0x800
    uc.mem_write(stub_page, RING3_STUB)
    uc.mem_write(stack, frame)
    uc.reg_write(X.UC_X86_REG_RSP, stack)
    for name, reg in (
        ("ds", X.UC_X86_REG_RAX),
        ("es", X.UC_X86_REG_RCX),
        ("fs", X.UC_X86_REG_RDX),
        ("gs", X.UC_X86_REG_RBX),
    ):
        uc.reg_write(reg, getattr(state, name).selector)
    try:
        # Stops on reaching the entry point: iretq is the stub's last instruction.
        uc.emu_start(stub_page, rip, timeout=1_000_000)
    except UcError as e:
        raise ConfigError(
            f"the emulator could not enter ring 3 at {rip:#x} through its iretq stub at {stub_page:#x} ({e}); "
            "the GDT must hold the ring-3 selectors and the page tables must map the stub page"
        ) from e
    got = read_pc(uc, UC_MODE_64)
    cs = int(uc.reg_read(X.UC_X86_REG_CS))
    if got != rip or cs != state.cs.selector:
        raise ConfigError(
            f"the emulator's ring-3 entry stub ended at rip {got:#x} cs {cs:#x}, not {rip:#x} cs {state.cs.selector:#x}"
        )
