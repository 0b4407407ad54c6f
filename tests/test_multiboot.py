"""The Multiboot v1 loader: header, image layouts, and the info block a guest decodes (pure
plans, built from synthetic images made with struct; no KVM needed)."""

from __future__ import annotations

import struct
from itertools import combinations

import pytest

from vmm.cpu.layout import BootLayout, CpuMode
from vmm.cpu.state import pc_boot_state
from vmm.errors import InputError
from vmm.loader import ImagePlan
from vmm.loader.multiboot import MAX_MODULES, find_header, plan_multiboot
from vmm.memory import GuestMemory, GuestRegion, HostMemory

MiB, GiB = 1 << 20, 1 << 30
RAM_64M = BootLayout.ram_ranges(64 * MiB)
CODE = b"\xfa\xf4\xeb\xfd" * 8  # cli; hlt; jmp back: something to load
# The Multiboot 0.6.96 specification's numbers, not the loader's constants.
HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002  # EAX at entry
MAX_CMDLINE = 4096  # README: --append takes at most 4096 bytes
FLAT_CODE32 = 0x00CF9B000000FFFF  # base 0, limit 4 GiB, 32-bit, execute/read, present
FLAT_DATA = 0x00CF93000000FFFF  # base 0, limit 4 GiB, read/write, present


def mb_header(flags: int = 0x3, *, checksum: int | None = None, address: tuple[int, ...] = ()) -> bytes:
    """A Multiboot header; ``address`` = (header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr)."""
    if checksum is None:
        checksum = -(HEADER_MAGIC + flags) & 0xFFFFFFFF
    return struct.pack("<III", HEADER_MAGIC, flags, checksum) + struct.pack(f"<{len(address)}I", *address)


def elf32(
    loads: list[tuple[int, int, bytes, int]],
    entry: int,
    *,
    header: bytes | None = None,
    machine: int = 3,
    elf_class: int = 1,
    e_type: int = 2,
    phoff: int | None = None,
    extra_phdrs: list[tuple[int, ...]] = (),
) -> bytes:
    """An ELF32 executable: ``loads`` = (paddr, vaddr, data, memsz) PT_LOAD segments, the
    Multiboot header right after the program headers, segment data after that."""
    header = mb_header() if header is None else header
    phdrs = len(loads) + len(extra_phdrs)
    mb_off = 52 + 32 * phdrs
    data_off = (mb_off + len(header) + 0xFF) & ~0xFF
    table, blob = [], b""
    for paddr, vaddr, data, memsz in loads:
        table.append(struct.pack("<8I", 1, data_off + len(blob), vaddr, paddr, len(data), memsz, 5, 0x1000))
        blob += data
    table += [struct.pack("<8I", *p) for p in extra_phdrs]
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
    phoff = 52 if phoff is None else phoff
    ehdr = struct.pack("<16sHHIIIIIHHHHHH", ident, e_type, machine, 1, entry, phoff, 0, 0, 52, 32, phdrs, 40, 0, 0)
    image = ehdr + b"".join(table) + header
    return image + bytes(data_off - len(image)) + blob


def aout(load_addr: int = 0x100000, *, body: bytes = CODE, bss: int = 0x1000, flags: int = 0x10003) -> bytes:
    """A Multiboot a.out-kludge image: the header at file offset 0 = load_addr, the whole file loaded."""
    fields = (load_addr, load_addr, 0, load_addr + 32 + len(body) + bss, load_addr + 32)
    return mb_header(flags, address=fields) + body


def plan(data: bytes, ram=RAM_64M, *, cmdline: str = "", modules=(), path: str = "kernel.elf") -> ImagePlan:
    header = find_header(data)
    assert header is not None
    return plan_multiboot(path, data, header, ram, cmdline=cmdline, modules=list(modules))


def read(p: ImagePlan, gpa: int, size: int) -> bytes:
    """Bytes at ``gpa`` as the plan will leave them (data, then zeroed memsz)."""
    for seg in p.segments:
        if seg.gpa <= gpa and gpa + size <= seg.gpa + seg.memsz:
            full = seg.data + bytes(seg.memsz - len(seg.data))
            return full[gpa - seg.gpa : gpa - seg.gpa + size]
    raise AssertionError(f"nothing planned at {gpa:#x}+{size:#x}")


def c_string(p: ImagePlan, gpa: int) -> bytes:
    for seg in p.segments:
        if seg.gpa <= gpa < seg.gpa + len(seg.data):
            tail = seg.data[gpa - seg.gpa :]
            return tail[: tail.index(b"\0")]
    raise AssertionError(f"no string at {gpa:#x}")


