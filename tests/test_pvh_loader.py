"""The PVH entry of an uncompressed vmlinux: the Xen PHYS32_ENTRY note, the segments, and the
hvm_start_info decoded with struct (layout of include/xen/interface/hvm/start_info.h, written out
here). Synthetic ELF64 images; one test plans a real Debian vmlinux when one is cached."""

from __future__ import annotations

import struct
from itertools import combinations
from pathlib import Path

import pytest

from vmm.cpu.layout import BootLayout, CpuMode
from vmm.cpu.state import gdt_table
from vmm.errors import InputError
from vmm.loader.linux import CMDLINE_ADDR, LinuxPlan, linux_boot_state
from vmm.loader.pvh import plan_pvh, pvh_entry
from vmm.platform.memmap import pc_ram_map

MiB = 1 << 20
RAM_256M = BootLayout.ram_ranges(256 * MiB)
REPO = Path(__file__).resolve().parent.parent
CODE = b"\xfa\xf4" * 512


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    name += b"\0"
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def vmlinux(
    loads: list[tuple[int, bytes, int]] | None = None,
    *,
    notes: bytes | None = None,
    machine: int = 62,
    truncate: int = 0,
) -> bytes:
    """An ELF64 executable: ``loads`` = (paddr, data, memsz) PT_LOADs and one PT_NOTE."""
    loads = [(0x1000000, CODE, 0x4000), (0x1200000, b"data" * 256, 0x2000)] if loads is None else loads
    notes = note(b"Xen", 18, struct.pack("<Q", 0x1000010)) if notes is None else notes
    phnum = len(loads) + 1
    off = 64 + 56 * phnum
    phdrs, blob = [], b""
    for paddr, data, memsz in loads:
        phdrs.append(
            struct.pack("<IIQQQQQQ", 1, 5, off + len(blob), paddr | 0xFFFFFFFF80000000, paddr, len(data), memsz, 0x1000)
        )
        blob += data
    phdrs.append(struct.pack("<IIQQQQQQ", 4, 4, off + len(blob), 0, 0, len(notes), len(notes), 4))
    blob += notes
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, machine, 1, 0xFFFFFFFF81000000, 64, 0, 0, 64, 56, phnum, 64, 0, 0)
    image = ehdr + b"".join(phdrs) + blob
    return image[: len(image) - truncate] if truncate else image


def plan(data: bytes | None = None, ram=RAM_256M, *, cmdline="console=ttyS0", initrd=None) -> LinuxPlan:
    return plan_pvh("vmlinux", vmlinux() if data is None else data, ram, cmdline=cmdline, initrd=initrd, nr_vcpus=2)


def read(p: LinuxPlan, gpa: int, size: int) -> bytes:
    for seg in p.segments:
        if seg.gpa <= gpa and gpa + size <= seg.gpa + seg.memsz:
            full = seg.data + bytes(seg.memsz - len(seg.data))
            return full[gpa - seg.gpa : gpa - seg.gpa + size]
    raise AssertionError(f"nothing planned at {gpa:#x}+{size:#x}")


def test_entry_note():
    assert pvh_entry("v", vmlinux()) == 0x1000010
    assert pvh_entry("v", vmlinux(notes=note(b"Xen", 18, struct.pack("<I", 0x1000020)))) == 0x1000020
    assert pvh_entry("v", vmlinux(notes=note(b"GNU", 18, bytes(8)) + note(b"Xen", 5, b"xen-3.0\0"))) is None
    # Any other file is simply not a PVH kernel: a 32-bit ELF, a bzImage, text.
    assert pvh_entry("v", vmlinux(machine=3)) is None and pvh_entry("v", b"HdrS" * 100) is None
    assert pvh_entry("v", b"\x7fELF\x01\x01\x01" + bytes(100)) is None


def test_start_info_decoded():
    blob = b"\x42" * 10000
    p = plan(cmdline="console=ttyS0 panic=-1", initrd=("initrd.cpio", blob))
    assert p.format == "pvh" and p.mode is CpuMode.PROTECTED and p.entry == 0x1000010 and p.pc
    info = p.regs["rbx"]
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, n_memmap, reserved = struct.unpack(
        "<IIIIQQQQII", read(p, info, 56)
    )
    assert (magic, version, flags, nr_modules, rsdp, reserved) == (0x336EC578, 1, 0, 1, 0, 0)
    assert cmdline == CMDLINE_ADDR and read(p, cmdline, 23) == b"console=ttyS0 panic=-1\0"
    paddr, size, mod_cmdline, mod_reserved = struct.unpack("<QQQQ", read(p, modlist, 32))
    assert (paddr, size, mod_cmdline, mod_reserved) == (*p.initrd, 0, 0) and read(p, paddr, size) == blob
    assert paddr % 4096 == 0 and paddr + size <= 256 * MiB and paddr + size + 4096 > 256 * MiB
    table = [struct.unpack("<QQII", read(p, memmap + i * 24, 24)) for i in range(n_memmap)]
    assert table == [(e.base, e.length, e.type, 0) for e in pc_ram_map(RAM_256M)]


