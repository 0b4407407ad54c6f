"""fw_cfg: the device (traditional and DMA interfaces, over a real GuestMemory), its
contents, and the --fw-cfg option parser. No KVM needed."""

from __future__ import annotations

import os
import struct

import pytest

import kvm_abi as abi
from vmm.devices import Bus
from vmm.devices.fw_cfg import (
    DMA_CTL_ERROR,
    DMA_CTL_READ,
    DMA_CTL_SELECT,
    DMA_CTL_SKIP,
    DMA_CTL_WRITE,
    FILE_DIR,
    FW_CFG_DMA_PORT,
    FW_CFG_PORT,
    ID,
    MAX_CPUS,
    NB_CPUS,
    NOGRAPHIC,
    RAM_SIZE,
    SIGNATURE,
    UUID,
    FwCfg,
)
from vmm.errors import InputError
from vmm.memory import GuestMemory, GuestRegion, HostMemory
from vmm.platform.fw_cfg import (
    FwCfgSource,
    fw_cfg_items,
    load_fw_cfg_files,
    parse_fw_cfg_option,
    parse_fw_cfg_options,
)

MiB, GiB = 1 << 20, 1 << 30
RAM = 2 * MiB
HIGH = 4 * GiB  # a second RAM region, reachable only with the DMA address's high half
ROM = 8 * MiB  # a read-only region
DESC = 0x1000  # where the tests put FWCfgDmaAccess
BUF = 0x2000
FILES = [("opt/zeta", b"zz"), ("opt/alpha", b"the alpha file"), ("etc/empty", b"")]
FILE_SLOTS = 0x20  # QEMU's default x-file-slots: the size of its file directory
MAX_ITEM_SIZE = 16 * MiB  # README/--fw-cfg: a file of at most 16 MiB


def mv(data: bytes) -> memoryview:
    return memoryview(bytearray(data))


@pytest.fixture
def memory():
    mem = GuestMemory()
    hosts = [HostMemory.allocate(RAM, "anon"), HostMemory.allocate(MiB, "anon"), HostMemory.allocate(MiB, "anon")]
    mem.add(GuestRegion(0, RAM, hosts[0]))
    mem.add(GuestRegion(HIGH, MiB, hosts[1]))
    mem.add(GuestRegion(ROM, MiB, hosts[2], flags=abi.MemFlag.READONLY))
    yield mem
    for host in hosts:
        host.close()


@pytest.fixture
def fw(memory):
    """(bus, device, memory) with 64 MiB of RAM, 2 of 4 CPUs and FILES."""
    device = FwCfg(fw_cfg_items(64 * MiB, 2, 4, FILES), memory)
    bus = Bus(strict=True)
    bus.register_pio(FW_CFG_PORT, FwCfg.WIDTH, device)
    bus.register_pio(FW_CFG_DMA_PORT, device.dma.WIDTH, device.dma)
    return bus, device, memory


def select(bus: Bus, key: int) -> None:
    bus.pio_write(FW_CFG_PORT, 2, mv(key.to_bytes(2, "little")))


def read_data(bus: Bus, n: int) -> bytes:
    buf = mv(bytes(n))
    bus.pio_read(FW_CFG_PORT + 1, 1, buf)  # rep insb: n one-byte reads
    return bytes(buf)


def item(bus: Bus, key: int, n: int) -> bytes:
    select(bus, key)
    return read_data(bus, n)


def dma(bus: Bus, memory: GuestMemory, control: int, length: int, address: int, desc: int = DESC) -> int:
    """Write a FWCfgDmaAccess at ``desc``, trigger it as a guest does (high half, then low
    half, big-endian), and return the control word the device wrote back."""
    memory.write(desc, struct.pack(">IIQ", control, length, address))
    bus.pio_write(FW_CFG_DMA_PORT, 4, mv((desc >> 32).to_bytes(4, "big")))
    bus.pio_write(FW_CFG_DMA_PORT + 4, 4, mv((desc & 0xFFFFFFFF).to_bytes(4, "big")))
    return int.from_bytes(memory.read(desc, 4), "big")


def directory(bus: Bus) -> list[tuple[int, int, bytes]]:
    count = int.from_bytes(item(bus, FILE_DIR, 4), "big")
    entries = []
    for _ in range(count):
        raw = read_data(bus, 64)
        size, key = struct.unpack_from(">IH", raw)
        entries.append((size, key, raw[8:].rstrip(b"\0")))
    return entries


