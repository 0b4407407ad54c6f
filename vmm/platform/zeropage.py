"""Linux's x86 setup header and zero page (``struct setup_header`` and ``struct boot_params``
of arch/x86/include/uapi/asm/bootparam.h; Documentation/arch/x86/boot.rst).

:func:`parse_setup_header` reads and checks the header of a bzImage (every size and offset
checked against the file); :func:`zero_page` builds the 4 KiB ``boot_params`` the 32- and
64-bit entries take in ESI/RSI: zeroed, the image's setup header copied in (offset 0x1f1 to
the end given by the jump at 0x200, as boot.rst's 32-bit protocol says), then the loader's
fields written. Offsets are the header's own (they are the same in the file and in
``boot_params``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from vmm.errors import InputError
from vmm.platform.memmap import RamMapEntry, e820_table

ZERO_PAGE_SIZE = 0x1000
HDRS = b"HdrS"
MIN_PROTOCOL = 0x020C  # 2.12 (Linux 3.8): xloadflags and the ext_ fields
SECTOR = 512

# struct setup_header, at these offsets in the image and in boot_params.
SETUP_SECTS = 0x1F1
SYSSIZE = 0x1F4
VID_MODE = 0x1FA
BOOT_FLAG = 0x1FE
JUMP = 0x200
HEADER = 0x202
VERSION = 0x206
KERNEL_VERSION = 0x20E
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
CODE32_START = 0x214
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
HEAP_END_PTR = 0x224
EXT_LOADER_VER = 0x226
EXT_LOADER_TYPE = 0x227
CMD_LINE_PTR = 0x228
INITRD_ADDR_MAX = 0x22C
KERNEL_ALIGNMENT = 0x230
RELOCATABLE_KERNEL = 0x234
MIN_ALIGNMENT = 0x235
XLOADFLAGS = 0x236
CMDLINE_SIZE = 0x238
HARDWARE_SUBARCH = 0x23C
HARDWARE_SUBARCH_DATA = 0x240
SETUP_DATA = 0x250
PREF_ADDRESS = 0x258
INIT_SIZE = 0x260
HEADER_NEEDED_END = INIT_SIZE + 4  # every field this loader reads (protocol 2.10's init_size)
HEADER_MAX_END = 0x290  # where boot_params' hole for the header ends (edd_mbr_sig_buffer)

# The rest of struct boot_params.
ACPI_RSDP_ADDR = 0x070
EXT_RAMDISK_IMAGE = 0x0C0
EXT_RAMDISK_SIZE = 0x0C4
EXT_CMD_LINE_PTR = 0x0C8
E820_ENTRIES = 0x1E8
SENTINEL = 0x1EF
E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128  # E820_MAX_ENTRIES_ZEROPAGE

# loadflags and xloadflags bits.
LOADED_HIGH = 1 << 0
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1

LOADER_UNDEFINED = 0xFF  # type_of_loader: no assigned boot loader id
# heap_end_ptr: boot.rst's sample value (heap end at 0xe000 of the real-mode segment, less
# 0x200). Only the 16-bit setup code reads it, and the 32/64-bit entries skip that code; the
# field is written because boot.rst calls it obligatory with CAN_USE_HEAP.
HEAP_END_PTR_VALUE = 0xE000 - 0x200


@dataclass(frozen=True)
class SetupHeader:
    """What a bzImage's setup header says, checked. ``raw`` is the header as it is in the
    file (offset 0x1f1 up to ``end``), copied into the zero page."""

    version: int
    setup_sects: int  # effective: 0 in the file means 4
    syssize: int
    loadflags: int
    code32_start: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    min_alignment: int
    xloadflags: int
    cmdline_size: int
    pref_address: int
    init_size: int
    end: int
    raw: bytes
    kernel_version: str

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode code (the boot sector and the setup sectors) before the kernel."""
        return (self.setup_sects + 1) * SECTOR

    @property
    def protocol(self) -> str:
        """The boot protocol version as boot.rst writes it, e.g. ``"2.15"``."""
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"

    @property
    def has_64bit_entry(self) -> bool:
        """XLF_KERNEL_64: the legacy 64-bit entry at load address + 0x200 exists."""
        return bool(self.xloadflags & XLF_KERNEL_64)


def is_bzimage(data: bytes) -> bool:
    """Whether ``data`` has a Linux setup header (``HdrS`` at 0x202)."""
    return data[HEADER : HEADER + 4] == HDRS


def _kernel_version(data: bytes, offset: int, setup_size: int) -> str:
    """The NUL-terminated version string at ``offset + 0x200``, if it lies in the setup code."""
    start = offset + 0x200
    if not offset or start >= min(setup_size, len(data)):
        return ""
    end = data.find(b"\0", start, min(setup_size, len(data), start + 256))
    text = data[start : end if end >= 0 else min(setup_size, len(data), start + 256)]
    return text.decode("ascii", "replace")


