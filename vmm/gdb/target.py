"""The target as gdb sees it: a KVM vCPU's registers and its guest-virtual memory.

Registers go by gdb's names (:data:`vmm.gdb.protocol.REGISTERS`): read from KVM_GET_REGS,
KVM_GET_SREGS and KVM_GET_FPU; written back through KVM_SET_REGS for the general
registers, RIP and RFLAGS (segment, x87/SSE and control registers are read-only here:
changing them under a guest is what its own code does, with checks).

Memory is by guest-virtual address, translated page by page with KVM_TRANSLATE (the
guest's own page tables; identity with paging off); every guest-physical piece is checked
against guest RAM (:class:`~vmm.memory.GuestMemory`) before the host touches it.
"""

from __future__ import annotations

from collections.abc import Mapping

from vmm.cpu.state import REG_NAMES
from vmm.errors import GuestMemoryError
from vmm.memory import GuestMemory
from vmm.vcpu import Vcpu

PAGE = 4096

WRITABLE = frozenset(REG_NAMES) | {"eflags"}
_SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")


def read_registers(vcpu: Vcpu) -> dict[str, int]:
    """Every register gdb is told about, by name."""
    regs, sregs, fpu = vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu()
    out = {name: int(getattr(regs, name)) for name in REG_NAMES if name != "rflags"}
    out["eflags"] = int(regs.rflags)
    for name in _SEGMENTS:
        out[name] = int(getattr(sregs, name).selector)
    for i in range(8):
        out[f"st{i}"] = int.from_bytes(bytes(fpu.fpr[i][0:10]), "little")
    # FXSAVE's layout, as KVM returns it: the tag word is the abridged one (a bit per register).
    out.update(
        fctrl=int(fpu.fcw),
        fstat=int(fpu.fsw),
        ftag=int(fpu.ftwx),
        fiseg=0,
        fioff=int(fpu.last_ip) & 0xFFFFFFFF,
        foseg=0,
        fooff=int(fpu.last_dp) & 0xFFFFFFFF,
        fop=int(fpu.last_opcode),
        mxcsr=int(fpu.mxcsr),
    )
    for i in range(16):
        out[f"xmm{i}"] = int.from_bytes(bytes(fpu.xmm[i][0:16]), "little")
    out.update(
        fs_base=int(sregs.fs.base),
        gs_base=int(sregs.gs.base),
        cr0=int(sregs.cr0),
        cr2=int(sregs.cr2),
        cr3=int(sregs.cr3),
        cr4=int(sregs.cr4),
        cr8=int(sregs.cr8),
        efer=int(sregs.efer),
    )
    return out


def write_registers(vcpu: Vcpu, values: Mapping[str, int], *, strict: bool = False) -> None:
    """Set the writable registers in ``values`` (KVM_SET_REGS). Others are ignored (a
    ``G`` packet carries every register back), or with ``strict`` (a ``P`` packet for one)
    refused with ValueError."""
    if strict:
        refused = sorted(set(values) - WRITABLE)
        if refused:
            raise ValueError(f"register {refused[0]} is read-only through the gdb stub")
    wanted = {k: v for k, v in values.items() if k in WRITABLE}
    if not wanted:
        return
    regs = vcpu.get_regs()
    for name, value in wanted.items():
        setattr(regs, "rflags" if name == "eflags" else name, value)
    vcpu.set_regs(regs)


def _pieces(vcpu: Vcpu, memory: GuestMemory, addr: int, length: int) -> list[tuple[int, int]]:
    """(gpa, size) pieces of [addr, addr+length) that translate and lie in guest RAM,
    stopping at the first that does not."""
    pieces: list[tuple[int, int]] = []
    while length > 0 and addr < 1 << 64:
        size = min(length, PAGE - (addr & (PAGE - 1)))
        gpa, valid = vcpu.translate(addr)
        if not valid or not memory.contains(gpa, size):
            break
        pieces.append((gpa, size))
        addr, length = addr + size, length - size
    return pieces


def read_virtual(vcpu: Vcpu, memory: GuestMemory, addr: int, length: int) -> bytes:
    """Up to ``length`` bytes at guest-virtual ``addr``: fewer when a page does not
    translate or is not guest RAM (gdb takes a short read), empty if the first is not."""
    out = bytearray()
    for gpa, size in _pieces(vcpu, memory, addr, length):
        try:
            out += memory.read(gpa, size)
        except GuestMemoryError:  # private memory: the host cannot read it
            break
    return bytes(out)


def write_virtual(vcpu: Vcpu, memory: GuestMemory, addr: int, data: bytes) -> bool:
    """Write ``data`` at guest-virtual ``addr``, all or nothing (no half-written
    instruction): False, and nothing written, if any page is not writable guest RAM."""
    pieces = _pieces(vcpu, memory, addr, len(data))
    if sum(size for _, size in pieces) != len(data):
        return False
    try:
        views = [memory.view(gpa, size) for gpa, size in pieces]
    except GuestMemoryError:
        return False
    pos = 0
    for view, (_, size) in zip(views, pieces, strict=True):
        view[:] = data[pos : pos + size]
        pos += size
    return True
