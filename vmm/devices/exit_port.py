"""The exit port (QEMU's isa-debug-exit convention, port 0xf4).

A guest writes a value ``v``; the VMM stops and exits with status ``(v << 1) | 1``.
Accepts 1-, 2- and 4-byte writes (the value is little-endian). Reads return 0.
Not emulated: QEMU's configurable iobase/iosize properties.
"""

from __future__ import annotations

from collections.abc import Callable

EXIT_PORT = 0xF4


class ExitPort:
    """The exit device; ``request_exit(value)`` is called on every write."""

    __slots__ = ("_request_exit",)
    name = "exit-port"
    WIDTH = 4

    def __init__(self, request_exit: Callable[[int], None]) -> None:
        self._request_exit = request_exit

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: memoryview) -> None:
        if offset == 0:
            self._request_exit(int.from_bytes(data, "little"))
