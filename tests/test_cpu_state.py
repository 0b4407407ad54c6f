"""Boot register state and the tables behind it (backend-neutral, no KVM). Addresses and
values are guests/README.md's (memory layout, "At entry"), not the layout module's."""

from __future__ import annotations

import struct

import pytest

from vmm.cpu.layout import BootLayout, CpuMode, GiB
from vmm.cpu.state import CODE32, CODE64, DATA, USER_CODE64, USER_DATA, boot_state, mapped_size, write_system_tables
from vmm.errors import InputError
from vmm.memory import GuestMemory, GuestRegion, HostMemory


def test_descriptors_match_the_usual_encodings():
    assert CODE64.descriptor() == 0x00AF9B000000FFFF
    assert DATA.descriptor() == 0x00CF93000000FFFF
    assert CODE32.descriptor() == 0x00CF9B000000FFFF
    assert USER_DATA.descriptor() == 0x00CFF3000000FFFF
    assert USER_CODE64.descriptor() == 0x00AFFB000000FFFF


def test_entry_registers_follow_the_boot_contract():
    for mode in CpuMode:
        state = boot_state(mode, 0x7C00 if mode is CpuMode.REAL else 0x100000, vcpu=2)
        assert state.regs["rdi"] == 0x1000  # the boot info
        assert state.regs["rsi"] == 2
    real = boot_state(CpuMode.REAL, 0x17C00, 0)
    assert (real.cs.selector, real.cs.base, real.regs["rip"]) == (0x1000, 0x10000, 0x7C00)
    assert real.ss.base + real.regs["rsp"] == 0xA0000  # vCPU i's stack top: 0xa0000 - i * 0x1000
    user = boot_state(CpuMode.USER, 0x100000, 1)
    assert user.cs.dpl == 3 and user.cs.selector & 3 == 3 and user.ss.dpl == 3
    assert user.regs["rflags"] == 0x3002
    assert user.regs["rsp"] == 0xA0000 - 0x1000
    long = boot_state(CpuMode.LONG, 0x100000, 0)
    assert long.efer & (1 << 10) and long.cr0 & (1 << 31) and long.cr3 == 0x10000
    assert boot_state(CpuMode.PROTECTED, 0x100000, 0).cr0 & (1 << 31) == 0
    with pytest.raises(InputError):
        boot_state(CpuMode.REAL, 0x100000, 0)


def test_page_tables_identity_map_everything_with_user_pages():
    mem = GuestMemory()
    host = HostMemory.allocate(16 << 20, "anon")
    try:
        mem.add(GuestRegion(0, 16 << 20, host))
        write_system_tables(mem, CpuMode.USER)
        pml4 = mem.read_u64(0x10000)  # CR3
        pdpt = pml4 & ~0xFFF
        assert pml4 & 0x7 == 0x7  # present, writable, user
        for gib in range(4):
            pd = mem.read_u64(pdpt + 8 * gib) & ~0xFFF
            for j in (0, 511):
                entry = mem.read_u64(pd + 8 * j)
                assert entry & ~0xFFF == gib * GiB + j * (2 << 20)
                assert entry & 0x87 == 0x87
        gdt = struct.unpack_from("<6Q", mem.read(0x2000, 48))
        assert gdt[1] == 0x00AF9B000000FFFF and gdt[5] == 0x00AFFB000000FFFF  # CS 0x08 and 0x2b
        iopb = struct.unpack_from("<H", mem.read(0x3000 + 102, 2))[0]  # the TSS at 0x3000
        assert iopb == 104 and mem.read(0x3000 + 104, 8192) == bytes(8192)  # every port allowed
    finally:
        host.close()


def test_the_identity_map_covers_ram_above_four_gib():
    assert mapped_size(64 << 20) == 4 * GiB
    assert mapped_size(5 * GiB + 1) == 6 * GiB
    assert BootLayout.ram_ranges(4 * GiB) == [(0, 3 * GiB), (4 * GiB, GiB)]
    assert BootLayout.ram_ranges(64 << 20) == [(0, 64 << 20)]
