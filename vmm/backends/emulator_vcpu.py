"""One emulated vCPU, :class:`EmulatorVcpuRunner`: its engine, hooks and the vCPU
protocol. The run loop is :mod:`vmm.backends.emulator_loop`; the design is described
in :mod:`vmm.backends.emulator`."""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from unicorn import (
    UC_ARCH_X86,
    UC_ERR_FETCH_PROT,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_MEM_UNMAPPED,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_WRITE_UNMAPPED,
    UC_MODE_64,
    UC_PROT_ALL,
    Uc,
    UcError,
)
from unicorn.x86_const import UC_X86_INS_CPUID, UC_X86_INS_IN, UC_X86_INS_OUT

from vmm.backends import emulator_native as native
from vmm.backends.base import ExitCounts, StopFlag, VcpuOutcome
from vmm.backends.emulator_apic import APIC_BASE, APIC_SIZE, Unmodelled
from vmm.backends.emulator_cpu import cpuid_leaf1
from vmm.backends.emulator_env import Env, check_layout, probe
from vmm.backends.emulator_loop import RunLoop, Trap
from vmm.backends.emulator_memory import mmio_ranges
from vmm.backends.emulator_platform import GONE, PARKED, READY, Platform
from vmm.backends.emulator_state import apply_state, read_pc, read_regs
from vmm.backends.emulator_stubs import GateState, native_code
from vmm.backends.emulator_turns import Turns
from vmm.cpu.state import CpuState
from vmm.devices.bus import Bus
from vmm.errors import VmmError
from vmm.exits import IoIn, IoOut, MmioRead, MmioWrite, crashed, dispatch
from vmm.memory import GuestMemory

log = logging.getLogger("vmm.emulator")

CLOSE_WAIT_SECONDS = 2.0
KICK_RETRY_SECONDS = 0.001
IOAPIC_BASE, IOAPIC_END = 0xFEC00000, 0xFEC01000
PIT_PORTS = range(0x40, 0x44)
CpuidCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


def _all_ones(size: int) -> int:
    return (1 << (8 * size)) - 1


