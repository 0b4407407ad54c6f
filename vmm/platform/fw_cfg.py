"""What the fw_cfg device holds, and the ``--fw-cfg`` option (QEMU's ``-fw_cfg``).

:func:`fw_cfg_items` builds the items a PC guest of QEMU finds, as far as this VMM can
fill them honestly (QEMU's fw_cfg_common_realize and fw_cfg_arch_create):

========== ============ ==========================================================
key        format       value
========== ============ ==========================================================
UUID       16 bytes     zeros (QEMU's default without ``-uuid``)
RAM_SIZE   le64         ``ram_size``
NOGRAPHIC  le16         1: there is no display
NB_CPUS    le16         ``nb_cpus`` (the boot CPUs)
BOOT_MENU  le16         0
MAX_CPUS   le16         ``max_cpus`` (QEMU puts its APIC-ID limit here)
FILE_DIR   see below    the directory of ``files``
0x20+i     bytes        the i-th file in name order
========== ============ ==========================================================

SIGNATURE and ID belong to the device (:class:`vmm.devices.fw_cfg.FwCfg`). Left out,
so they read as length 0: MACHINE_ID and the KERNEL_*/INITRD_*/CMDLINE_*/SETUP_* keys
(no fw_cfg kernel boot), NUMA, and the x86 keys for ACPI tables, SMBIOS, IRQ0 override,
E820 and HPET; QEMU's own files (etc/e820, bootorder, etc/boot-fail-wait, ACPI, SMBIOS)
are the caller's to add through ``files`` when the platform has them.

FILE_DIR is ``be32 count`` then, per file, ``{be32 size; be16 select; be16 reserved;
char name[56]}``, sorted by name with strcmp as QEMU's non-legacy machines do; like QEMU's
it is sized for ``FILE_SLOTS`` (0x20, QEMU's default ``x-file-slots``) entries, unused ones
zero, and more files than that are refused as QEMU refuses them.

``--fw-cfg`` takes QEMU's syntax, ``[name=]NAME,file=PATH`` or ``[name=]NAME,string=TEXT``
(QemuOpts: ``,,`` is a literal comma, a later key overrides an earlier one, an empty value
counts as absent). As QEMU: the name is required, at most 55 bytes; exactly one of file
and string; a string's bytes are the item (no NUL); a name outside ``opt/`` only warns.
Stricter than QEMU: the name must be printable ASCII, ``gen_id`` is refused (no QEMU
objects here), the file must be a regular file (a FIFO, device or directory is refused
from its stat, without opening it) of at most ``MAX_ITEM_SIZE`` (16 MiB) bytes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from vmm.devices.fw_cfg import BOOT_MENU, FILE_DIR, FILE_FIRST, MAX_CPUS, NB_CPUS, NOGRAPHIC, RAM_SIZE, UUID
from vmm.errors import InputError

FILE_SLOTS = 0x20
MAX_NAME = 55  # FW_CFG_MAX_FILE_PATH - 1: the name and its NUL fill 56 bytes
MAX_ITEM_SIZE = 16 << 20
FILE_ENTRY_SIZE = 64
OPT_PREFIX = "opt/"
NAME_WARNING = 'externally provided fw_cfg item names should be prefixed with "opt/"'
_KEYS = ("name", "file", "string", "gen_id")


@dataclass(frozen=True)
class FwCfgFile:
    """One file item: ``name`` at selector ``select``."""

    name: str
    select: int
    data: bytes


class FwCfgItems(Mapping[int, bytes]):
    """The items (key -> bytes) for :class:`~vmm.devices.fw_cfg.FwCfg`; ``files`` lists
    the file items in directory order."""

    __slots__ = ("_items", "files")

    def __init__(self, items: Mapping[int, bytes], files: tuple[FwCfgFile, ...]) -> None:
        self._items = dict(items)
        self.files = files

    def __getitem__(self, key: int) -> bytes:
        return self._items[key]

    def __iter__(self) -> Iterator[int]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"FwCfgItems({len(self._items)} items, files={[f.name for f in self.files]})"


def check_name(name: str) -> str | None:
    """The reason ``name`` cannot be an fw_cfg file name, or None."""
    if not name:
        return "the name is empty"
    if not (name.isascii() and name.isprintable()):
        return f"the name {name!r} is not printable ASCII"
    if len(name) > MAX_NAME:
        return f"name too long (max. {MAX_NAME} char)"
    return None


def fw_cfg_items(ram_size: int, nb_cpus: int, max_cpus: int, files: Sequence[tuple[str, bytes]]) -> FwCfgItems:
    """The fw_cfg contents for a guest with ``ram_size`` bytes of RAM and ``nb_cpus`` of
    ``max_cpus`` CPUs, plus ``files`` ((name, data) pairs). InputError on a bad name, a
    duplicate, too many files, or an item over MAX_ITEM_SIZE; ValueError on bad numbers."""
    if not 0 <= ram_size < 1 << 64:
        raise ValueError(f"RAM size {ram_size} does not fit fw_cfg's le64")
    if not 1 <= nb_cpus <= max_cpus <= 0xFFFF:
        raise ValueError(f"CPU counts {nb_cpus} of {max_cpus} do not fit fw_cfg's le16")
    if len(files) > FILE_SLOTS:
        raise InputError(f"too many fw_cfg files: {len(files)} (at most {FILE_SLOTS})")
    seen: set[str] = set()
    for name, data in files:
        reason = check_name(name)
        if reason:
            raise InputError(f"fw_cfg file {name!r}: {reason}")
        if name in seen:
            raise InputError(f"duplicate fw_cfg file name: {name}")
        if len(data) > MAX_ITEM_SIZE:
            raise InputError(f"fw_cfg file {name}: {len(data)} bytes is more than {MAX_ITEM_SIZE >> 20} MiB")
        seen.add(name)
    # strcmp order: names are ASCII, so byte order and code-point order agree.
    ordered = tuple(
        FwCfgFile(name, FILE_FIRST + i, bytes(data))
        for i, (name, data) in enumerate(sorted(files, key=lambda f: f[0].encode("ascii")))
    )
    directory = bytearray(4 + FILE_ENTRY_SIZE * FILE_SLOTS)
    directory[0:4] = len(ordered).to_bytes(4, "big")
    for i, f in enumerate(ordered):
        at = 4 + FILE_ENTRY_SIZE * i
        directory[at : at + 8] = len(f.data).to_bytes(4, "big") + f.select.to_bytes(2, "big") + b"\0\0"
        directory[at + 8 : at + 8 + len(f.name)] = f.name.encode("ascii")
    items: dict[int, bytes] = {
        UUID: bytes(16),
        RAM_SIZE: ram_size.to_bytes(8, "little"),
        NOGRAPHIC: (1).to_bytes(2, "little"),
        NB_CPUS: nb_cpus.to_bytes(2, "little"),
        BOOT_MENU: (0).to_bytes(2, "little"),
        MAX_CPUS: max_cpus.to_bytes(2, "little"),
        FILE_DIR: bytes(directory),
    }
    items.update((f.select, f.data) for f in ordered)
    return FwCfgItems(items, ordered)


# --- the --fw-cfg option ------------------------------------------------------------------
@dataclass(frozen=True)
class FwCfgSource:
    """Where an fw_cfg file's bytes come from: ``file`` (a path) or ``string``; ``warning``
    is what QEMU would warn about the option (for the caller to print), or None."""

    file: str | None = None
    string: str | None = None
    warning: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if (self.file is None) == (self.string is None):
            raise InputError("an fw_cfg source needs exactly one of file and string")

    def load(self) -> bytes:
        """The item's bytes. A file is opened without blocking, checked again on the open
        descriptor (regular, at most MAX_ITEM_SIZE), and read with that cap."""
        if self.string is not None:
            try:
                data = self.string.encode("utf-8", "surrogateescape")  # argv's own bytes back
            except UnicodeEncodeError:
                raise InputError("--fw-cfg string=: the text cannot be encoded as UTF-8") from None
            if len(data) > MAX_ITEM_SIZE:
                raise InputError(f"--fw-cfg string=: {len(data)} bytes is more than {MAX_ITEM_SIZE >> 20} MiB")
            return data
        assert self.file is not None
        return _read_capped(self.file)


def _read_capped(path: str) -> bytes:
    where = f"--fw-cfg file={path}"
    try:
        # O_NONBLOCK: should a FIFO replace the file after the stat, open() must not wait.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise InputError(f"{where}: can't load: {e.strerror}") from None
    try:
        reason = _file_problem(os.fstat(fd))
        if reason:
            raise InputError(f"{where}: {reason}")
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, min(1 << 20, MAX_ITEM_SIZE + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_ITEM_SIZE:
                raise InputError(f"{where}: more than {MAX_ITEM_SIZE >> 20} MiB")
        return b"".join(chunks)
    except OSError as e:
        raise InputError(f"{where}: can't load: {e.strerror}") from None
    finally:
        os.close(fd)


def _file_problem(st: os.stat_result) -> str | None:
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a regular file"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file (a FIFO, socket or device cannot be an fw_cfg item)"
    if st.st_size > MAX_ITEM_SIZE:
        return f"{st.st_size} bytes is more than {MAX_ITEM_SIZE >> 20} MiB"
    return None


def _split_opts(text: str) -> list[str]:
    """QemuOpts splitting: ``,`` separates, ``,,`` is a literal comma."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text.startswith(",,", i):
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    parts.append("".join(current))
    return parts


