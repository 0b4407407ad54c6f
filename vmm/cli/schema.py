"""``vmm schema [NAME]``: the JSON Schema of a ``--json`` output, from the installed package."""

from __future__ import annotations

import argparse
from typing import Any

from vmm.cli import streams
from vmm.schema import NAMES  # names only: the files are read by cmd_schema


def add_parser(sub: Any) -> None:
    schema = sub.add_parser(
        "schema",
        help="the JSON Schema of a --json output",
        description="Print the JSON Schema (draft 2020-12) of `vmm run --json` (run), `vmm caps --json` (caps), "
        "`vmm prefault --json` (prefault) or of the error object any of them prints under --json (error). "
        "Without NAME: each schema's file in the installed package.",
    )
    schema.add_argument("name", nargs="?", choices=NAMES, metavar="NAME", help=f"one of {', '.join(NAMES)}")
    schema.set_defaults(handler=cmd_schema)


def cmd_schema(ns: argparse.Namespace) -> int:
    from vmm import schema

    if ns.name is None:
        streams.write_text("".join(f"{name:<9} {schema.path(name)}\n" for name in schema.NAMES))
        return 0
    with open(schema.path(ns.name), encoding="utf-8") as f:
        streams.write_text(f.read())
    return 0