def info(p: ImagePlan) -> dict[str, int]:
    names = ["flags", "mem_lower", "mem_upper", "boot_device", "cmdline", "mods_count", "mods_addr"]
    fields = struct.unpack("<7I", read(p, p.regs["rbx"], 28))
    out = dict(zip(names, fields, strict=True))
    out["syms"] = read(p, p.regs["rbx"] + 28, 16)
    out["mmap_length"], out["mmap_addr"] = struct.unpack("<II", read(p, p.regs["rbx"] + 44, 8))
    out["drives_length"], out["drives_addr"], out["config_table"], out["boot_loader_name"] = struct.unpack(
        "<IIII", read(p, p.regs["rbx"] + 52, 16)
    )
    out["rest"] = read(p, p.regs["rbx"] + 68, 116 - 68)  # APM, VBE, framebuffer
    return out


def assert_disjoint(p: ImagePlan) -> None:
    for a, b in combinations(p.segments, 2):
        assert a.gpa + a.memsz <= b.gpa or b.gpa + b.memsz <= a.gpa, f"{a.gpa:#x} and {b.gpa:#x} overlap"


# --- the header ---------------------------------------------------------------------------


def test_header_found_aligned_in_the_first_8_kib():
    data = bytes(0x40) + mb_header(0x10003, address=(1, 2, 3, 4, 5)) + bytes(100)
    h = find_header(data)
    assert h is not None and (h.offset, h.flags, h.has_address) == (0x40, 0x10003, True)
    assert (h.header_addr, h.load_addr, h.load_end_addr, h.bss_end_addr, h.entry_addr) == (1, 2, 3, 4, 5)
    assert find_header(bytes(0x41) + mb_header() + bytes(100)) is None  # not 32-bit aligned
    assert find_header(bytes(8192)) is None
    last = bytes(8192 - 12) + mb_header(0x3)  # ends exactly at 8192
    assert find_header(last).offset == 8192 - 12


def test_address_fields_are_ignored_without_flag_16():
    h = find_header(mb_header(0x3, address=(1, 2, 3, 4, 5)))
    assert not h.has_address and (h.header_addr, h.entry_addr) == (0, 0)


def test_bad_checksum_names_the_offset():
    with pytest.raises(InputError, match="multiboot header at offset 0x80 has a bad checksum"):
        find_header(bytes(0x80) + mb_header(checksum=0x1234) + bytes(64))


def test_a_good_header_after_a_stray_magic_wins():
    data = mb_header(checksum=1) + bytes(4) + mb_header() + bytes(32)
    assert find_header(data).offset == 16


def test_header_beyond_8_kib_is_an_error_saying_so():
    with pytest.raises(InputError, match=r"offset 0x3000 is beyond the first 8192 bytes"):
        find_header(bytes(0x3000) + mb_header() + bytes(64), path="k")
    with pytest.raises(InputError, match="beyond the first 8192"):
        find_header(bytes(8192 - 8) + mb_header() + bytes(64))  # straddles the limit


def test_header_fields_must_fit_in_8_kib_and_the_file():
    with pytest.raises(InputError, match="runs past the first 8192 bytes"):
        find_header(bytes(8192 - 16) + mb_header(0x10003, address=(1, 2, 3, 4, 5)))
    with pytest.raises(InputError, match="runs past the end of the file"):
        find_header(bytes(16) + mb_header(0x10003))


def test_required_flags():
    with pytest.raises(InputError, match=r"video mode.*no framebuffer"):
        plan(aout(flags=0x10007) + bytes(16))
    with pytest.raises(InputError, match="requires Multiboot header flag 5,"):
        plan(aout(flags=0x10023))
    assert plan(aout(flags=0x10000)).format == "multiboot-aout"  # bits 0 and 1 are optional to ask for
    assert plan(aout(flags=0x80010003)).format == "multiboot-aout"  # bits 17-31 are only hints


# --- image layouts ------------------------------------------------------------------------


def test_elf_loads_by_program_headers_with_bss():
    text, data = CODE, b"DATA" * 4
    image = elf32([(0x100000, 0x100000, text, len(text)), (0x102000, 0x102000, data, 0x3000)], 0x100004)
    p = plan(image)
    assert (p.format, p.mode, p.entry, p.pc) == ("multiboot-elf", CpuMode.PROTECTED, 0x100004, True)
    assert (p.segments[0].gpa, p.segments[0].data) == (0x100000, text)
    assert (p.segments[1].gpa, p.segments[1].data, p.segments[1].memsz) == (0x102000, data, 0x3000)
    assert set(p.regs) == {"rax", "rbx"} and p.regs["rax"] == BOOTLOADER_MAGIC
    assert_disjoint(p)


