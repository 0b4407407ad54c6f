"""Hostile images (issue 9, defects 4, 7, 8): every one is a one-line InputError, never a
traceback, a hang, or an unbounded read. No KVM needed."""

from __future__ import annotations

import os
import resource
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from vmm.cpu.layout import CpuMode
from vmm.errors import InputError
from vmm.loader import peek_mode, read_image
from vmm.loader.elf import plan_elf

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
RAM = [(0, 64 * MiB)]
CODE = bytes.fromhex("b000e6f4f4")  # mov al,0; out 0xf4,al; hlt
LOAD = 0x100000


def elf(
    segments: list[tuple[int, bytes, int]],
    entry: int = LOAD,
    *,
    bits: int = 64,
    machine: int | None = None,
    extra_phdrs: Sequence[tuple[int, int, int]] = (),  # (p_type, p_offset, p_filesz)
) -> bytearray:
    """A little-endian ET_EXEC with one PT_LOAD per (paddr, data, memsz), built by hand
    (not with the loader under test), data after the headers."""
    machine = machine if machine is not None else (62 if bits == 64 else 3)
    ehsize, phentsize = (64, 56) if bits == 64 else (52, 32)
    phnum = len(segments) + len(extra_phdrs)
    offset = ehsize + phnum * phentsize
    ident = b"\x7fELF" + bytes([2 if bits == 64 else 1, 1, 1]) + bytes(9)
    ehdr_fmt = "<HHIQQQIHHHHHH" if bits == 64 else "<HHIIIIIHHHHHH"
    out = bytearray(
        ident + struct.pack(ehdr_fmt, 2, machine, 1, entry, ehsize, 0, 0, ehsize, phentsize, phnum, 0, 0, 0)
    )
    body = bytearray()
    for paddr, data, memsz in segments:
        fields = (1, offset + len(body), paddr, paddr, len(data), memsz)
        if bits == 64:
            out += struct.pack("<IIQQQQQQ", fields[0], 5, fields[1], fields[2], fields[3], fields[4], fields[5], 0x1000)
        else:
            out += struct.pack("<IIIIIIII", fields[0], fields[1], fields[2], fields[3], fields[4], fields[5], 5, 0x1000)
        body += data
    for p_type, p_offset, p_filesz in extra_phdrs:
        if bits == 64:
            out += struct.pack("<IIQQQQQQ", p_type, 4, p_offset, 0, 0, p_filesz, p_filesz, 4)
        else:
            out += struct.pack("<IIIIIIII", p_type, p_offset, 0, 0, p_filesz, p_filesz, 4, 4)
    return out + body


def refused(data: bytes | bytearray, match: str, **kw: object) -> None:
    with pytest.raises(InputError, match=match) as info:
        plan_elf("img", bytes(data), RAM, **kw)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_the_hand_built_elf_is_accepted():
    """The builder's baseline: what the tests below mutate is a valid image."""
    plan = plan_elf("img", bytes(elf([(LOAD, CODE, 0x1000)])), RAM)
    assert (plan.format, plan.entry, plan.mode) == ("elf64", LOAD, CpuMode.LONG)
    assert plan_elf("img", bytes(elf([(LOAD, CODE, 0x1000)], bits=32)), RAM).mode is CpuMode.PROTECTED


# --- defect 7: offsets beyond any file ----------------------------------------------------
@pytest.mark.parametrize("phoff", [1 << 63, (1 << 64) - 1, 1 << 40])
def test_huge_program_header_offset_is_an_input_error(guest, phoff):
    data = bytearray(Path(guest("hello64.elf")).read_bytes())
    struct.pack_into("<Q", data, 32, phoff)
    refused(data, "program headers run past the end of the file")


def test_huge_note_offset_is_an_input_error(guest, tmp_path):
    data = elf([(LOAD, CODE, 0x1000)], extra_phdrs=[(4, 1 << 63, 16)])  # PT_NOTE
    refused(data, "note segment .* runs past the end of the file")
    path = tmp_path / "note.elf"
    path.write_bytes(data)
    with pytest.raises(InputError, match="runs past the end of the file"):
        peek_mode(path)


def test_huge_section_header_offset_is_ignored_as_the_loader_needs_no_sections(guest):
    data = bytearray(Path(guest("user64.elf")).read_bytes())
    struct.pack_into("<Q", data, 40, 1 << 63)  # e_shoff
    assert plan_elf("img", bytes(data), RAM).mode is CpuMode.USER


def test_entry_beyond_64_bits_is_an_input_error():
    refused(elf([(LOAD, CODE, 0x1000)]), f"--entry {1 << 64:#x} is not inside", entry=1 << 64)