# --- the traditional interface ------------------------------------------------------------
def test_signature_id_and_the_machine_items(fw):
    bus, _, _ = fw
    assert item(bus, SIGNATURE, 4) == b"QEMU"
    assert int.from_bytes(item(bus, ID, 4), "little") == 0b11  # traditional and DMA
    assert int.from_bytes(item(bus, RAM_SIZE, 8), "little") == 64 * MiB
    assert int.from_bytes(item(bus, NB_CPUS, 2), "little") == 2
    assert int.from_bytes(item(bus, MAX_CPUS, 2), "little") == 4
    assert int.from_bytes(item(bus, NOGRAPHIC, 2), "little") == 1
    assert item(bus, UUID, 16) == bytes(16)


def test_reading_past_the_end_gives_zeros(fw):
    bus, _, _ = fw
    assert item(bus, SIGNATURE, 8) == b"QEMU\0\0\0\0"
    assert read_data(bus, 2) == b"\0\0"  # still past the end
    select(bus, SIGNATURE)  # selecting rewinds
    assert read_data(bus, 2) == b"QE"


def test_file_directory_is_sorted_by_name_with_sizes_and_selectors(fw):
    bus, _, _ = fw
    assert directory(bus) == [(0, 0x20, b"etc/empty"), (14, 0x21, b"opt/alpha"), (2, 0x22, b"opt/zeta")]
    # Sized like QEMU's for 0x20 slots: past the 3 entries it reads zeros, then ends.
    assert read_data(bus, 64 * (FILE_SLOTS - 3)) == bytes(64 * (FILE_SLOTS - 3))


def test_user_file_by_the_traditional_interface(fw):
    bus, _, _ = fw
    assert item(bus, 0x21, 16) == b"the alpha file\0\0"
    assert item(bus, 0x22, 2) == b"zz"


def test_unknown_and_unset_keys_read_as_zero_length(fw):
    bus, _, _ = fw
    for key in (0x0006, 0x0010, 0x0023, 0x1234, 0x3FFF, 0x8000, 0x8003, 0xFFFF):
        assert item(bus, key, 4) == b"\0\0\0\0", hex(key)
    assert item(bus, 0x4000, 4) == b"QEMU"  # bit 14, the old write channel, is ignored


def test_port_widths_as_qemu_checks_them(fw):
    bus, device, _ = fw
    select(bus, SIGNATURE)
    bus.pio_write(FW_CFG_PORT + 1, 1, mv(b"\x55"))  # data writes are ignored
    wide = mv(b"\xaa\xaa")
    bus.pio_read(FW_CFG_PORT, 2, wide)  # refused: reads 0 and does not advance
    assert bytes(wide) == b"\0\0"
    one = mv(b"\0")
    bus.pio_read(FW_CFG_PORT, 1, one)  # an 8-bit read of 0x510 is a data read too
    assert one[0] == ord("Q")
    bus.pio_write(FW_CFG_PORT, 4, mv((0xABCD0000 | NB_CPUS).to_bytes(4, "little")))
    assert device.selected == NB_CPUS  # a 32-bit write selects with its low half
    assert read_data(bus, 2) == b"\x02\0"


def test_dma_register_reads_the_signature(fw):
    bus, _, _ = fw
    high, low = mv(bytes(4)), mv(bytes(4))
    bus.pio_read(FW_CFG_DMA_PORT, 4, high)
    bus.pio_read(FW_CFG_DMA_PORT + 4, 4, low)
    assert int.from_bytes(bytes(high) + bytes(low), "big") == 0x51454D5520434647
    byte = mv(b"\0")
    bus.pio_read(FW_CFG_DMA_PORT + 3, 1, byte)
    assert byte[0] == ord("U")


# --- DMA ----------------------------------------------------------------------------------
def test_dma_select_and_read_a_user_file_into_guest_memory(fw):
    bus, _, memory = fw
    memory.fill(BUF, 32, 0xEE)
    assert dma(bus, memory, 0x21 << 16 | DMA_CTL_SELECT | DMA_CTL_READ, 14, BUF) == 0
    assert memory.read(BUF, 16) == b"the alpha file\xee\xee"


def test_dma_reads_the_signature_and_continues_at_the_offset(fw):
    bus, _, memory = fw
    assert dma(bus, memory, SIGNATURE << 16 | DMA_CTL_SELECT | DMA_CTL_READ, 2, BUF) == 0
    assert dma(bus, memory, DMA_CTL_READ, 2, BUF + 2) == 0  # no SELECT: same item, next bytes
    assert memory.read(BUF, 4) == b"QEMU"


