"""The Linux boot protocol loader: setup header checks, placement, the zero page decoded field by
field (offsets from arch/x86/include/uapi/asm/bootparam.h, written out here rather than taken
from the module), the page tables walked, the entry state. Synthetic bzImages built with
struct; no KVM needed. One test plans a real Debian kernel when one is cached (see
``real_kernel``)."""

from __future__ import annotations

import struct
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import pytest

from vmm.cpu.layout import BootLayout, CpuMode
from vmm.cpu.state import pc_boot_state
from vmm.errors import InputError
from vmm.loader.linux import (
    CMDLINE_ADDR,
    PAGE_TABLES_ADDR,
    ZERO_PAGE_ADDR,
    LinuxPlan,
    linux_boot_state,
    plan_linux,
)
from vmm.memory import GuestMemory, GuestRegion, HostMemory
from vmm.platform.memmap import pc_ram_map

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
LOADED_HIGH, KEEP_SEGMENTS, CAN_USE_HEAP = 0x01, 0x40, 0x80
XLF_KERNEL_64, XLF_ABOVE_4G = 0x1, 0x2
RAM_256M = BootLayout.ram_ranges(256 * MiB)
REPO = Path(__file__).resolve().parent.parent


def bzimage(
    *,
    version: int = 0x020F,
    setup_sects: int = 4,
    payload: bytes = b"\x90" * 0x1000,
    loadflags: int = LOADED_HIGH,
    relocatable: int = 1,
    kernel_alignment: int = 0x200000,
    pref_address: int = 0x1000000,
    init_size: int = 0x400000,
    xloadflags: int = XLF_KERNEL_64 | XLF_ABOVE_4G,
    cmdline_size: int = 2047,
    initrd_addr_max: int = 0x7FFFFFFF,
    header_end: int = 0x26C,
    jump: int = 0xEB,
    syssize: int | None = None,
) -> bytes:
    """A bzImage: boot sector + setup sectors with the header fields at boot.rst's offsets,
    then ``payload`` (padded to 16 bytes, as the kernel's build pads it) as the kernel."""
    payload = payload + bytes(-len(payload) % 16)
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    setup[0x1EF] = 0xFF  # the sentinel, as header.S leaves it: a loader must not copy it
    setup[0x1F1] = setup_sects
    struct.pack_into("<I", setup, 0x1F4, len(payload) // 16 if syssize is None else syssize)
    struct.pack_into("<HH", setup, 0x1FA, 0xFFFF, 0)  # vid_mode, root_dev
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200], setup[0x201] = jump, (header_end - 0x202) & 0xFF
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<H", setup, 0x20E, 0x300)  # kernel_version: the string at 0x500
    setup[0x500 : 0x500 + 17] = b"6.99.0-synthetic\0"
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)  # code32_start
    struct.pack_into("<H", setup, 0x224, 0x5C00)  # heap_end_ptr as the image ships it
    struct.pack_into("<II", setup, 0x22C, initrd_addr_max, kernel_alignment)
    setup[0x234], setup[0x235] = relocatable, 21
    struct.pack_into("<HI", setup, 0x236, xloadflags, cmdline_size)
    struct.pack_into("<Q", setup, 0x250, 0xDEAD0000)  # setup_data: garbage the loader must clear
    struct.pack_into("<QI", setup, 0x258, pref_address, init_size)
    struct.pack_into("<II", setup, 0x264, 0x1234, 0x5678)  # handover_offset, kernel_info_offset
    return bytes(setup) + payload


def plan(data: bytes | None = None, ram=RAM_256M, *, cmdline="console=ttyS0", initrd=None, nr_vcpus=1) -> LinuxPlan:
    return plan_linux(
        "bzImage", bzimage() if data is None else data, ram, cmdline=cmdline, initrd=initrd, nr_vcpus=nr_vcpus
    )


def read(p: LinuxPlan, gpa: int, size: int) -> bytes:
    for seg in p.segments:
        if seg.gpa <= gpa and gpa + size <= seg.gpa + seg.memsz:
            full = seg.data + bytes(seg.memsz - len(seg.data))
            return full[gpa - seg.gpa : gpa - seg.gpa + size]
    raise AssertionError(f"nothing planned at {gpa:#x}+{size:#x}")


def u8(p, off):
    return read(p, ZERO_PAGE_ADDR + off, 1)[0]


def u16(p, off):
    return struct.unpack("<H", read(p, ZERO_PAGE_ADDR + off, 2))[0]