def parse_setup_header(path: str, data: bytes) -> SetupHeader:
    """The checked setup header of bzImage ``data``. One-line InputError for a file with no
    header, a protocol older than 2.12, a header whose length (the jump at 0x200) is not
    where the fields are, a zImage, or a file shorter than its setup sectors and kernel."""
    if len(data) < HEADER + 4 or not is_bzimage(data):
        raise InputError(f'{path}: not a Linux kernel image (no "HdrS" setup header at 0x202)')
    if len(data) < HEADER_NEEDED_END:
        raise InputError(f"{path}: truncated Linux kernel ({len(data)} bytes: shorter than its setup header)")
    (version,) = struct.unpack_from("<H", data, VERSION)
    if version < MIN_PROTOCOL:
        raise InputError(
            f"{path}: Linux boot protocol {version >> 8}.{version & 0xFF:02d}; this loader needs 2.12 or later "
            "(Linux 3.8+)"
        )
    if data[JUMP] != 0xEB:
        raise InputError(f"{path}: no short jump at 0x200 giving the setup header's length (byte {data[JUMP]:#04x})")
    end = HEADER + data[JUMP + 1]  # the jump's 8-bit displacement is from 0x202: the header's end
    if not HEADER_NEEDED_END <= end <= HEADER_MAX_END:
        raise InputError(
            f"{path}: setup header ends at {end:#x} (the jump at 0x200); protocol {version >> 8}."
            f"{version & 0xFF:02d} needs {HEADER_NEEDED_END:#x} to {HEADER_MAX_END:#x}"
        )
    setup_sects = data[SETUP_SECTS] or 4
    (syssize,) = struct.unpack_from("<I", data, SYSSIZE)
    loadflags = data[LOADFLAGS]
    (code32_start,) = struct.unpack_from("<I", data, CODE32_START)
    initrd_addr_max, kernel_alignment = struct.unpack_from("<II", data, INITRD_ADDR_MAX)
    relocatable, min_alignment = data[RELOCATABLE_KERNEL], data[MIN_ALIGNMENT]
    xloadflags, cmdline_size = struct.unpack_from("<HI", data, XLOADFLAGS)
    (pref_address,) = struct.unpack_from("<Q", data, PREF_ADDRESS)
    (init_size,) = struct.unpack_from("<I", data, INIT_SIZE)
    (kernel_version_off,) = struct.unpack_from("<H", data, KERNEL_VERSION)

    if not loadflags & LOADED_HIGH:
        raise InputError(f"{path}: a zImage (loaded at 0x10000, LOADED_HIGH clear); only bzImage kernels are supported")
    setup_size = (setup_sects + 1) * SECTOR
    if setup_size >= len(data):
        raise InputError(
            f"{path}: truncated Linux kernel: {len(data):,} bytes, and its {setup_sects} setup sectors end at "
            f"{setup_size:#x} with no protected-mode kernel after them"
        )
    if syssize * 16 > len(data) - setup_size:
        raise InputError(
            f"{path}: truncated Linux kernel: syssize says {syssize * 16:,} bytes of protected-mode kernel, "
            f"the file has {len(data) - setup_size:,} after the setup sectors"
        )
    return SetupHeader(
        version=version,
        setup_sects=setup_sects,
        syssize=syssize,
        loadflags=loadflags,
        code32_start=code32_start,
        initrd_addr_max=initrd_addr_max,
        kernel_alignment=kernel_alignment,
        relocatable=bool(relocatable),
        min_alignment=min_alignment,
        xloadflags=xloadflags,
        cmdline_size=cmdline_size,
        pref_address=pref_address,
        init_size=init_size,
        end=end,
        raw=bytes(data[SETUP_SECTS:end]),
        kernel_version=_kernel_version(data, kernel_version_off, setup_size),
    )


def zero_page(
    header: SetupHeader,
    *,
    load_addr: int,
    cmdline_addr: int,
    initrd: tuple[int, int] | None,
    e820: Sequence[RamMapEntry],
) -> bytes:
    """``boot_params`` (4 KiB) for a kernel loaded at ``load_addr``: the header copied in,
    type_of_loader 0xff, loadflags |= CAN_USE_HEAP (KEEP_SEGMENTS left as the image has it:
    boot.rst calls it obsolete, and the GDT the loader gives has flat segments at the
    selectors older kernels reload), heap_end_ptr, code32_start = the load address, the
    command line and the initrd ((address, size) or None) with their ext_ high halves, no
    setup_data, hardware_subarch PC, and the ``e820`` map."""
    if len(e820) > E820_MAX_ENTRIES:
        raise ValueError(f"{len(e820)} e820 entries; the zero page holds {E820_MAX_ENTRIES}")
    bp = bytearray(ZERO_PAGE_SIZE)
    bp[SETUP_SECTS : header.end] = header.raw
    bp[TYPE_OF_LOADER] = LOADER_UNDEFINED
    bp[EXT_LOADER_VER] = bp[EXT_LOADER_TYPE] = 0
    bp[LOADFLAGS] = header.loadflags | CAN_USE_HEAP
    struct.pack_into("<H", bp, HEAP_END_PTR, HEAP_END_PTR_VALUE)
    # code32_start: boot.rst asks a loader that puts a relocatable kernel elsewhere to say where.
    struct.pack_into("<I", bp, CODE32_START, load_addr & 0xFFFFFFFF)
    struct.pack_into("<I", bp, CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", bp, EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    addr, size = initrd if initrd is not None else (0, 0)
    struct.pack_into("<II", bp, RAMDISK_IMAGE, addr & 0xFFFFFFFF, size & 0xFFFFFFFF)
    struct.pack_into("<II", bp, EXT_RAMDISK_IMAGE, addr >> 32, size >> 32)
    struct.pack_into("<I", bp, HARDWARE_SUBARCH, 0)
    # An image's setup_data would be a guest-physical list of the image's choosing: there is none.
    struct.pack_into("<Q", bp, SETUP_DATA, 0)
    table = e820_table(e820)
    bp[E820_ENTRIES] = len(e820)
    bp[E820_TABLE : E820_TABLE + len(table)] = table
    return bytes(bp)