def test_bss_is_zeroed_in_guest_ram():
    image = elf32([(0x100000, 0x100000, CODE, 0x2000)], 0x100000)
    host = HostMemory.allocate(4 * MiB, "anon")
    try:
        mem = GuestMemory()
        mem.add(GuestRegion(0, 4 * MiB, host))
        mem.fill(0, 4 * MiB, 0xAA)
        p = plan(image, [(0, 4 * MiB)]).load(mem)
        assert mem.read(0x100000, len(CODE)) == CODE
        assert mem.read(0x100000 + len(CODE), 0x2000 - len(CODE)) == bytes(0x2000 - len(CODE))
        assert mem.read(p.regs["rbx"], 116) == read(p, p.regs["rbx"], 116)
    finally:
        host.close()


def test_higher_half_entry_is_translated_to_physical():
    image = elf32([(0x100000, 0xC0100000, CODE, len(CODE))], 0xC0100008)
    p = plan(image)
    assert p.entry == 0x100008 and p.segments[0].gpa == 0x100000


def test_aout_kludge_layout():
    body = CODE + b"END!"
    image = b"\x7fELF" + bytes(12) + aout(0x200000, body=body)  # an ELF with flag 16 loads by address too
    fields = (0x200010, 0x200000, 0, 0x200000 + len(image) + 0x800, 0x200030)
    image = image[:16] + mb_header(0x10003, address=fields) + image[16 + 32 :]
    p = plan(image)
    assert (p.format, p.entry) == ("multiboot-aout", 0x200030)
    seg = p.segments[0]
    assert (seg.gpa, seg.data, seg.memsz) == (0x200000, image, len(image) + 0x800)


def test_aout_load_end_addr_loads_part_of_the_file():
    fields = (0x100000, 0x100000, 0x100000 + 40, 0x100000 + 0x1000, 0x100020)
    image = mb_header(0x10000, address=fields) + CODE + b"trailing symbols"
    seg = plan(image).segments[0]
    assert (seg.data, seg.memsz) == (image[:40], 0x1000)


def test_aout_header_can_sit_after_the_load_start():
    # Header at file offset 0x100, load_addr 0x100 bytes before header_addr: load from offset 0.
    fields = (0x100100, 0x100000, 0, 0, 0x100000)
    image = CODE + bytes(0x100 - len(CODE)) + mb_header(0x10000, address=fields) + CODE
    seg = plan(image).segments[0]
    assert (seg.gpa, seg.data, seg.memsz) == (0x100000, image, len(image))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ((0x100000, 0x100010, 0, 0, 0x100020), "load_addr 0x100010 is above header_addr"),
        ((0x100100, 0x100000, 0, 0, 0x100000), r"header_addr - load_addr \(0x100\) is more than"),
        ((0x100000, 0x100000, 0xFFFFF, 0, 0x100000), "load_end_addr 0xfffff is below load_addr"),
        ((0x100000, 0x100000, 0x100000 + 4096, 0, 0x100000), "asks for 4096 bytes from file offset 0x0"),
        ((0x100000, 0x100000, 0, 0x100010, 0x100000), "bss_end_addr 0x100010 is below the end"),
        ((0x100000, 0x100000, 0, 0, 0x200000), "entry_addr 0x200000 is not inside the loaded image"),
        ((0xFFFFF000, 0xFFFFF000, 0, 0xFFFFFFFF, 0xFFFFF020), "not in usable guest RAM below 4 GiB"),
    ],
)
def test_aout_arithmetic_is_checked(fields, message):
    with pytest.raises(InputError, match=message):
        plan(mb_header(0x10003, address=fields) + CODE)


def test_non_elf_without_address_fields_is_refused():
    with pytest.raises(InputError, match=r"not an ELF file.*no address fields"):
        plan(mb_header() + CODE)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"elf_class": 2}, "Multiboot v1 needs a 32-bit ELF; this is a 64-bit ELF"),
        ({"machine": 62}, r"Multiboot v1 needs a 32-bit ELF for i386 \(EM_386\); this one is for machine 62"),
        ({"e_type": 3}, r"expected an executable \(ET_EXEC\)"),
        ({"phoff": 0xFFFFFFFF}, "program headers run past the end of the file"),
    ],
)
def test_elf_header_checks(kwargs, message):
    with pytest.raises(InputError, match=message):
        plan(elf32([(0x100000, 0x100000, CODE, len(CODE))], 0x100000, **kwargs))


