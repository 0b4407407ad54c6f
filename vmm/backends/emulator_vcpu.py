"""One emulated vCPU, :class:`EmulatorVcpuRunner`. The design is described in
:mod:`vmm.backends.emulator`."""

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
    UC_ERR_INSN_INVALID,
    UC_ERR_OK,
    UC_HOOK_BLOCK,
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
from unicorn.x86_const import UC_X86_INS_IN, UC_X86_INS_OUT

from vmm.backends import emulator_native as native
from vmm.backends.base import HALTED, STOPPED, ExitCounts, StopFlag, VcpuOutcome
from vmm.backends.emulator_memory import mmio_ranges, scratch_page
from vmm.backends.emulator_state import (
    NOT_DELIVERED,
    apply_state,
    describe_exception,
    enter_ring3,
    needs_ring3_entry,
    read_pc,
    read_regs,
    uc_mode_for,
    write_regs,
)
from vmm.backends.emulator_turns import Turns
from vmm.cpu.state import CpuState
from vmm.devices.bus import Bus
from vmm.errors import ConfigError, VmmError
from vmm.memory import PAGE_SIZE, GuestMemory

log = logging.getLogger("vmm.emulator")

NEVER = (1 << 64) - 1  # uc_emu_start's "until": an address no guest executes
CLOSE_WAIT_SECONDS = 2.0
KICK_RETRY_SECONDS = 0.001


def _all_ones(size: int) -> int:
    return (1 << (8 * size)) - 1


