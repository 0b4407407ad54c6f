"""The marker port (0x500): a guest writes a 32-bit event id, the VMM records when.

``memtouch`` marks the start and end of each pass here so the VMM can time passes
from outside the guest (guests/README.md lists the ids). Each mark is
``(host monotonic ns, vCPU index, value)``.

The guest fills this list, so it is bounded: the first :data:`MAX_MARKS` marks are kept
and later ones only counted in ``dropped`` (a guest writing the port in a loop grew host
memory by 11 MiB/s before). Reads return the number of marks kept so far, so a guest can
see that it hit the limit.

The port's writes may be coalesced (``MachineConfig.coalesce`` names it; KVM keeps them in
its ring): the values and their order are exact, but such a mark carries the time the VMM
replayed it (the next exit) and vCPU -1 (the ring does not say which vCPU wrote it), so it
is opt-in: memtouch times its passes by marks.
"""

from __future__ import annotations

import threading
import time

MARK_PORT = 0x500
MAX_MARKS = 1 << 16
"""Marks kept per machine (~130 bytes each in Python: ~8.5 MiB at most); memtouch needs two
per pass."""


class Marker:
    """Timestamps guest events: ``marks`` (at most ``limit``), ``dropped`` (the rest)."""

    __slots__ = ("marks", "dropped", "limit", "_vcpu", "_lock")
    name = "marker"
    WIDTH = 4
    COALESCIBLE = ((0, 4),)  # (offset, length)

    def __init__(self, limit: int = MAX_MARKS) -> None:
        self.marks: list[tuple[int, int, int]] = []
        self.dropped = 0
        self.limit = limit
        self._vcpu = threading.local()
        self._lock = threading.Lock()  # vCPU threads write concurrently: keep the bound exact

    def bind_vcpu(self, index: int) -> None:
        """Called on each vCPU thread so marks carry the vCPU that made them."""
        self._vcpu.index = index

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = len(self.marks).to_bytes(4, "little")[: len(data)]

    def write(self, offset: int, data: memoryview) -> None:
        if offset != 0:
            return
        self._record(getattr(self._vcpu, "index", -1), data)

    def write_deferred(self, offset: int, data: memoryview) -> None:
        """A write replayed from KVM's coalesced ring: the vCPU that made it is unknown."""
        if offset == 0:
            self._record(-1, data)

    def _record(self, vcpu: int, data: memoryview) -> None:
        mark = (time.monotonic_ns(), vcpu, int.from_bytes(data, "little"))
        with self._lock:
            if len(self.marks) < self.limit:
                self.marks.append(mark)
            else:
                self.dropped += 1
