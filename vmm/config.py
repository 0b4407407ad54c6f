"""``MachineConfig``: everything ``vmm run`` takes, validated before any fd is opened."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from vmm.bootinfo import encode_args
from vmm.cpu.layout import BootLayout, CpuMode
from vmm.errors import InputError
from vmm.memory import DEFAULT_BACKING, Backing, parse_backing
from vmm.strategies import parse_strategy

_SIZE = re.compile(r"^\s*([0-9]+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE | re.ASCII)
_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
BACKENDS = ("auto", "kvm", "emulator")
COALESCIBLE_DEVICES = ("post-code", "marker")
"""The devices with registers KVM may coalesce (their ``COALESCIBLE``)."""
DEFAULT_TIMEOUT = 60.0
MAX_TIMEOUT = 30 * 24 * 3600.0  # a month: far beyond any run, well inside threading.TIMEOUT_MAX
MAX_ADDRESS = (1 << 64) - 1


def parse_size(text: str | int) -> int:
    """``"64M"`` -> 67108864. Suffixes K, M, G, T (optionally KiB, MB, ...); a bare number
    means MiB, as in QEMU's ``-m``. InputError for anything else."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise InputError(f"bad size {text!r}: use a number with K, M, G or T (e.g. 64M)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_number(text: str | int, what: str) -> int:
    """``"0x7c00"`` or ``"31744"`` -> 31744; InputError naming ``what`` otherwise."""
    if isinstance(text, int):
        value = text
    else:
        try:
            if not text.isascii():
                raise ValueError(text)
            value = int(text, 0)
        except ValueError:
            raise InputError(f"bad {what} {text!r}: use a number such as 0x100000") from None
    if value < 0:
        raise InputError(f"bad {what} {text!r}: must not be negative")
    if value > MAX_ADDRESS:
        raise InputError(f"bad {what} {text!r}: more than 64 bits")
    return value


def parse_count(text: str | int, what: str, low: int, high: int) -> int:
    """An ASCII decimal integer in [low, high]; InputError naming ``what`` otherwise
    (Python's int() would also take other scripts' digits)."""
    if isinstance(text, str):
        stripped = text.strip()
        if not (stripped.isascii() and stripped.isdigit()):
            raise InputError(f"bad {what} {text!r}: use a whole number")
        value = int(stripped)
    else:
        value = text
    if not low <= value <= high:
        raise InputError(f"{what} must be between {low} and {high}, not {value}")
    return value


def parse_timeout(text: str | float | None) -> float | None:
    """Seconds as a finite number in [0, MAX_TIMEOUT] (ASCII); 0 or None = no limit."""
    if text is None:
        return None
    if isinstance(text, str):
        try:
            if not text.strip().isascii():
                raise ValueError(text)
            value = float(text)
        except ValueError:
            raise InputError(f"bad timeout {text!r}: use a number of seconds") from None
    else:
        value = float(text)
    if not math.isfinite(value) or value < 0 or value > MAX_TIMEOUT:
        raise InputError(f"bad timeout {text!r}: use a number of seconds from 0 (no limit) to {MAX_TIMEOUT:.0f}")
    return value


def parse_mode(text: CpuMode | str | None) -> CpuMode | None:
    """``"long"`` -> CpuMode.LONG; InputError naming the choices otherwise."""
    if text is None or isinstance(text, CpuMode):
        return text
    try:
        return CpuMode(text)
    except ValueError:
        raise InputError(f"unknown mode {text!r} (choose from {', '.join(m.value for m in CpuMode)})") from None