def test_dma_skip_then_read_and_the_data_port_sees_the_same_offset(fw):
    bus, _, memory = fw
    assert dma(bus, memory, 0x21 << 16 | DMA_CTL_SELECT | DMA_CTL_SKIP, 4, 0xDEAD0000) == 0
    assert dma(bus, memory, DMA_CTL_READ, 5, BUF) == 0
    assert memory.read(BUF, 5) == b"alpha"
    assert read_data(bus, 5) == b" file"


def test_dma_read_past_the_end_fills_zeros_up_to_the_length_only(fw):
    bus, _, memory = fw
    memory.fill(BUF, 0x2000, 0xEE)
    assert dma(bus, memory, 0x22 << 16 | DMA_CTL_SELECT | DMA_CTL_READ, 0x1000, BUF) == 0
    assert memory.read(BUF, 2) == b"zz"
    assert memory.read(BUF + 2, 0x1000 - 2) == bytes(0x1000 - 2)
    assert memory.read(BUF + 0x1000, 16) == b"\xee" * 16  # nothing beyond the length


def test_dma_length_beyond_ram_sets_error_without_writing_past_the_item(fw):
    bus, _, memory = fw
    memory.fill(RAM - 16, 16, 0xEE)
    # A 4 GiB - 1 request near the end of RAM: the item's 2 bytes fit, the zero fill does
    # not; the device reports ERROR instead of allocating or raising.
    status = dma(bus, memory, 0x22 << 16 | DMA_CTL_SELECT | DMA_CTL_READ, 0xFFFFFFFF, RAM - 16)
    assert status == DMA_CTL_ERROR
    assert memory.read(RAM - 16, 16) == b"zz" + b"\xee" * 14


def test_dma_to_an_address_outside_ram_sets_error(fw):
    bus, _, memory = fw
    assert dma(bus, memory, SIGNATURE << 16 | DMA_CTL_SELECT | DMA_CTL_READ, 4, 0x4000_0000) == DMA_CTL_ERROR
    assert dma(bus, memory, DMA_CTL_READ, 4, ROM) == DMA_CTL_ERROR  # read-only memory
    assert dma(bus, memory, DMA_CTL_READ, 2, RAM - 1) == DMA_CTL_ERROR  # straddles the end


def test_dma_descriptor_outside_ram_is_ignored_without_an_exception(fw):
    bus, device, memory = fw
    bus.pio_write(FW_CFG_DMA_PORT + 4, 4, mv((RAM + 0x1000).to_bytes(4, "big")))  # wholly outside
    memory.fill(RAM - 8, 8, 0xEE)
    assert device.transfer(RAM - 8) == DMA_CTL_ERROR  # the descriptor straddles the end of RAM
    assert memory.read(RAM - 8, 8) == b"\0\0\0\x01" + b"\xee" * 4  # ERROR stored where it fits, as QEMU
    assert item(bus, SIGNATURE, 4) == b"QEMU"  # the device still works


def test_dma_uses_the_high_half_of_the_address(fw):
    bus, _, memory = fw
    status = dma(bus, memory, SIGNATURE << 16 | DMA_CTL_SELECT | DMA_CTL_READ, 4, HIGH + 0x100, desc=HIGH)
    assert status == 0 and memory.read(HIGH + 0x100, 4) == b"QEMU"
    # The high half is consumed by the transfer: a lone low-half write now means HIGH's
    # low 32 bits, i.e. address 0, which holds no valid request (length 0: no error).
    memory.write(0, struct.pack(">IIQ", DMA_CTL_READ, 0, 0))
    bus.pio_write(FW_CFG_DMA_PORT + 4, 4, mv(b"\0\0\0\0"))
    assert memory.read(0, 4) == b"\0\0\0\0"


def test_dma_write_is_refused_as_for_read_only_items(fw):
    bus, _, memory = fw
    memory.write(BUF, b"XX")
    assert dma(bus, memory, 0x22 << 16 | DMA_CTL_SELECT | DMA_CTL_WRITE, 2, BUF) == DMA_CTL_ERROR
    assert item(bus, 0x22, 2) == b"zz"


def test_dma_of_an_unknown_key_fills_zeros_and_no_operation_does_nothing(fw):
    bus, _, memory = fw
    memory.fill(BUF, 8, 0xEE)
    assert dma(bus, memory, 0x1234 << 16 | DMA_CTL_SELECT | DMA_CTL_READ, 8, BUF) == 0
    assert memory.read(BUF, 8) == bytes(8)
    memory.fill(BUF, 8, 0xEE)
    assert dma(bus, memory, SIGNATURE << 16 | DMA_CTL_SELECT, 8, BUF) == 0  # select only
    assert memory.read(BUF, 8) == b"\xee" * 8
    assert read_data(bus, 4) == b"QEMU"


