"""The VM's coalesced-write ring, as the KVM backend's vCPU loops drain it.

With KVM_CAP_COALESCED_PIO, writes to the ports a device declares coalescible
(``COALESCIBLE``, :meth:`vmm.devices.bus.Bus.coalesce_ports`) do not exit: KVM appends
them to one ring per VM, at page KVM_COALESCED_MMIO_PAGE_OFFSET of every vCPU's mapping,
while it has room (a write to a full ring exits as usual). The VMM replays them in order at
the next exit, before handling that exit, as the kernel's api.rst documents (and QEMU's
``kvm_flush_coalesced_mmio_buffer`` does).
"""

from __future__ import annotations

import threading
from typing import Any

import kvm_abi as abi
from kvm_abi import ffi
from vmm.devices.bus import Bus


class CoalescedRing:
    """The VM's coalesced-write ring (one per VM, mapped by every vCPU), drained by the
    vCPU threads at their exits. The kernel appends at ``last`` while there is room and
    the VMM consumes from ``first``; both indices and every entry are checked (the values
    come from the guest's writes): an entry that is not a port write of 1-8 bytes to a
    register the bus coalesces is counted in ``bus.coalesced_refused`` and dropped. One
    drain handles at most the ring's size of entries."""

    __slots__ = ("ring", "_lock", "_max")

    def __init__(self, ring: Any) -> None:
        self.ring = ring
        self._lock = threading.Lock()  # several vCPU threads may drain
        self._max = abi.KVM_COALESCED_MMIO_MAX

    def drain(self, bus: Bus) -> None:
        ring, size = self.ring, self._max
        with self._lock:
            first = ring.first
            if first >= size:  # only the VMM writes it; never trust it anyway
                first = 0
            for _ in range(size):
                last = ring.last
                if first == last:
                    break
                if last >= size:
                    bus.coalesced_refused += 1
                    break
                entry = ring.coalesced_mmio[first]
                length = entry.len
                if entry.pio == 1 and 1 <= length <= 8:
                    bus.coalesced_write(entry.phys_addr, memoryview(bytes(ffi.buffer(entry.data, length))))
                else:
                    bus.coalesced_refused += 1
                first = (first + 1) % size
                ring.first = first  # the slot is free for the kernel again
