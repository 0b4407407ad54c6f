"""``vmm run --config FILE``: a machine described in a JSON or TOML file (Firecracker's
``--config-file``), with the fields of :class:`vmm.config.MachineConfig`.

:func:`load_config_file` reads and checks the file (one :class:`InputError` line for a
missing, unreadable or non-regular file, bad syntax, an unknown key or a value of the wrong
type) and returns the values as :meth:`MachineConfig.parse` takes them; the command line
then overrides them key by key (:func:`merge`). Values mean what the flags mean: ``mem``
is ``"64M"`` (or a number of bytes), paths are relative to the current directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from vmm.errors import InputError

MAX_CONFIG_BYTES = 1 << 20  # a machine description, not a data file

_STR = (str,)
_INT_OR_STR = (int, str)
# Each field of MachineConfig.parse(): the JSON/TOML types it takes, and whether null may
# stand for "not set" (JSON only: TOML has no null).
FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "image": (_STR, False),
    "mem": (_INT_OR_STR, False),
    "vcpus": (_INT_OR_STR, False),
    "mode": (_STR, True),
    "load_addr": (_INT_OR_STR, True),
    "entry": (_INT_OR_STR, True),
    "args": ((dict,), False),
    "timeout": ((int, float, str), True),
    "strict": ((bool,), False),
    "backend": (_STR, False),
    "memory": (_STR, False),
    "prefault": (_STR, True),
    "prefault_threads": (_INT_OR_STR, True),
    "irqchip": ((bool,), False),
    "append": (_STR, False),
    "modules": ((list,), False),
    "fw_cfg": ((list,), False),
    "initrd": (_STR, True),
    "count_faults": ((bool,), False),
    "gdb": (_STR, True),
    "gdb_wait": ((bool,), False),
    "coalesce": ((list,), False),
}


def split_module(text: str) -> tuple[str, str | None]:
    """``"FILE=STRING"`` -> (FILE, STRING); ``"FILE"`` -> (FILE, None) (``--module``'s syntax)."""
    path, sep, string = text.partition("=")
    if not path:
        raise InputError(f"--module {text!r}: give FILE or FILE=STRING")
    return path, string if sep else None


def _read(path: str) -> bytes:
    """The file's bytes; InputError for anything but a readable regular file of sane size
    (a FIFO is refused instead of waiting for a writer)."""
    from vmm.files import read_regular_file

    return read_regular_file(
        path,
        max_size=MAX_CONFIG_BYTES,
        what="a config file",
        label=f"--config {path}",
        too_big=lambda _: f"larger than {MAX_CONFIG_BYTES >> 20} MiB",
    )


def _parse(path: str, data: bytes) -> Any:
    """JSON for ``*.json`` or text starting with ``{``, TOML otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"--config {path}: not UTF-8 text (byte {e.start})") from None
    if path.endswith(".json") or (not path.endswith(".toml") and text.lstrip().startswith("{")):
        import json

        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"--config {path}: bad JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"--config {path}: bad TOML: {e}") from None


_TYPE_NAMES = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "a table"}


def _type_name(value: Any) -> str:
    return "null" if value is None else _TYPE_NAMES.get(type(value), type(value).__name__)


def _check(path: str, key: str, value: object) -> Any:
    """``value`` for field ``key``, in the type MachineConfig.parse takes; InputError if not."""
    types, nullable = FIELDS[key]
    if value is None and nullable:
        return None
    # bool is an int to Python, never to a user: `mem = true` is a mistake
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        wanted = " or ".join(sorted({_TYPE_NAMES[t] for t in types}))
        raise InputError(f"--config {path}: {key} must be {wanted}, not {_type_name(value)}")
    if isinstance(value, dict):  # args
        bad = [k for k, v in value.items() if not isinstance(v, str)]
        if bad:
            raise InputError(f"--config {path}: args.{bad[0]} must be a string, not {_type_name(value[bad[0]])}")
        return dict(value)
    if isinstance(value, list):  # modules, fw_cfg, coalesce
        bad_items = [v for v in value if not isinstance(v, str)]
        if bad_items:
            raise InputError(f"--config {path}: {key} must be a list of strings, not of {_type_name(bad_items[0])}")
        return tuple(split_module(v) for v in value) if key == "modules" else tuple(value)
    return value


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The machine described by a JSON or TOML file: {field: value} for the fields it sets,
    as :meth:`MachineConfig.parse` takes them. InputError (one line) for anything wrong."""
    name = os.fspath(path)
    doc = _parse(name, _read(name))
    if not isinstance(doc, dict):
        raise InputError(f"--config {name}: the top level must be an object of MachineConfig fields")
    unknown = sorted(set(doc) - set(FIELDS))
    if unknown:
        raise InputError(f"--config {name}: unknown key {unknown[0]!r} (the keys are: {', '.join(FIELDS)})")
    return {key: _check(name, key, value) for key, value in doc.items()}


def merge(from_file: Mapping[str, Any], from_flags: Mapping[str, Any]) -> dict[str, Any]:
    """The file's values with the flags' on top: a flag the user gave wins over the file
    (``args`` key by key; ``modules`` and ``fw_cfg`` as a whole)."""
    out = dict(from_file)
    for key, value in from_flags.items():
        if key == "args" and "args" in out:
            out["args"] = {**out["args"], **value}
        else:
            out[key] = value
    return out