class EmulatorVcpuRunner:
    """One vCPU: a unicorn engine over the machine's RAM, driven by the machine's loop.
    The engine opens in :meth:`set_state` (its unicorn mode follows the CPU mode)."""

    def __init__(self, index: int, memory: GuestMemory, turns: Turns) -> None:
        self.index = index
        self.counts = ExitCounts()
        self._memory = memory
        self._turns = turns
        turns.members += 1
        self._uc: Uc | None = None
        self._uc_mode = UC_MODE_64
        self._pc = 0
        self._ram: set[tuple[int, int, int]] = set()
        self._mmio: list[tuple[int, int]] = []
        self._running = False  # inside uc_emu_start
        self._idle = threading.Event()  # not inside run_loop
        self._idle.set()
        self._bus: Bus | None = None
        self._fault: VcpuOutcome | None = None
        self._hook_error: BaseException | None = None
        # Closed by kick() and by a failed hook; hooks pass nothing to devices once closed.
        self._gate = StopFlag()
        # Raised by a vCPU waiting for the turn; the block hook then yields precisely.
        self._yield = StopFlag()
        self._yielded_at: int | None = None
        self._thread = 0  # ident of the thread in run_loop
        # unicorn keeps raw pointers to these: they live as long as the runner.
        self._mmio_read_cb = native.MmioReadCallback(self._mmio_read)
        self._mmio_write_cb = native.MmioWriteCallback(self._mmio_write)
        self._intr_cb = native.IntrCallback(self._on_exception)
        self._unmapped_cb = native.UnmappedCallback(self._on_unmapped)
        self._io_callbacks: list[Any] = []

    # --- engine and memory map -----------------------------------------------------------
    def _open_engine(self, uc_mode: int) -> Uc:
        self._close_engine()
        uc = Uc(UC_ARCH_X86, uc_mode)
        self._uc, self._uc_mode = uc, uc_mode
        try:
            native.hook_add(uc, UC_HOOK_INTR, self._intr_cb)
            native.hook_add(uc, UC_HOOK_MEM_UNMAPPED, self._unmapped_cb)
            self.sync_memory()
        except BaseException:
            self._close_engine()
            raise
        return uc

    def _close_engine(self) -> None:
        uc, self._uc = self._uc, None
        self._ram, self._mmio = set(), []
        if uc is not None:
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
        """Open a fresh engine for ``state.mode`` and load ``state`` into it."""
        if not self._idle.is_set():
            raise VmmError(f"vCPU {self.index}: cannot set the state of a running vCPU")
        uc = self._open_engine(uc_mode_for(state.mode))
        self._fault = None
        apply_state(uc, self._uc_mode, state)
        if needs_ring3_entry(state):
            self._enter_ring3(uc, state)
            write_regs(uc, self._uc_mode, state.regs)
        self._pc = state.regs.get("rip", 0)

    def _enter_ring3(self, uc: Uc, state: CpuState) -> None:
        page = scratch_page(self._memory)
        if page is None or (page, PAGE_SIZE) not in self._mmio:
            raise ConfigError("the emulator needs a page without RAM below 4 GiB to enter ring 3")
        # Lend the MMIO scratch page to the entry stub as private RAM, then give it back.
        uc.mem_unmap(page, PAGE_SIZE)
        try:
            uc.mem_map(page, PAGE_SIZE, UC_PROT_ALL)
            try:
                enter_ring3(uc, state, page)
            except ConfigError as e:
                if self._fault is not None:
                    raise ConfigError(f"{e}: {self._fault.detail}") from e
                raise
            finally:
                uc.mem_unmap(page, PAGE_SIZE)
        finally:
            native.mmio_map(uc, page, PAGE_SIZE, self._mmio_read_cb, self._mmio_write_cb)

    def regs(self) -> dict[str, int]:
        if self._uc is None:
            raise VmmError(f"vCPU {self.index} has no state (closed, or set_state() not called)")
        return read_regs(self._uc, self._uc_mode)

    def kick(self) -> None:
        self._gate.requested = True
        self._turns.wake()
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
        self._yield.requested = True

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
        """True once the engine is released (or before set_state opened one)."""
        return self._uc is None

    # --- the run loop --------------------------------------------------------------------
    def run_loop(self, bus: Bus, stop: StopFlag) -> VcpuOutcome:
        uc = self._uc
        if uc is None:
            raise VmmError(f"vCPU {self.index}: set_state() first")
        self._bus = bus
        self._hook_error = None
        self._gate.requested = False
        self._thread = threading.get_ident()
        self._idle.clear()
        try:
            hooks, io_count = self._install_hooks(uc, bus)
            try:
                return self._loop(uc, stop)
            finally:
                for hook in hooks:
                    native.hook_del(uc, hook)
                self.counts.io += io_count()
        finally:
            self._bus = None
            self._idle.set()

    def _install_hooks(self, uc: Uc, bus: Bus) -> tuple[list[int], Callable[[], int]]:
        """The IN and OUT hooks, the hot path: closures over the bus's per-port tables,
        one flag test, one dict lookup and one device call per access, as in the KVM loop.
        With other vCPUs to share the turn with, also a block hook: the one precise place
        to yield (see :meth:`_loop`). Returns the hook handles and a function giving the
        number of port accesses."""
        out_table, in_table = bus.pio_handlers()
        views = {n: memoryview(bytearray(n)) for n in (1, 2, 4)}
        one = views[1]
        # After a stop (kick) or a failed hook KVM would not run the guest again, so the
        # rest of unicorn's translation block must not reach the devices either.
        gate = self._gate
        failed = self._hook_failed
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
                else:
                    bus.pio_write(port, size, data)
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
                else:
                    bus.pio_read(port, size, data)
                return int.from_bytes(data, "little")
            except BaseException as e:
                failed(e)
                return _all_ones(size)

        def count() -> int:
            return n

        yield_flag = self._yield
        runner = self

        def on_block(handle: int, address: int, _size: int, _user: int) -> None:
            # Called on entering a translation block, before any of it executes: stopping
            # here leaves RIP at the block's start with nothing half done.
            if yield_flag.requested:
                runner._yielded_at = address
                native.emu_stop_handle(handle)

        callbacks = [native.OutCallback(on_out), native.InCallback(on_in)]
        wanted = [(callbacks[0], ctypes.c_int(UC_X86_INS_OUT)), (callbacks[1], ctypes.c_int(UC_X86_INS_IN))]
        if self._turns.members > 1:
            callbacks.append(native.BlockCallback(on_block))
        # Kept until close(): unicorn frees a deleted hook only after its next emulation.
        self._io_callbacks += callbacks
        hooks: list[int] = []
        try:
            for callback, insn in wanted:
                hooks.append(native.hook_add(uc, UC_HOOK_INSN, callback, insn))
            if len(callbacks) > 2:
                hooks.append(native.hook_add(uc, UC_HOOK_BLOCK, callbacks[2]))
        except BaseException:
            for hook in hooks:
                native.hook_del(uc, hook)
            raise
        return hooks, count

    def _loop(self, uc: Uc, stop: StopFlag) -> VcpuOutcome:
        """Run until HLT, a fault, or a stop. ``uc_emu_start`` returns without an error on
        HLT and on ``uc_emu_stop``; every stop is ours, so what is left is HLT.

        Only stops at precise points are resumed: a hook's (the block hook's yield, an
        I/O hook's), where RIP is exact. A stop from another thread (a kick) can land
        inside a read-modify-write instruction with RIP left at its start (measured:
        resuming then repeats it), so a kick ends the loop for good, as on KVM.
        """
        turns = self._turns
        counts = self.counts
        gate = self._gate
        while True:
            if stop.requested or not turns.acquire(self, stop, gate):
                return STOPPED
            self._yield.requested = False
            self._yielded_at = None
            status = UC_ERR_OK
            # _running goes up before the last look at the gate: a kick either sees it
            # (and repeats uc_emu_stop until the engine returns) or is seen here.
            self._running = True
            try:
                if stop.requested or gate.requested:
                    return STOPPED
                uc.emu_start(self._pc, NEVER)
            except UcError as e:
                status = e.errno
            finally:
                self._running = False
                self._pc = read_pc(uc, self._uc_mode)
                turns.release(self)
            error, self._hook_error = self._hook_error, None
            if error is not None:
                raise error  # strict mode's UnhandledAccess, or a device's bug: as on KVM
            if self._fault is not None:
                counts.other += 1
                return self._fault
            if status != UC_ERR_OK:
                counts.other += 1
                return self._engine_error(status)
            if stop.requested or gate.requested:
                return STOPPED
            if self._yielded_at is not None:
                counts.interrupted += 1  # gave the turn away; resume at RIP
                continue
            counts.hlt += 1
            return HALTED

    # --- rare paths: faults and MMIO -----------------------------------------------------
    def _hook_failed(self, error: BaseException) -> None:
        if self._hook_error is None:
            self._hook_error = error
        self._gate.requested = True
        if self._uc is not None:
            native.emu_stop(self._uc)

    def _engine_error(self, status: int) -> VcpuOutcome:
        if status == UC_ERR_INSN_INVALID:
            return VcpuOutcome("crashed", f"{describe_exception(6)} {NOT_DELIVERED}", self._pc)
        if status == UC_ERR_FETCH_PROT:  # unicorn maps MMIO ranges non-executable
            detail = f"instruction fetch from guest-physical {self._pc:#x}, which has no RAM (MMIO)"
            return VcpuOutcome("crashed", detail, self._pc)
        return VcpuOutcome("crashed", f"emulator error: {UcError(status)}", self._pc)

    def _on_exception(self, _uc: int, vector: int, _user: int) -> None:
        # Unicorn calls this instead of delivering the exception; RIP is still the
        # faulting instruction's. Stop here: resuming would skip it.
        try:
            if self._fault is None and self._uc is not None:
                rip = read_pc(self._uc, self._uc_mode)
                self._fault = VcpuOutcome("crashed", f"{describe_exception(vector)} {NOT_DELIVERED}", rip)
        except BaseException as e:
            self._hook_failed(e)
        if self._uc is not None:
            native.emu_stop(self._uc)

    def _on_unmapped(self, _uc: int, access: int, address: int, size: int, _value: int, _user: int) -> bool:
        # Only addresses beyond every RAM and MMIO mapping get here (above the identity
        # map, where KVM's page walk would fault first).
        if self._fault is None:
            fetch = access == UC_MEM_FETCH_UNMAPPED
            what = "instruction fetch from" if fetch else "write to" if access == UC_MEM_WRITE_UNMAPPED else "read from"
            rip: int | None = address
            if not fetch:
                try:
                    rip = read_pc(self._uc, self._uc_mode) if self._uc is not None else None
                except BaseException:
                    rip = None
            detail = f"{what} guest-physical {address:#x} (size {size}): nothing is mapped there"
            self._fault = VcpuOutcome("crashed", detail, rip)
        return False  # unicorn stops with UC_ERR_*_UNMAPPED

    def _mmio_read(self, _uc: int, offset: int, size: int, base: int | None) -> int:
        bus = self._bus
        if bus is None or self._gate.requested:
            return _all_ones(size)
        self.counts.mmio += 1
        try:
            data = memoryview(bytearray(size))  # zeroed, as the KVM loop hands it over
            bus.mmio_read((base or 0) + offset, data)
            return int.from_bytes(data, "little")
        except BaseException as e:
            self._hook_failed(e)
            return _all_ones(size)

    def _mmio_write(self, _uc: int, offset: int, size: int, value: int, base: int | None) -> None:
        bus = self._bus
        if bus is None or self._gate.requested:
            return
        self.counts.mmio += 1
        try:
            bus.mmio_write((base or 0) + offset, memoryview(value.to_bytes(size, "little")))
        except BaseException as e:
            self._hook_failed(e)
