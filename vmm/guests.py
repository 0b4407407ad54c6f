"""The bundled guest images, found wherever vmm is installed (``importlib.resources``).

The images live in the repository's ``guests/`` (beside their sources) and ship in the wheel
as the data package ``vmm._guest_images`` (``setup.py`` maps that package onto ``guests/``,
so an editable install reads the same files). Names are the file names relative to that
directory; the suffix may be left out::

    >>> from vmm import guests                                    # doctest: +SKIP
    >>> guests.path("hello64")                                     # doctest: +SKIP
    PosixPath('.../vmm/_guest_images/hello64.elf')
    >>> "pc/mbinfo.elf" in guests.names()                           # doctest: +SKIP
    True
"""

from __future__ import annotations

import atexit
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from vmm.errors import InputError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

PACKAGE = "vmm._guest_images"
SUFFIXES = (".elf", ".bin")
SUBDIRS = ("pc",)

# Paths handed out stay valid for the process: an installation on disk hands out its own
# files; one inside a zip is extracted once, and removed at exit.
_extracted = contextlib.ExitStack()
atexit.register(_extracted.close)


def _root() -> Traversable:
    # importlib.resources (and the tempfile module it pulls in) only when a bundled guest is
    # looked up: `vmm run FILE` of an existing file never needs it.
    import importlib.resources

    return importlib.resources.files(PACKAGE)


def names() -> list[str]:
    """Every bundled image, by file name relative to the guests directory (``hello64.elf``,
    ``pc/mbinfo.elf``), sorted."""
    found: list[str] = []
    for prefix, folder in [("", _root())] + [(f"{d}/", _root() / d) for d in SUBDIRS]:
        if folder.is_dir():
            found += [prefix + f.name for f in folder.iterdir() if f.is_file() and f.name.endswith(SUFFIXES)]
    return sorted(found)


def find(name: str) -> Path | None:
    """The bundled image called ``name`` (``hello64``, ``hello64.elf``, ``pc/mbinfo``), or None."""
    known = names()
    for candidate in (name, *(name + s for s in SUFFIXES)):
        if candidate in known:
            import importlib.resources

            ref = _root().joinpath(*candidate.split("/"))
            return _extracted.enter_context(importlib.resources.as_file(ref))
    return None


def path(name: str) -> Path:
    """The file of the bundled image ``name``; :class:`~vmm.errors.InputError` naming the
    bundled images if there is none."""
    found = find(name)
    if found is None:
        raise InputError(f"no bundled guest {name!r} (bundled: {', '.join(short_names())})")
    return found


def short_names() -> list[str]:
    """The names without their suffix, as ``vmm run NAME`` takes them (``hello64``, ``pc/mbinfo``)."""
    return [n.rsplit(".", 1)[0] for n in names()]


def resolve(image: str) -> str:
    """What ``vmm run IMAGE`` runs: ``image`` when that file exists, else the bundled image of
    that name; :class:`~vmm.errors.InputError` (``no such file``, naming the bundled images)
    when it is neither."""
    if Path(image).exists():
        return image
    found = find(image)
    if found is not None:
        return str(found)
    if "/" in image and image.split("/")[0] not in SUBDIRS:
        raise InputError(f"{image}: no such file")  # a path, not a bundled guest's name
    raise InputError(f"{image}: no such file, nor a bundled guest (bundled: {', '.join(short_names())})")