def test_elf_segment_checks():
    ok = (0x100000, 0x100000, CODE, len(CODE))
    huge = (1, 0xFFFFFFF0, 0x100000, 0x100000, 0xFFFFFFFF, 0xFFFFFFFF, 5, 0)  # offset and sizes near 2**32
    with pytest.raises(InputError, match="runs past the end of the file"):
        plan(elf32([ok], 0x100000, extra_phdrs=[huge]))
    with pytest.raises(InputError, match="runs past the end of the file"):
        plan(elf32([ok], 0x100000)[:-4])  # truncated
    with pytest.raises(InputError, match="more file bytes"):
        plan(elf32([(0x100000, 0x100000, CODE, 4)], 0x100000))
    with pytest.raises(InputError, match="segments at 0x100000 and 0x100010 overlap"):
        plan(elf32([ok, (0x100010, 0x100010, CODE, len(CODE))], 0x100000))
    with pytest.raises(InputError, match="entry point 0x200000 is not inside a loaded segment"):
        plan(elf32([ok], 0x200000))
    with pytest.raises(InputError, match="entry point 0x100040 is not inside"):  # in the bss, not the code
        plan(elf32([(0x100000, 0x100000, CODE, 0x1000)], 0x100040))
    with pytest.raises(InputError, match="ends above 4 GiB"):
        plan(elf32([(0xFFFFFF00, 0xFFFFFF00, CODE, 0x1000)], 0xFFFFFF00))
    with pytest.raises(InputError, match="no loadable segments"):
        plan(elf32([], 0x100000, extra_phdrs=[(4, 0, 0, 0, 0, 0, 0, 0)]))
    with pytest.raises(InputError, match="truncated ELF header"):
        plan(b"\x7fELF" + bytes(12) + mb_header())


def test_image_outside_usable_ram_names_address_and_map():
    with pytest.raises(InputError, match=r"at 0x4000000 are not in usable guest RAM below 4 GiB \(0x0-0x9fbff, "):
        plan(elf32([(64 * MiB, 64 * MiB, CODE, len(CODE))], 64 * MiB))
    with pytest.raises(InputError, match="at 0xa0000 are not in usable"):  # the VGA window
        plan(elf32([(0xA0000, 0xA0000, CODE, len(CODE))], 0xA0000))


# --- the info block -----------------------------------------------------------------------


RAM_5G = BootLayout.ram_ranges(5 * GiB)


@pytest.mark.parametrize(("ram", "upper"), [(RAM_64M, 63 * 1024), (RAM_5G, 3 * 1024 * 1024 - 1024)])
def test_info_block_fields(ram, upper):
    p = plan(elf32([(0x100000, 0x100000, CODE, len(CODE))], 0x100000), ram, cmdline="console=ttyS0 x=1")
    mbi = info(p)
    assert mbi["flags"] == (1 << 0) | (1 << 2) | (1 << 6) | (1 << 9)  # mem, cmdline, mmap, loader name
    assert (mbi["mem_lower"], mbi["mem_upper"], mbi["boot_device"]) == (639, upper, 0)
    assert c_string(p, mbi["cmdline"]) == b"kernel.elf console=ttyS0 x=1"
    assert (mbi["mods_count"], mbi["mods_addr"]) == (0, 0)
    assert mbi["syms"] == bytes(16) and mbi["rest"] == bytes(48)
    assert (mbi["drives_length"], mbi["drives_addr"], mbi["config_table"]) == (0, 0, 0)
    assert c_string(p, mbi["boot_loader_name"]) == b"vmm"
    mmap = read(p, mbi["mmap_addr"], mbi["mmap_length"])
    entries = [struct.unpack_from("<IQQI", mmap, i) for i in range(0, len(mmap), 24)]
    low_end = min(ram[0][1], 3 * GiB)
    expected = [(20, 0, 0x9FC00, 1), (20, 0x9FC00, 0x400, 2), (20, 0xF0000, 0x10000, 2), (20, MiB, low_end - MiB, 1)]
    if len(ram) > 1:
        expected.append((20, 4 * GiB, 2 * GiB, 1))
    assert entries == expected
    # Preferred spot: conventional memory from 0x1000, clear of the image at 1 MiB.
    assert p.regs["rbx"] == 0x1000 and p.regs["rax"] == 0x2BADB002