def u32(p, off):
    return struct.unpack("<I", read(p, ZERO_PAGE_ADDR + off, 4))[0]


def u64(p, off):
    return struct.unpack("<Q", read(p, ZERO_PAGE_ADDR + off, 8))[0]


def translate(p: LinuxPlan, va: int) -> int:
    """Walk the plan's 4-level page tables (CR3 = p.cr3) for ``va``; AssertionError if unmapped."""
    table = p.cr3
    for level, shift in enumerate((39, 30, 21)):
        (entry,) = struct.unpack("<Q", read(p, table + ((va >> shift) & 511) * 8, 8))
        assert entry & 1, f"{va:#x} not present at level {level}"
        assert entry & 2, f"{va:#x} not writable at level {level}"
        if level == 2:
            assert entry & 0x80, "expected a 2 MiB page"
            return (entry & ~0x1FFFFF & ((1 << 52) - 1)) | (va & 0x1FFFFF)
        table = entry & ~0xFFF & ((1 << 52) - 1)
    raise AssertionError("unreachable")


# --- the zero page ------------------------------------------------------------------------


def test_zero_page_decoded_field_by_field():
    data = bzimage()
    initrd = b"\x07" * 3 * 4096 + b"tail"
    p = plan(data, cmdline="console=ttyS0 panic=-1", initrd=("initrd.cpio", initrd))
    zp = read(p, ZERO_PAGE_ADDR, 4096)
    assert p.regs == {"rsi": ZERO_PAGE_ADDR} and p.zero_page == ZERO_PAGE_ADDR
    # Fields the loader does not write are the image's setup header, copied 0x1f1..0x26c.
    written = {0x210, 0x211, *range(0x214, 0x220), 0x224, 0x225, 0x226, 0x227, *range(0x228, 0x22C)}
    written |= {*range(0x23C, 0x240), *range(0x250, 0x258)}
    for off in range(0x1F1, 0x26C):
        if off not in written:
            assert zp[off] == data[off], f"header byte {off:#x}"
    assert zp[0x26C:0x290] == bytes(0x290 - 0x26C)  # nothing copied past the header's end
    assert u8(p, 0x1EF) == 0  # the sentinel stays clear: only the header was copied
    assert read(p, ZERO_PAGE_ADDR + 0x202, 4) == b"HdrS" and u16(p, 0x206) == 0x020F and u16(p, 0x1FE) == 0xAA55
    assert u8(p, 0x210) == 0xFF  # type_of_loader: undefined
    assert u8(p, 0x211) == LOADED_HIGH | CAN_USE_HEAP and not u8(p, 0x211) & KEEP_SEGMENTS
    assert u16(p, 0x224) == 0xE000 - 0x200  # heap_end_ptr
    assert u32(p, 0x214) == p.load_addr  # code32_start
    assert u32(p, 0x228) == CMDLINE_ADDR and u32(p, 0xC8) == 0  # cmd_line_ptr, ext_cmd_line_ptr
    assert read(p, CMDLINE_ADDR, 23) == b"console=ttyS0 panic=-1\0"
    addr, size = p.initrd
    assert (u32(p, 0x218), u32(p, 0x21C), u32(p, 0xC0), u32(p, 0xC4)) == (addr, len(initrd), 0, 0)
    assert read(p, addr, size) == initrd
    assert u64(p, 0x250) == 0  # setup_data cleared
    assert u32(p, 0x23C) == 0  # hardware_subarch: PC
    assert u64(p, 0x70) == 0  # acpi_rsdp_addr: no ACPI
    assert u32(p, 0x238) == 2047 and u64(p, 0x258) == 0x1000000 and u32(p, 0x260) == 0x400000  # read-only fields


def test_e820_table_is_the_pc_ram_map():
    ram = BootLayout.ram_ranges(5 * GiB)  # low RAM to 3 GiB, then 2 GiB above 4 GiB
    p = plan(ram=ram)
    n = u8(p, 0x1E8)
    table = [struct.unpack("<QQI", read(p, ZERO_PAGE_ADDR + 0x2D0 + i * 20, 20)) for i in range(n)]
    assert table == [
        (0, 0x9FC00, 1),
        (0x9FC00, 0x400, 2),
        (0xF0000, 0x10000, 2),
        (0x100000, 3 * GiB - 0x100000, 1),
        (4 * GiB, 2 * GiB, 1),
    ]
    assert table == [(e.base, e.length, e.type) for e in pc_ram_map(ram)]
    assert read(p, ZERO_PAGE_ADDR + 0x2D0 + n * 20, 20) == bytes(20)