# --- contents -----------------------------------------------------------------------------
def test_items_refuse_duplicates_bad_names_too_many_and_too_big():
    with pytest.raises(InputError, match="duplicate fw_cfg file name: opt/a"):
        fw_cfg_items(MiB, 1, 1, [("opt/a", b"1"), ("opt/a", b"2")])
    with pytest.raises(InputError, match="name too long"):
        fw_cfg_items(MiB, 1, 1, [("opt/" + "x" * 52, b"")])
    with pytest.raises(InputError, match="too many fw_cfg files"):
        fw_cfg_items(MiB, 1, 1, [(f"opt/{i}", b"") for i in range(FILE_SLOTS + 1)])
    with pytest.raises(InputError, match="more than 16 MiB"):
        fw_cfg_items(MiB, 1, 1, [("opt/big", bytes(MAX_ITEM_SIZE + 1))])
    items = fw_cfg_items(MiB, 1, 1, [("opt/" + "x" * 51, b"ok")])  # 55 bytes: the maximum
    assert [f.name for f in items.files] == ["opt/" + "x" * 51] and items[0x20] == b"ok"


# --- the --fw-cfg option ------------------------------------------------------------------
def test_option_string_file_and_the_implied_name(tmp_path):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\x00\x01binary")
    assert parse_fw_cfg_option("name=opt/x,string=hello") == ("opt/x", FwCfgSource(string="hello"))
    name, source = parse_fw_cfg_option(f"opt/org.example/blob,file={blob}")
    assert name == "opt/org.example/blob" and source.warning is None
    assert source.load() == b"\x00\x01binary"
    assert parse_fw_cfg_option("opt/c,string=a,,b")[1].load() == b"a,b"  # QemuOpts escape
    assert parse_fw_cfg_option("opt/d,string=first,string=last")[1].string == "last"


def test_option_outside_opt_warns_but_is_accepted():
    name, source = parse_fw_cfg_option("etc/mine,string=1")
    assert name == "etc/mine" and source.warning and 'prefixed with "opt/"' in source.warning


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("string=x", "name, plus exactly one of file and string"),
        ("opt/x", "name, plus exactly one of file and string"),
        ("opt/x,string=", "name, plus exactly one of file and string"),
        ("opt/x,string=a,file=/etc/hostname", "name, plus exactly one of file and string"),
        ("opt/" + "y" * 52 + ",string=1", "name too long"),
        ("opt/é,string=1", "not printable ASCII"),
        ("opt/x,strng=1", "invalid parameter 'strng'"),
        ("opt/x,string=1,bare", "not key=value"),
        ("opt/x,gen_id=obj0", "gen_id is not supported"),
    ],
)
def test_option_refusals(text, message):
    with pytest.raises(InputError, match=message) as info:
        parse_fw_cfg_option(text)
    assert str(info.value).startswith("--fw-cfg ") and "\n" not in str(info.value)


def test_option_refuses_what_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # refused from its stat: never opened
    with pytest.raises(InputError, match="not a regular file"):
        parse_fw_cfg_option(f"opt/f,file={fifo}")
    with pytest.raises(InputError, match="not a regular file"):
        parse_fw_cfg_option("opt/f,file=/dev/null")
    with pytest.raises(InputError, match="is a directory"):
        parse_fw_cfg_option(f"opt/f,file={tmp_path}")
    with pytest.raises(InputError, match="can't load"):
        parse_fw_cfg_option(f"opt/f,file={tmp_path / 'missing'}")
    # A directory appearing after the option was checked is caught on the open descriptor.
    with pytest.raises(InputError, match="is a directory"):
        FwCfgSource(file=str(tmp_path)).load()


def test_option_refuses_a_file_over_the_cap_without_reading_it(tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(MAX_ITEM_SIZE + 1)  # sparse: nothing is written or read
    with pytest.raises(InputError, match="more than 16 MiB"):
        parse_fw_cfg_option(f"opt/big,file={big}")


def test_options_refuse_duplicate_names_and_load_in_order(tmp_path):
    with pytest.raises(InputError, match="duplicate fw_cfg file name: opt/a"):
        parse_fw_cfg_options(["opt/a,string=1", "name=opt/a,string=2"])
    parsed = parse_fw_cfg_options(["opt/b,string=2", "opt/a,string=1"])
    assert load_fw_cfg_files(parsed) == [("opt/b", b"2"), ("opt/a", b"1")]