def test_cmdline_mirrors_qemu_even_when_empty():
    p = plan(aout(), path="/boot/my kernel")
    assert c_string(p, info(p)["cmdline"]) == b"/boot/my kernel "


def test_gdt_holds_the_flat_segments_the_entry_state_loads():
    # Multiboot: CS a 32-bit read/execute segment, DS/ES/FS/GS/SS read/write, all with
    # offset 0 and limit 0xFFFFFFFF. The descriptors the entry selectors name, in the GDT
    # the plan places, must be exactly those.
    p = plan(aout())
    state = pc_boot_state(p)
    assert state.gdt[0] == p.gdt and p.gdt % 8 == 0
    table = read(p, p.gdt, state.gdt[1] + 1)

    def descriptor(selector: int) -> int:
        assert selector & 7 == 0 and selector + 8 <= len(table), hex(selector)
        return struct.unpack_from("<Q", table, selector)[0]

    assert descriptor(state.cs.selector) == FLAT_CODE32
    for seg in (state.ds, state.es, state.fs, state.gs, state.ss):
        assert descriptor(seg.selector) == FLAT_DATA


def test_modules_are_page_aligned_after_the_image():
    mods = [("a.bin", b"A" * 5000, "a.bin first"), ("b.bin", b"B" * 3, "b.bin"), ("empty", b"", "")]
    image = elf32([(0x100000, 0x100000, CODE, 0x1800)], 0x100000, header=mb_header(0x1))
    p = plan(image, modules=mods)
    mbi = info(p)
    assert mbi["flags"] & (1 << 3) and mbi["mods_count"] == 3
    table = read(p, mbi["mods_addr"], 16 * 3)
    prev_end = 0x101800  # the image's bss included
    for i, (_, contents, string) in enumerate(mods):
        start, end, string_addr, reserved = struct.unpack_from("<IIII", table, 16 * i)
        assert start % 0x1000 == 0 and start >= prev_end and end - start == len(contents) and reserved == 0
        assert c_string(p, string_addr) == string.encode()
        if contents:
            assert read(p, start, len(contents)) == contents
        prev_end = max(end, start + 1)
    assert_disjoint(p)


@pytest.mark.parametrize("link", [0x1000, 0x8000])
def test_low_images_push_the_info_block_elsewhere(link):
    image = elf32([(link, link, CODE, 0x3000)], link)
    p = plan(image, modules=[("m", b"M" * 100, "m")])
    assert_disjoint(p)
    base = p.regs["rbx"]
    assert not link <= base < link + 0x3000 and base >= 0x1000
    assert info(p)["mem_lower"] == 639 and read(p, link, len(CODE)) == CODE


def test_image_filling_conventional_memory_puts_the_info_above_image_and_modules():
    image = elf32([(0x1000, 0x1000, CODE, 0x9FC00 - 0x1000)], 0x1000)
    p = plan(image, modules=[("m", b"M" * 100, "m")])
    mod_start = struct.unpack_from("<I", read(p, info(p)["mods_addr"], 4))[0]
    assert mod_start == MiB and p.regs["rbx"] == MiB + 0x1000
    assert_disjoint(p)


def test_module_that_does_not_fit():
    with pytest.raises(InputError, match=r"module big.bin \(4194304 bytes\) does not fit"):
        plan(aout(), [(0, 4 * MiB)], modules=[("big.bin", bytes(4 * MiB), "big.bin")])


def test_module_below_the_image_when_nothing_is_free_above():
    p = plan(aout(0x300000, bss=0x100000 - 0x1000), [(0, 4 * MiB)], modules=[("m", b"M" * 8192, "m")])
    start = struct.unpack_from("<I", read(p, info(p)["mods_addr"], 4))[0]
    assert start == MiB and read(p, start, 8192) == b"M" * 8192


def test_cmdline_and_module_limits():
    plan(aout(), cmdline="x" * MAX_CMDLINE)
    with pytest.raises(InputError, match=f"--append is {MAX_CMDLINE + 1} bytes; at most {MAX_CMDLINE}"):
        plan(aout(), cmdline="x" * (MAX_CMDLINE + 1))
    with pytest.raises(InputError, match="--append contains a NUL byte"):
        plan(aout(), cmdline="a\0b")
    with pytest.raises(InputError, match=f"{MAX_MODULES + 1} modules; at most {MAX_MODULES}"):
        plan(aout(), modules=[("m", b"x", "m")] * (MAX_MODULES + 1))
    with pytest.raises(InputError, match="the string of module m is"):
        plan(aout(), modules=[("m", b"x", "y" * (MAX_CMDLINE + 1))])
