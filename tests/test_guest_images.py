"""The committed guest images are exactly what `make guests` builds from the sources."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IMAGES = sorted(p.name for p in (ROOT / "guests").iterdir() if p.suffix in (".elf", ".bin"))


def test_every_source_has_a_committed_image():
    sources = {p.stem for p in (ROOT / "guests").glob("*.S")}
    assert sources == {Path(name).stem for name in IMAGES}


@pytest.fixture
def rebuilt(rebuilt_guests: Path) -> Path:
    return rebuilt_guests


@pytest.mark.parametrize("image", IMAGES)
def test_rebuild_is_byte_identical(rebuilt, image):
    assert (rebuilt / image).read_bytes() == (ROOT / "guests" / image).read_bytes(), (
        f"guests/{image} differs from a rebuild of its source: run `make guests` and commit the result"
    )
