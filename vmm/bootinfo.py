"""The boot info block a guest finds at 0x1000 (guests/README.md, "Boot info").

=======  ====  ==============================================================
offset   size  field
=======  ====  ==============================================================
0        4     magic 0x424d4d56 ("VMMB" in memory)
4        4     version (1)
8        8     total RAM in bytes
16       4     number of vCPUs
20       4     CPU mode: 0 real, 1 protected, 2 long, 3 user
24       8     first guest-physical byte of the image
32       8     one past the last byte of the image
40       4     number of RAM ranges (1 or 2)
44       4     bytes used in the argument area
48       64    RAM ranges: 4 x {u64 base, u64 size}
256      3840  arguments: "key=value\\0" strings, then an empty string
=======  ====  ==============================================================
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping, Sequence

from vmm.cpu.layout import BootLayout, CpuMode
from vmm.errors import InputError
from vmm.memory import GuestMemory

BOOT_INFO_MAGIC = 0x424D4D56
BOOT_INFO_VERSION = 1
ARGS_OFFSET = 0x100
ARGS_MAX = 0x1000 - ARGS_OFFSET
MAX_RANGES = 4
MODE_NUMBERS = {CpuMode.REAL: 0, CpuMode.PROTECTED: 1, CpuMode.LONG: 2, CpuMode.USER: 3}
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def encode_args(args: Mapping[str, str]) -> bytes:
    """``{"passes": "2"}`` -> ``b"passes=2\\0\\0"``; InputError on a bad key or value."""
    out = bytearray()
    for key, value in args.items():
        if not _KEY.match(key):
            raise InputError(f"bad --arg key {key!r}: use letters, digits, '_', '.', '-'")
        if "\0" in value:
            raise InputError(f"--arg {key}: the value contains a NUL byte")
        out += f"{key}={value}".encode() + b"\0"
    out += b"\0"
    if len(out) > ARGS_MAX:
        raise InputError(f"--arg values take {len(out)} bytes; the boot info has room for {ARGS_MAX}")
    return bytes(out)


def write_boot_info(
    mem: GuestMemory,
    *,
    ram_ranges: Sequence[tuple[int, int]],
    nr_vcpus: int,
    mode: CpuMode,
    image_start: int,
    image_end: int,
    args: Mapping[str, str],
) -> None:
    """Write the boot info block at ``BootLayout.BOOT_INFO``."""
    if len(ram_ranges) > MAX_RANGES:
        raise InputError(f"{len(ram_ranges)} RAM ranges; the boot info holds {MAX_RANGES}")
    encoded = encode_args(args)
    header = struct.pack(
        "<IIQIIQQII",
        BOOT_INFO_MAGIC,
        BOOT_INFO_VERSION,
        sum(size for _, size in ram_ranges),
        nr_vcpus,
        MODE_NUMBERS[mode],
        image_start,
        image_end,
        len(ram_ranges),
        len(encoded),
    )
    ranges = b"".join(struct.pack("<QQ", base, size) for base, size in ram_ranges)
    block = bytearray(0x1000)
    block[: len(header)] = header
    block[48 : 48 + len(ranges)] = ranges
    block[ARGS_OFFSET : ARGS_OFFSET + len(encoded)] = encoded
    mem.write(BootLayout.BOOT_INFO, bytes(block))
