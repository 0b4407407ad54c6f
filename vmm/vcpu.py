"""``Vcpu``: one vCPU fd, its shared ``kvm_run`` page, one method per ioctl, and ``run()``."""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import kvm_abi as abi
from kvm_abi import EHWPOISON, ExitReason, KvmError, ffi
from kvm_abi.types import Cpuid2, Fpu, MemoryMapping, PreFaultRange, Regs, Sregs
from vmm import exits as ex
from vmm.errors import ConfigError

KICK_SIGNAL = signal.SIGRTMIN
"""The signal that kicks a vCPU thread out of KVM_RUN (with immediate_exit set first)."""

_kick_installed = False
_kick_lock = threading.Lock()


def ensure_kick_handler() -> bool:
    """Make KICK_SIGNAL interrupt KVM_RUN: a C no-op handler installed from any thread
    (compiled cffi), else a Python one (main thread only). Idempotent; returns True.

    Raises ConfigError when neither can be installed (cffi ABI mode, off the main thread):
    the signal's default action would kill the process, and without the signal a vCPU
    inside KVM_RUN (an in-kernel HLT, a guest that never exits) cannot be stopped. Call it
    before creating anything that would need a kick; :meth:`Vcpu.kick` never sends the
    signal without it.
    """
    global _kick_installed
    with _kick_lock:
        if _kick_installed:
            return True
        if abi.install_kick_handler(KICK_SIGNAL):
            _kick_installed = True
        elif threading.current_thread() is threading.main_thread():
            signal.signal(KICK_SIGNAL, lambda signo, frame: None)
            signal.siginterrupt(KICK_SIGNAL, True)
            _kick_installed = True
        else:
            raise ConfigError(
                "cannot install the vCPU kick signal handler off the main thread without kvm_abi's compiled "
                "module: run the VMM from the main thread, or reinstall the project with a C compiler"
            )
        return True


def kick_handler_installed() -> bool:
    """Whether :func:`ensure_kick_handler` has installed the kick handler in this process."""
    return _kick_installed


_EXIT_IO = int(ExitReason.IO)
_EXIT_MMIO = int(ExitReason.MMIO)
_MMIO_DATA_OFFSET = ffi.offsetof("struct kvm_run", "mmio") + 8  # phys_addr, then data[8]


