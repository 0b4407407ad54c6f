"""Image loaders and the boot structures they sit beside (no KVM needed)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vmm.bootinfo import encode_args, write_boot_info
from vmm.cpu.layout import CpuMode
from vmm.errors import InputError
from vmm.loader import load_image, peek_mode
from vmm.memory import GuestMemory, GuestRegion, HostMemory

MiB = 1 << 20


@pytest.fixture
def ram():
    mem = GuestMemory()
    host = HostMemory.allocate(4 * MiB, "anon")
    mem.add(GuestRegion(0, 4 * MiB, host))
    yield mem
    host.close()


def test_elf64_loads_by_program_header(ram, guest):
    image = load_image(guest("hello64.elf"), ram)
    assert (image.format, image.mode, image.entry) == ("elf64", CpuMode.LONG, 0x100000)
    assert image.start == 0x100000 and image.end > image.start
    with open(guest("hello64.elf"), "rb") as f:
        data = f.read()
    # The code bytes from the file's first PT_LOAD are now at the entry point.
    (phoff,) = struct.unpack_from("<Q", data, 32)
    offset, _vaddr, paddr, filesz = struct.unpack_from("<QQQQ", data, phoff + 8)
    assert ram.read(paddr, filesz) == data[offset : offset + filesz]


def test_elf32_and_the_mode_note(ram, guest):
    assert load_image(guest("hello32.elf"), ram).mode is CpuMode.PROTECTED
    assert peek_mode(guest("user64.elf")) is CpuMode.USER
    assert peek_mode(guest("hello64.elf")) is CpuMode.LONG
    assert load_image(guest("user64.elf"), ram, mode=CpuMode.LONG).mode is CpuMode.LONG


def test_flat_defaults_by_mode(ram, guest):
    image = load_image(guest("hello16.bin"), ram)
    assert (image.format, image.mode, image.entry, image.start) == ("flat", CpuMode.REAL, 0x7C00, 0x7C00)
    other = load_image(guest("hello16.bin"), ram, mode=CpuMode.PROTECTED)
    assert other.start == 0x100000  # guests/README.md: flat images load there outside real mode
    moved = load_image(guest("hello16.bin"), ram, load_addr=0x8000, entry=0x8004)
    assert (moved.start, moved.entry) == (0x8000, 0x8004)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty image"),
        (b"\x7fELF\x02\x01\x01", "malformed or truncated ELF"),
        (None, "not x86"),
        (None, "runs past the end of the file"),
    ],
)
def test_bad_images_are_input_errors(ram, guest, tmp_path, content, message):
    path = tmp_path / "bad.elf"
    if content is None and message == "not x86":
        data = bytearray(Path(guest("hello64.elf")).read_bytes())
        struct.pack_into("<H", data, 18, 183)  # EM_AARCH64
        content = bytes(data)
    elif content is None:
        content = Path(guest("hello64.elf")).read_bytes()[:0x1010]  # header intact, segment cut
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_image(path, ram)


def test_missing_and_directory_images(ram, tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_image(tmp_path / "nope.elf", ram)
    with pytest.raises(InputError, match="is a directory"):
        load_image(tmp_path, ram)


def test_images_must_fit_and_must_not_cover_the_boot_structures(ram, guest, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(b"\x90" * (5 * MiB))
    with pytest.raises(InputError, match="do not fit in guest RAM"):
        load_image(big, ram, mode=CpuMode.LONG)
    with pytest.raises(InputError, match="overlaps the VMM's boot structures"):
        load_image(guest("hello16.bin"), ram, mode=CpuMode.LONG, load_addr=0x10000)
    with pytest.raises(InputError, match="--load-addr is for flat binaries"):
        load_image(guest("hello64.elf"), ram, load_addr=0x200000)


def decode_boot_info(block: bytes) -> dict[str, object]:
    """The boot info block as guests/README.md's table lays it out, decoded here with
    struct (not with anything in vmm): offsets 0-47 the header, 48 the RAM ranges, 256
    the arguments."""
    magic, version, ram, vcpus, mode, start, end, nranges, args_len = struct.unpack_from("<IIQIIQQII", block, 0)
    ranges = [struct.unpack_from("<QQ", block, 48 + 16 * i) for i in range(nranges)]
    args = block[256 : 256 + args_len]
    pairs, pos = [], 0
    while item := args[pos : args.index(b"\0", pos)]:  # "key=value\0" strings, then an empty one
        pairs.append(item.decode().split("=", 1))
        pos += len(item) + 1
    assert pos + 1 == args_len, "the argument area's length covers exactly the strings and the empty one"
    return {
        "magic": magic,
        "version": version,
        "ram": ram,
        "vcpus": vcpus,
        "mode": mode,
        "image": (start, end),
        "ranges": ranges,
        "args": dict(pairs),
        "unused": block[48 + 16 * nranges : 256] + block[256 + args_len :],
    }


def test_boot_info_block_follows_the_documented_layout(ram):
    ram.fill(0x1000, 0x1000, 0xEE)  # whatever was there before must not show through
    write_boot_info(
        ram,
        ram_ranges=[(0, 3 << 30), (4 << 30, 1 << 30)],
        nr_vcpus=2,
        mode=CpuMode.USER,
        image_start=0x100000,
        image_end=0x101000,
        args={"passes": "2", "name": "x y"},
    )
    block = ram.read(0x1000, 0x1000)  # guests/README.md: the boot info is at 0x1000
    assert block[:4] == b"VMMB"
    assert decode_boot_info(block) == {
        "magic": 0x424D4D56,
        "version": 1,
        "ram": 4 << 30,
        "vcpus": 2,
        "mode": 3,  # user
        "image": (0x100000, 0x101000),
        "ranges": [(0, 3 << 30), (4 << 30, 1 << 30)],
        "args": {"passes": "2", "name": "x y"},
        "unused": bytes(256 - 48 - 32) + bytes(0x1000 - 256 - len(b"passes=2\0name=x y\0\0")),
    }


@pytest.mark.parametrize(("mode", "number"), [(CpuMode.REAL, 0), (CpuMode.PROTECTED, 1), (CpuMode.LONG, 2)])
def test_boot_info_mode_numbers(ram, mode, number):
    write_boot_info(ram, ram_ranges=[(0, 4 * MiB)], nr_vcpus=1, mode=mode, image_start=0, image_end=0, args={})
    assert decode_boot_info(ram.read(0x1000, 0x1000))["mode"] == number


def test_boot_args_are_validated():
    assert encode_args({}) == b"\0"
    with pytest.raises(InputError, match="bad --arg key"):
        encode_args({"a b": "1"})
    with pytest.raises(InputError, match="room for"):
        encode_args({"k": "x" * 5000})
