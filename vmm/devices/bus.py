"""The port-I/O and MMIO buses: range registration (checked once) and dispatch.

Devices see an offset from their base and a memoryview of the access's bytes.
String I/O (``rep outsb``: count > 1) is split into ``count`` accesses of ``size``
bytes. An access no device claims reads as all-ones and writes are dropped; it is
counted and logged at debug level, and in strict mode it raises UnhandledAccess.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from vmm.errors import BusError, UnhandledAccess

log = logging.getLogger("vmm.bus")

PORT_SPACE = 0x10000


class Device(Protocol):
    """What the bus needs of a device."""

    name: str

    def read(self, offset: int, data: memoryview) -> None: ...

    def write(self, offset: int, data: memoryview) -> None: ...


Handler = Callable[[int, memoryview], None]


class Bus:
    """Port I/O and MMIO dispatch for one machine (shared by all its vCPUs)."""

    __slots__ = (
        "strict",
        "_pio",
        "_pio_write",
        "_pio_read",
        "_mmio",
        "_mmio_starts",
        "unhandled",
        "_coalesced",
        "coalesced_writes",
        "coalesced_refused",
    )

    def __init__(self, *, strict: bool = False) -> None:
        self.strict = strict
        self._pio: list[tuple[int, int, Device]] = []
        # Per-port (handler, offset) tables: a port access is one dict lookup.
        self._pio_write: dict[int, tuple[Handler, int]] = {}
        self._pio_read: dict[int, tuple[Handler, int]] = {}
        self._mmio: list[tuple[int, int, Device]] = []
        self._mmio_starts: list[int] = []
        self.unhandled = 0
        self._coalesced: dict[int, tuple[Handler, int]] = {}  # port -> deferred-write handler
        self.coalesced_writes = 0  # writes replayed from the backend's coalesced ring
        self.coalesced_refused = 0  # ring entries that matched no coalesced register

    # --- registration ----------------------------------------------------------------------
    def register_pio(self, base: int, length: int, device: Device) -> None:
        """Give ports [base, base+length) to ``device``; BusError on a bad or overlapping range."""
        if length <= 0 or base < 0 or base + length > PORT_SPACE:
            raise BusError(f"{device.name}: bad port range {base:#x}+{length:#x}")
        for b, e, other in self._pio:
            if base < e and b < base + length:
                raise BusError(f"{device.name} at ports {base:#x}+{length:#x} overlaps {other.name} at {b:#x}")
        self._pio.append((base, base + length, device))
        for port in range(base, base + length):
            self._pio_write[port] = (device.write, port - base)
            self._pio_read[port] = (device.read, port - base)

    def register_mmio(self, base: int, length: int, device: Device) -> None:
        """Give guest-physical [base, base+length) to ``device`` (it must not be RAM)."""
        if length <= 0 or base < 0 or base + length > 1 << 52:
            raise BusError(f"{device.name}: bad MMIO range {base:#x}+{length:#x}")
        for b, e, other in self._mmio:
            if base < e and b < base + length:
                raise BusError(f"{device.name} at {base:#x}+{length:#x} overlaps {other.name} at {b:#x}")
        i = bisect.bisect(self._mmio_starts, base)
        self._mmio.insert(i, (base, base + length, device))
        self._mmio_starts.insert(i, base)

    def coalesce_ports(self, names: Iterable[str]) -> list[tuple[int, int]]:
        """Let the writes of the devices named ``names`` be coalesced, where they say a
        register may be (``COALESCIBLE``: (offset, length) pairs of write-only registers
        that do not care when a write is seen, only in which order). Returns the port
        ranges (base, length) for the backend to register; from now on
        :meth:`coalesced_write` accepts exactly those ports."""
        wanted = set(names)
        zones: list[tuple[int, int]] = []
        for base, _end, device in self._pio:
            if device.name not in wanted:
                continue
            write = getattr(device, "write_deferred", device.write)
            for offset, length in getattr(device, "COALESCIBLE", ()):
                zones.append((base + offset, length))
                for port in range(base + offset, base + offset + length):
                    self._coalesced[port] = (write, port - base)
        return sorted(zones)

    def coalesced_write(self, port: int, data: memoryview) -> None:
        """One write replayed from the backend's coalesced ring (guest-influenced: the port
        and size are checked against what :meth:`coalesce_ports` registered; anything
        else is counted in ``coalesced_refused`` and dropped)."""
        entry = self._coalesced.get(port)
        size = len(data)
        last = self._coalesced.get(port + size - 1) if 1 <= size <= 8 else None
        if entry is None or last is None or last[0] != entry[0]:  # within one device's register
            self.coalesced_refused += 1
            return
        handler, offset = entry
        self.coalesced_writes += 1
        handler(offset, data)

    def pio_handlers(self) -> tuple[dict[int, tuple[Handler, int]], dict[int, tuple[Handler, int]]]:
        """(write table, read table): port -> (handler, offset). For backends' hot loops."""
        return self._pio_write, self._pio_read

    # --- dispatch ------------------------------------------------------------------------
    def pio_write(self, port: int, size: int, data: memoryview) -> None:
        """An OUT (or OUTS with len(data) == count*size)."""
        self._pio_access(self._pio_write, "write to port", port, size, data)

    def pio_read(self, port: int, size: int, data: memoryview) -> None:
        """An IN (or INS): fill ``data``."""
        self._pio_access(self._pio_read, "read from port", port, size, data)

    def _pio_access(
        self, table: dict[int, tuple[Handler, int]], what: str, port: int, size: int, data: memoryview
    ) -> None:
        entry = table.get(port)
        if entry is None:
            self._unhandled(what, port, size, data)
            if table is self._pio_read:
                data[:] = b"\xff" * len(data)
            return
        handler, offset = entry
        if len(data) == size:
            handler(offset, data)
        else:  # string I/O: count accesses of size bytes each
            for start in range(0, len(data), size):
                handler(offset, data[start : start + size])

    def _find_mmio(self, addr: int, size: int) -> tuple[Device, int] | None:
        i = bisect.bisect(self._mmio_starts, addr) - 1
        if i >= 0:
            base, end, device = self._mmio[i]
            if addr + size <= end:
                return device, addr - base
        return None

    def mmio_write(self, addr: int, data: memoryview) -> None:
        """A store to an address without RAM."""
        found = self._find_mmio(addr, len(data))
        if found is None:
            self._unhandled("MMIO write at", addr, len(data), data)
            return
        device, offset = found
        device.write(offset, data)

    def mmio_read(self, addr: int, data: memoryview) -> None:
        """A load from an address without RAM: fill ``data`` (all-ones if unclaimed)."""
        found = self._find_mmio(addr, len(data))
        if found is None:
            self._unhandled("MMIO read at", addr, len(data), data)
            data[:] = b"\xff" * len(data)
            return
        device, offset = found
        device.read(offset, data)

    def _unhandled(self, what: str, addr: int, size: int, data: memoryview) -> None:
        self.unhandled += 1
        if self.strict:
            raise UnhandledAccess(f"guest {what} {addr:#x} (size {size}) that no device claims (--strict)")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("unhandled %s %#x size %d data %s", what, addr, size, bytes(data).hex())