def host_memory_bytes() -> int:
    """Physical RAM of this host (sysconf: the kernel's totalram, what psutil reports too,
    without importing psutil on every run)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class MachineConfig:
    """A machine to build and run, in exact types: bytes, enums, seconds. Validated when
    made (InputError for anything impossible, before any resource is taken).
    :meth:`parse` takes what a user types ("64M", "0x100000", "long", "thp", "2.5")."""

    image: str
    mem: int = 64 << 20
    vcpus: int = 1
    mode: CpuMode | None = None
    load_addr: int | None = None
    entry: int | None = None
    args: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    timeout: float | None = DEFAULT_TIMEOUT
    strict: bool = False
    backend: str = "auto"
    memory: Backing = DEFAULT_BACKING
    prefault: str | None = None
    prefault_threads: int | None = None
    irqchip: bool = True
    append: str = ""
    modules: tuple[tuple[str, str | None], ...] = ()
    fw_cfg: tuple[str, ...] = ()
    initrd: str | None = None
    count_faults: bool = False
    gdb: str | None = None
    """A gdb stub's address (``tcp::1234``, ``tcp:HOST:PORT``): KVM only."""
    gdb_wait: bool = False
    """With ``gdb``: the guest does not start until gdb continues it (QEMU's ``-S``)."""
    # Devices whose write-only registers KVM may coalesce (KVM_CAP_COALESCED_PIO: kept in
    # its ring, replayed in order at the next exit). The POST port by default; the marker
    # only when asked (its marks then carry the replay time). () = none; the emulator and a
    # KVM without the capability ignore it.
    coalesce: tuple[str, ...] = ("post-code",)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def parse(
        cls,
        image: str | os.PathLike[str],
        *,
        mem: int | str = "64M",
        vcpus: int | str = 1,
        mode: CpuMode | str | None = None,
        load_addr: int | str | None = None,
        entry: int | str | None = None,
        args: Mapping[str, str] | None = None,
        timeout: float | str | None = DEFAULT_TIMEOUT,
        memory: Backing | str = DEFAULT_BACKING,
        prefault_threads: int | str | None = None,
        modules: Iterable[tuple[str | os.PathLike[str], str | None]] = (),
        fw_cfg: Iterable[str] = (),
        initrd: str | os.PathLike[str] | None = None,
        **exact: Any,
    ) -> MachineConfig:
        """A config from user-style values (sizes with suffixes, numbers as text, names);
        the other fields (``strict``, ``backend``, ``prefault``, ``irqchip``, ``append``,
        ``count_faults``, ``gdb``, ``gdb_wait``) as the dataclass takes them. InputError naming what is wrong."""
        return cls(
            image=os.fspath(image),
            mem=parse_size(mem),
            vcpus=parse_count(vcpus, "--vcpus", 1, BootLayout.MAX_VCPUS),
            mode=parse_mode(mode),
            load_addr=None if load_addr is None else parse_number(load_addr, "load address"),
            entry=None if entry is None else parse_number(entry, "entry address"),
            args=MappingProxyType(dict(args or {})),
            timeout=parse_timeout(timeout),
            memory=parse_backing(memory),
            prefault_threads=None if prefault_threads is None else parse_count(prefault_threads, "--threads", 1, 4096),
            modules=tuple((os.fspath(path), text) for path, text in modules),
            fw_cfg=tuple(fw_cfg),
            initrd=None if initrd is None else os.fspath(initrd),
            **exact,
        )

    def _check_types(self) -> None:
        """The fields' exact types (a str where bytes belong is a mistake, not a size)."""
        expected: dict[str, tuple[type, ...]] = {
            "image": (str,),
            "mem": (int,),
            "vcpus": (int,),
            "mode": (CpuMode, type(None)),
            "load_addr": (int, type(None)),
            "entry": (int, type(None)),
            "timeout": (int, float, type(None)),
            "memory": (Backing,),
            "prefault_threads": (int, type(None)),
            "append": (str,),
            "modules": (tuple,),
            "fw_cfg": (tuple,),
            "initrd": (str, type(None)),
            "gdb": (str, type(None)),
            "coalesce": (tuple,),
        }
        for name, types in expected.items():
            value = getattr(self, name)
            if not isinstance(value, types) or isinstance(value, bool):
                raise InputError(
                    f"MachineConfig.{name} = {value!r} is not of its type "
                    f"({' or '.join(t.__name__ for t in types)}); MachineConfig.parse() takes user-style values"
                )

    def validate(self) -> None:
        """InputError for anything impossible, before any resource is taken."""
        self._check_types()
        parse_timeout(self.timeout)  # finite, in range
        if self.load_addr is not None:
            parse_number(self.load_addr, "load address")
        if self.entry is not None:
            parse_number(self.entry, "entry address")
        mem = self.mem
        if mem <= 0:
            raise InputError("--mem must be more than 0")
        if mem % 4096:
            raise InputError(f"--mem {mem} bytes is not a multiple of 4 KiB")
        if mem > BootLayout.MAX_RAM:
            raise InputError(f"--mem {mem >> 30} GiB is more than the {BootLayout.MAX_RAM >> 30} GiB this VMM supports")
        host = host_memory_bytes()
        if mem > host:
            raise InputError(f"--mem {_human(mem)} is more than this host's {_human(host)} of RAM")
        if mem < 1 << 20:
            raise InputError(f"--mem {_human(mem)} is too small: at least 1 MiB (the boot structures need it)")
        if self.memory is Backing.HUGETLB and mem % (2 << 20):
            raise InputError("--memory hugetlb needs --mem to be a multiple of 2 MiB")
        if not 1 <= self.vcpus <= BootLayout.MAX_VCPUS:
            raise InputError(f"--vcpus must be between 1 and {BootLayout.MAX_VCPUS}, not {self.vcpus}")
        if "\0" in self.append:
            raise InputError("--append: the command line contains a NUL byte")
        if self.backend not in BACKENDS:
            raise InputError(f"unknown backend {self.backend!r} (choose from {', '.join(BACKENDS)})")
        if self.prefault_threads is not None and self.prefault_threads < 1:
            raise InputError("--threads must be at least 1")
        if self.prefault is not None:
            parse_strategy(self.prefault)
        encode_args(self.args)  # keys, values and size must fit the boot info
        if self.gdb is not None:
            from vmm.gdb.protocol import parse_address

            try:
                parse_address(self.gdb)
            except ValueError as e:
                raise InputError(str(e)) from None
        elif self.gdb_wait:
            raise InputError("-S (wait for gdb) needs a gdb stub: add -s or --gdb tcp::PORT")
        for name in self.coalesce:
            if name not in COALESCIBLE_DEVICES:
                raise InputError(f"cannot coalesce {name!r}: choose from {', '.join(COALESCIBLE_DEVICES)}")

    @property
    def mem_bytes(self) -> int:
        """Guest RAM in bytes (``mem``)."""
        return self.mem


def _human(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.1f} {unit}" if value != int(value) else f"{int(value)} {unit}"
    return f"{n} bytes"
