"""QEMU's firmware configuration device (fw_cfg), x86 I/O-port flavour, with DMA.

Follows QEMU's docs/specs/fw_cfg.rst and hw/nvram/fw_cfg.c. Two bus windows:

- ports 0x510-0x511 (:class:`FwCfg`): a 16-bit write to 0x510 selects an item and rewinds
  its offset to 0; an 8-bit read of 0x510 or 0x511 returns the item's next byte (0 past the
  end, and the offset stops there). As in QEMU's access checks: 8-bit writes (the data port
  has been read-only since QEMU 2.4) are dropped, a 16- or 32-bit write starting at 0x510
  selects with its low 16 bits, a 16/32-bit read of 0x510 reads 0 and does not advance, a
  wider read of 0x511 takes one byte and the rest reads as unassigned ports (0xff).
- ports 0x514-0x51b (:attr:`FwCfg.dma`): the DMA address register, big-endian. Reads give
  the signature ``"QEMU CFG"`` (any width, any offset, a byte past 0x51b reads 0xff). A
  32-bit write at 0x514 sets the high half (and zeroes the low half); a 32-bit write at
  0x518 ORs in the low half and runs the transfer; other writes are dropped.

Selector keys: bit 15 selects the architecture-specific bank, bit 14 (the old write
channel) is ignored, so 0x4000 reads what 0x0000 reads. A key with no item (unknown, or
above the file range) reads as QEMU's invalid entry: length 0, every byte 0.

A DMA transfer reads ``FWCfgDmaAccess {be32 control; be32 length; be64 address}`` from guest
RAM, SELECTs (control bits 31-16 are the key) if asked, then READs, WRITEs or SKIPs
``length`` bytes exactly as fw_cfg_dma_transfer(): a READ past the end of the item fills the
rest of the guest buffer with zeros, a SKIP advances the offset (never past the end), a
WRITE sets the ERROR bit (every item here is read-only, as QEMU's externally provided ones
are), and a control with none of the three bits transfers nothing. The control word is then
written back: 0 on success, ERROR (bit 0) otherwise; the address register is 0 again.

Guest memory is touched only through the injected :class:`vmm.memory.GuestMemory`: a
descriptor or a buffer outside RAM (or straddling two regions, or in a read-only or private
region) sets ERROR and stops the transfer, never raises. The host never allocates more
than the item (guest buffers are written in place; the zero fill is chunked by
GuestMemory.fill), so the guest's 32-bit length cannot make the host allocate. If the
descriptor itself is unreadable, ERROR is written to its control field where possible.

Not emulated: writable items and write callbacks, select callbacks (QEMU regenerates
"bootorder" on select), the MMIO flavour (ARM), the legacy item order of old machine types.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from vmm.errors import GuestMemoryError
from vmm.memory import GuestMemory

FW_CFG_PORT = 0x510  # selector; the data register is the next port
FW_CFG_PORT_WIDTH = 2
FW_CFG_DMA_PORT = 0x514
FW_CFG_DMA_WIDTH = 8

# selector keys (QEMU's include/standard-headers/linux/qemu_fw_cfg.h)
SIGNATURE = 0x0000
ID = 0x0001
UUID = 0x0002
RAM_SIZE = 0x0003
NOGRAPHIC = 0x0004
NB_CPUS = 0x0005
MACHINE_ID = 0x0006
KERNEL_ADDR = 0x0007
KERNEL_SIZE = 0x0008
KERNEL_CMDLINE = 0x0009
INITRD_ADDR = 0x000A
INITRD_SIZE = 0x000B
BOOT_DEVICE = 0x000C
NUMA = 0x000D
BOOT_MENU = 0x000E
MAX_CPUS = 0x000F
KERNEL_ENTRY = 0x0010
KERNEL_DATA = 0x0011
INITRD_DATA = 0x0012
CMDLINE_ADDR = 0x0013
CMDLINE_SIZE = 0x0014
CMDLINE_DATA = 0x0015
SETUP_ADDR = 0x0016
SETUP_SIZE = 0x0017
SETUP_DATA = 0x0018
FILE_DIR = 0x0019
FILE_FIRST = 0x0020
WRITE_CHANNEL = 0x4000
ARCH_LOCAL = 0x8000
ENTRY_MASK = 0x3FFF  # ~(WRITE_CHANNEL | ARCH_LOCAL)

SIGNATURE_BYTES = b"QEMU"
DMA_SIGNATURE = b"QEMU CFG"  # 0x51454d5520434647, big-endian
ID_TRADITIONAL = 0x01
ID_DMA = 0x02

# FWCfgDmaAccess.control bits
DMA_CTL_ERROR = 0x01
DMA_CTL_READ = 0x02
DMA_CTL_SKIP = 0x04
DMA_CTL_SELECT = 0x08
DMA_CTL_WRITE = 0x10

DMA_ACCESS = struct.Struct(">IIQ")  # control, length, address

_EMPTY = b""


class FwCfg:
    """fw_cfg over ``items`` (key -> bytes; SIGNATURE and ID are the device's own), DMA
    through ``memory``. Register ``self`` at 0x510 (2 ports) and ``self.dma`` at 0x514
    (8 ports)."""

    __slots__ = ("_items", "_memory", "_key", "_item", "_offset", "_dma_addr", "dma")
    name = "fw-cfg"
    WIDTH = FW_CFG_PORT_WIDTH

    def __init__(self, items: Mapping[int, bytes], memory: GuestMemory) -> None:
        table = {SIGNATURE: SIGNATURE_BYTES, ID: (ID_TRADITIONAL | ID_DMA).to_bytes(4, "little")}
        for key, data in items.items():
            if key in table:
                raise ValueError(f"fw_cfg key {key:#06x} belongs to the device")
            if not 0 <= key <= 0xFFFF or key & WRITE_CHANNEL or len(data) >= 1 << 32:
                raise ValueError(f"bad fw_cfg item {key:#x} ({len(data)} bytes)")
            table[key] = bytes(data)
        self._items = table
        self._memory = memory
        self.dma = FwCfgDma(self)
        self.reset()

    def reset(self) -> None:
        """As QEMU's fw_cfg_reset: the signature is selected; no DMA address is pending."""
        self._select(SIGNATURE)
        self._dma_addr = 0

    @property
    def selected(self) -> int:
        """The key last selected (as written, write-channel bit included)."""
        return self._key

    def _select(self, key: int) -> None:
        self._key = key
        self._item = self._items.get(key & ~WRITE_CHANNEL, _EMPTY)
        self._offset = 0

    def _next_byte(self) -> int:
        item, offset = self._item, self._offset
        if offset < len(item):
            self._offset = offset + 1
            return item[offset]
        return 0

    # --- ports 0x510-0x511 ---------------------------------------------------------------
    def read(self, offset: int, data: memoryview) -> None:
        n = len(data)
        if n == 1:
            data[0] = self._next_byte()
        elif offset == 0:
            # QEMU refuses a wide read of the 2-port window (reads 0, no advance); bytes
            # beyond port 0x511 are unassigned.
            data[:2] = b"\0\0"
            data[2:] = b"\xff" * (n - 2)
        else:
            data[0] = self._next_byte()
            data[1:] = b"\xff" * (n - 1)

    def write(self, offset: int, data: memoryview) -> None:
        if offset == 0 and len(data) >= 2:
            self._select(data[0] | data[1] << 8)
        # 8-bit writes are data-port writes: ignored since QEMU 2.4.

    # --- DMA register (offsets relative to 0x514, via FwCfgDma) -------------------------
    def _dma_read(self, offset: int, data: memoryview) -> None:
        n = len(data)
        sig = DMA_SIGNATURE[offset : offset + n]
        data[: len(sig)] = sig
        data[len(sig) :] = b"\xff" * (n - len(sig))

    def _dma_write(self, offset: int, data: memoryview) -> None:
        if len(data) != 4:
            return
        value = int.from_bytes(data, "big")
        if offset == 0:
            self._dma_addr = value << 32
        elif offset == 4:
            addr = self._dma_addr | value
            self._dma_addr = 0  # reset before the transfer, as QEMU does
            self.transfer(addr)

    def transfer(self, addr: int) -> int:
        """Run the DMA request whose FWCfgDmaAccess is at guest-physical ``addr``; returns
        the control word written back (0 or DMA_CTL_ERROR)."""
        mem = self._memory
        try:
            control, length, address = DMA_ACCESS.unpack(mem.read(addr, DMA_ACCESS.size))
        except GuestMemoryError:
            self._store_control(addr, DMA_CTL_ERROR)
            return DMA_CTL_ERROR
        if control & DMA_CTL_SELECT:
            self._select(control >> 16)
        read = write = False
        if control & DMA_CTL_READ:
            read = True
        elif control & DMA_CTL_WRITE:
            write = True
        elif not control & DMA_CTL_SKIP:
            length = 0
        status = 0
        item = self._item
        while length > 0 and not status:
            offset = self._offset
            if offset >= len(item):
                n = length
                if write or (read and not self._fill_zero(address, n)):
                    status = DMA_CTL_ERROR
            else:
                n = min(length, len(item) - offset)
                if write or (read and not self._copy_out(address, memoryview(item)[offset : offset + n])):
                    status = DMA_CTL_ERROR
                self._offset = offset + n  # advances even on error, as QEMU does
            address += n
            length -= n
        self._store_control(addr, status)
        return status

    def _writable(self, gpa: int, size: int) -> bool:
        try:
            region, _ = self._memory.find(gpa, size)
        except GuestMemoryError:
            return False
        return not region.readonly

    def _copy_out(self, gpa: int, chunk: memoryview) -> bool:
        if not self._writable(gpa, len(chunk)):
            return False
        self._memory.write(gpa, chunk)
        return True

    def _fill_zero(self, gpa: int, size: int) -> bool:
        if not self._writable(gpa, size):
            return False
        self._memory.fill(gpa, size, 0)
        return True

    def _store_control(self, addr: int, control: int) -> None:
        if self._writable(addr, 4):
            self._memory.write(addr, control.to_bytes(4, "big"))


class FwCfgDma:
    """The DMA address register of a :class:`FwCfg` (its own bus window at 0x514)."""

    __slots__ = ("_fw_cfg",)
    name = "fw-cfg-dma"
    WIDTH = FW_CFG_DMA_WIDTH

    def __init__(self, fw_cfg: FwCfg) -> None:
        self._fw_cfg = fw_cfg

    def reset(self) -> None:
        self._fw_cfg.reset()

    def read(self, offset: int, data: memoryview) -> None:
        self._fw_cfg._dma_read(offset, data)

    def write(self, offset: int, data: memoryview) -> None:
        self._fw_cfg._dma_write(offset, data)
