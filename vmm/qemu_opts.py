"""QEMU's option syntax, as vmm qemu reads it: QemuOpts parameters (``[implied=]v,key=value,
flag``, ``,,`` a literal comma), qemu_strtou64 numbers and qemu_strtosz sizes. Pure."""

from __future__ import annotations

import re
from fractions import Fraction

from vmm.errors import InputError

_SIZE = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?|\.[0-9]+)([bBkKmMgGtTpPeE]?)")
_SHIFT = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def show(text: str) -> str:
    return text if text.isprintable() else repr(text)


def refuse(what: str, why: str = "") -> InputError:
    return InputError(f"qemu option {show(what)} is not supported by vmm" + (f" ({why})" if why else ""))


def value_end(text: str, i: int) -> tuple[str, int]:
    """QEMU's get_opt_value: the value from ``i`` to the next lone ``,`` (``,,`` is a comma),
    and the index of that ``,`` (``len(text)`` at the end)."""
    out: list[str] = []
    while True:
        j = text.find(",", i)
        if j < 0:
            out.append(text[i:])
            return "".join(out), len(text)
        if text.startswith(",,", j):
            out.append(text[i : j + 1])
            i = j + 2
            continue
        out.append(text[i:j])
        return "".join(out), j


def params(option: str, text: str, implied: str | None) -> list[tuple[str, str]]:
    """QemuOpts parameters ``[implied=]v,key=value,flag`` as (key, value) pairs, in order."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(text):
        stop = min(k for k in (text.find("=", i), text.find(",", i), len(text)) if k >= 0)
        if stop < len(text) and text[stop] == "=":
            key = text[i:stop]
            value, i = value_end(text, stop + 1)
        elif not pairs and implied:
            key = implied
            value, i = value_end(text, i)
        else:
            key, value, i = text[i:stop], "on", stop  # a bare flag, as QemuOpts reads it
        pairs.append((key, value))
        i += 1  # past the ","
    if any(not key for key, _ in pairs):
        raise InputError(f"qemu option {option} {show(text)}: a parameter has no name")
    return pairs


def number(option: str, key: str, text: str) -> int:
    """An unsigned integer as qemu_strtou64 with base 0 reads it (0x hex, 0 octal, decimal)."""
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
        return int(text, 16)
    if re.fullmatch(r"0[0-7]*", text):
        return int(text, 8)
    if re.fullmatch(r"[1-9][0-9]*", text):
        return int(text)
    raise InputError(f"qemu option {option} {key}={show(text)}: not a number")


def size(text: str) -> int:
    """qemu_strtosz: bytes, with an optional k/M/G/T/P/E suffix; a fraction needs a suffix."""
    m = _SIZE.fullmatch(text)
    if not m or (m.group(1).lower().startswith("0x") and "." in m.group(1)):
        raise InputError(f"qemu option -m {show(text)}: not a size (use a number with k, M, G or T)")
    number, shift = m.group(1), _SHIFT[m.group(2).lower()]
    if number.lower().startswith("0x"):
        return int(number, 16) << shift
    value = Fraction(number)
    if shift == 0 and value.denominator != 1:
        raise InputError(f"qemu option -m {show(text)}: a fraction of a byte (add a suffix: M, G)")
    return int(value * (1 << shift))
