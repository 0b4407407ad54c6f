"""Port 0x80, the PC's POST-code port: keeps the last value written and a count.

Guests use it as a harmless I/O target (the exit benchmark's ``out`` loop).
Reads return the last value. Nothing else is emulated. Writes may be coalesced (KVM keeps
them in its ring and the VMM replays them at the next exit, before handling it): a latch
and a count do not care when they are seen, and a read always comes after the replay.
"""

from __future__ import annotations

POST_PORT = 0x80


class PostCode:
    """The POST-code latch."""

    __slots__ = ("last", "writes")
    name = "post-code"
    WIDTH = 1
    COALESCIBLE = ((0, 1),)  # (offset, length): writes the VMM may see late, in order

    def __init__(self) -> None:
        self.last = 0
        self.writes = 0

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes([self.last]) + bytes(len(data) - 1)

    def write(self, offset: int, data: memoryview) -> None:
        self.last = data[0]
        self.writes += 1
