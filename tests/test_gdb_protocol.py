"""The gdb remote protocol's pure parts (vmm.gdb.protocol, vmm.gdb.session.dr7_for): no
KVM, no socket."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from vmm.gdb import protocol as p
from vmm.gdb.session import dr7_for


def test_checksum_and_frame_match_gdbs_examples():
    # The protocol documentation's qSupported reply framing: sum of bytes mod 256.
    assert p.checksum(b"OK") == 0x9A
    assert p.frame(b"OK") == b"$OK#9a"
    assert p.frame(b"") == b"$#00"
    assert p.checksum(bytes([0xFF, 0x02])) == 0x01


def test_escape_round_trips_every_byte():
    data = bytes(range(256))
    escaped = p.escape(data)
    assert b"$" not in escaped and b"#" not in escaped
    assert p.escape(b"$#}*a") == b"}\x04}\x03}]}\x0aa"
    assert p.unescape(escaped) == data


def test_unescape_refuses_a_trailing_escape():
    with pytest.raises(ValueError, match="escape"):
        p.unescape(b"ab}")


def test_reader_splits_packets_across_reads_and_drops_acks():
    reader = p.PacketReader()
    assert list(reader.feed(b"+$qSupp")) == []
    assert list(reader.feed(b"orted#37+$g#67")) == [p.Packet(b"qSupported"), p.Packet(b"g")]


def test_reader_reports_bad_checksums_and_interrupts():
    reader = p.PacketReader()
    events = list(reader.feed(b"$g#00\x03$m0,4#fd"))
    assert isinstance(events[0], p.BadPacket) and "computed 0x67" in events[0].reason
    assert events[1] is p.INTERRUPTED
    assert events[2] == p.Packet(b"m0,4")
    assert isinstance(next(iter(p.PacketReader().feed(b"$g#zz"))), p.BadPacket)


def test_reader_bounds_a_packet_that_never_ends():
    reader = p.PacketReader()
    events = list(reader.feed(b"$" + b"a" * (p.MAX_PACKET + 10)))
    assert len(events) == 1 and isinstance(events[0], p.BadPacket)
    assert list(reader.feed(b"$g#67")) == [p.Packet(b"g")]  # and recovers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp::1234", ("127.0.0.1", 1234)),
        ("tcp:0.0.0.0:1234", ("0.0.0.0", 1234)),
        ("tcp:localhost:0", ("localhost", 0)),
        ("tcp:[::1]:9000", ("::1", 9000)),
        ("1234", ("127.0.0.1", 1234)),
        (":1234", ("127.0.0.1", 1234)),
    ],
)
def test_parse_address_takes_qemus_spellings(text, expected):
    assert p.parse_address(text) == expected


@pytest.mark.parametrize("text", ["tcp::", "tcp::65536", "udp::1234", "tcp:host", "unix:/tmp/s", "tcp::١٢٣", ""])
def test_parse_address_refuses_the_rest(text):
    with pytest.raises(ValueError, match="tcp::PORT or tcp:HOST:PORT"):
        p.parse_address(text)


def test_hex_helpers():
    assert p.hex_int(b"100018") == 0x100018
    assert p.parse_addr_len(b"100000,4") == (0x100000, 4)
    assert p.le_hex(0x1234, 4) == "34120000"
    assert p.parse_le_hex("34120000", 4) == 0x1234
    assert p.le_hex(-1, 2) == "ffff"
    for bad in (b"", b"0x10", b"1g"):
        with pytest.raises(ValueError):
            p.hex_int(bad)
    with pytest.raises(ValueError):
        p.parse_addr_len(b"100000")
    with pytest.raises(ValueError):
        p.parse_le_hex("3412", 4)


def test_register_layout_is_gdbs_amd64_order():
    names = [r.name for r in p.REGISTERS]
    assert names[:16] == [
        "rax",
        "rbx",
        "rcx",
        "rdx",
        "rsi",
        "rdi",
        "rbp",
        "rsp",
        "r8",
        "r9",
        "r10",
        "r11",
        "r12",
        "r13",
        "r14",
        "r15",
    ]
    assert names[16:24] == ["rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs"]
    assert names[24] == "st0" and names[40] == "xmm0" and names[56] == "mxcsr"  # gdb's amd64 numbers
    assert p.REGISTERS[16].size == 8 and p.REGISTERS[17].size == 4 and p.REGISTERS[24].size == 10


def test_encode_decode_registers_round_trip_and_unavailable():
    values = {"rax": 0x1122334455667788, "rip": 0x100018, "eflags": 0x202, "cs": 0x8, "xmm3": 1 << 127}
    text = p.encode_registers(values)
    assert len(text) == 2 * p.GREG_BYTES
    assert text.startswith("8877665544332211")  # little-endian, as the target stores it
    assert text[16:32] == "xx" * 8  # rbx: not given, so unavailable
    decoded = p.decode_registers(text)
    assert {k: decoded[k] for k in values} == values
    assert "rbx" not in decoded
    assert p.decode_registers(text[:32]) == {"rax": 0x1122334455667788}  # a prefix is fine
    with pytest.raises(ValueError):
        p.decode_registers(text + "00")


def test_target_xml_describes_the_registers_in_order():
    root = ET.fromstring(p.target_xml().split("?>", 1)[1].split(">", 1)[1])  # past <?xml?> and DOCTYPE
    assert root.find("architecture").text == "i386:x86-64"
    regs = root.findall("./feature/reg")
    assert [r.get("name") for r in regs] == [r.name for r in p.REGISTERS]
    assert [int(r.get("regnum")) for r in regs] == list(range(len(p.REGISTERS)))
    assert [int(r.get("bitsize")) for r in regs] == [8 * r.size for r in p.REGISTERS]
    features = [f.get("name") for f in root.findall("feature")]
    assert features[:2] == ["org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse"]


def test_xfer_chunks_cover_the_document():
    doc = b"0123456789$"
    first = p.xfer_chunk(doc, 0, 4)
    assert first == b"m0123"
    assert p.xfer_chunk(doc, 8, 100) == b"l89}\x04"
    assert p.xfer_chunk(doc, 20, 4) == b"l"


def test_stop_reply():
    assert p.stop_reply(p.SIGTRAP) == b"T05"
    assert p.stop_reply(p.SIGINT, 2) == b"T02thread:2;"


def test_dr7_enables_only_the_used_slots():
    assert dr7_for([None, None, None, None]) == 1 << 10
    assert dr7_for([0x1000, None, 0x2000, None]) == (1 << 10) | (1 << 9) | 0b1 | 0b10000