def test_no_initrd_leaves_the_ramdisk_fields_zero():
    p = plan()
    assert p.initrd is None and (u32(p, 0x218), u32(p, 0x21C), u32(p, 0xC0), u32(p, 0xC4)) == (0, 0, 0, 0)


# --- the header's checks ------------------------------------------------------------------


@pytest.mark.parametrize("version", [0x0200, 0x020A, 0x020B])
def test_protocol_older_than_2_12_refused(version):
    with pytest.raises(InputError, match=r"boot protocol 2\.\d\d; this loader needs 2\.12") as e:
        plan(bzimage(version=version))
    assert "\n" not in str(e.value)


def test_protocol_2_12_accepted():
    assert plan(bzimage(version=0x020C)).header.protocol == "2.12"


def test_no_setup_header_refused():
    data = bytearray(bzimage())
    data[0x202:0x206] = b"NoPe"
    with pytest.raises(InputError, match="HdrS"):
        plan(bytes(data))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bzimage()[:0x240], "shorter than its setup header"),
        (bzimage(setup_sects=4)[: 5 * 512], "no protected-mode kernel"),
        (bzimage()[:-16], "syssize says"),
        (bzimage(syssize=0xFFFFFFFF), "syssize says"),
        (bzimage(header_end=0x240), "setup header ends at 0x240"),
        (bzimage(header_end=0x2A0), "setup header ends at 0x2a0"),
        (bzimage(jump=0x90), "no short jump"),
        (bzimage(loadflags=0), "zImage"),
        (bzimage(kernel_alignment=0x300000), "not a power of two"),
        (bzimage(kernel_alignment=0), "not a power of two"),
        (bzimage(init_size=0xFFFFFFFF), "init_size"),
        (bzimage(pref_address=1 << 63), "pref_address"),
        (bzimage(relocatable=0, pref_address=0x7000, init_size=0x1000), "overlaps the VMM's boot tables"),
        (bzimage(relocatable=0, pref_address=0xFE00000), "not relocatable and needs"),
    ],
)
def test_bad_images_get_one_line(data, message):
    with pytest.raises(InputError, match=message) as e:
        plan(data)
    assert "\n" not in str(e.value)


def test_setup_sects_zero_means_four():
    data = bzimage(setup_sects=0, payload=b"\xcc" * 64)
    p = plan(data)
    assert p.header.setup_sects == 4 and read(p, p.load_addr, 64) == b"\xcc" * 64
    assert data[5 * 512 :] == read(p, p.load_addr, len(data) - 5 * 512)


def test_kernel_version_string():
    assert plan().header.kernel_version == "6.99.0-synthetic"


# --- placement ----------------------------------------------------------------------------


def test_relocatable_kernel_at_pref_address():
    payload = bytes(range(256)) * 64
    p = plan(bzimage(payload=payload))
    assert p.load_addr == 0x1000000 and p.kernel_window == (0x1000000, 0x400000)
    assert p.entry == 0x1000200 and p.mode is CpuMode.LONG and p.pc
    assert read(p, p.load_addr, len(payload)) == payload


def test_relocatable_kernel_aligned_up_from_an_unaligned_pref_address():
    p = plan(bzimage(pref_address=0x1100000, kernel_alignment=0x1000000))
    assert p.load_addr == 0x2000000 and p.load_addr % 0x1000000 == 0


def test_relocatable_kernel_moves_past_a_hole():
    # RAM ends at 17 MiB, then resumes at 32 MiB: the 4 MiB window cannot start at 16 MiB.
    ram = [(0, 17 * MiB), (32 * MiB, 64 * MiB)]
    p = plan(ram=ram)
    assert p.load_addr == 32 * MiB and p.load_addr % 0x200000 == 0


def test_window_is_at_least_the_kernel():
    p = plan(bzimage(payload=bytes(0x500000), init_size=0x1000))
    assert p.kernel_window == (0x1000000, 0x500000)


def test_not_relocatable_at_its_fixed_address():
    p = plan(bzimage(relocatable=0, pref_address=0x1000000))
    assert p.load_addr == 0x100000 and p.entry == 0x100200
    assert p.kernel_window == (0x1000000, 0x400000)  # where it moves itself to run
    assert u32(p, 0x214) == 0x100000


def test_too_little_ram_for_the_kernel():
    with pytest.raises(InputError, match="give more --mem"):
        plan(ram=BootLayout.ram_ranges(18 * MiB))


