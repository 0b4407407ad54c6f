"""Apply a backend-neutral :class:`~vmm.cpu.CpuState` to a KVM vCPU."""

from __future__ import annotations

from typing import Any

from vmm.cpu.state import REG_NAMES, CpuState, Segment
from vmm.vcpu import Vcpu


def _set_segment(dst: Any, seg: Segment) -> None:
    dst.base, dst.limit, dst.selector, dst.type = seg.base, seg.limit, seg.selector, seg.type
    dst.present, dst.dpl, dst.db, dst.s, dst.l, dst.g = seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g
    dst.avl, dst.unusable = 0, seg.unusable


def apply_state(vcpu: Vcpu, state: CpuState) -> None:
    """KVM_SET_SREGS then KVM_SET_REGS from ``state`` (registers not named are zero)."""
    sregs = vcpu.get_sregs()
    for name, seg in state.segments.items():
        _set_segment(getattr(sregs, name), seg)
    sregs.gdt.base, sregs.gdt.limit = state.gdt
    sregs.idt.base, sregs.idt.limit = state.idt
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = state.cr0, state.cr3, state.cr4, state.efer
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    for name in REG_NAMES:
        setattr(regs, name, state.regs.get(name, 0))
    vcpu.set_regs(regs)


def read_regs(vcpu: Vcpu) -> dict[str, int]:
    """The general registers as a dict (for crash reports and tests)."""
    regs = vcpu.get_regs()
    return {name: int(getattr(regs, name)) for name in REG_NAMES}
