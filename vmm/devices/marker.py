"""The marker port (0x500): a guest writes a 32-bit event id, the VMM records when.

``memtouch`` marks the start and end of each pass here so the VMM can time passes
from outside the guest (guests/README.md lists the ids). Each mark is
``(host monotonic ns, vCPU index, value)``. Reads return the number of marks so far.
"""

from __future__ import annotations

import threading
import time

MARK_PORT = 0x500


class Marker:
    """Timestamps guest events."""

    __slots__ = ("marks", "_vcpu")
    name = "marker"
    WIDTH = 4

    def __init__(self) -> None:
        self.marks: list[tuple[int, int, int]] = []
        self._vcpu = threading.local()

    def bind_vcpu(self, index: int) -> None:
        """Called on each vCPU thread so marks carry the vCPU that made them."""
        self._vcpu.index = index

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = len(self.marks).to_bytes(4, "little")[: len(data)]

    def write(self, offset: int, data: memoryview) -> None:
        now = time.monotonic_ns()
        if offset == 0:
            self.marks.append((now, getattr(self._vcpu, "index", -1), int.from_bytes(data, "little")))