def test_initrd_as_high_as_possible_below_the_top_of_ram():
    blob = bytes(5 * MiB + 123)
    p = plan(initrd=("initrd", blob))
    addr, size = p.initrd
    assert size == len(blob) and addr % 4096 == 0
    assert addr + size <= 256 * MiB and addr + 4096 + size > 256 * MiB  # the highest page that fits


def test_initrd_below_initrd_addr_max():
    blob = bytes(3 * MiB)
    p = plan(bzimage(initrd_addr_max=0x4000000 - 1), initrd=("initrd", blob))
    addr, size = p.initrd
    assert addr + size - 1 <= 0x4000000 - 1 and addr == 0x4000000 - 3 * MiB


def test_initrd_goes_below_the_kernel_when_initrd_addr_max_says_so():
    # initrd_addr_max inside the kernel's window: the highest place left is just below it.
    p = plan(bzimage(initrd_addr_max=0x1200000), initrd=("initrd", bytes(2 * MiB)))
    addr, size = p.initrd
    assert addr + size <= 0x1000000 and addr == 0x1000000 - 2 * MiB
    assert addr >= 1 * MiB


def test_initrd_that_does_not_fit():
    with pytest.raises(InputError, match=r"initrd big\.cpio .* does not fit") as e:
        plan(initrd=("big.cpio", bytes(250 * MiB)))
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="empty"):
        plan(initrd=("empty.cpio", b""))


def test_segments_are_disjoint_and_in_ram():
    p = plan(initrd=("initrd", bytes(MiB)), nr_vcpus=4)
    for a, b in combinations(p.segments, 2):
        assert a.gpa + a.memsz <= b.gpa or b.gpa + b.memsz <= a.gpa, f"{a.gpa:#x} and {b.gpa:#x} overlap"
    w0, wn = p.kernel_window
    for seg in p.segments:
        assert any(base <= seg.gpa and seg.gpa + seg.memsz <= base + size for base, size in RAM_256M)
        if seg.gpa != p.load_addr:
            assert seg.gpa + seg.memsz <= w0 or seg.gpa >= w0 + wn, f"{seg.gpa:#x} is inside the kernel window"


def test_the_plan_loads_into_guest_memory():
    host = HostMemory.allocate(32 * MiB, "anon")
    with host:
        mem = GuestMemory()
        mem.add(GuestRegion(0, 32 * MiB, host))
        p = plan(bzimage(init_size=0x200000), ram=[(0, 32 * MiB)], initrd=("initrd", b"\x5a" * 8192))
        p.load(mem)
        assert mem.read(ZERO_PAGE_ADDR + 0x202, 4) == b"HdrS"
        assert mem.read(p.initrd[0], 8192) == b"\x5a" * 8192
        assert mem.read(0xF0000, 4) == b"_MP_"


# --- the command line ---------------------------------------------------------------------


def test_command_line_at_most_cmdline_size():
    data = bzimage(cmdline_size=16)
    assert read(plan(data, cmdline="x" * 16), CMDLINE_ADDR, 17) == b"x" * 16 + b"\0"
    with pytest.raises(InputError, match="17 bytes; bzImage takes at most 16") as e:
        plan(data, cmdline="x" * 17)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="NUL"):
        plan(cmdline="a\0b")


def test_huge_cmdline_size_is_bounded_by_the_command_line_area():
    with pytest.raises(InputError, match="at most 65535"):
        plan(bzimage(cmdline_size=0xFFFFFFFF), cmdline="y" * 70000)


# --- page tables, GDT and entry state -----------------------------------------------------


def test_page_tables_identity_map_what_the_kernel_needs():
    p = plan(initrd=("initrd", bytes(2 * MiB)))
    assert p.cr3 == PAGE_TABLES_ADDR
    start, size = p.kernel_window
    addr, isize = p.initrd
    for va in (start, start + size - 1, ZERO_PAGE_ADDR, CMDLINE_ADDR, addr, addr + isize - 1, 0xFEC00000, 4 * GiB - 1):
        assert translate(p, va) == va
    (pml4_1,) = struct.unpack("<Q", read(p, p.cr3 + 8, 8))
    assert pml4_1 == 0  # nothing above 512 GiB
    (pdpt_4,) = struct.unpack("<Q", read(p, p.cr3 + 0x1000 + 4 * 8, 8))
    assert pdpt_4 == 0  # the map ends at 4 GiB