# --- defect 8: loader gaps ----------------------------------------------------------------
def test_overlapping_load_segments_are_refused():
    refused(elf([(LOAD, CODE, 0x2000), (LOAD + 0x1000, CODE, 0x1000)]), "PT_LOAD segments at 0x100000 and 0x101000")
    # Adjacent is fine.
    plan_elf("img", bytes(elf([(LOAD, CODE, 0x1000), (LOAD + 0x1000, CODE, 0x1000)])), RAM)


def test_big_endian_x86_elf_is_refused(guest):
    data = bytearray(Path(guest("hello64.elf")).read_bytes())
    data[5] = 2  # EI_DATA = ELFDATA2MSB
    refused(data, "big-endian")


@pytest.mark.parametrize(("bits", "machine", "name"), [(32, 62, "ELF32 for EM_X86_64"), (64, 3, "ELF64 for EM_386")])
def test_class_and_machine_must_agree(bits, machine, name):
    refused(elf([(LOAD, CODE, 0x1000)], bits=bits, machine=machine), name)


def test_an_entry_outside_every_loaded_segment_is_refused():
    refused(elf([(LOAD, CODE, 0x1000)], entry=0x200000), "entry point 0x200000 is not inside")
    # Inside the segment's zero-filled tail is not code either.
    refused(elf([(LOAD, CODE, 0x1000)], entry=LOAD + 0x800), "entry point 0x100800 is not inside")
    refused(elf([(LOAD, CODE, 0x1000)]), "--entry 0x300000 is not inside", entry=0x300000)
    assert plan_elf("img", bytes(elf([(LOAD, CODE, 0x1000)])), RAM, entry=LOAD + 2).entry == LOAD + 2


def test_every_bundled_elf_guest_still_plans(guest):
    for path in sorted(Path(guest("hello64.elf")).parent.glob("*.elf")):
        plan = plan_elf(str(path), path.read_bytes(), RAM)
        assert any(s.gpa <= plan.entry < s.gpa + len(s.data) for s in plan.segments), path.name


# --- defect 4: what is read, and how much -------------------------------------------------
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "img.fifo"
    os.mkfifo(fifo)
    outcome: list[BaseException | bytes] = []

    def read() -> None:
        try:
            outcome.append(read_image(fifo))
        except BaseException as e:  # reported below, whatever it is
            outcome.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)  # a hang guard, not a timing assertion: a fixed read_image never opens it
    if reader.is_alive():  # release a reader blocked in open(2): a writer opens and closes
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], InputError), outcome
    assert str(outcome[0]) == f"{fifo}: is a FIFO, not an image"


def read_image_in_a_bounded_child(path: str | Path, max_size: int | None = None) -> str:
    """read_image(path) in a child process whose address space is capped at 2 GiB, so a
    read_image that reads without bound dies there (MemoryError) instead of driving the
    host out of memory. Returns what it raised (``InputError: ...``), or ``read N bytes``."""
    kwargs = "" if max_size is None else f", max_size={max_size}"
    code = textwrap.dedent(
        f"""
        from vmm.loader import read_image
        try:
            print(f"read {{len(read_image({str(path)!r}{kwargs}))}} bytes")
        except Exception as e:
            print(f"{{type(e).__name__}}: {{e}}")
        """
    )

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (BOUNDED_CHILD_BYTES, BOUNDED_CHILD_BYTES))

    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        preexec_fn=cap_memory,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


BOUNDED_CHILD_BYTES = 2 << 30


def test_a_character_device_is_refused_and_never_read():
    with pytest.raises(InputError, match=r"^/dev/null: is a character device, not an image$"):
        read_image("/dev/null")
    assert read_image_in_a_bounded_child("/dev/zero") == "InputError: /dev/zero: is a character device, not an image"


def test_a_socket_is_refused(tmp_path):
    path = tmp_path / "img.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        with pytest.raises(InputError, match="is a socket, not an image"):
            read_image(path)


def test_a_symlink_to_a_device_is_refused(tmp_path):
    link = tmp_path / "img"
    link.symlink_to("/dev/zero")
    assert read_image_in_a_bounded_child(link) == f"InputError: {link}: is a character device, not an image"


def test_an_image_larger_than_max_size_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        f.truncate(64 << 30)  # sparse: 64 GiB of nothing on disk, far more than any read could hold
    assert read_image_in_a_bounded_child(path, max_size=MiB) == (
        f"InputError: {path}: 68,719,476,736 bytes do not fit in guest RAM (1,048,576 bytes); give more --mem"
    )
    exact = tmp_path / "exact.bin"
    exact.write_bytes(b"\x90" * MiB)
    assert read_image(exact, max_size=MiB) == b"\x90" * MiB
    with pytest.raises(InputError, match="do not fit in guest RAM"):
        read_image(exact, max_size=MiB - 1)


def test_an_unreadable_image_is_an_input_error(tmp_path):
    path = tmp_path / "secret.bin"
    path.write_bytes(CODE)
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as root: permissions do not stop a read")
    with pytest.raises(InputError, match="permission denied"):
        read_image(path, max_size=MiB)