def parse_fw_cfg_option(text: str) -> tuple[str, FwCfgSource]:
    """``"name=opt/x,file=PATH"`` / ``"opt/x,string=TEXT"`` -> (name, source). A file is
    stat()ed now (not opened); read it with ``source.load()``. InputError, one line naming
    the option, for anything QEMU refuses and for the stricter checks above."""
    where = f"--fw-cfg {text!r}"
    values: dict[str, str] = {}
    for i, part in enumerate(_split_opts(text)):
        key, eq, value = part.partition("=")
        if not eq:
            if i == 0:  # QEMU's implied_opt_name: a bare first element is the name
                key, value = "name", part
            else:
                raise InputError(f"{where}: {part!r} is not key=value (keys: name, file, string)")
        if key not in _KEYS:
            raise InputError(f"{where}: invalid parameter {key!r} (keys: name, file, string)")
        values[key] = value  # as QemuOpts: the last occurrence wins
    if values.get("gen_id"):
        raise InputError(f"{where}: gen_id is not supported (there are no QEMU objects here)")
    name, path, string = values.get("name", ""), values.get("file", ""), values.get("string", "")
    if not name or bool(path) == bool(string):
        raise InputError(f"{where}: name, plus exactly one of file and string, are needed")
    reason = check_name(name)
    if reason:
        raise InputError(f"{where}: {reason}")
    warning = None if name.startswith(OPT_PREFIX) else f"{where}: warning: {NAME_WARNING}"
    if string:
        return name, FwCfgSource(string=string, warning=warning)
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(f"{where}: can't load {path}: {e.strerror}") from None
    reason = _file_problem(st)
    if reason:
        raise InputError(f"{where}: {path} {reason}")
    return name, FwCfgSource(file=path, warning=warning)


def parse_fw_cfg_options(texts: Iterable[str]) -> list[tuple[str, FwCfgSource]]:
    """Every ``--fw-cfg`` in order; InputError on any bad one, a duplicate name (as QEMU's
    "duplicate fw_cfg file name") or more than FILE_SLOTS of them."""
    parsed: list[tuple[str, FwCfgSource]] = []
    seen: set[str] = set()
    for text in texts:
        name, source = parse_fw_cfg_option(text)
        if name in seen:
            raise InputError(f"--fw-cfg {text!r}: duplicate fw_cfg file name: {name}")
        seen.add(name)
        parsed.append((name, source))
    if len(parsed) > FILE_SLOTS:
        raise InputError(f"too many --fw-cfg options: {len(parsed)} (at most {FILE_SLOTS})")
    return parsed


def load_fw_cfg_files(options: Iterable[tuple[str, FwCfgSource]]) -> list[tuple[str, bytes]]:
    """(name, source) pairs -> (name, bytes) pairs for :func:`fw_cfg_items`."""
    return [(name, source.load()) for name, source in options]
