"""Linear-address access for what the emulator does on the CPU's behalf (reading the
IDT, GDT and TSS, pushing exception frames, decoding an MSR instruction): the guest's
paging structures walked as the CPU walks them, in guest RAM through
:class:`~vmm.memory.GuestMemory` (bounds-checked), faulting as the CPU faults.

Modes: paging off (linear = physical; 32 bits outside long mode), 32-bit paging (4 MiB
pages with CR4.PSE), PAE, 4-level and 5-level (CR4.LA57). Accessed and dirty bits are
set as the CPU sets them. A non-present entry, a write to a read-only page (by the
supervisor only with CR0.WP) or a supervisor-only page touched at CPL 3 raises
:class:`PageFault` with the architectural error code; an entry that is not in RAM faults
as not present. Reserved-bit and protection-key checks are not made.
"""

from __future__ import annotations

from vmm.cpu.bits import (
    CR0_PG,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PSE,
    EFER_LMA,
    PTE_A,
    PTE_D,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_US,
)
from vmm.errors import GuestMemoryError
from vmm.memory import GuestMemory

PAGE = 4096


PF_P = 1  # error code bits
PF_W = 1 << 1
PF_U = 1 << 2
_ADDR = 0x000F_FFFF_FFFF_F000


class PageFault(Exception):
    """A #PF the walk raised: ``address`` for CR2, ``code`` for the error code."""

    def __init__(self, address: int, code: int) -> None:
        super().__init__(f"page fault at {address:#x} (error code {code:#x})")
        self.address = address
        self.code = code


class LinearMemory:
    """Guest memory seen through the paging state of one vCPU at one moment."""

    def __init__(self, memory: GuestMemory, cr0: int, cr3: int, cr4: int, efer: int) -> None:
        self.memory = memory
        self.cr0, self.cr3, self.cr4, self.efer = cr0, cr3, cr4, efer

    def _entry(self, address: int) -> int:
        try:
            return self.memory.read_u64(address)
        except GuestMemoryError:
            return 0  # outside RAM: not present

    def _entry32(self, address: int) -> int:
        try:
            return int.from_bytes(self.memory.read(address, 4), "little")
        except GuestMemoryError:
            return 0

    def translate(self, linear: int, *, write: bool, user: bool) -> int:
        """The physical address of ``linear`` for an access of this kind."""
        if not self.cr0 & CR0_PG:
            return linear if self.efer & EFER_LMA else linear & 0xFFFFFFFF
        code = (PF_W if write else 0) | (PF_U if user else 0)
        if self.efer & EFER_LMA:
            levels = 5 if self.cr4 & CR4_LA57 else 4
            return self._walk64(linear, levels, code, write, user)
        linear &= 0xFFFFFFFF
        if self.cr4 & CR4_PAE:
            pdpte = self._entry((self.cr3 & ~0x1F) + ((linear >> 30) & 3) * 8)
            if not pdpte & PTE_P:
                raise PageFault(linear, code)
            return self._walk_table(linear, pdpte & _ADDR, 2, 9, 8, code, write, user, PTE_RW | PTE_US)
        return self._walk_table(linear, self.cr3 & ~0xFFF, 2, 10, 4, code, write, user, PTE_RW | PTE_US)

    def _walk64(self, linear: int, levels: int, code: int, write: bool, user: bool) -> int:
        bits = 9 * levels + 12
        top = linear >> (bits - 1)
        if top not in (0, (1 << (64 - bits + 1)) - 1):
            raise PageFault(linear, code)  # non-canonical: the CPU raises #GP; callers see a fault
        return self._walk_table(linear, self.cr3 & _ADDR, levels, 9, 8, code, write, user, PTE_RW | PTE_US)

    def _walk_table(
        self,
        linear: int,
        table: int,
        levels: int,
        bits: int,
        size: int,
        code: int,
        write: bool,
        user: bool,
        rights: int,
    ) -> int:
        """Walk ``levels`` levels of ``bits``-bit indexes from ``table``; ``rights`` the
        RW/US bits granted so far (the AND of every level)."""
        shift = 12 + bits * (levels - 1)
        entries: list[tuple[int, int]] = []
        while True:
            index = (linear >> shift) & ((1 << bits) - 1)
            address = table + index * size
            entry = self._entry(address) if size == 8 else self._entry32(address)
            if not entry & PTE_P:
                raise PageFault(linear, code)
            rights &= entry
            entries.append((address, entry))
            if size == 8:
                large = bool(entry & PTE_PS) and shift in (21, 30)
            else:
                large = bool(entry & PTE_PS and self.cr4 & CR4_PSE) and shift == 22
            if shift == 12 or large:
                break
            table = entry & (_ADDR if size == 8 else 0xFFFFF000)
            shift -= bits
        if user and not rights & PTE_US:
            raise PageFault(linear, code | PF_P)
        if write and not rights & PTE_RW and (user or self.cr0 & CR0_WP):
            raise PageFault(linear, code | PF_P)
        last = len(entries) - 1
        for i, (address, entry) in enumerate(entries):
            flags = PTE_A | (PTE_D if write and i == last else 0)
            if entry & flags != flags:
                self._set(address, entry | flags, size)
        leaf = entries[-1][1]
        if shift == 22 and size == 4:  # a 4 MiB page (PSE-36 high bits not modelled)
            return (leaf & 0xFFC00000) | (linear & 0x3FFFFF)
        mask = (1 << shift) - 1
        frame = leaf & (_ADDR if size == 8 else 0xFFFFF000) & ~mask
        return frame | (linear & mask)

    def _set(self, address: int, value: int, size: int) -> None:
        try:
            self.memory.write(address, value.to_bytes(size, "little"))
        except GuestMemoryError:
            pass

    # --- data ----------------------------------------------------------------------------
    def read(self, linear: int, size: int, *, user: bool = False) -> bytes:
        """``size`` bytes at ``linear``; bytes outside RAM read as 0xff."""
        out = bytearray()
        while size:
            chunk = min(size, PAGE - linear % PAGE)
            physical = self.translate(linear, write=False, user=user)
            try:
                out += self.memory.read(physical, chunk)
            except GuestMemoryError:
                out += b"\xff" * chunk
            linear, size = linear + chunk, size - chunk
        return bytes(out)

    def write(self, linear: int, data: bytes, *, user: bool = False) -> None:
        """Write ``data`` at ``linear``; every page is translated before any byte is
        written (a fault leaves memory unchanged); bytes outside RAM are dropped."""
        pieces = []
        offset = 0
        while offset < len(data):
            chunk = min(len(data) - offset, PAGE - (linear + offset) % PAGE)
            pieces.append((self.translate(linear + offset, write=True, user=user), data[offset : offset + chunk]))
            offset += chunk
        for physical, piece in pieces:
            try:
                self.memory.write(physical, piece)
            except GuestMemoryError:
                pass

    def read_u64(self, linear: int) -> int:
        return int.from_bytes(self.read(linear, 8), "little")
