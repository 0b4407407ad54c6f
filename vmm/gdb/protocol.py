"""The gdb remote serial protocol, as pure functions: framing, checksums, escaping, hex,
the stub's address, and the x86-64 register file gdb is told about (target.xml).

Nothing here opens a socket or touches a vCPU; :mod:`vmm.gdb.stub` does. The packet
format is gdb's ("Overview" in the protocol's documentation): ``$payload#cc`` where ``cc``
is the modulo-256 sum of the payload's bytes in two hex digits; ``+``/``-`` acknowledge;
a lone 0x03 byte is an interrupt request. In binary data (``X`` packets, ``qXfer``
replies) ``$``, ``#``, ``}`` and ``*`` are sent as ``}`` followed by the byte XOR 0x20.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

INTERRUPT = b"\x03"
ACK, NACK = b"+", b"-"
MAX_PACKET = 16384
"""The largest payload the stub accepts, and what it announces as PacketSize."""

SIGINT, SIGTRAP, SIGSEGV = 2, 5, 11
"""The stop signals gdb expects: an interrupt (Ctrl-C), a breakpoint or step, and (as the
stub reports a guest crash) a fault."""

_ESCAPED = frozenset(b"$#}*")


def checksum(payload: bytes) -> int:
    """The packet checksum: the sum of the payload's bytes modulo 256."""
    return sum(payload) & 0xFF


def frame(payload: bytes) -> bytes:
    """``$payload#cc``. The payload must already be escaped where it carries binary data."""
    return b"$" + payload + b"#" + b"%02x" % checksum(payload)


def escape(data: bytes) -> bytes:
    """Binary data for a packet: ``$ # } *`` become ``}`` and the byte XOR 0x20."""
    out = bytearray()
    for b in data:
        if b in _ESCAPED:
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """The inverse of :func:`escape`. ValueError for a trailing lone ``}``."""
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == 0x7D:
            nxt = next(it, None)
            if nxt is None:
                raise ValueError("binary data ends with an escape byte")
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Packet:
    """A packet whose checksum matched (``payload`` as sent: still escaped)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class BadPacket:
    """A packet whose checksum did not match, or that was too long: answer ``-``."""

    reason: str


class Interrupt:
    """gdb's 0x03: stop the guest."""

    __slots__ = ()


INTERRUPTED = Interrupt()

Event = Packet | BadPacket | Interrupt


class PacketReader:
    """Splits the byte stream from gdb into events. Feed it whatever ``recv`` returned;
    acknowledgements (``+``/``-``) and noise between packets are dropped."""

    __slots__ = ("_buf", "_in_packet")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._in_packet = False

    def feed(self, data: bytes) -> list[Event]:
        """The complete events in ``data``, in order (a packet split across calls is kept).
        A list, not a generator: every byte is consumed now, whatever the caller does next."""
        return list(self._events(data))

    def _events(self, data: bytes) -> Iterator[Event]:
        for b in data:
            if not self._in_packet:
                if b == 0x24:  # $
                    self._in_packet = True
                    self._buf.clear()
                elif b == 0x03:
                    yield INTERRUPTED
                continue  # '+', '-' and anything else outside a packet
            self._buf.append(b)
            n = len(self._buf)
            if n >= 3 and self._buf[-3] == 0x23:  # '#' then two checksum digits
                yield self._finish()
            elif n > MAX_PACKET + 3:
                self._in_packet = False
                yield BadPacket(f"packet longer than {MAX_PACKET} bytes")

    def _finish(self) -> Event:
        self._in_packet = False
        payload, digits = bytes(self._buf[:-3]), bytes(self._buf[-2:])
        try:
            expected = int(digits, 16)
        except ValueError:
            return BadPacket(f"checksum {digits!r} is not hex")
        if expected != checksum(payload):
            return BadPacket(f"checksum {expected:#04x}, computed {checksum(payload):#04x}")
        return Packet(payload)


# --- hex ------------------------------------------------------------------------------