class Vcpu:
    """A vCPU of a :class:`~vmm.vm.Vm` (create it with ``vm.create_vcpu(index)``).

    ``run()`` returns a typed exit (:mod:`vmm.exits`); ``kick()`` from any other thread
    makes a running ``run()`` return ``INTERRUPTED`` promptly.
    """

    __slots__ = (
        "index",
        "name",
        "_fd",
        "run_struct",
        "_map_addr",
        "_map_size",
        "_view",
        "_thread",
        "_lock",
        "__weakref__",
    )

    def __init__(self, index: int, fd: int, mmap_size: int) -> None:
        self.index = index
        self.name = f"vcpu{index}"
        self._fd = fd
        self._map_size = mmap_size
        # MAP_SHARED and the size from KVM_GET_VCPU_MMAP_SIZE: the PIO data page follows
        # kvm_run, and writes to immediate_exit or to IN data must reach the kernel.
        self._map_addr = abi.libc_mmap(mmap_size, abi.PROT_READ | abi.PROT_WRITE, abi.MAP_SHARED, fd)
        self.run_struct: Any = ffi.cast("struct kvm_run *", self._map_addr)
        self._view: memoryview | None = memoryview(ffi.buffer(ffi.cast("char *", self._map_addr), mmap_size))
        self._thread: int | None = None
        self._lock = threading.Lock()

    # --- lifetime ------------------------------------------------------------------------
    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError(f"{self.name} is closed")
        return self._fd

    def coalesced_ring(self) -> Any:
        """The VM's coalesced-write ring (``struct kvm_coalesced_mmio_ring *``) at page
        KVM_COALESCED_MMIO_PAGE_OFFSET of this mapping, or None when the mapping has no
        such page. Valid until the vCPU is closed; the kernel writes ``last`` and the
        entries, the VMM ``first``: check every value read from it."""
        offset = abi.KVM_COALESCED_MMIO_PAGE_OFFSET * abi.PAGE_SIZE
        if self._fd < 0 or self._map_size < offset + abi.PAGE_SIZE:
            return None
        return ffi.cast("struct kvm_coalesced_mmio_ring *", self._map_addr + offset)

    @property
    def shared_page(self) -> memoryview:
        """The whole vCPU mapping (kvm_run, then the PIO data page)."""
        if self._view is None:
            raise ValueError(f"{self.name} is closed")
        return self._view

    def close(self) -> None:
        """Unmap kvm_run and close the fd (idempotent). The vCPU must not be running."""
        if self._fd < 0:
            return
        if self._view is not None:
            self._view.release()
            self._view = None
        abi.libc_munmap(self._map_addr, self._map_size)
        fd, self._fd = self._fd, -1
        os.close(fd)

    def __enter__(self) -> Vcpu:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Vcpu({self.index}, fd={self._fd})"

    def _ioctl(self, op: abi.Ioctl, arg: Any = 0, detail: str = "") -> int:
        return abi.ioctl(self.fd, op, arg, target=self.name, detail=detail)

    # --- registers -----------------------------------------------------------------------
    def get_regs(self) -> Regs:
        """KVM_GET_REGS: an owned ``struct kvm_regs *``."""
        regs = ffi.new("struct kvm_regs *")
        self._ioctl(abi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: Regs) -> None:
        """KVM_SET_REGS from a ``struct kvm_regs *``."""
        self._ioctl(abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> Sregs:
        """KVM_GET_SREGS: an owned ``struct kvm_sregs *``."""
        sregs = ffi.new("struct kvm_sregs *")
        self._ioctl(abi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: Sregs) -> None:
        """KVM_SET_SREGS from a ``struct kvm_sregs *``."""
        self._ioctl(abi.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> Fpu:
        """KVM_GET_FPU: an owned ``struct kvm_fpu *``."""
        fpu = ffi.new("struct kvm_fpu *")
        self._ioctl(abi.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: Fpu) -> None:
        """KVM_SET_FPU from a ``struct kvm_fpu *``."""
        self._ioctl(abi.KVM_SET_FPU, fpu)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS: values of the MSRs read; KVM stops at the first it cannot read."""
        wanted = list(indices)
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(wanted), "entries": len(wanted)})
        for i, index in enumerate(wanted):
            msrs.entries[i].index = index
        done = self._ioctl(abi.KVM_GET_MSRS, msrs)
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(done)}

    def set_msrs(self, values: Mapping[int, int]) -> int:
        """KVM_SET_MSRS: returns how many were set (KVM stops at the first it refuses)."""
        items = list(values.items())
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": len(items)})
        for i, (index, data) in enumerate(items):
            msrs.entries[i].index = index
            msrs.entries[i].data = data
        return self._ioctl(abi.KVM_SET_MSRS, msrs)

    def set_cpuid2(self, cpuid: Cpuid2) -> None:
        """KVM_SET_CPUID2 from a ``struct kvm_cpuid2 *`` (e.g. Kvm.get_supported_cpuid())."""
        self._ioctl(abi.KVM_SET_CPUID2, cpuid, detail=f"nent={cpuid.nent}")

    def get_cpuid2(self, max_entries: int = abi.KVM_MAX_CPUID_ENTRIES) -> Cpuid2:
        """KVM_GET_CPUID2: an owned ``struct kvm_cpuid2 *``."""
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
        self._ioctl(abi.KVM_GET_CPUID2, cpuid)
        return cpuid

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE (see kvm_abi.MpState)."""
        state = ffi.new("struct kvm_mp_state *")
        self._ioctl(abi.KVM_GET_MP_STATE, state)
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        """KVM_SET_MP_STATE."""
        self._ioctl(abi.KVM_SET_MP_STATE, ffi.new("struct kvm_mp_state *", {"mp_state": mp_state}))

    def set_guest_debug(self, control: int, debugreg: Iterable[int] = ()) -> None:
        """KVM_SET_GUEST_DEBUG (KVM_GUESTDBG_* bits; up to 8 debug registers)."""
        dbg = ffi.new("struct kvm_guest_debug *", {"control": control})
        for i, value in enumerate(debugreg):
            dbg.arch.debugreg[i] = value
        self._ioctl(abi.KVM_SET_GUEST_DEBUG, dbg)

    def translate(self, gva: int) -> tuple[int, bool]:
        """KVM_TRANSLATE: (guest-physical address, valid) for a guest-virtual one."""
        tr = ffi.new("struct kvm_translation *", {"linear_address": gva})
        self._ioctl(abi.KVM_TRANSLATE, tr, detail=f"gva={gva:#x}")
        return int(tr.physical_address), bool(tr.valid)

    # --- memory population ---------------------------------------------------------------
    def pre_fault_memory(self, rng: PreFaultRange) -> int:
        """KVM_PRE_FAULT_MEMORY on a ``struct kvm_pre_fault_memory *``, updated in place
        (gpa advances, size shrinks). Returns 0 when at least one page was processed;
        raises KvmError otherwise. One call: loop until ``size == 0`` (vmm.prefault does)."""
        return self._ioctl(abi.KVM_PRE_FAULT_MEMORY, rng, detail=f"gpa={rng.gpa:#x} size={rng.size:#x}")

    def map_memory(self, mapping: MemoryMapping) -> int:
        """The RFC's KVM_MAP_MEMORY on a ``struct kvm_memory_mapping *`` (kernels that carry
        the March 2024 patches only; mainline answers EINVAL)."""
        return self._ioctl(
            abi.KVM_MAP_MEMORY, mapping, detail=f"base_gfn={mapping.base_gfn:#x} nr_pages={mapping.nr_pages}"
        )

    # --- running -------------------------------------------------------------------------
    def bind_thread(self) -> None:
        """Record the calling thread as the one running this vCPU (the kick target)."""
        with self._lock:
            self._thread = threading.get_ident()

    def unbind_thread(self) -> None:
        """Forget the running thread; later kicks only set immediate_exit."""
        with self._lock:
            self._thread = None

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN soon: immediate_exit first (covers a thread about
        to enter), then the kick signal (covers one inside). Safe from any thread.

        The signal is sent only once :func:`ensure_kick_handler` installed its handler (its
        default action kills the process); without it, immediate_exit alone takes effect at
        the vCPU's next exit."""
        with self._lock:
            if self._fd < 0:
                return
            self.run_struct.immediate_exit = 1
            if _kick_installed and self._thread is not None and self._thread != threading.get_ident():
                try:
                    signal.pthread_kill(self._thread, KICK_SIGNAL)
                except ProcessLookupError:
                    pass

    def run(self) -> ex.Exit:
        """KVM_RUN, then decode the exit. Payload views are valid until the next run().

        Returns ``INTERRUPTED`` after a kick or signal (immediate_exit is cleared), and
        a ``MemoryFault`` when KVM reports one with EFAULT; raises KvmError otherwise.
        """
        run = self.run_struct
        rc = abi.run_vcpu(self.fd, run)
        if rc < 0:
            err = -rc
            if err == errno.EINTR or err == errno.EAGAIN:
                run.immediate_exit = 0
                return ex.INTERRUPTED
            failure = self.decode_failure(err)
            if isinstance(failure, ex.RunFailed):
                raise KvmError(err, "KVM_RUN", self.name)
            return failure
        return self.decode_exit()

    def decode_failure(self, err: int) -> ex.MemoryFault | ex.RunFailed:
        """The exit for a KVM_RUN that failed with ``err`` (not EINTR/EAGAIN): a
        ``MemoryFault`` when KVM filled one in (EFAULT/EHWPOISON), else ``RunFailed``."""
        run = self.run_struct
        if err in (errno.EFAULT, EHWPOISON) and run.exit_reason == ExitReason.MEMORY_FAULT:
            mf = run.memory_fault
            return ex.MemoryFault(int(mf.flags), int(mf.gpa), int(mf.size))
        return ex.RunFailed(err, str(KvmError(err, "KVM_RUN", self.name)))

    def decode_exit(self) -> ex.Exit:
        """The typed exit for the current contents of kvm_run."""
        run = self.run_struct
        view = self.shared_page
        reason = run.exit_reason
        if reason == _EXIT_IO:
            io = run.io
            start = io.data_offset
            size, count = io.size, io.count
            data = view[start : start + size * count]
            if io.direction == abi.KVM_EXIT_IO_OUT:
                return ex.IoOut(io.port, size, count, data)
            return ex.IoIn(io.port, size, count, data)
        if reason == _EXIT_MMIO:
            m = run.mmio
            data = view[_MMIO_DATA_OFFSET : _MMIO_DATA_OFFSET + m.len]
            return ex.MmioWrite(m.phys_addr, data) if m.is_write else ex.MmioRead(m.phys_addr, data)
        if reason == ExitReason.HLT:
            return ex.HLT
        if reason == ExitReason.SHUTDOWN:
            return ex.SHUTDOWN
        if reason == ExitReason.INTR:
            return ex.INTERRUPTED
        if reason == ExitReason.FAIL_ENTRY:
            fe = run.fail_entry
            return ex.FailEntry(int(fe.hardware_entry_failure_reason), int(fe.cpu))
        if reason == ExitReason.INTERNAL_ERROR:
            return _decode_internal(run)
        if reason == ExitReason.SYSTEM_EVENT:
            se = run.system_event
            return ex.SystemEvent(int(se.type), tuple(se.data[0 : min(se.ndata, 16)]))
        if reason == ExitReason.DEBUG:
            arch = run.debug.arch
            return ex.Debug(int(arch.exception), int(arch.pc), int(arch.dr6))
        return ex.Unsupported(int(reason))


def _decode_internal(run: Any) -> ex.InternalError:
    internal = run.internal
    ndata = min(int(internal.ndata), 16)
    data = tuple(int(d) for d in internal.data[0:ndata])
    insn = b""
    if internal.suberror == abi.InternalError.EMULATION and ndata >= 2:
        ef = run.emulation_failure
        if ef.flags & abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
            insn = bytes(ef.insn_bytes[0 : min(ef.insn_size, 15)])
    return ex.InternalError(int(internal.suberror), data, insn)
