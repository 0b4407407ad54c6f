"""Image loaders and the boot structures they sit beside (no KVM needed)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from vmm.bootinfo import BOOT_INFO_MAGIC, encode_args, parse_boot_info, write_boot_info
from vmm.cpu.layout import BootLayout, CpuMode
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
    assert other.start == BootLayout.FLAT_LOAD
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


def test_boot_info_round_trip(ram):
    write_boot_info(
        ram,
        ram_ranges=[(0, 3 << 30), (4 << 30, 1 << 30)],
        nr_vcpus=2,
        mode=CpuMode.USER,
        image_start=0x100000,
        image_end=0x101000,
        args={"passes": "2", "name": "x y"},
    )
    info = parse_boot_info(ram.read(BootLayout.BOOT_INFO, 0x1000))
    assert info["magic"] == BOOT_INFO_MAGIC
    assert info["ram_size"] == 4 << 30
    assert info["ram_ranges"] == [(0, 3 << 30), (4 << 30, 1 << 30)]
    assert (info["nr_vcpus"], info["mode"], info["image_end"]) == (2, 3, 0x101000)
    assert info["args"] == {"passes": "2", "name": "x y"}
    assert ram.read(BootLayout.BOOT_INFO, 4) == b"VMMB"


def test_boot_args_are_validated():
    assert encode_args({}) == b"\0"
    with pytest.raises(InputError, match="bad --arg key"):
        encode_args({"a b": "1"})
    with pytest.raises(InputError, match="room for"):
        encode_args({"k": "x" * 5000})