def gdt_entry(p: LinuxPlan, selector: int) -> int:
    return struct.unpack("<Q", read(p, p.gdt + (selector & ~7), 8))[0]


def test_64_bit_entry_state():
    p = plan()
    s = linux_boot_state(p)
    assert s.mode is CpuMode.LONG and s.regs["rip"] == p.entry == p.load_addr + 0x200
    assert s.regs["rsi"] == ZERO_PAGE_ADDR and s.regs["rflags"] == 2  # interrupts off
    assert all(s.regs.get(r, 0) == 0 for r in ("rax", "rbx", "rcx", "rdx", "rdi", "rbp"))
    assert s.cs.selector == 0x10 and s.cs.l == 1 and s.cs.type & 0x8  # __BOOT_CS, 64-bit code
    for seg in (s.ds, s.es, s.ss):
        assert seg.selector == 0x18 and not seg.type & 0x8 and seg.type & 0x2  # __BOOT_DS, writable data
    assert gdt_entry(p, 0x10) == s.cs.descriptor() and gdt_entry(p, 0x18) == s.ds.descriptor()
    assert s.gdt == (p.gdt, 31) and s.cr3 == p.cr3 and s.cr0 & (1 << 31) and s.efer & (1 << 10)


def test_32_bit_entry_without_xlf_kernel_64():
    p = plan(bzimage(xloadflags=0))
    s = linux_boot_state(p)
    assert p.mode is CpuMode.PROTECTED and p.entry == p.load_addr and p.cr3 is None
    assert not any(seg.gpa == PAGE_TABLES_ADDR for seg in p.segments)
    assert s.cs.selector == 0x10 and s.cs.db == 1 and s.cs.l == 0 and s.ss.selector == 0x18
    assert gdt_entry(p, 0x10) == s.cs.descriptor() and gdt_entry(p, 0x18) == s.ds.descriptor()
    assert not s.cr0 & (1 << 31) and s.cr0 & 1 and s.efer == 0
    assert s.regs["rsi"] == ZERO_PAGE_ADDR and all(s.regs.get(r, 0) == 0 for r in ("rbx", "rdi", "rbp"))


def test_pc_boot_state_finds_the_same_tables():
    # The machine's generic PC path uses BootLayout's CR3 and GDT: the plan's tables are there.
    p = plan()
    s = pc_boot_state(p)
    assert s.cr3 == p.cr3 and s.gdt[0] == p.gdt and s.regs["rsi"] == ZERO_PAGE_ADDR and s.regs["rip"] == p.entry
    assert gdt_entry(p, s.cs.selector) == replace(s.cs, selector=0).descriptor()


# --- a real kernel ------------------------------------------------------------------------


def real_kernel() -> Path | None:
    """A Debian bzImage, if one is cached: ``.cache/linux/vmlinuz*`` (put one there by hand:
    ``apt-get download linux-image-<version>-cloud-amd64-unsigned`` and ``dpkg-deb -x``; never
    committed, .cache/ is ignored), else the lab's kernel under ``.cache/lab/kernel/``."""
    for pattern in ("linux/vmlinuz*", "linux/*/boot/vmlinuz*", "lab/kernel/*/boot/vmlinuz*"):
        found = sorted((REPO / ".cache").glob(pattern))
        if found:
            return found[0]
    return None


def test_real_bzimage_plans():
    path = real_kernel()
    if path is None:
        pytest.skip("no cached bzImage (.cache/linux/vmlinuz* or .cache/lab/kernel/*/boot/vmlinuz*)")
    data = path.read_bytes()
    p = plan_linux(
        str(path), data, BootLayout.ram_ranges(512 * MiB), cmdline="console=ttyS0", initrd=("i", bytes(MiB)), nr_vcpus=2
    )
    h = p.header
    assert h.version >= 0x020C and h.relocatable and h.has_64bit_entry and p.mode is CpuMode.LONG
    assert p.load_addr >= h.pref_address and p.load_addr % h.kernel_alignment == 0
    assert p.kernel_window[1] >= h.init_size and p.entry == p.load_addr + 0x200
    assert read(p, p.load_addr, 64) == data[h.setup_size : h.setup_size + 64]
    assert p.initrd[0] + p.initrd[1] <= min(h.initrd_addr_max + 1, 512 * MiB)
    assert read(p, ZERO_PAGE_ADDR + 0x1F1, h.end - 0x1F1)[0x202 - 0x1F1 :][:4] == b"HdrS"