def hex_int(text: bytes | str) -> int:
    """A big-endian hex number as gdb writes addresses and lengths; ValueError otherwise."""
    s = text.decode("ascii") if isinstance(text, bytes) else text
    if not s or not re.fullmatch(r"[0-9a-fA-F]+", s):
        raise ValueError(f"not a hex number: {s!r}")
    return int(s, 16)


def le_hex(value: int, size: int) -> str:
    """``value`` as ``size`` little-endian bytes in hex (the target's byte order)."""
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little").hex()


def parse_le_hex(text: str, size: int) -> int:
    """The inverse of :func:`le_hex`; ValueError if ``text`` is not ``2 * size`` hex digits."""
    if len(text) != 2 * size:
        raise ValueError(f"expected {2 * size} hex digits, got {len(text)}")
    return int.from_bytes(bytes.fromhex(text), "little")


def parse_addr_len(text: bytes) -> tuple[int, int]:
    """``addr,length`` (``m`` packets and the front of ``M``/``X``); ValueError otherwise."""
    addr, sep, length = text.partition(b",")
    if not sep:
        raise ValueError("expected ADDR,LENGTH")
    return hex_int(addr), hex_int(length)


# --- the stub's address ---------------------------------------------------------------

_ADDRESS = re.compile(r"tcp:(?P<host>[^:]*|\[[0-9a-fA-F:.]+\]):(?P<port>[0-9]{1,5})")
DEFAULT_HOST = "127.0.0.1"


def parse_address(text: str) -> tuple[str, int]:
    """QEMU's ``-gdb`` spelling: ``tcp::PORT`` (this host only: 127.0.0.1) or
    ``tcp:HOST:PORT``; a bare ``PORT`` or ``:PORT`` is taken as ``tcp::PORT``. Port 0 asks
    the kernel for a free port. ValueError with the accepted forms otherwise."""
    s = text.strip()
    if re.fullmatch(r":?[0-9]{1,5}", s):
        s = "tcp:" + (s if s.startswith(":") else ":" + s)
    m = _ADDRESS.fullmatch(s) if s.isascii() else None
    port = int(m.group("port")) if m else -1
    if m is None or port > 65535:
        raise ValueError(f"bad gdb address {text!r}: use tcp::PORT or tcp:HOST:PORT (PORT 0-65535)")
    host = m.group("host").strip("[]") or DEFAULT_HOST
    return host, port


# --- registers ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reg:
    """One register as gdb numbers it: its name, size in bytes, target.xml type and group."""

    name: str
    size: int
    type: str
    feature: str
    group: str = ""


def _regs(feature: str, names: str, size: int, type_: str, group: str = "") -> list[Reg]:
    return [Reg(n, size, type_, feature, group) for n in names.split()]


_CORE, _SSE = "org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse"
_SEG, _SYS = "org.gnu.gdb.i386.segments", "org.vmm.x86.sys"

REGISTERS: tuple[Reg, ...] = tuple(
    _regs(_CORE, "rax rbx rcx rdx rsi rdi", 8, "int64")
    + _regs(_CORE, "rbp rsp", 8, "data_ptr")
    + _regs(_CORE, "r8 r9 r10 r11 r12 r13 r14 r15", 8, "int64")
    + _regs(_CORE, "rip", 8, "code_ptr")
    + _regs(_CORE, "eflags", 4, "i386_eflags")
    + _regs(_CORE, "cs ss ds es fs gs", 4, "int32")
    + _regs(_CORE, "st0 st1 st2 st3 st4 st5 st6 st7", 10, "i387_ext")
    + _regs(_CORE, "fctrl fstat ftag fiseg fioff foseg fooff fop", 4, "int", "float")
    + _regs(_SSE, " ".join(f"xmm{i}" for i in range(16)), 16, "vec128")
    + _regs(_SSE, "mxcsr", 4, "int", "vector")
    + _regs(_SEG, "fs_base gs_base", 8, "int64")
    + _regs(_SYS, "cr0 cr2 cr3 cr4 cr8 efer", 8, "int64", "system")
)
"""gdb's amd64 register numbering: the order of ``g`` packets and ``p``/``P`` numbers. The
core and SSE features are gdb's own (their names are what gdb's amd64 support checks);
``org.vmm.x86.sys`` adds control registers gdb shows as ordinary registers."""

