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

Precise points. A stop is resumable only where RIP is exact and nothing is half done:
between two translation blocks. A stop from another thread, or ``uc_emu_start``'s
timeout, can land inside a read-modify-write instruction with RIP left at its start
(resuming repeats it: unicorn issues #1105 and #1565, measured here too), and a stop
from an I/O or MMIO hook lets the rest of the block run, so such stops end the loop
for good. The precise stops are: UC_HOOK_INTR (QEMU raises an exception between
blocks), UC_ERR_INSN_INVALID (#UD), HLT, and the native block gate of
:mod:`~vmm.backends.emulator_stubs`, which every engine carries from its first block at
~0.3 ns per block (a Python block hook costs ~120 ns, and one added while a guest runs
never reaches blocks already translated: measured), so no speed is lost when nothing
asks it to stop.

Exceptions (measured on unicorn 2.1.4). Unicorn delivers none: #UD ends emulation with
UC_ERR_INSN_INVALID, RIP at the instruction; every other exception reaches UC_HOOK_INTR
with RIP at the faulting instruction, or, for ``int n``, ``int3`` and ``into``, at the
next one (unicorn applies ``exception_next_eip`` first); a hook that neither moves RIP
nor stops re-executes the fault forever. The error code and the ``int n`` flag are not
exposed, and QEMU's nested-exception state is never reset (the second contributory
fault of a run arrives as #DF, the third stops emulation as if by HLT). So the hook
records the event and stops, and the loop delivers it through the guest's IVT or IDT
itself (:mod:`~vmm.backends.emulator_exceptions`), with QEMU's CPU state written in
place (:mod:`~vmm.backends.emulator_env`); a triple fault ends the vCPU as "triple
fault (shutdown)", as KVM's backend says. ``uc_emu_start`` runs with exits enabled and
none set: its classic "until" address made unicorn clobber CR2 on every return
(measured). RDMSR/WRMSR have no unicorn hook in 2.1.4 and never fault there (an unknown
MSR reads 0): a patched PLT slot traps them (:mod:`~vmm.backends.emulator_stubs`) and
:mod:`~vmm.backends.emulator_cpu` decides (#GP(0) for an MSR no CPU has, as KVM).

Interrupts. Each vCPU has a small xAPIC (:mod:`~vmm.backends.emulator_apic`; timer
interrupts from a host-time thread, IPIs, INIT/SIPI through
:mod:`~vmm.backends.emulator_platform`). A pending interrupt raises the gate's
interrupt-window flag; the gate stops at the first block that starts with IF=1 and no
STI/MOV SS shadow, and the loop delivers the vector through the IDT. HLT with IF=1
waits, blocked, for an interrupt, INIT or a stop; HLT with IF=0 ends the loop as
"halted". Not modelled: the 8259 PIC (its ports reach the bus as unclaimed: it never
interrupts), the IOAPIC and the 8254 PIT (an access ends the run with one line naming
it), x2APIC, NMI/SMI, task switches and virtual-8086 mode.

vCPUs. One engine per vCPU (always UC_MODE_64, see
:mod:`~vmm.backends.emulator_state`), one thread each, as on KVM; ``uc_emu_start``
releases the GIL (the binding uses ``ctypes.CDLL``). But TCG compiles ``lock xadd`` and
``xchg`` to plain loads and stores unless it runs in parallel mode, which unicorn never
enables: engines executing at once on shared RAM lose atomic updates (measured: three
vCPUs doing 200 k ``lock xadd`` each end ~20 % short). So a machine's vCPUs take turns
(:class:`~vmm.backends.emulator_turns.Turns`), one executing at a time. A vCPU that has
waited a quantum asks the running one to yield, through its block gate. vCPUs given a
state start there; ``park()`` instead makes a vCPU wait for INIT and STARTUP, as a PC's
application processors do.

Kicks. ``kick()`` closes the vCPU's gate (hooks stop passing I/O to devices, as KVM
would not re-enter the guest), wakes vCPUs waiting for a turn, an interrupt or a SIPI,
and calls ``uc_emu_stop``, repeating it from another thread until the engine returns:
unicorn clears its stop request on entry to ``uc_emu_start``, which would otherwise
lose a kick that lands in that instant.
"""

from __future__ import annotations

import logging

from vmm.backends.emulator_env import probe
from vmm.backends.emulator_platform import Platform
from vmm.backends.emulator_turns import Turns
from vmm.backends.emulator_vcpu import EmulatorVcpuRunner
from vmm.errors import ConfigError, Unavailable, VmmError
from vmm.memory import Backing, GuestMemory, GuestRegion, HostMemory, parse_backing

__all__ = ["EmulatorBackend", "EmulatorVcpuRunner"]

log = logging.getLogger("vmm.emulator")


class EmulatorBackend:
    """The in-process emulator: guest RAM in host mappings shared by pointer, one unicorn
    engine per vCPU, the vCPUs taking turns, their APICs and run states in ``platform``.
    Unavailable (one line) where the host cannot run the emulator's native hooks."""

    name = "emulator"

    def __init__(self) -> None:
        probe()  # once per process: the native hooks and unicorn's CPU state layout
        self.memory = GuestMemory()
        self.turns = Turns()
        self.platform = Platform()
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
        """vCPU ``index``; its engine opens in ``set_state`` or ``park``."""
        self._check_open()
        if any(r.index == index for r in self.runners):
            raise ConfigError(f"vCPU {index} already exists")
        runner = EmulatorVcpuRunner(index, self.memory, self.turns, self.platform)
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
        self.platform.close()
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
