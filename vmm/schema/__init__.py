"""The JSON Schema (draft 2020-12) of every ``--json`` output, published with the package.

``vmm run --json``, ``vmm caps --json`` and ``vmm prefault --json`` print one object each,
and under ``--json`` an error is one object too; each carries ``schema_version``
(:data:`SCHEMA_VERSION`). The schemas are files in this package (``run.json``,
``caps.json``, ``prefault.json``, ``error.json``); ``vmm schema NAME`` prints one.
Nothing here is read when ``vmm`` starts: only :func:`load` opens a file.
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 1  # bumped when a key changes meaning or goes away; adding one is compatible
NAMES = ("run", "caps", "prefault", "error")


def path(name: str) -> str:
    """The file of schema ``name`` (one of :data:`NAMES`), inside the installed package."""
    if name not in NAMES:
        raise ValueError(f"no schema {name!r} (choose from {', '.join(NAMES)})")
    from importlib.resources import files

    return str(files(__name__).joinpath(f"{name}.json"))


def load(name: str) -> dict[str, Any]:
    """Schema ``name`` as a dict (for a validator such as ``jsonschema``)."""
    import json
    from importlib.resources import files

    if name not in NAMES:
        raise ValueError(f"no schema {name!r} (choose from {', '.join(NAMES)})")
    data: dict[str, Any] = json.loads(files(__name__).joinpath(f"{name}.json").read_text(encoding="utf-8"))
    return data
