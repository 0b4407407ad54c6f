"""Apply a backend-neutral :class:`~vmm.cpu.state.CpuState` to a unicorn x86 engine, and
read the registers back.

Every engine is opened in ``UC_MODE_64``, whatever mode the guest starts in (measured
on unicorn 2.1.4): in ``UC_MODE_32`` ``uc_emu_start`` writes only EIP (a 32-bit image
that switches to long mode, as Multiboot kernels do, could not be resumed above 4 GiB)
and registers read back as 32 bits; ``UC_MODE_16`` takes CS*16+IP. The catch of
``UC_MODE_64`` is that a write to CS, DS, ES or SS only changes the selector, and
nothing changes the CPL. So :func:`apply_state` loads the segment caches, the CPL and
EFER.LMA into QEMU's CPU state directly (:mod:`vmm.backends.emulator_env`), as
KVM_SET_SREGS loads them: real-mode CS:IP, flat protected-mode segments and ring-3
long-mode segments run from their first instruction, without the guest's GDT being
read. Registers read back are the 64-bit ones in every mode (RIP is IP in real mode, as
KVM reports it).
"""

from __future__ import annotations

from unicorn import Uc
from unicorn import x86_const as X

from vmm.backends.emulator_env import CS, DS, ES, FS, GS, HF_INHIBIT_IRQ, SS, Env
from vmm.cpu.state import REG_NAMES, CpuState, Segment

_REGS = {name: getattr(X, f"UC_X86_REG_{name.upper()}") for name in REG_NAMES}

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


def describe_exception(vector: int) -> str:
    """``"invalid opcode (#UD)"`` for 6; other vectors by number."""
    if vector in EXCEPTIONS:
        short, name = EXCEPTIONS[vector]
        return f"{name} ({short})"
    return f"interrupt {vector:#x}"


def segment_flags(seg: Segment) -> int:
    """QEMU's cached descriptor flags (the descriptor's high dword, base and limit bits
    cleared) for ``seg``; 0 for an unusable segment."""
    if seg.unusable and seg.s:
        return 0
    return (
        (seg.type << 8)
        | (seg.s << 12)
        | (seg.dpl << 13)
        | (seg.present << 15)
        | (seg.l << 21)
        | (seg.db << 22)
        | (seg.g << 23)
    )


def apply_state(uc: Uc, env: Env, state: CpuState) -> None:
    """Load ``state`` except RIP (``uc_emu_start`` takes it). Registers not named are
    zero. The engine must be stopped."""
    uc.reg_write(X.UC_X86_REG_GDTR, (0, state.gdt[0], state.gdt[1], 0))
    uc.reg_write(X.UC_X86_REG_IDTR, (0, state.idt[0], state.idt[1], 0))
    # CR4 (PAE) and EFER (LME) before CR0: QEMU ignores CR0.PG with LME set and PAE clear.
    uc.reg_write(X.UC_X86_REG_CR4, state.cr4)
    uc.reg_write(X.UC_X86_REG_CR3, state.cr3)
    env.set_efer(state.efer)
    uc.reg_write(X.UC_X86_REG_CR0, state.cr0)
    env.set_efer(state.efer)  # LMA exactly as the state says (a fresh engine's reset sets it)
    for name, reg in (("tr", X.UC_X86_REG_TR), ("ldt", X.UC_X86_REG_LDTR)):
        seg: Segment = getattr(state, name)
        uc.reg_write(reg, (seg.selector, seg.base, seg.limit, segment_flags(seg)))
    # CS first (it decides 16/32/64-bit code), SS next (the CPL), then the data segments.
    for index, name in ((CS, "cs"), (SS, "ss"), (DS, "ds"), (ES, "es"), (FS, "fs"), (GS, "gs")):
        seg = getattr(state, name)
        env.load_seg(index, seg.selector, seg.base, seg.limit, segment_flags(seg))
    write_regs(uc, state.regs)
    uc.reg_write(X.UC_X86_REG_RFLAGS, state.regs.get("rflags", 2))
    env.hflags &= ~HF_INHIBIT_IRQ
    env.clear_old_exception()


def write_regs(uc: Uc, regs: dict[str, int]) -> None:
    """General registers from ``regs`` (absent ones zero); RIP and RFLAGS left alone."""
    for name, reg in _REGS.items():
        if name not in ("rip", "rflags"):
            uc.reg_write(reg, regs.get(name, 0) & (1 << 64) - 1)


def read_regs(uc: Uc) -> dict[str, int]:
    """rax..r15, rip, rflags (64 bits in every mode)."""
    return {name: int(uc.reg_read(reg)) for name, reg in _REGS.items()}


def read_pc(uc: Uc) -> int:
    """RIP: what ``uc_emu_start`` resumes from."""
    return int(uc.reg_read(X.UC_X86_REG_RIP))