REG_INDEX = {r.name: i for i, r in enumerate(REGISTERS)}
GREG_BYTES = sum(r.size for r in REGISTERS)

RegValues = Mapping[str, "int | None"]


def encode_registers(values: RegValues) -> str:
    """A ``g`` reply: every register in :data:`REGISTERS` order, little-endian hex;
    a register missing from ``values`` (or None) is sent as ``xx`` bytes (unavailable)."""
    parts = []
    for reg in REGISTERS:
        value = values.get(reg.name)
        parts.append("xx" * reg.size if value is None else le_hex(value, reg.size))
    return "".join(parts)


def decode_registers(text: str) -> dict[str, int]:
    """The registers of a ``G`` packet (a prefix is accepted: gdb may send fewer; ``xx``
    bytes are skipped). ValueError for odd lengths or non-hex data."""
    out: dict[str, int] = {}
    pos = 0
    for reg in REGISTERS:
        chunk = text[pos : pos + 2 * reg.size]
        if not chunk:
            break
        pos += 2 * reg.size
        if "x" in chunk.lower():
            continue
        out[reg.name] = parse_le_hex(chunk, reg.size)
    if pos < len(text):
        raise ValueError(f"G packet longer than the {GREG_BYTES} bytes of registers")
    return out


_EFLAGS_FIELDS = "CF:0 :1 PF:2 AF:4 ZF:6 SF:7 TF:8 IF:9 DF:10 OF:11 NT:14 RF:16 VM:17 AC:18 VIF:19 VIP:20 ID:21"
_VEC128 = (
    '<vector id="v4f" type="ieee_single" count="4"/><vector id="v2d" type="ieee_double" count="2"/>'
    '<vector id="v16i8" type="int8" count="16"/><vector id="v8i16" type="int16" count="8"/>'
    '<vector id="v4i32" type="int32" count="4"/><vector id="v2i64" type="int64" count="2"/>'
    '<union id="vec128"><field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>'
    '<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>'
    '<field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>'
    '<field name="uint128" type="uint128"/></union>'
)


def target_xml() -> str:
    """The target description: architecture i386:x86-64 and :data:`REGISTERS`, numbered
    in order (so ``g``, ``p`` and the description agree by construction)."""
    flags = "".join(
        f'<field name="{name}" start="{bit}" end="{bit}"/>'
        for name, bit in (f.split(":") for f in _EFLAGS_FIELDS.split())
    )
    types = {
        _CORE: f'<flags id="i386_eflags" size="4">{flags}</flags>',
        _SSE: _VEC128,
    }
    features: dict[str, list[str]] = {}
    for i, reg in enumerate(REGISTERS):
        group = f' group="{reg.group}"' if reg.group else ""
        features.setdefault(reg.feature, []).append(
            f'<reg name="{reg.name}" bitsize="{8 * reg.size}" type="{reg.type}" regnum="{i}"{group}/>'
        )
    body = "".join(
        f'<feature name="{name}">{types.get(name, "")}{"".join(regs)}</feature>' for name, regs in features.items()
    )
    return (
        '<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">'
        f"<target><architecture>i386:x86-64</architecture>{body}</target>"
    )


def xfer_chunk(document: bytes, offset: int, length: int) -> bytes:
    """A ``qXfer:...:read`` reply payload: ``m`` + data while more follows, ``l`` + data
    for the last piece (escaped binary)."""
    piece = document[offset : offset + length]
    more = offset + length < len(document)
    return (b"m" if more else b"l") + escape(piece)


def stop_reply(signal: int, thread: int | None = None) -> bytes:
    """``T`` stop reply: the signal and, with threads, which one stopped (gdb's ids start at 1)."""
    text = b"T%02x" % signal
    if thread is not None:
        text += b"thread:%x;" % thread
    return text