class EmulatorVcpuRunner(RunLoop):
    """One vCPU: a unicorn engine over the machine's RAM, driven by the machine's loop.
    The engine opens in :meth:`set_state` or :meth:`park`."""

    def __init__(self, index: int, memory: GuestMemory, turns: Turns, platform: Platform) -> None:
        self.index = index
        self.counts = ExitCounts()
        self._memory = memory
        self._turns = turns
        turns.members += 1
        self._platform = platform
        self._slot = platform.add(index, self)
        self._apic = self._slot.apic
        self._uc: Uc | None = None
        self._env: Env = None  # type: ignore[assignment]  # set with the engine
        self._pc = 0
        self._ram: set[tuple[int, int, int]] = set()
        self._mmio: list[tuple[int, int]] = []
        self._running = False  # inside uc_emu_start
        self._idle = threading.Event()  # not inside run_loop
        self._idle.set()
        self._bus: Bus | None = None
        self._fault: VcpuOutcome | None = None
        self._event: Trap | None = None
        self._hook_error: BaseException | None = None
        # Closed by kick() and by a failed hook; hooks pass nothing to devices once closed.
        self._gate = StopFlag()
        self._gate_state = GateState()  # the native block gate's flags
        self._thread = 0  # ident of the thread in run_loop
        # unicorn keeps raw pointers to these: they live as long as the runner.
        self._mmio_read_cb = native.MmioReadCallback(self._mmio_read)
        self._mmio_write_cb = native.MmioWriteCallback(self._mmio_write)
        self._intr_cb = native.IntrCallback(self._on_exception)
        self._unmapped_cb = native.UnmappedCallback(self._on_unmapped)
        self._cpuid_cb = CpuidCallback(self._on_cpuid)
        self._io_callbacks: list[Any] = []

    # --- engine and memory map -----------------------------------------------------------
    def _open_engine(self) -> Uc:
        self._close_engine()
        probe()
        code = native_code()
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self._uc = uc
        try:
            self._env = Env(code.capture_env(uc))
            check_layout(uc, self._env)
            code.register(self._env.addr)
            self._gate_state.env = self._env.addr
            # With exits enabled and none set, uc_emu_start has no "until" address: the
            # classic one makes unicorn walk the guest's page tables for it on every
            # return, writing CR2 (measured: CR2 = until - 1 after each emu_start).
            uc.ctl_exits_enabled(True)
            uc.ctl_set_exits([])
            code.add_gate(uc, self._gate_state)
            native.hook_add(uc, UC_HOOK_INTR, self._intr_cb)
            native.hook_add(uc, UC_HOOK_MEM_UNMAPPED, self._unmapped_cb)
            native.hook_add(uc, UC_HOOK_INSN, self._cpuid_cb, ctypes.c_int(UC_X86_INS_CPUID))
            self.sync_memory()
        except BaseException:
            self._close_engine()
            raise
        return uc

    def _close_engine(self) -> None:
        uc, self._uc = self._uc, None
        self._ram, self._mmio = set(), []
        if uc is not None:
            if self._env is not None:
                native_code().unregister(self._env.addr)
                self._env = None  # type: ignore[assignment]
            native.close_engine(uc)

    def sync_memory(self) -> None:
        """Map every RAM region by pointer and every gap below the identity map's top as
        MMIO. Called when the engine opens and when the backend adds RAM."""
        uc = self._uc
        if uc is None:
            return
        ram = {(r.gpa, r.size, r.host_addr) for r in self._memory}
        mmio = mmio_ranges(self._memory)
        if ram == self._ram and mmio == self._mmio:
            return
        for gpa, size in self._mmio:  # new RAM may sit where MMIO was
            uc.mem_unmap(gpa, size)
        self._mmio = []
        for gpa, size, addr in sorted(ram - self._ram):
            # The host mapping outlives the engine: the backend closes engines first.
            uc.mem_map_ptr(gpa, size, UC_PROT_ALL, addr)
        self._ram = ram
        for gpa, size in mmio:
            native.mmio_map(uc, gpa, size, self._mmio_read_cb, self._mmio_write_cb)
        self._mmio = mmio

    # --- VcpuRunner protocol -------------------------------------------------------------
    def set_state(self, state: CpuState) -> None:
        """Open a fresh engine and load ``state``: the vCPU starts there."""
        if not self._idle.is_set():
            raise VmmError(f"vCPU {self.index}: cannot set the state of a running vCPU")
        uc = self._open_engine()
        self._fault = self._event = None
        apply_state(uc, self._env, state)
        self._pc = state.regs.get("rip", 0)
        with self._platform.lock:
            self._apic.reset()
            self._slot.init_pending, self._slot.started = False, True
        self._platform.set_state(self._slot, READY)

    def park(self) -> None:
        """Instead of :meth:`set_state`: an application processor waiting for INIT and
        STARTUP from another vCPU's APIC (see :mod:`vmm.backends.emulator_platform`)."""
        if not self._idle.is_set():
            raise VmmError(f"vCPU {self.index}: cannot park a running vCPU")
        self._open_engine()
        self._fault = self._event = None
        with self._platform.lock:
            self._apic.reset()
            self._slot.init_pending, self._slot.started = False, False
        self._platform.set_state(self._slot, PARKED)

    def regs(self) -> dict[str, int]:
        if self._uc is None:
            raise VmmError(f"vCPU {self.index} has no state (closed, or neither set_state() nor park() called)")
        return read_regs(self._uc)

    def kick(self) -> None:
        self._gate.requested = True
        self._turns.wake()
        self._platform.wake()
        uc = self._uc
        if uc is None or not self._running:
            return  # the loop checks the gate after raising _running: nothing is lost
        native.emu_stop(uc)
        if threading.get_ident() == self._thread:
            return  # from this vCPU's own hook: emulation is live, the stop lands
        # From another thread the stop can land in the instant before uc_emu_start clears
        # unicorn's stop request on entry; repeat it until the loop has left the engine.
        deadline = time.monotonic() + CLOSE_WAIT_SECONDS
        while self._running and not self._idle.wait(KICK_RETRY_SECONDS) and time.monotonic() < deadline:
            native.emu_stop(uc)

    def preempt(self) -> None:
        """Ask this vCPU to give up its turn at its next translation block (any thread)."""
        self._gate_state.req_now = 1

    def interrupt_window(self) -> None:
        """Stop at the next block that can take an interrupt (the platform's Waker)."""
        self._gate_state.req_irq = 1

    def attention(self) -> None:
        """Stop at the next block (the platform's Waker)."""
        self._gate_state.req_now = 1

    def close(self) -> None:
        """Release the engine (idempotent). A vCPU still in its loop is kicked first; one
        that does not leave it keeps its engine (closing it under the thread would crash
        the process) and VmmError says so."""
        if self._uc is None:
            return
        if not self._idle.is_set():
            self.kick()
            if not self._idle.wait(CLOSE_WAIT_SECONDS):
                log.error("vCPU %d did not stop; leaving its emulator engine open", self.index)
                raise VmmError(f"vCPU {self.index} is still running; cannot release it")
        self._close_engine()
        self._io_callbacks.clear()

    @property
    def closed(self) -> bool:
        """True once the engine is released (or before set_state/park opened one)."""
        return self._uc is None

    # --- the run loop --------------------------------------------------------------------
    def run_loop(self, bus: Bus, stop: StopFlag) -> VcpuOutcome:
        uc = self._uc
        if uc is None:
            raise VmmError(f"vCPU {self.index}: set_state() or park() first")
        self._bus = bus
        self._hook_error = None
        self._gate.requested = False
        self._thread = threading.get_ident()
        self._idle.clear()
        try:
            hooks, io_count = self._install_io_hooks(uc, bus)
            try:
                return self._run(uc, stop)
            finally:
                for hook in hooks:
                    native.hook_del(uc, hook)
                self.counts.io += io_count()
        finally:
            self._platform.set_state(self._slot, GONE)
            self._bus = None
            self._idle.set()

    def _install_io_hooks(self, uc: Uc, bus: Bus) -> tuple[list[int], Callable[[], int]]:
        """The IN and OUT hooks, the hot path: closures over the bus's per-port tables,
        one flag test, one dict lookup and one device call per access, as in the KVM loop.
        Returns the hook handles and a function giving the number of port accesses."""
        out_table, in_table = bus.pio_handlers()
        views = {n: memoryview(bytearray(n)) for n in (1, 2, 4)}
        one = views[1]
        # After a stop (kick) or a failed hook KVM would not run the guest again, so the
        # rest of unicorn's translation block must not reach the devices either.
        gate = self._gate
        failed = self._hook_failed
        unmodelled = self._unmodelled
        n = 0

        def on_out(_uc: int, port: int, size: int, value: int, _user: int) -> None:
            nonlocal n
            if gate.requested:
                return
            n += 1
            try:
                if size == 1:
                    one[0] = value & 0xFF
                    data = one
                else:
                    data = views[size]
                    data[:] = value.to_bytes(size, "little")
                entry = out_table.get(port)
                if entry is not None:
                    entry[0](entry[1], data)
                elif port in PIT_PORTS:
                    unmodelled(f"the emulator does not model the 8254 PIT (OUT to port {port:#x})")
                else:
                    dispatch(bus, IoOut(port, size, 1, data))
            except BaseException as e:
                failed(e)

        def on_in(_uc: int, port: int, size: int, _user: int) -> int:
            nonlocal n
            if gate.requested:
                return _all_ones(size)
            n += 1
            try:
                data = views[size]
                entry = in_table.get(port)
                if entry is not None:
                    entry[0](entry[1], data)
                elif port in PIT_PORTS:
                    unmodelled(f"the emulator does not model the 8254 PIT (IN from port {port:#x})")
                    return _all_ones(size)
                else:
                    dispatch(bus, IoIn(port, size, 1, data))
                return int.from_bytes(data, "little")
            except BaseException as e:
                failed(e)
                return _all_ones(size)

        def count() -> int:
            return n

        callbacks = [native.OutCallback(on_out), native.InCallback(on_in)]
        # Kept until close(): unicorn frees a deleted hook only after its next emulation.
        self._io_callbacks += callbacks
        hooks: list[int] = []
        try:
            hooks.append(native.hook_add(uc, UC_HOOK_INSN, callbacks[0], ctypes.c_int(UC_X86_INS_OUT)))
            hooks.append(native.hook_add(uc, UC_HOOK_INSN, callbacks[1], ctypes.c_int(UC_X86_INS_IN)))
        except BaseException:
            for hook in hooks:
                native.hook_del(uc, hook)
            raise
        return hooks, count

    # --- rare paths: faults, CPUID and MMIO ------------------------------------------------
    def _hook_failed(self, error: BaseException) -> None:
        if self._hook_error is None:
            self._hook_error = error
        self._gate.requested = True
        if self._uc is not None:
            native.emu_stop(self._uc)

    def _unmodelled(self, detail: str) -> None:
        """The guest needs something the emulator does not model: the run ends, saying so."""
        if self._fault is None:
            rip = read_pc(self._uc) if self._uc is not None else None
            self._fault = crashed(detail, rip)
        self._gate.requested = True
        if self._uc is not None:
            native.emu_stop(self._uc)

    def _engine_error(self, status: int) -> VcpuOutcome:
        if status == UC_ERR_FETCH_PROT:  # unicorn maps MMIO ranges non-executable
            detail = f"instruction fetch from guest-physical {self._pc:#x}, which has no RAM (MMIO)"
            return crashed(detail, self._pc)
        return crashed(f"emulator error: {UcError(status)}", self._pc)

    def _on_exception(self, _uc: int, vector: int, _user: int) -> None:
        # Between two blocks: RIP is the faulting instruction's (the next one's for
        # int n, int3, into), and stopping here executes nothing more.
        try:
            env = self._env
            if self._event is None:
                self._event = Trap(vector, env.error_code, env.exception_is_int, env.eip)
        except BaseException as e:
            self._hook_failed(e)
        if self._uc is not None:
            native.emu_stop(self._uc)

    def _on_cpuid(self, _uc: int, _user: int) -> int:
        try:
            env = self._env
            if env.reg(0) & 0xFFFFFFFF != 1:
                return 0  # unicorn answers
            with self._platform.lock:
                eax, ebx, ecx, edx = cpuid_leaf1(self._apic)
            for index, value in ((0, eax), (3, ebx), (1, ecx), (2, edx)):
                env.set_reg(index, value)
            return 1
        except BaseException as e:
            self._hook_failed(e)
            return 0

    def _on_unmapped(self, _uc: int, access: int, address: int, size: int, _value: int, _user: int) -> bool:
        # Only addresses beyond every RAM and MMIO mapping get here (above the identity
        # map, where KVM's page walk would fault first).
        if self._fault is None:
            fetch = access == UC_MEM_FETCH_UNMAPPED
            what = "instruction fetch from" if fetch else "write to" if access == UC_MEM_WRITE_UNMAPPED else "read from"
            rip: int | None = address
            if not fetch:
                try:
                    rip = read_pc(self._uc) if self._uc is not None else None
                except BaseException:
                    rip = None
            detail = f"{what} guest-physical {address:#x} (size {size}): nothing is mapped there"
            self._fault = crashed(detail, rip)
        return False  # unicorn stops with UC_ERR_*_UNMAPPED

    def _mmio_read(self, _uc: int, offset: int, size: int, base: int | None) -> int:
        addr = (base or 0) + offset
        if APIC_BASE <= addr < APIC_BASE + APIC_SIZE and self._apic.enabled:
            with self._platform.lock:
                return self._apic.read(addr - APIC_BASE, size)
        if IOAPIC_BASE <= addr < IOAPIC_END:
            self._unmodelled(f"the emulator does not model the IOAPIC (MMIO read at {addr:#x})")
            return _all_ones(size)
        bus = self._bus
        if bus is None or self._gate.requested:
            return _all_ones(size)
        self.counts.mmio += 1
        try:
            data = memoryview(bytearray(size))
            dispatch(bus, MmioRead(addr, data))
            return int.from_bytes(data, "little")
        except BaseException as e:
            self._hook_failed(e)
            return _all_ones(size)

    def _mmio_write(self, _uc: int, offset: int, size: int, value: int, base: int | None) -> None:
        addr = (base or 0) + offset
        if APIC_BASE <= addr < APIC_BASE + APIC_SIZE and self._apic.enabled:
            try:
                with self._platform.lock:
                    self._apic.write(addr - APIC_BASE, size, value)
            except Unmodelled as e:
                self._unmodelled(str(e))
            except BaseException as e:
                self._hook_failed(e)
            return
        if IOAPIC_BASE <= addr < IOAPIC_END:
            self._unmodelled(f"the emulator does not model the IOAPIC (MMIO write at {addr:#x})")
            return
        bus = self._bus
        if bus is None or self._gate.requested:
            return
        self.counts.mmio += 1
        try:
            dispatch(bus, MmioWrite(addr, memoryview(value.to_bytes(size, "little"))))
        except BaseException as e:
            self._hook_failed(e)
