"""The in-process emulator backend: vCPUs run in unicorn (QEMU's TCG as a library), so the
same guest images run, with the same console output and status, where /dev/kvm is absent.

Memory. Guest RAM is a :class:`~vmm.memory.HostMemory` mapping handed to every vCPU's
engine by pointer (``uc_mem_map_ptr``): loaders, pre-population and inspection go
through :class:`~vmm.memory.GuestMemory` exactly as on KVM, and all vCPUs share it.
Every range below the top of the identity map (at least 4 GiB) without RAM is mapped
as MMIO (``uc_mmio_map``), so a guest touching the 3-4 GiB hole or any other gap
reaches the bus as a KVM_EXIT_MMIO would: all-ones from an unclaimed address, a crash
under ``--strict``.

Port I/O. Unicorn's IN and OUT instruction hooks fire once per access; for ``rep
outsb``/``rep insb`` once per element, with the element's size (measured), so the
devices see the byte stream that the bus makes of KVM's count > 1 exits. The hooks
are raw ctypes callbacks (:mod:`~vmm.backends.emulator_native`) dispatching through
the bus's per-port tables like the KVM loop.

Ends. ``uc_emu_start`` returns without an error on HLT and on ``uc_emu_stop``; every
stop is the VMM's own (a kick, a yield, a failed hook), so a return nobody asked for is
HLT. Unicorn delivers no exceptions: #UD ends emulation with UC_ERR_INSN_INVALID, any
other exception reaches an interrupt hook (vector and RIP recorded), a fetch from MMIO
fails with UC_ERR_FETCH_PROT. Each becomes a "crashed" outcome naming the fault and its
RIP, the counterpart of KVM's triple fault or internal error (status 4).

vCPUs. One engine per vCPU, one thread each, as on KVM; ``uc_emu_start`` releases the
GIL (the binding uses ``ctypes.CDLL``). But TCG compiles ``lock xadd`` and ``xchg`` to
plain loads and stores unless it runs in parallel mode, which unicorn never enables:
engines executing at once on shared RAM lose atomic updates (measured: three vCPUs
doing 200 k ``lock xadd`` each end ~20 % short). So a machine's vCPUs take turns
(:class:`~vmm.backends.emulator_turns.Turns`), one executing at a time. A vCPU that has
waited a quantum asks the running one to yield; it does so from a block hook, at the
start of a translation block, the one place where stopping leaves RIP exact. (A stop
from another thread, or ``uc_emu_start``'s timeout, can land inside a read-modify-write
instruction with RIP left at its start: resuming repeats it, unicorn issues #1105 and
#1565, measured here too. So such stops are never resumed.) With one vCPU there is no
block hook and no cost.

Kicks. ``kick()`` closes the vCPU's gate (hooks stop passing I/O to devices, as KVM
would not re-enter the guest), wakes vCPUs waiting for a turn and calls
``uc_emu_stop``, repeating it from another thread until the engine returns: unicorn
clears its stop request on entry to ``uc_emu_start``, which would otherwise lose a kick
that lands in that instant.
"""

from __future__ import annotations

import logging

from vmm.backends.emulator_turns import Turns
from vmm.backends.emulator_vcpu import EmulatorVcpuRunner
from vmm.errors import ConfigError, Unavailable, VmmError
from vmm.memory import Backing, GuestMemory, GuestRegion, HostMemory, parse_backing

__all__ = ["EmulatorBackend", "EmulatorVcpuRunner"]

log = logging.getLogger("vmm.emulator")


class EmulatorBackend:
    """The in-process emulator: guest RAM in host mappings shared by pointer, one unicorn
    engine per vCPU, the vCPUs taking turns."""

    name = "emulator"

    def __init__(self) -> None:
        self.memory = GuestMemory()
        self.turns = Turns()
        self.runners: list[EmulatorVcpuRunner] = []
        self._hosts: list[HostMemory] = []
        self._closed = False

    def add_ram(self, gpa: int, size: int, backing: Backing | str) -> GuestRegion:
        """Allocate ``size`` bytes of RAM with ``backing`` at ``gpa``; existing vCPUs map it
        too. ``guest-memfd`` is KVM's alone: Unavailable."""
        self._check_open()
        backing = parse_backing(backing)
        if backing is Backing.GUEST_MEMFD:
            raise Unavailable(
                "guest-memfd memory is KVM-only (KVM_CREATE_GUEST_MEMFD); the emulator cannot back RAM with it: "
                "choose --memory anon, thp, memfd or hugetlb",
                capability="GUEST_MEMFD",
            )
        host = HostMemory.allocate(size, backing)
        try:
            region = self.memory.add(GuestRegion(gpa, size, host))
        except BaseException:
            host.close()
            raise
        self._hosts.append(host)
        for runner in self.runners:
            runner.sync_memory()
        return region

    def create_vcpu(self, index: int) -> EmulatorVcpuRunner:
        """vCPU ``index``; its engine opens in ``set_state``."""
        self._check_open()
        if any(r.index == index for r in self.runners):
            raise ConfigError(f"vCPU {index} already exists")
        runner = EmulatorVcpuRunner(index, self.memory, self.turns)
        self.runners.append(runner)
        return runner

    def close(self) -> None:
        """Close every engine, then unmap guest RAM (idempotent)."""
        if self._closed:
            return
        stuck = []
        for runner in self.runners:
            try:
                runner.close()
            except VmmError:
                stuck.append(str(runner.index))
        if stuck:
            # A running engine reads guest RAM by pointer: unmapping it would crash.
            log.error("leaving guest RAM mapped: vCPUs %s still run", ", ".join(stuck))
            return
        self._closed = True
        for host in self._hosts:
            host.close()
        self._hosts.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise VmmError("the emulator backend is closed")

    def __enter__(self) -> EmulatorBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