def test_no_initrd_no_modules():
    p = plan()
    _, _, _, nr_modules, modlist = struct.unpack("<IIIIQ", read(p, p.regs["rbx"], 24))
    assert (nr_modules, modlist, p.initrd) == (0, 0, None)


def test_segments_and_bss():
    p = plan()
    assert read(p, 0x1000000, len(CODE)) == CODE and read(p, 0x1000000 + len(CODE), 0x4000 - len(CODE)) == bytes(
        0x4000 - len(CODE)
    )
    assert read(p, 0x1200000, 8) == b"datadata"
    for a, b in combinations(p.segments, 2):
        assert a.gpa + a.memsz <= b.gpa or b.gpa + b.memsz <= a.gpa
    assert p.kernel_window == (0x1000000, 0x202000)


def test_entry_state_is_the_pvh_abi():
    p = plan()
    s = linux_boot_state(p)
    assert s.mode is CpuMode.PROTECTED and s.regs["rip"] == 0x1000010 and s.regs["rbx"] == p.regs["rbx"]
    assert s.cr0 & 1 and not s.cr0 & (1 << 31) and s.cr4 == 0 and s.regs["rflags"] == 2
    assert s.cs.db == 1 and s.cs.base == 0 and s.cs.limit == 0xFFFFFFFF and s.ds.limit == 0xFFFFFFFF
    assert s.tr.type == 0xB and s.tr.limit == 0x67 and s.tr.base == 0  # a 32-bit TSS, base 0, limit 0x67
    assert read(p, p.gdt, len(gdt_table())) == gdt_table() and s.gdt[0] == p.gdt


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (vmlinux(notes=note(b"Xen", 5, b"xen-3.0\0")), "without a PVH entry"),
        (vmlinux(notes=note(b"Xen", 18, b"\1\2")), "note of 2 bytes"),
        (vmlinux(notes=note(b"Xen", 18, struct.pack("<Q", 1 << 33))), "above 4 GiB"),
        (vmlinux(notes=note(b"Xen", 18, struct.pack("<Q", 0x3000000))), "not inside a loaded segment"),
        (vmlinux(machine=3), "x86-64 executable"),
        (vmlinux(truncate=100), "truncated"),
        (b"\x7fELF" + bytes(10), "not a little-endian ELF64"),
        (vmlinux([(0x1000000, CODE, 0x4000), (0x1002000, CODE, 0x1000)]), "overlaps"),
        (vmlinux([(0x7000, CODE, 0x1000)], notes=note(b"Xen", 18, struct.pack("<I", 0x7000))), "overlaps"),
        (vmlinux([(0x20000000, CODE, 0x1000)], notes=note(b"Xen", 18, struct.pack("<I", 0x20000000))), "give more"),
        (vmlinux([(0x1000000, CODE, 0x10)]), "more file bytes"),
    ],
)
def test_bad_kernels_get_one_line(data, message):
    with pytest.raises(InputError, match=message) as e:
        plan(data)
    assert "\n" not in str(e.value)


def test_bad_command_line_and_initrd():
    with pytest.raises(InputError, match="NUL"):
        plan(cmdline="a\0b")
    with pytest.raises(InputError, match="at most 65535"):
        plan(cmdline="x" * 70000)
    with pytest.raises(InputError, match="empty"):
        plan(initrd=("e", b""))
    with pytest.raises(InputError, match="does not fit"):
        plan(initrd=("big", bytes(255 * MiB)))


def test_real_vmlinux_plans():
    found = sorted((REPO / ".cache").glob("linux/vmlinux*")) + sorted(
        (REPO / ".cache").glob("lab/kernel/*/boot/vmlinux-*")
    )
    if not found:
        pytest.skip("no cached vmlinux (.cache/linux/vmlinux* or .cache/lab/kernel/*/boot/vmlinux-*)")
    data = found[0].read_bytes()
    entry = pvh_entry(str(found[0]), data)
    if entry is None:
        pytest.skip(f"{found[0].name} has no PVH entry (CONFIG_PVH off)")
    p = plan_pvh(
        str(found[0]), data, BootLayout.ram_ranges(512 * MiB), cmdline="", initrd=("i", bytes(MiB)), nr_vcpus=1
    )
    assert p.entry == entry and p.load_addr <= entry < p.load_addr + p.kernel_window[1]
    assert p.initrd[0] >= p.load_addr + p.kernel_window[1] or p.initrd[0] + p.initrd[1] <= p.load_addr
